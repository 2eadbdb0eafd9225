"""Multi-target ridge regression for the decoders: exact, fast, memory-bounded, on the GPU when there is one.

The decoders map voxels X (n samples, p voxels) to features Y (n, t): VAE latents z (t = 16,384), CLIP text
embeddings c (15 x 768) and CLIP vision layers (6 x 38,400). :class:`RidgeDecoder` fits all targets at once in
three modes (docs/method.md, rows "decoder" and "voxels per feature"):

- ``cv="loo"`` (default): one alpha per target, chosen from a grid by efficient leave-one-out, with exactly the
  semantics of scikit-learn's ``RidgeCV(alphas, alpha_per_target=True)`` (squared error, intercept fitted,
  the first best alpha of the grid on ties). One eigendecomposition of the centred training voxels serves
  every alpha and every target.
- ``cv="gcv"``: generalised cross-validation, the same with the per-sample leverages replaced by their mean;
  far cheaper (no n x n product per alpha), not what scikit-learn computes.
- ``n_select=...`` (FastL2LiR, the released code's decoder): for each target, the ``n_select`` voxels most
  correlated with it on the training set, then ridge with one fixed alpha on standardised voxels.
  :meth:`RidgeDecoder.fastl2lir` builds it with the released settings (alpha 0.15).

The maths of the LOO mode (Xc, Yc: X and Y centred on the training set; k = min(n, p)):

- n <= p ("gram"): K = Xc Xc' = Q diag(lam) Q' with Q (n, n). The LOO residual of target y at alpha a is
  r / d with r = Q (f * Q'y), f = a / (lam + a), and d_i = 1 - H_ii, H the hat matrix including the
  intercept: d = (Q*Q) f - Q (f * Q'1) / n. This is scikit-learn's ``_RidgeGCV`` "gram" mode multiplied
  through by a (its ``c / d`` with ``c = a r``), written so that r never comes from a subtraction.
- n > p ("cov"): Xc'Xc = V diag(lam) V', A = Xc V (n, p). r = y - A (g * A'y), g = 1 / (lam + a), and
  d = 1 - (A*A) g - (1 - A (g * A'1)) / n: scikit-learn's "cov" mode.
- The LOO mean squared error of (target, alpha) is mean_i (r_i / d_i)^2; the chosen alpha minimises it.
  Coefficients: W = Xc' Q diag(1 / (lam + a)) Q'y (gram) or V diag(1 / (lam + a)) A'y (cov).

Cost: the decomposition is O(n p min(n, p)) once; each (target, alpha) LOO evaluation is an (n x k) product,
k = min(n, p). Two things keep that affordable for 10^5 targets:

- Pruning with exact bounds: ||r||^2 costs O(k) per (target, alpha) from z = Q'y, and LOO >=
  ||r||^2 / (n max d^2). Alphas are evaluated lowest-bound first; an alpha whose lower bound exceeds the best
  LOO found so far cannot win and is never evaluated (each evaluation also tightens the other alphas' bounds
  by the triangle inequality). The chosen alpha is the same as without pruning; how many alphas were
  evaluated per target is in ``timings_["loo_evals_per_target"]`` (benchmarks/README.md: a few of the grid).
- float32 where it is safe: the decomposition, the leverages d and all bounds are float64; the per-chunk
  products (Q'Y, the LOO residuals, the coefficients) run in ``dtype`` (float32 by default). Every float32
  LOO value carries a rounding-error bound (:func:`_resid_error`, :func:`_loo_error`, with the safety factor
  ``_ERR_SAFETY`` over the errors measured on well- and ill-conditioned problems); the few targets whose best
  and runner-up alphas are closer than their bounds are re-done in float64, so the chosen alphas are those of
  the float64 computation. Predictions then agree with scikit-learn's float64 ones to float32's resolution
  (the tests ask for 1e-4 relative; benchmarks/README.md has the measured differences).
  ``dtype=torch.float64`` computes everything in float64.
- Ties and the limits of "identical": scikit-learn keeps the first best alpha of the grid, and so does this
  module (exact ties: constant targets, repeated alphas). On numerically singular X (condition number
  ~1e15) float64 LOO values themselves are only good to ~1e-8 relative, and two alphas that close may be
  ordered differently than by scikit-learn, whose eigendecomposition rounds differently (predictions still
  agree to ~1e-7).

Memory: targets are processed in chunks (``chunk_size``, or as many as ``memory_gb`` allows after the
decomposition). :meth:`RidgeDecoder.fit` keeps ``coef_`` (p, t) in ``dtype``: p x t x 4 bytes, 16 GB for
subject 1's 15,724 voxels x 258k features, so it refuses when that exceeds ``memory_gb``;
:meth:`RidgeDecoder.fit_predict` streams the chunks (fit, predict the test set, discard the coefficients) and
keeps only the chosen alphas and the predictions. Y itself may be anything sliceable by columns (a memmap,
an HDF5 dataset, a :class:`ColumnStack` of several feature arrays), so it need not fit in memory either.
Fitted decoders are saved with :meth:`RidgeDecoder.save` as safetensors with JSON metadata (no pickles).

Taught in the decoding lessons; benchmarked in ``benchmarks/bench_ridge.py`` (against scikit-learn and
himalaya; the measured times, memory and differences are in benchmarks/README.md).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

import mdlib
from mdlib.device import resolve_device
from mdlib.progress import bar as progress_bar
from mdlib.stats import pearson

#: The default alpha grid: 13 values, 0.1 ... 1e5, half a decade apart.
DEFAULT_ALPHAS = np.logspace(-1, 5, 13)

#: The released code's FastL2LiR settings (docs/method.md): alpha on standardised voxels.
FASTL2LIR_ALPHA = 0.15

#: Bump when the saved file's meaning changes; :meth:`RidgeDecoder.load` refuses other versions.
FORMAT_VERSION = 1
_FORMAT_NAME = "mdlib.ridge.RidgeDecoder"
_META_KEY = "mdlib.ridge"

CV_MODES = ("loo", "gcv")
SELECT_MODES = ("abs", "signed")

#: Safety factor on the rounding-error model of :func:`_resid_error` (worst measured actual/model ratio: 0.3).
_ERR_SAFETY = 4.0

#: Bytes in a "GB" of ``memory_gb`` (GiB).
_GB = 2**30

PathLike = str | os.PathLike


# -- small helpers ------------------------------------------------------------------------------------------
def r2_from_mse(mse, Y) -> np.ndarray:
    """(t,) float64 R^2 of each target from its mean squared error, e.g. a decoder's leave-one-out ``cv_mse_``:
    1 - mse / var(Y), the variance over Y's rows (ddof 0); NaN for a constant target. Y: (n, t)."""
    var = np.asarray(Y, dtype=np.float64).var(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(var > 0, 1.0 - np.asarray(mse, dtype=np.float64) / np.where(var > 0, var, 1.0), np.nan)


def pearson_per_target(Y: np.ndarray, Y_hat: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Pearson r between each column of ``Y`` and of ``Y_hat``, computed in float64: (t,)
    (:func:`mdlib.stats.pearson`, a block of columns at a time).

    Args:
        Y: (n, t) or (n,) true values.
        Y_hat: predictions, same shape.
        chunk: columns per step (memory: 4 x n x chunk float64).

    Returns:
        (t,) float64 (a scalar array for 1-D input); NaN where either column is constant (r is undefined).
    """
    Y, Y_hat = np.asarray(Y), np.asarray(Y_hat)
    if Y.shape != Y_hat.shape:
        raise ValueError(f"Y and Y_hat must have the same shape, got {Y.shape} and {Y_hat.shape}")
    one_d = Y.ndim == 1
    Y2, H2 = (Y[:, None], Y_hat[:, None]) if one_d else (Y, Y_hat)
    r = np.empty(Y2.shape[1])
    for j0 in range(0, Y2.shape[1], chunk):
        r[j0:j0 + chunk] = pearson(Y2[:, j0:j0 + chunk], H2[:, j0:j0 + chunk], axis=0)
    return r[0] if one_d else r


class ColumnStack:
    """Several (n, t_i) arrays seen as one (n, sum t_i) array that :class:`RidgeDecoder` reads by columns.

    Decode z, c and the CLIP layers with one decomposition of X, without concatenating their features in
    memory: ``RidgeDecoder().fit_predict(X, ColumnStack([Yz, Yc, Yl1]), X_test)``; split the predictions
    back with :meth:`split`. The parts may be numpy arrays, memmaps or HDF5 datasets (anything with
    ``.shape`` and ``[:, j0:j1]`` slicing); 3-D parts are not reshaped for you: pass (n, t_i) views.
    """

    def __init__(self, arrays: Sequence):
        if not arrays:
            raise ValueError("ColumnStack needs at least one array")
        shapes = [tuple(a.shape) for a in arrays]
        if any(len(s) != 2 for s in shapes) or len({s[0] for s in shapes}) != 1:
            raise ValueError(f"ColumnStack needs 2-D arrays with the same number of rows, got shapes {shapes}")
        self.arrays = list(arrays)
        self.sizes = [s[1] for s in shapes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int)
        self.shape = (shapes[0][0], int(self.offsets[-1]))
        self.ndim = 2

    def __getitem__(self, key):
        if not (isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None) and isinstance(key[1], slice)
                and key[1].step in (None, 1)):
            raise TypeError("ColumnStack supports only [:, j0:j1] slicing")
        j0, j1, _ = key[1].indices(self.shape[1])
        parts = []
        for a, o0, o1 in zip(self.arrays, self.offsets[:-1], self.offsets[1:]):
            lo, hi = max(j0, o0), min(j1, o1)
            if lo < hi:
                parts.append(np.asarray(a[:, lo - o0:hi - o0]))
        if not parts:
            return np.empty((self.shape[0], 0))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def split(self, Y: np.ndarray) -> list[np.ndarray]:
        """Cut (m, sum t_i) columns (e.g. predictions) back into the parts' (m, t_i) blocks (views)."""
        return [Y[:, o0:o1] for o0, o1 in zip(self.offsets[:-1], self.offsets[1:])]


def _torch_dtype(dtype) -> torch.dtype:
    """torch.float32 / float64 from a torch dtype, numpy dtype or name."""
    if isinstance(dtype, torch.dtype):
        out = dtype
    else:
        name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype.replace("torch.", "")
        out = {"float32": torch.float32, "float64": torch.float64}.get(name)
    if out not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _as_2d_x(X, name: str) -> np.ndarray:
    """X as a 2-D floating numpy array (a view when possible), with a clear error otherwise."""
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, voxels), got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.floating) or X.dtype == np.float16:
        X = X.astype(np.float32)
    return X


def _check_finite(A: np.ndarray, name: str, col_offset: int = 0, what: str = "columns") -> None:
    """Raise ValueError naming the count and the rows/columns of NaN/inf values (scanned in column blocks)."""
    step = max(1, 2**26 // max(1, A.shape[0]))
    bad_rows, bad_cols, count = set(), [], 0
    for j0 in range(0, A.shape[1], step):
        bad = ~np.isfinite(A[:, j0:j0 + step])
        if bad.any():
            count += int(bad.sum())
            rows, cols = np.nonzero(bad)
            bad_rows.update(rows[:1000].tolist())
            bad_cols.extend((np.unique(cols) + j0 + col_offset).tolist())
    if count:
        rows = sorted(bad_rows)
        raise ValueError(f"{name} has {count} NaN/inf values in {len(bad_cols)} {what} (first: "
                         f"{bad_cols[:5]}) and rows {rows[:5]}{' ...' if len(rows) > 5 else ''}; "
                         "remove or impute them before fitting")


def _slices(total: int, step: int) -> Iterator[slice]:
    for i in range(0, total, step):
        yield slice(i, min(total, i + step))


# -- the decomposition --------------------------------------------------------------------------------------
class _Standardised:
    """(X - mean) / scale, handed out in float64 blocks on the device so that no full float64 copy exists."""

    def __init__(self, X: np.ndarray, mean: np.ndarray, scale: np.ndarray, device: torch.device):
        self.X, self.device = X, device
        self.mean = torch.as_tensor(mean, dtype=torch.float64, device=device)
        self.scale = torch.as_tensor(scale, dtype=torch.float64, device=device)
        # Blocks of about 128 MB of float64.
        self.row_step = max(1, 2**24 // X.shape[1])
        self.col_step = max(1, 2**24 // X.shape[0])

    def rows(self, X: np.ndarray | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
        X = self.X if X is None else X
        for s in _slices(X.shape[0], self.row_step):
            yield s, (torch.as_tensor(X[s], device=self.device).double() - self.mean) / self.scale

    def cols(self, X: np.ndarray | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
        X = self.X if X is None else X
        for s in _slices(X.shape[1], self.col_step):
            block = torch.as_tensor(np.ascontiguousarray(X[:, s]), device=self.device).double()
            yield s, (block - self.mean[s]) / self.scale[s]


def _eigh(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric float64 matrix (LAPACK syevd / cuSOLVER).

    torch's, also on the CPU: numpy's LAPACK is OpenBLAS, whose threads keep spinning after a call and
    slowed every following torch (OpenMP) operation 50-fold on a 2-core machine.
    """
    return torch.linalg.eigh(S)


class _Decomposition:
    """What every alpha and target chunk shares: the eigendecomposition and the leverages.

    Attributes (device tensors; k = n in gram mode, p in cov mode):
        mode: "gram" (n <= p) or "cov" (n > p), as scikit-learn picks them.
        lam: (k,) float64 eigenvalues of Xc Xc' (gram) or Xc' Xc (cov).
        M64, M: (n, k) Q (gram) or A = Xc V (cov), in float64 and in the compute dtype.
        V: (p, k) float64 eigenvectors of Xc'Xc (cov mode only).
        one: (k,) M' 1 (about 0: X is centred; kept because scikit-learn's formula keeps it).
    """

    def __init__(self, xs: _Standardised, n: int, p: int, dtype: torch.dtype):
        dev = xs.device
        self.n, self.p = n, p
        self.mode = "gram" if n <= p else "cov"
        self.V = None
        if self.mode == "gram":
            K = torch.zeros(n, n, dtype=torch.float64, device=dev)
            for _, b in xs.cols():
                K.addmm_(b, b.T)
            self.lam, self.M64 = _eigh(K)
            del K
        else:
            C = torch.zeros(p, p, dtype=torch.float64, device=dev)
            for _, b in xs.rows():
                C.addmm_(b.T, b)
            self.lam, self.V = _eigh(C)
            del C
            self.M64 = torch.empty(n, p, dtype=torch.float64, device=dev)
            for s, b in xs.rows():
                self.M64[s] = b @ self.V
        self.k = self.M64.shape[1]
        self.M = self.M64 if dtype == torch.float64 else self.M64.to(dtype)
        self.one = self.M64.sum(0)

    def alpha_terms(self, alphas: torch.Tensor) -> dict:
        """Per-alpha quantities shared by all targets, for an (m,) float64 grid.

        Returns a dict of float64 tensors: w (k, m) weights of z in the residual (r = [y +] M (w * z)),
        d (n, m) = 1 - diag(H), f (k, m) = a / (lam + a), and the bound helpers (see ``_loo_sweep``).
        """
        lam, n = self.lam, self.n
        a = alphas[None, :]
        f = a / (lam[:, None] + a)
        g = 1.0 / (lam[:, None] + a)
        if self.mode == "gram":
            # scikit-learn: d = diag(G^-1) - (G^-1 1) 1/n with G = K + aI; times a, as r = a c.
            w = f
            d = (self.M64 ** 2) @ f - self.M64 @ (f * self.one[:, None]) / n
            r2_coef = f ** 2                                 # ||r||^2 = sum_k f^2 z^2
        else:
            w = -g
            d = 1.0 - (self.M64 ** 2) @ g - (1.0 - self.M64 @ (g * self.one[:, None])) / n
            r2_coef = (1.0 + f) * g                          # ||r||^2 = ||y||^2 - sum_k (1 + f) g z^2
        # ||M (w_a - w_b) z||^2 = sum_k (w_a - w_b)_k^2 lam_k^[cov] z_k^2: distance between two alphas' residuals;
        # pair_w[:, a * m + b] holds (w_a - w_b)^2 lam^[cov].
        # (k, m * m) memory: kept for grids up to 32 alphas (beyond, the bounds are not tightened).
        lam_w = lam.clamp_min(0)[:, None, None] if self.mode == "cov" else 1.0
        m = w.shape[1]
        pair_w = ((w[:, :, None] - w[:, None, :]) ** 2 * lam_w).reshape(len(lam), -1) if m <= 32 else None
        dabs = d.abs()
        # How much of an error in z reaches r (see _loo_error): f (gram) or lam g = 1 - f (cov), per alpha.
        omega = (f if self.mode == "gram" else 1.0 - f).norm(dim=0)
        return dict(w=w, f=f, g=g, d=d, r2_coef=r2_coef, pair_w=pair_w, dmin=dabs.min(0).values,
                    dmax=dabs.max(0).values, d_mean=d.mean(0), omega=omega)


# -- the decoder --------------------------------------------------------------------------------------------
class RidgeDecoder:
    """Multi-target ridge regression from voxels to features, scikit-learn-like (fit / predict / score).

    Args:
        alphas: the grid for ``cv`` (positive). Ignored when ``fixed_alpha`` is given.
        cv: ``"loo"`` (efficient leave-one-out, identical to ``sklearn.linear_model.RidgeCV(alphas,
            alpha_per_target=True)``) or ``"gcv"`` (generalised cross-validation; faster, not identical).
        fixed_alpha: one alpha for every target, no cross-validation (required with ``n_select``).
        n_select: FastL2LiR mode: per target, keep the ``n_select`` voxels most correlated with it on the
            training set (Pearson r), then ridge with ``fixed_alpha``. ``None``: all voxels.
        select: ``"abs"`` ranks voxels by |r| (FastL2LiR's rule, the released code's); ``"signed"`` by r.
        standardize_x: divide centred voxels by their training sd (ddof 0, as sklearn's StandardScaler; a
            constant voxel keeps scale 1). ``None``: True in FastL2LiR mode (the released code standardises),
            False otherwise (then ``cv="loo"`` equals RidgeCV on X as given).
        device: torch device; ``None``: CUDA when available, else the CPU (a missing CUDA falls back with a
            warning).
        dtype: compute dtype of the per-chunk products and of ``coef_``/predictions: torch.float32 (default)
            or torch.float64 (everything in float64, scikit-learn's arithmetic). The decomposition is always
            float64, and chosen alphas are float64's in both (see the module docstring).
        chunk_size: targets per chunk; ``None``: as many as ``memory_gb`` allows.
        memory_gb: working-memory budget in GiB (device memory on a GPU) for the decomposition and the target
            chunks; X, Y, the predictions and ``coef_`` come on top. :meth:`fit` refuses when ``coef_`` alone
            would exceed it.
        progress: show a tqdm bar over targets.

    Fitted attributes:
        alpha_: (t,) the alpha of each target.
        cv_mse_: (t,) LOO (or GCV) mean squared error at ``alpha_`` (None for a fixed alpha).
        coef_: (p, t) in ``dtype`` after :meth:`fit` (note: scikit-learn's is (t, p)); None after
            :meth:`fit_predict`. In FastL2LiR mode it is assembled on demand from ``selected_``/``sel_coef_``.
        selected_, sel_coef_: FastL2LiR mode: (t, n_select) indices of each target's voxels (ascending),
            int32, and their coefficients.
        x_mean_, x_scale_: (p,) float64 training mean and scale of the voxels (scale 1 unless standardised).
        y_mean_: (t,) float64 training mean of the targets: predict(X) = (X - x_mean_) / x_scale_ @ coef_ + y_mean_.
        timings_: seconds spent on the set-up (decomposition or X'X) and on the targets, the chunk size, and
            (LOO) the mean number of alphas whose LOO error was evaluated per target.
    """

    def __init__(self, alphas=DEFAULT_ALPHAS, *, cv: str = "loo", fixed_alpha: float | None = None,
                 n_select: int | None = None, select: str = "abs", standardize_x: bool | None = None,
                 device=None, dtype=torch.float32, chunk_size: int | None = None, memory_gb: float = 4.0,
                 progress: bool = True):
        self.alphas = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
        self.cv = cv
        self.fixed_alpha = fixed_alpha
        self.n_select = n_select
        self.select = select
        self.standardize_x = standardize_x
        self.device = device
        self.dtype = _torch_dtype(dtype)
        self.chunk_size = chunk_size
        self.memory_gb = memory_gb
        self.progress = progress
        self._check_params()
        self._reset()

    @classmethod
    def fastl2lir(cls, n_select: int, alpha: float = FASTL2LIR_ALPHA, **kwargs) -> RidgeDecoder:
        """The released code's decoder: per-target voxel selection by |r|, ridge alpha 0.15 on standardised X.

        Differs from FastL2LiR (KamitaniLab) in one detail: FastL2LiR appends a column of ones to X and so
        penalises the intercept too (b = sum(y) / (n + alpha) when X is centred); here the intercept is not
        penalised (b = mean(y)), as in scikit-learn. The difference is a factor n / (n + alpha), 1 - 2e-5 for
        8,859 samples, and nothing when Y is z-scored (the released code z-scores Y).
        """
        return cls(fixed_alpha=alpha, n_select=n_select, **kwargs)

    # -- parameters ---------------------------------------------------------------------------------------
    def _check_params(self) -> None:
        if self.cv not in CV_MODES:
            raise ValueError(f"cv must be one of {CV_MODES}, got {self.cv!r}")
        if self.select not in SELECT_MODES:
            raise ValueError(f"select must be one of {SELECT_MODES}, got {self.select!r}")
        grid = self.alphas if self.fixed_alpha is None else np.array([self.fixed_alpha], dtype=np.float64)
        if grid.size == 0 or not np.all(np.isfinite(grid)) or np.any(grid <= 0):
            what = "alphas" if self.fixed_alpha is None else "fixed_alpha"
            raise ValueError(f"{what} must be finite and positive, got {grid if grid.size < 20 else grid[:20]}")
        if self.n_select is not None:
            if int(self.n_select) != self.n_select or self.n_select < 1:
                raise ValueError(f"n_select must be a positive integer, got {self.n_select!r}")
            if self.fixed_alpha is None:
                raise ValueError("n_select (FastL2LiR mode) needs fixed_alpha: the released code uses "
                                 f"{FASTL2LIR_ALPHA} (RidgeDecoder.fastl2lir(n_select) sets it)")
        if self.chunk_size is not None and (int(self.chunk_size) != self.chunk_size or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {self.chunk_size!r}")
        if not self.memory_gb > 0:
            raise ValueError(f"memory_gb must be positive, got {self.memory_gb!r}")

    def _reset(self) -> None:
        self.alpha_ = self.cv_mse_ = self._coef = None
        self.selected_ = self.sel_coef_ = None
        self.x_mean_ = self.x_scale_ = self.y_mean_ = None
        self.n_features_in_ = self.n_targets_ = None
        self._y_1d = False
        self.timings_ = None

    @property
    def mode(self) -> str:
        """"select" (FastL2LiR), "fixed" (one alpha), or the cv mode ("loo" / "gcv")."""
        if self.n_select is not None:
            return "select"
        return "fixed" if self.fixed_alpha is not None else self.cv

    @property
    def _standardize(self) -> bool:
        return self.n_select is not None if self.standardize_x is None else bool(self.standardize_x)

    @property
    def _grid(self) -> np.ndarray:
        return self.alphas if self.fixed_alpha is None else np.array([float(self.fixed_alpha)])

    # -- fitting ------------------------------------------------------------------------------------------
    def fit(self, X, Y) -> RidgeDecoder:
        """Fit every target and keep the coefficients (``coef_``, or ``selected_``/``sel_coef_``).

        Args:
            X: (n, p) training voxels (numpy or torch; float32 is enough, the decomposition is float64).
            Y: (n, t) or (n,) training targets: a numpy array, or anything with ``.shape`` and ``[:, j0:j1]``
                (memmap, HDF5 dataset, :class:`ColumnStack`), read one chunk of columns at a time.

        Raises:
            MemoryError: the coefficients would exceed ``memory_gb`` (use :meth:`fit_predict`).
            ValueError: see :meth:`fit_predict`.
        """
        self._run(X, Y, None, keep=True)
        return self

    def fit_predict(self, X, Y, X_test) -> np.ndarray:
        """Fit every target and predict ``X_test`` chunk by chunk, keeping no coefficients.

        The bounded-memory route for many targets: memory is the decomposition plus one chunk plus the
        predictions (n_test, t). ``alpha_``, ``cv_mse_`` and the means are kept; ``predict`` is not available
        afterwards (``coef_`` is None).

        Args:
            X, Y: as in :meth:`fit`.
            X_test: (n_test, p) voxels to predict.

        Returns:
            (n_test, t) predictions in ``dtype`` ((n_test,) for 1-D Y).

        Raises:
            ValueError: row counts of X and Y differ; X_test's voxel count differs from X's; NaN/inf in X,
                X_test or Y (with the count and where); n_select > p.
        """
        if X_test is None:
            raise ValueError("fit_predict needs X_test; use fit(X, Y) to keep the coefficients instead")
        return self._run(X, Y, X_test, keep=False)

    def _run(self, X, Y, X_test, keep: bool):
        self._check_params()
        self._reset()
        X = _as_2d_x(X, "X")
        n, p = X.shape
        Y, y_1d = self._as_targets(Y)
        if Y.shape[0] != n:
            raise ValueError(f"X and Y must have the same number of rows (samples): X has {n}, Y has {Y.shape[0]}")
        t = Y.shape[1]
        if n < 2 or p < 1 or t < 1:
            raise ValueError(f"need at least 2 samples, 1 voxel and 1 target; got X {X.shape}, Y {Y.shape}")
        if self.n_select is not None and self.n_select > p:
            raise ValueError(f"n_select={self.n_select} is more than the {p} voxels of X")
        _check_finite(X, "X", what="voxels (columns)")
        if isinstance(Y, np.ndarray):
            _check_finite(Y, "Y", what="targets (columns)")
        if X_test is not None:
            X_test = _as_2d_x(X_test, "X_test")
            if X_test.shape[1] != p:
                raise ValueError(f"X_test has {X_test.shape[1]} voxels, X has {p}")
            _check_finite(X_test, "X_test", what="voxels (columns)")
        isz = torch.finfo(self.dtype).bits // 8
        if keep:
            need = t * self.n_select * (isz + 4) if self.n_select is not None else p * t * isz
            if need > self.memory_gb * _GB:
                raise MemoryError(
                    f"fit keeps the coefficients: {need / _GB:.1f} GiB for {t} targets, more than memory_gb="
                    f"{self.memory_gb}; use fit_predict(X, Y, X_test), which streams target chunks and keeps none, "
                    "or fit fewer targets at a time")

        device = resolve_device(self.device)
        self.x_mean_, x_sd = _column_mean_sd(X)
        self.x_scale_ = np.where(x_sd > 0, x_sd, 1.0) if self._standardize else np.ones(p)
        xs = _Standardised(X, self.x_mean_, self.x_scale_, device)
        self.n_features_in_, self.n_targets_, self._y_1d = p, t, y_1d
        self.alpha_ = np.empty(t)
        self.y_mean_ = np.empty(t)
        np_dtype = np.float32 if self.dtype == torch.float32 else np.float64
        out = np.empty((X_test.shape[0], t), np_dtype) if X_test is not None else None

        bar = progress_bar(total=t, unit="target", progress=self.progress, desc="ridge: preparing X")
        self.timings_, self._t0 = {"chunk_size": None}, time.perf_counter()
        try:
            if self.mode == "select":
                self._fit_select(xs, x_sd, Y, X_test, keep, out, bar, device)
            else:
                self._fit_eigen(xs, Y, X_test, keep, out, bar, device)
        finally:
            bar.close()
        if out is not None and y_1d:
            return out[:, 0]
        return out

    def _time(self, key: str) -> None:
        """Record the seconds since the last mark (``timings_``: setup_s, then targets_s)."""
        now = time.perf_counter()
        self.timings_[key] = now - self._t0
        self._t0 = now

    def _as_targets(self, Y):
        """Y as something sliceable by columns, and whether it was 1-D."""
        if isinstance(Y, torch.Tensor):
            Y = Y.detach().cpu().numpy()
        if not hasattr(Y, "shape") or not hasattr(Y, "__getitem__"):
            Y = np.asarray(Y)
        if isinstance(Y, np.ndarray) and Y.ndim == 1:
            return Y[:, None], True
        if len(Y.shape) != 2:
            raise ValueError(f"Y must be 2-D (samples, targets) or 1-D, got shape {tuple(Y.shape)}")
        return Y, False

    def _read_chunk(self, Y, s: slice, device) -> torch.Tensor:
        """Y[:, s] as a float64 device tensor, checked for NaN/inf (lazy Y is checked here, chunk by chunk)."""
        block = np.asarray(Y[:, s])
        if not isinstance(Y, np.ndarray):
            _check_finite(block, "Y", col_offset=s.start, what="targets (columns)")
        # A copy, always: the chunk is centred in place and must not write into the caller's Y.
        return torch.tensor(block, dtype=torch.float64, device=device)

    def _chunk_size(self, t: int, per_target: float, fixed: float) -> int:
        """Targets per chunk: ``chunk_size``, or what ``memory_gb`` leaves after ``fixed`` bytes."""
        if self.chunk_size is not None:
            return int(min(self.chunk_size, t))
        free = self.memory_gb * _GB - fixed
        if free < 64 * per_target:
            warnings.warn(f"memory_gb={self.memory_gb} leaves little room beyond the decomposition "
                          f"({fixed / _GB:.1f} GiB): using chunks of 64 targets", RuntimeWarning, stacklevel=4)
            return min(t, 64)
        c = int(free // per_target)
        return min(t, c if c < 1024 else c // 256 * 256)

    # -- LOO / GCV / fixed alpha -----------------------------------------------------------------------------
    def _fit_eigen(self, xs: _Standardised, Y, X_test, keep, out, bar, device) -> None:
        n, p = xs.X.shape
        t = Y.shape[1]
        cd = self.dtype
        bar.set_description("ridge: eigendecomposition")
        dec = _Decomposition(xs, n, p, cd)
        k = dec.k
        grid = torch.as_tensor(self._grid, dtype=torch.float64, device=device)
        terms = dec.alpha_terms(grid)
        if self.mode == "loo":
            terms["invd2"] = (1.0 / terms["d"] ** 2).to(cd)  # (n, m)
            terms["w_cd"] = terms["w"].to(cd)

        # Coefficients live in the eigenbasis: W = L diag(1 / (lam + a)) z, L = Xc'Q (gram) or V (cov); the
        # test predictions are P diag(1 / (lam + a)) z with P = X_test L, so only P is needed for fit_predict.
        if keep:
            if dec.mode == "gram":
                L = torch.empty(p, k, dtype=cd, device=device)
                for s, b in xs.cols():
                    L[s] = (b.T @ dec.M64).to(cd)
            else:
                L = dec.V.to(cd)
            self._coef = np.empty((p, t), np.float32 if cd == torch.float32 else np.float64)
        else:
            L = None
        if X_test is not None:
            if dec.mode == "gram":
                Kt = torch.zeros(X_test.shape[0], n, dtype=torch.float64, device=device)
                for (s, b), (_, bt) in zip(xs.cols(), xs.cols(X_test)):
                    Kt.addmm_(bt, b.T)
                P = (Kt @ dec.M64).to(cd)
                del Kt
            else:
                P = torch.empty(X_test.shape[0], k, dtype=cd, device=device)
                for s, bt in xs.rows(X_test):
                    P[s] = (bt @ dec.V).to(cd)
        isz = torch.finfo(cd).bits // 8
        m = len(grid)
        fixed = (dec.M64.numel() * (8 + (isz if cd != torch.float64 else 0)) + n * m * 24 + m * m * k * 8
                 + (L.numel() * isz if L is not None else 0))
        per_target = n * (8 + 8 + 3 * isz) + k * (isz + 16) + m * 48 + (p * isz if keep else 0)
        step = self.timings_["chunk_size"] = self._chunk_size(t, per_target, fixed)
        bar.set_description(f"ridge {self.mode} ({dec.mode}, chunks of {step})")
        self.cv_mse_ = np.empty(t) if self.mode != "fixed" else None
        evals = 0
        self._time("setup_s")

        for s in _slices(t, step):
            Y64 = self._read_chunk(Y, s, device)
            y_mean = Y64.mean(0)
            Yc = Y64.sub_(y_mean)
            if self.mode == "loo":
                idx, mse, z, n_eval = _loo_sweep(dec, terms, Yc, cd)
                evals += n_eval
            elif self.mode == "gcv":
                idx, mse, z = _gcv(dec, terms, Yc, cd)
            else:
                z = dec.M.T @ Yc.to(cd)
                idx, mse = torch.zeros(Yc.shape[1], dtype=torch.long, device=device), None
            alpha = grid[idx]
            zs = z * (1.0 / (dec.lam[:, None] + alpha[None, :])).to(cd)  # (k, c)
            self.alpha_[s] = alpha.cpu().numpy()
            self.y_mean_[s] = y_mean.cpu().numpy()
            if mse is not None:
                self.cv_mse_[s] = mse.cpu().numpy()
            if keep:
                self._coef[:, s] = (L @ zs).cpu().numpy()
            if X_test is not None:
                out[:, s] = (P @ zs + y_mean.to(cd)).cpu().numpy()
            bar.update(s.stop - s.start)
        self._time("targets_s")
        if self.mode == "loo":
            self.timings_["loo_evals_per_target"] = evals / t

    # -- FastL2LiR -------------------------------------------------------------------------------------------
    def _fit_select(self, xs: _Standardised, x_sd, Y, X_test, keep, out, bar, device) -> None:
        n, p = xs.X.shape
        t, ns = Y.shape[1], int(self.n_select)
        cd = self.dtype
        isz = torch.finfo(cd).bits // 8
        alpha = float(self.fixed_alpha)
        bar.set_description("ridge select: X'X")
        G = torch.zeros(p, p, dtype=torch.float64, device=device)
        for _, b in xs.rows():
            G.addmm_(b.T, b)
        G.diagonal().add_(alpha)
        # Pearson r of voxel v with target j is (Xc'yc)_vj / (n sd_v sd_j): rank voxels by (Xs'yc)_vj times
        # scale_v / sd_v (1 when standardised); constant voxels get 0, as in FastL2LiR.
        rank_w = torch.as_tensor(np.where(x_sd > 0, self.x_scale_ / np.where(x_sd > 0, x_sd, 1), 0.0),
                                 device=device)
        if keep:
            self.selected_ = np.empty((t, ns), np.int32)
            self.sel_coef_ = np.empty((t, ns), np.float32 if cd == torch.float32 else np.float64)
        fixed = G.numel() * 8
        per_target = n * 16 + p * (24 + isz) + ns * 32
        step = self.timings_["chunk_size"] = self._chunk_size(t, per_target, fixed)
        # Batched solves, a quarter of the budget: per system the float64 block and either its float32 copy and
        # factor (4 + 4 bytes) or its float64 factor (8).
        per_system = ns * ns * 16
        batch = int(max(1, min(step, self.memory_gb * _GB / 4 // per_system)))
        bar.set_description(f"ridge select n={ns} (chunks of {step}, solves of {batch})")
        self._time("setup_s")
        for s in _slices(t, step):
            Y64 = self._read_chunk(Y, s, device)
            y_mean = Y64.mean(0)
            Yc = Y64.sub_(y_mean)
            B = torch.zeros(p, Yc.shape[1], dtype=torch.float64, device=device)
            for r, b in xs.rows():
                B.addmm_(b.T, Yc[r])
            score = B * rank_w[:, None]
            if self.select == "abs":
                score = score.abs()
            # The ns largest per target, then sorted by voxel index (the order of a system's unknowns is free,
            # and sorted indices gather G's submatrix faster).
            sel = torch.topk(score, ns, dim=0).indices.sort(dim=0).values  # (ns, c)
            del score
            coef = torch.empty(ns, Yc.shape[1], dtype=torch.float64, device=device)
            for bs in _slices(Yc.shape[1], batch):
                S = sel[:, bs].T.contiguous()  # (b, ns)
                rhs = torch.gather(B[:, bs], 0, sel[:, bs]).T  # (b, ns)
                coef[:, bs] = _solve_selected(G, S, rhs, cd).T
            del B
            self.alpha_[s] = alpha
            self.y_mean_[s] = y_mean.cpu().numpy()
            if keep:
                self.selected_[s] = sel.T.cpu().numpy()
                self.sel_coef_[s] = coef.T.to(cd).cpu().numpy()
            if X_test is not None:
                W = torch.zeros(p, Yc.shape[1], dtype=cd, device=device)
                W.scatter_(0, sel, coef.to(cd))
                pred = torch.empty(X_test.shape[0], Yc.shape[1], dtype=cd, device=device)
                for r, bt in xs.rows(X_test):
                    pred[r] = bt.to(cd) @ W + y_mean.to(cd)
                out[:, s] = pred.cpu().numpy()
            bar.update(s.stop - s.start)
        self._time("targets_s")

    # -- using a fitted decoder -----------------------------------------------------------------------------
    @property
    def coef_(self) -> np.ndarray | None:
        """(p, t) coefficients on the standardised scale (see ``x_scale_``); None after fit_predict."""
        if self._coef is not None or self.selected_ is None:
            return self._coef
        W = np.zeros((self.n_features_in_, self.n_targets_), self.sel_coef_.dtype)
        np.put_along_axis(W, self.selected_.T.astype(np.int64), self.sel_coef_.T, axis=0)
        return W

    @property
    def intercept_(self) -> np.ndarray | None:
        """(t,) intercepts on the original scale of X: predict(X) = X @ (coef_ / x_scale_[:, None]) + intercept_."""
        W = self.coef_
        if W is None:
            return None
        return self.y_mean_ - (self.x_mean_ / self.x_scale_) @ W.astype(np.float64)

    def _check_fitted(self) -> None:
        if self.alpha_ is None:
            raise RuntimeError("this RidgeDecoder is not fitted yet: call fit(X, Y) first")
        if self._coef is None and self.selected_ is None:
            raise RuntimeError("this RidgeDecoder was fitted with fit_predict, which keeps no coefficients: "
                               "call fit(X, Y) to keep them, or fit_predict(X, Y, X_test) again")

    def predict(self, X) -> np.ndarray:
        """Predictions (n, t) in ``dtype`` ((n,) if fitted on 1-D Y): (X - x_mean_) / x_scale_ @ coef_ + y_mean_."""
        self._check_fitted()
        X = _as_2d_x(X, "X")
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} voxels, the decoder was fitted on {self.n_features_in_}")
        _check_finite(X, "X", what="voxels (columns)")
        device = resolve_device(self.device)
        cd = self.dtype
        xs = _Standardised(X, self.x_mean_, self.x_scale_, device)
        Xs = torch.empty(X.shape, dtype=cd, device=device)
        for r, b in xs.rows():
            Xs[r] = b.to(cd)
        t = self.n_targets_
        out = np.empty((X.shape[0], t), np.float32 if cd == torch.float32 else np.float64)
        isz = torch.finfo(cd).bits // 8
        step = max(1, min(t, int(self.memory_gb * _GB // (4 * isz * (self.n_features_in_ + X.shape[0])))))
        for s in _slices(t, step):
            if self._coef is not None:
                W = torch.as_tensor(self._coef[:, s], device=device)
            else:
                W = torch.zeros(self.n_features_in_, s.stop - s.start, dtype=cd, device=device)
                W.scatter_(0, torch.as_tensor(self.selected_[s].T.astype(np.int64), device=device),
                           torch.as_tensor(self.sel_coef_[s].T, device=device))
            ym = torch.as_tensor(self.y_mean_[s], device=device).to(cd)
            out[:, s] = (Xs @ W + ym).cpu().numpy()
        return out[:, 0] if self._y_1d else out

    def score(self, X, Y) -> np.ndarray:
        """Per-target Pearson r between ``Y`` and ``predict(X)``: (t,) (see :func:`pearson_per_target`)."""
        Y = Y.detach().cpu().numpy() if isinstance(Y, torch.Tensor) else np.asarray(Y)
        return pearson_per_target(Y, self.predict(X))

    # -- saving -------------------------------------------------------------------------------------------
    def _params(self) -> dict:
        return dict(alphas=self.alphas.tolist(), cv=self.cv, fixed_alpha=self.fixed_alpha,
                    n_select=None if self.n_select is None else int(self.n_select), select=self.select,
                    standardize_x=self.standardize_x, dtype=_dtype_name(self.dtype), chunk_size=self.chunk_size,
                    memory_gb=self.memory_gb, progress=self.progress)

    def save(self, path: PathLike) -> Path:
        """Write the fitted decoder to ``path`` (safetensors; parameters and provenance as JSON metadata).

        Tensors: alphas, alpha, x_mean, x_scale, y_mean, [cv_mse], and coef (p, t) or selected/sel_coef
        (t, n_select). Metadata key ``"mdlib.ridge"``: format name and version, mdlib version, constructor
        parameters, dtype, mode. A decoder fitted with fit_predict saves its alphas and means only.
        """
        from safetensors.numpy import save_file

        if self.alpha_ is None:
            raise RuntimeError("nothing to save: this RidgeDecoder is not fitted yet")
        tensors = dict(alphas=self.alphas, alpha=self.alpha_, x_mean=self.x_mean_, x_scale=self.x_scale_,
                       y_mean=self.y_mean_)
        if self.cv_mse_ is not None:
            tensors["cv_mse"] = self.cv_mse_
        if self._coef is not None:
            tensors["coef"] = self._coef
        if self.selected_ is not None:
            tensors["selected"], tensors["sel_coef"] = self.selected_, self.sel_coef_
        meta = dict(format=_FORMAT_NAME, format_version=FORMAT_VERSION, mdlib_version=mdlib.__version__,
                    params=self._params(), mode=self.mode, dtype=_dtype_name(self.dtype),
                    n_features_in=self.n_features_in_, n_targets=self.n_targets_, y_1d=self._y_1d)
        path = Path(path)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
                  metadata={_META_KEY: json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: PathLike, device=None) -> RidgeDecoder:
        """Read a decoder written by :meth:`save`; ``device`` overrides the saved one (default: auto).

        Raises:
            ValueError: not an mdlib ridge file, or written in another format version.
        """
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="numpy") as f:
                raw = (f.metadata() or {}).get(_META_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        except Exception as e:  # safetensors raises its own error types for non-safetensors files
            if isinstance(e, FileNotFoundError):
                raise
            raise ValueError(f"{path}: not a safetensors file written by RidgeDecoder.save ({e})") from e
        meta = json.loads(raw) if raw else {}
        if meta.get("format") != _FORMAT_NAME:
            raise ValueError(f"{path}: not a RidgeDecoder file (no '{_META_KEY}' metadata of format {_FORMAT_NAME})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: RidgeDecoder file format version {meta.get('format_version')} (written by "
                             f"mdlib {meta.get('mdlib_version')}); this mdlib ({mdlib.__version__}) reads version "
                             f"{FORMAT_VERSION}: refit the decoder or use the mdlib that wrote it")
        params = dict(meta["params"])
        params["device"] = device
        model = cls(**params)
        model.alpha_, model.x_mean_, model.x_scale_ = tensors["alpha"], tensors["x_mean"], tensors["x_scale"]
        model.y_mean_ = tensors["y_mean"]
        model.cv_mse_ = tensors.get("cv_mse")
        model._coef = tensors.get("coef")
        model.selected_, model.sel_coef_ = tensors.get("selected"), tensors.get("sel_coef")
        model.n_features_in_, model.n_targets_ = meta["n_features_in"], meta["n_targets"]
        model._y_1d = meta["y_1d"]
        return model


# -- the per-chunk computations -----------------------------------------------------------------------------
def loo_predictions(X: np.ndarray, Y, alpha, device=None, chunk: int = 4096) -> np.ndarray:
    """(n, t) float32: each training image's targets predicted by the ridge fitted on the other images.

    Exact and without refitting: the leave-one-out residual of image i is r_i / d_i, the same r and d (hat
    matrix with the intercept) with which :class:`RidgeDecoder` chooses its alphas (module docstring, "The
    maths of the LOO mode"), so one eigendecomposition serves every alpha; computed in float64.

    Args:
        X: (n, p) voxels, as the decoder saw them (not standardised here). Y: (n, t) targets (anything
            sliceable by columns).
        alpha: (t,) each target's alpha (e.g. a fitted decoder's ``alpha_``), or one for all.
        device: where it runs (None: CUDA when available). chunk: targets per step.
    """
    X = _as_2d_x(X, "X")
    n, p = X.shape
    if n < 2:
        raise ValueError(f"leave-one-out needs at least 2 images, got {n}")
    t = Y.shape[1]
    alpha = np.broadcast_to(np.asarray(alpha, dtype=np.float64), (t,))
    if np.any(~np.isfinite(alpha)) or np.any(alpha <= 0):
        raise ValueError("alpha must be finite and positive")
    dev = resolve_device(device)
    mean, _ = _column_mean_sd(X)
    dec = _Decomposition(_Standardised(X, mean, np.ones(p), dev), n, p, torch.float64)
    grid = np.unique(alpha)
    terms = dec.alpha_terms(torch.as_tensor(grid, dtype=torch.float64, device=dev))
    out = np.empty((n, t), dtype=np.float32)
    for b, a in enumerate(grid):
        cols = np.flatnonzero(alpha == a)
        w, d = terms["w"][:, b], terms["d"][:, b]
        for j0 in range(0, cols.size, chunk):
            c = cols[j0:j0 + chunk]
            Yb = torch.as_tensor(np.asarray(Y[:, c], dtype=np.float64), device=dev)
            Yc = Yb - Yb.mean(0)
            r = dec.M64 @ (w[:, None] * (dec.M64.T @ Yc))
            if dec.mode == "cov":
                r += Yc
            out[:, c] = (Yb - r / d[:, None]).cpu().numpy()
    return out


def _column_mean_sd(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and sd (ddof 0) of each column, in row blocks (no float64 copy of X)."""
    s1 = np.zeros(X.shape[1])
    for r in _slices(X.shape[0], max(1, 2**24 // X.shape[1])):
        s1 += X[r].sum(0, dtype=np.float64)
    mean = s1 / X.shape[0]
    s2 = np.zeros(X.shape[1])
    for r in _slices(X.shape[0], max(1, 2**24 // X.shape[1])):
        s2 += ((X[r] - mean) ** 2).sum(0)  # two passes: no cancellation
    return mean, np.sqrt(s2 / X.shape[0])


def _resid_error(ynorm, omega, rnorm, k: int, eps: float, cov: bool):
    """Bound on ||dr||, the rounding error of a residual r = [y +] M (w * z) computed with unit roundoff eps.

    S eps (omega ||y|| + sqrt(k) ||r|| [+ ||y|| in cov mode]): the first term from z = M'y (each z_k is off by
    about eps ||y|| times its column's scale; omega = ||f|| in gram mode, ||1 - f|| in cov mode, is how much
    of that reaches r), the second from the product M (w * z), the third from rounding y to the dtype.
    S = 4: the largest ratio of actual to modelled error measured on well- and ill-conditioned problems,
    n < p and n > p, was 0.3.
    """
    return _ERR_SAFETY * eps * (omega * ynorm + math.sqrt(k) * rnorm + (ynorm if cov else 0.0))


def _loo_error(L, ynorm, omega, dmin, dmax, n: int, k: int, eps: float, cov: bool):
    """Bound on the rounding error of LOO values L = mean((r / d)^2) (see :func:`_resid_error`).

    With ||r|| <= sqrt(n L) max d and e = ||dr|| / min d: |dL| <= 2 sqrt(L / n) e + e^2 / n, plus
    S sqrt(n) eps L for the final sum.
    """
    L = L.clamp_min(0)
    e = _resid_error(ynorm, omega, (n * L).sqrt() * dmax, k, eps, cov) / dmin
    return 2.0 * (L / n).sqrt() * e + e * e / n + _ERR_SAFETY * math.sqrt(n) * eps * L


def _loo_sweep(dec: _Decomposition, terms: dict, Yc: torch.Tensor, cd: torch.dtype):
    """Per-target LOO choice of alpha for one chunk of centred targets Yc (n, c) float64.

    Returns ``(idx, mse, z, n_eval)``: (c,) index into the grid (the first minimum, as scikit-learn), (c,)
    float64 LOO MSE there, z = M'Yc (k, c) in ``cd``, and the number of (target, alpha) LOO evaluations.

    Branch and bound: every (alpha, target) has a lower bound lb <= LOO, first from ||r||^2 (cheap, from z)
    and the range of d; each round evaluates, per target, its unevaluated alpha with the smallest lb, unless
    that lb exceeds the best LOO found so far (plus its rounding error): such an alpha cannot be the
    minimum, nor tie with it. After an evaluation at alpha b, r_b bounds every other alpha a through
    ||r_a / d_a|| >= ||r_b / d_a|| - ||r_a - r_b|| / min d_a, where ||r_a - r_b|| is again cheap from z.
    All bounds carry the rounding slack of :func:`_resid_error`, so pruning never changes the result.
    """
    n, k, m = dec.n, dec.k, terms["w"].shape[1]
    c = Yc.shape[1]
    dev = Yc.device
    cov = dec.mode == "cov"
    eps = torch.finfo(cd).eps
    sq_n = math.sqrt(n)
    # Target-major layouts (c, k) and (c, n): a subset of targets is then a gather of contiguous rows.
    YcT = Yc.T.contiguous() if cov else None
    YcdT = (YcT.to(cd) if cd != torch.float64 else YcT) if cov else None
    zT = (Yc.T.to(cd) @ dec.M) if cd != torch.float64 else Yc.T @ dec.M  # (c, k) = (M'Yc)'
    ynorm = torch.linalg.vector_norm(Yc, dim=0)
    yn2 = ynorm ** 2
    f, omega = terms["f"], terms["omega"]
    dmin, dmax = terms["dmin"], terms["dmax"]

    # From z alone, in one product: ||r_a||^2 per (target, alpha) and, for the bound tightening below, the
    # squared distances ||r_a - r_b||^2 = sum_k (w_a - w_b)_k^2 lam_k^[cov] z_k^2 for every pair (a, b).
    tighten = terms["pair_w"] is not None
    z2T = zT.to(torch.float64, copy=True).square_()  # a copy: zT itself may be float64
    r2_and_dist = z2T @ (torch.cat([terms["r2_coef"], terms["pair_w"]], dim=1) if tighten else terms["r2_coef"])
    del z2T
    r2 = r2_and_dist[:, :m]
    dist2 = r2_and_dist[:, m:].view(c, m, m) if tighten else None  # [target, a, b]: (c, m + m * m) product
    # r2's rounding slack (z_k's error reaches r2 through f in gram mode, at most 2 ||1 - f|| ||y||^2 eps in
    # cov mode).
    if cov:
        r2 = yn2[:, None] - r2
        slack = _ERR_SAFETY * 4 * eps * omega[None, :] * yn2[:, None]
    else:
        ez = _ERR_SAFETY * eps * omega[None, :] * ynorm[:, None]
        slack = ez * (2 * r2.clamp_min(0).sqrt() + ez)
    lb = (r2 - slack).clamp_min(0) / (n * dmax ** 2)  # (c, m)
    del r2, slack, r2_and_dist

    L = torch.full((c, m), math.inf, dtype=torch.float64, device=dev)
    L_err = torch.full((c, m), math.inf, dtype=torch.float64, device=dev)
    evaluated = torch.zeros(c, m, dtype=torch.bool, device=dev)
    best = torch.full((c,), math.inf, dtype=torch.float64, device=dev)
    best_err = torch.zeros(c, dtype=torch.float64, device=dev)
    invd2, w_cd = terms["invd2"], terms["w_cd"]
    while True:
        key = torch.where(evaluated | (lb > (best + best_err)[:, None]), math.inf, lb)
        v, pick = key.min(1)
        active = torch.isfinite(v)
        if not bool(active.any()):
            break
        for b in torch.unique(pick[active]).tolist():
            rows = torch.nonzero(active & (pick == b)).squeeze(1)
            if rows.numel() == c:
                rows = slice(None)  # every target: views instead of gathered copies
            Zb = zT.index_select(0, rows) if isinstance(rows, torch.Tensor) else zT.clone()
            R = Zb.mul_(w_cd[:, b]) @ dec.M.T  # (targets, n): residuals at alpha b
            del Zb
            if cov:
                R += YcdT[rows]
            R.square_()
            T2 = (R @ invd2).double() / n  # (targets, m): mean_i r_b,i^2 / d_a,i^2 for every alpha a
            del R
            Lb = T2[:, b].clone()
            yn = ynorm[rows]
            L[rows, b] = Lb
            L_err[rows, b] = _loo_error(Lb, yn, omega[b], dmin[b], dmax[b], n, k, eps, cov)
            evaluated[rows, b] = True
            # sqrt(LOO_a) >= sqrt(T2_a) - (||r_a - r_b|| + errors) / (sqrt(n) min d_a): the distance from z
            # (its error: eps ||y|| ||f_a - f_b||), plus r_b's own rounding error.
            if tighten:
                e_b = _resid_error(yn, omega[b], (n * Lb.clamp_min(0)).sqrt() * dmax[b], k, eps, cov)
                df = (f - f[:, b:b + 1]).norm(dim=0)  # (m,)
                dist = dist2[rows, :, b].sqrt() + _ERR_SAFETY * eps * yn[:, None] * df + e_b[:, None]
                root = T2.sqrt_().mul_(1 - _ERR_SAFETY * sq_n * eps)
                lo = (root - dist / (sq_n * dmin)).clamp_min_(0).square_()
                lb[rows] = torch.maximum(lb[rows], lo)
        best, which = L.min(1)
        best_err = L_err.gather(1, which[:, None]).squeeze(1)
    idx = L.argmin(1)  # first minimum over the grid, as scikit-learn's strict ">" update

    if cd != torch.float64:
        # Near ties: an alpha whose LOO is within the rounding bounds of the best one's might win in float64.
        # Re-evaluate those rivals (and the best) in float64, so the choice is exactly float64's; the other
        # alphas are certainly worse. Typically about 1% of targets, with 2 rivals each.
        best = L.gather(1, idx[:, None])
        best_err = L_err.gather(1, idx[:, None])
        rival = (L - L_err <= best + best_err) & evaluated
        redo = torch.nonzero(rival.sum(1) > 1).squeeze(1)
        if redo.numel():
            L64, z64 = _loo_float64(dec, terms, Yc[:, redo], rival[redo].T)
            L[redo] = L64.T
            idx[redo] = L64.argmin(0)
            zT[redo] = z64.T.to(cd)
    mse = L.gather(1, idx[:, None]).squeeze(1)
    return idx, mse, zT.T, int(evaluated.sum())


def _loo_float64(dec: _Decomposition, terms: dict, Yc: torch.Tensor, which: torch.Tensor):
    """LOO MSE in float64 of the (alpha, target) pairs marked in ``which`` (m, c), inf elsewhere; and z."""
    z = dec.M64.T @ Yc
    out = torch.full(which.shape, math.inf, dtype=torch.float64, device=Yc.device)
    for a in range(which.shape[0]):
        cols = torch.nonzero(which[a]).squeeze(1)
        if cols.numel():
            R = dec.M64 @ (terms["w"][:, a:a + 1] * z[:, cols])
            if dec.mode == "cov":
                R += Yc[:, cols]
            out[a, cols] = ((R / terms["d"][:, a:a + 1]) ** 2).mean(0)
    return out, z


def _gcv(dec: _Decomposition, terms: dict, Yc: torch.Tensor, cd: torch.dtype):
    """Per-target GCV choice: argmin_a mean(r_a^2) / mean(d_a)^2, from z in float64 (no per-alpha product).

    Returns ``(idx, gcv, z)``: the first minimum, the GCV score there, z in ``cd``.
    """
    z64 = dec.M64.T @ Yc
    r2 = terms["r2_coef"].T @ z64 ** 2
    if dec.mode == "cov":
        r2 = (Yc * Yc).sum(0)[None, :] - r2
    score = r2.clamp_min(0) / dec.n / terms["d_mean"][:, None] ** 2
    idx = score.argmin(0)
    return idx, score.gather(0, idx[None]).squeeze(0), z64.to(cd)


def _solve_selected(G: torch.Tensor, S: torch.Tensor, rhs: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """Solve G[S_j, S_j] w_j = rhs_j for a batch of sorted index sets S (b, s); G (p, p) already holds + alpha I.

    ``cd`` float64: Cholesky in float64. float32: Cholesky in float32 (3x faster on the CPU) plus iterative
    refinement with float64 residuals, which converges to float64 accuracy when cond(G_SS) x 1e-7 < 1
    (cond <= (n max eigenvalue of the voxels' correlation + alpha) / alpha); systems whose correction is not
    below 1e-12 of the solution after 8 steps, or whose float32 Cholesky fails, are solved in float64.
    Sorted indices make the gather of G_SS about 5x faster (rows and columns in memory order).
    Returns (b, s) float64.
    """
    A = G[S[:, :, None], S[:, None, :]]  # (b, s, s) float64
    rhs = rhs.unsqueeze(-1)
    if cd == torch.float64:
        ok = torch.zeros(len(S), dtype=torch.bool, device=G.device)
        w = torch.empty_like(rhs)
    else:
        Lc, info = torch.linalg.cholesky_ex(A.to(torch.float32))
        ok = info == 0
        w = _chol_solve(Lc, rhs.to(torch.float32)).double()
        for _ in range(8):
            dw = _chol_solve(Lc, (rhs - A @ w).to(torch.float32)).double()
            w += dw
            done = dw.norm(dim=(1, 2)) <= 1e-12 * w.norm(dim=(1, 2))
            if bool((done | ~ok).all()):
                break
        ok &= done
        del Lc
    if not bool(ok.all()):
        bad = torch.nonzero(~ok).squeeze(1)
        L64, info = torch.linalg.cholesky_ex(A[bad])
        w[bad] = torch.cholesky_solve(rhs[bad], L64)
        if bool((info != 0).any()):  # not positive definite even in float64: cannot happen with alpha > 0
            fail = bad[info != 0]
            w[fail] = torch.linalg.solve(A[fail], rhs[fail])
    return w.squeeze(-1)


def _chol_solve(Lc: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve L L' x = b with two triangular solves (torch.cholesky_solve copies the factor on every call)."""
    y = torch.linalg.solve_triangular(Lc, b, upper=False)
    return torch.linalg.solve_triangular(Lc.mT, y, upper=True)
