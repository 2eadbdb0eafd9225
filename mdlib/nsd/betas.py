"""Single-trial betas: read one session at a time, mask, z-score, average repeats, cache the matrix.

NSD's betas (``betas_fithrf_GLMdenoise_RR``, func1pt8mm) come one file per session, in two layouts of the same
int16 numbers (percent signal change x 300, 0 outside the brain; docs/data.md, "Betas"):

- ``betas_sessionSS.nii.gz``: (X, Y, Z, T) gzip-compressed NIfTI, T = trials in the session (750 in NSD);
- ``betas_sessionSS.hdf5``: dataset ``betas`` of shape (T, Z, Y, X) (the NIfTI axes reversed), stored as one
  chunk per voxel time series (chunks (T, 1, 1, 1)).

A real session is about 1 GB of int16, so neither reader ever holds a whole session: the NIfTI reader streams
blocks of volumes through nibabel's array proxy and masks each block; the HDF5 reader reads, for each z the
mask touches, the bounding box of the mask's voxels in that slab. Both return the same (T, n_vox) matrix with
voxels in mdlib's canonical order (:func:`mdlib.nsd.rois.voxel_coords`).

:func:`load_betas` builds the matrix a decoder needs from a session range and caches it on disk.
Taught in ``notebooks/02_voxels_nilearn.ipynb``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import scipy.sparse

from mdlib import paths
from mdlib.cachekey import cache_key
from mdlib.nsd import layout
from mdlib.progress import bar as progress_bar
from mdlib.nsd.rois import check_grid, nsd_affine, roi_mask_and_affine, voxel_coords
from mdlib.record import write_npz_atomic

FORMATS = ("hdf5", "nii.gz")

#: Volumes per block when streaming a NIfTI session: 50 x 1.4 MB for subj01's grid.
NIFTI_BLOCK = 50

#: Bump when the cached matrices' meaning changes, so that old caches miss.
CACHE_VERSION = 1

# Errors that mean "this file is damaged": gzip/zlib stream errors, short reads, HDF5 library errors.
_DAMAGED = (OSError, EOFError, zlib.error, KeyError, RuntimeError,
            nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError)

PathLike = str | os.PathLike


# -- one session --------------------------------------------------------------------------------------------
def read_session(data_root: PathLike, subject: int, session: int, mask: np.ndarray | str,
                 fmt: str = "hdf5", *, affine: np.ndarray | None = None, scale: float = layout.BETA_SCALE,
                 nan: str = "zero", block_size: int = NIFTI_BLOCK) -> np.ndarray:
    """The masked betas of one session in percent signal change: float32 (T, n_vox).

    Args:
        data_root: the NSD (or mini-NSD) root.
        subject: 1..8.
        session: 1-based session number.
        mask: boolean (X, Y, Z) mask on the betas' grid, or an ROI choice string (see ``rois.roi_mask``).
        fmt: ``"hdf5"`` or ``"nii.gz"``; both give identical matrices.
        affine: the mask's affine; checked against a NIfTI file's (HDF5 files carry no affine, so only the
            shape is checked there).
        scale: the stored numbers are percent signal change x ``scale`` (300 in NSD; 1.0 for a file of your
            own that already holds percent signal change).
        nan: what to do with NaN/inf values, which int16 cannot hold but a float file of your own might:
            ``"zero"`` (default) sets them to 0, NSD's own value for "no data", and warns with the count;
            ``"raise"`` raises ValueError.
        block_size: NIfTI volumes read per block (memory: block_size x one volume).

    Returns:
        (T, n_vox) float32: row t = volume t (0-based) of the session, column n = voxel ``voxel_coords(mask)[n]``.

    Raises:
        FileNotFoundError: the betas file is absent (names the NSD path and how to get it).
        ValueError: the file is truncated or corrupt (names it; re-download), or its grid differs from the mask's.
    """
    if isinstance(mask, str):
        mask, affine = roi_mask_and_affine(data_root, subject, mask)
    mask = _as_mask(mask)
    path = layout.require(data_root, layout.betas_file(subject, session, fmt))
    raw = _read_nifti(path, mask, affine, block_size) if fmt == "nii.gz" else _read_hdf5(path, mask)
    return _to_percent(raw, scale, nan, path)


def _read_nifti(path: Path, mask: np.ndarray, affine: np.ndarray | None, block_size: int) -> np.ndarray:
    """Stream (X, Y, Z, T) volumes in blocks of ``block_size``, keeping the masked voxels: (T, n_vox) raw."""
    with _damaged_file(path), _open_stream(path) as stream:
        # One open stream for all blocks: nibabel then reads each block by seeking *forward* in the gzip
        # stream, so the file is decompressed once (reopening per block would restart from byte 0 each time).
        img = nib.Nifti1Image.from_file_map({"image": nib.FileHolder(filename=str(path), fileobj=stream)})
        if len(img.shape) != 4:
            raise ValueError(f"{path}: betas must be 4-D (X, Y, Z, T), got shape {img.shape}")
        check_grid(img.shape, mask.shape, f"betas file {path}", "the ROI mask", img.affine, affine)
        n_volumes = img.shape[3]
        out = None
        for t0 in range(0, n_volumes, block_size):
            block = np.asanyarray(img.dataobj[..., t0:t0 + block_size])  # (X, Y, Z, b), stored dtype
            if out is None:
                out = np.empty((n_volumes, int(mask.sum())), dtype=block.dtype)
            out[t0:t0 + block.shape[3]] = block[mask].T  # block[mask]: (n_vox, b) in canonical order
        _read_to_end(stream)  # gzip checks its CRC only at the end of the stream
    return out


def _read_hdf5(path: Path, mask: np.ndarray) -> np.ndarray:
    """Read the mask's voxels from dataset ``betas`` (T, Z, Y, X), one z-slab bounding box at a time."""
    coords = voxel_coords(mask)
    with _damaged_file(path), h5py.File(path, "r") as f:
        if "betas" not in f or not isinstance(f["betas"], h5py.Dataset) or f["betas"].ndim != 4:
            raise ValueError(f"{path}: expected a 4-D dataset 'betas' of shape (T, Z, Y, X); found "
                             f"{ {k: getattr(v, 'shape', None) for k, v in f.items()} }")
        ds = f["betas"]
        check_grid(ds.shape[1:][::-1], mask.shape, f"betas file {path} (HDF5 (T, Z, Y, X) = {ds.shape})",
                   "the ROI mask")
        out = np.empty((ds.shape[0], len(coords)), dtype=ds.dtype)
        for z in np.unique(coords[:, 2]):
            cols = np.flatnonzero(coords[:, 2] == z)
            x, y = coords[cols, 0], coords[cols, 1]
            # Chunks are single voxels' time series, so a box costs only the chunks inside it.
            box = ds[:, int(z), y.min():y.max() + 1, x.min():x.max() + 1]  # (T, ny, nx); HDF5 (z, y, x)
            out[:, cols] = box[:, y - y.min(), x - x.min()]
    return out


def _to_percent(raw: np.ndarray, scale: float, nan: str, path: Path) -> np.ndarray:
    """Stored numbers -> float32 percent signal change, with the documented NaN handling."""
    x = raw.astype(np.float32)
    if np.issubdtype(raw.dtype, np.floating):
        bad = ~np.isfinite(x)
        if bad.any():
            if nan == "raise":
                raise ValueError(f"{path}: {int(bad.sum())} NaN/inf values in {int(bad.any(0).sum())} voxels")
            if nan != "zero":
                raise ValueError(f"nan must be 'zero' or 'raise', got {nan!r}")
            warnings.warn(f"{path}: {int(bad.sum())} NaN/inf values in {int(bad.any(0).sum())} voxels set to 0 "
                          "(NSD's value for 'no data')", RuntimeWarning, stacklevel=3)
            x[bad] = 0.0
    x /= np.float32(scale)  # the same float32 operation for both formats, so they agree bit for bit
    return x


@contextlib.contextmanager
def _damaged_file(path: Path):
    """Turn the many ways a truncated or corrupt file fails into one ValueError naming it."""
    try:
        yield
    except _DAMAGED as err:
        raise ValueError(f"{path}: cannot read this betas file; it looks truncated or corrupt "
                         f"({type(err).__name__}: {err}). Delete it and download it again: "
                         f"{layout.how_to_get(_nsd_relative(path))}") from err


def _open_stream(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _read_to_end(stream) -> None:
    while stream.read(1 << 20):
        pass


def _nsd_relative(path: Path) -> str:
    """The NSD-relative part of an absolute path (from 'nsddata...' on), for download hints."""
    parts = Path(path).parts
    starts = [i for i, p in enumerate(parts) if p.startswith("nsddata")]
    return "/".join(parts[starts[0]:]) if starts else str(path)


def _as_mask(mask: np.ndarray) -> np.ndarray:
    """A boolean (X, Y, Z) mask; numeric arrays follow NSD's convention mask = values > 0."""
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"a mask is a 3-D (X, Y, Z) array, got shape {mask.shape}")
    mask = mask if mask.dtype == bool else np.nan_to_num(mask) > 0
    if not mask.any():
        raise ValueError("the mask selects no voxels")
    return mask


# -- z-scoring ----------------------------------------------------------------------------------------------
def zscore_per_session(x: np.ndarray, *, return_constant: bool = False):
    """Z-score each voxel (column) over the trials (rows) of one session: mean 0, sd 1 (ddof=0).

    Constant voxels (sd = 0 up to rounding, e.g. zeros outside the brain, or a one-trial session) have no
    z-score: they are set to 0, never NaN. Their number is reported: with ``return_constant=True`` the
    function returns ``(z, constant)`` with ``constant`` a (n_vox,) bool array; otherwise it warns with the
    count when there are any.

    Args:
        x: (T, n_vox) finite responses of one session.

    Returns:
        z: (T, n_vox), float32 for float32 input (float64 otherwise); and ``constant`` if asked.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a (trials, voxels) matrix, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("x holds NaN/inf values; z-scores would be undefined (read_session zeroes them)")
    mean = x.mean(axis=0, dtype=np.float64)
    sd = x.std(axis=0, dtype=np.float64)
    # sd of a constant float32 column computed in float64 is exactly 0; the relative bound absorbs float64 input.
    constant = sd <= 1e-10 * np.maximum(1.0, np.abs(mean))
    z = (x - mean) / np.where(constant, 1.0, sd)
    z[:, constant] = 0.0
    z = z.astype(np.float32 if x.dtype == np.float32 else np.float64, copy=False)
    if return_constant:
        return z, constant
    if constant.any():
        warnings.warn(f"{int(constant.sum())} of {x.shape[1]} voxels are constant within the session; their "
                      "z-scores were set to 0", RuntimeWarning, stacklevel=2)
    return z


# -- the prepared matrix ------------------------------------------------------------------------------------
@dataclass(eq=False)
class Betas:
    """A subject's responses over a session range, ready for decoding (see :func:`load_betas`).

    Attributes:
        responses: (n_rows, n_vox) float32: z-scores (or percent signal change with ``zscore=False``).
            One row per image (repeats averaged) or per trial (``average_repeats=False``).
        nsd_ids: (n_rows,) int64 0-based nsdIds (= rows of ``nsd_stimuli.hdf5``), sorted ascending (per-trial
            rows: by nsdId, then trial).
        n_repeats: (n_rows,) int64: the trials averaged into each row (1..3 in NSD; 1 for per-trial rows).
        shared: (n_rows,) bool: a shared image (the papers' test set).
        coords: (n_vox, 3) int64 (i, j, k) voxel indices, mdlib's canonical order; column n is voxel coords[n].
        mask: (X, Y, Z) bool; ``mask.sum() == n_vox``.
        affine: (4, 4) voxel -> subject-space mm.
        subject: 1..8.
        sessions: the 1-based sessions used.
        roi: the ROI choice (a string of ``rois.roi_mask``, or ``"custom"`` for a mask array).
        trials: (n_rows,) int64 0-based global trial numbers for per-trial rows; None when averaged.
        constant: (n_vox,) bool: voxels constant within at least one session, whose z-scores there were set
            to 0 (all False without z-scoring).
        params: the parameters it was built with (stored in the cache file as JSON).
    """

    responses: np.ndarray
    nsd_ids: np.ndarray
    n_repeats: np.ndarray
    shared: np.ndarray
    coords: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    subject: int
    sessions: tuple[int, ...]
    roi: str
    trials: np.ndarray | None = None
    constant: np.ndarray | None = None
    params: dict = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return int(self.responses.shape[0])

    @property
    def n_voxels(self) -> int:
        return int(self.responses.shape[1])

    @property
    def train_rows(self) -> np.ndarray:
        """Row indices of the training set: the non-shared images (the reconstruction papers' rule)."""
        return np.flatnonzero(~self.shared)

    @property
    def test_rows(self) -> np.ndarray:
        """Row indices of the test set: the shared images seen in these sessions."""
        return np.flatnonzero(self.shared)

    def subset(self, rows: np.ndarray) -> Betas:
        """The same Betas restricted to ``rows`` (int indices or a bool array over rows)."""
        rows = np.asarray(rows)
        pick = (lambda a: None if a is None else a[rows])
        return Betas(responses=self.responses[rows], nsd_ids=self.nsd_ids[rows], n_repeats=self.n_repeats[rows],
                     shared=self.shared[rows], coords=self.coords, mask=self.mask, affine=self.affine,
                     subject=self.subject, sessions=self.sessions, roi=self.roi, trials=pick(self.trials),
                     constant=self.constant, params=dict(self.params))

    def split(self) -> tuple[Betas, Betas]:
        """``(train, test)``: test = the shared images, train = the rest (8,859 / 982 images in sessions 1-37).

        Both are copies of their rows; index ``responses[train_rows]`` yourself to choose when to copy.
        """
        return self.subset(self.train_rows), self.subset(self.test_rows)

    def __repr__(self) -> str:
        kind = "images" if self.trials is None else "trials"
        return (f"Betas(subject={self.subject}, roi={self.roi!r}, sessions={_compact(self.sessions)}, "
                f"{self.n_rows} {kind} ({int(self.shared.sum())} shared) x {self.n_voxels} voxels)")


def load_betas(data_root: PathLike, subject: int, roi: str | np.ndarray | nib.Nifti1Image = "nsdgeneral",
               sessions: Iterable[int] | None = None, fmt: str = "hdf5", zscore: bool = True,
               average_repeats: bool = True, cache: bool = True, progress: bool = True,
               design=None) -> Betas:
    """The (images x voxels) response matrix of ``subject`` over a session range, cached on disk.

    Steps, session by session: read the masked betas (:func:`read_session`), z-score each voxel within the
    session over all its trials (:func:`zscore_per_session`; NSD's common practice), then either add each
    trial into its image's row (repeats are averaged over the whole session range at the end) or keep it.

    Args:
        data_root: the NSD (or mini-NSD) root.
        subject: 1..8.
        roi: an ROI choice string (``"nsdgeneral"``, ``"mindiffuser"``, an atlas, ``"atlas:name,..."``; see
            ``rois.roi_mask``), a boolean (X, Y, Z) mask array (only its shape is checked against the betas;
            the result gets NSD's affine), or a nibabel image (mask = data > 0, with its own affine).
        sessions: None for every session the subject completed, or an iterable of 1-based session numbers,
            e.g. ``range(1, 38)`` for the papers' sessions 1-37 (the convention of ``Design.trials``).
        fmt: which betas files to read, ``"hdf5"`` (default) or ``"nii.gz"``; the result is identical.
        zscore: z-score each voxel within each session.
        average_repeats: one row per image (mean of its trials in the range) instead of one per trial.
        cache: reuse / write ``<data root>/mdlib_cache/subjNN/betas_*.npz``, keyed by every parameter, the
            trial table, the mask, and the betas files' sizes and modification times.
        progress: show a tqdm progress bar over sessions.
        design: a ``Design`` (anything with ``.trials(subject, sessions)``); default
            ``mdlib.nsd.design.load_design(data_root)``.

    Returns:
        :class:`Betas`; ``.split()`` gives the papers' train/test rows.

    Memory: one session's masked matrix at a time (T x n_vox float32, plus its int16 copy and a float64
    temporary while z-scoring), plus the result being filled (n_rows x n_vox float32: 9,841 images x 15,724
    voxels = 0.6 GB for subj01, sessions 1-37, nsdgeneral; 2.2 GB per trial for all 40 sessions).

    Raises:
        FileNotFoundError: a betas file of the range is absent (checked before any reading).
        ValueError: damaged files, grid mismatch, or a betas file whose number of volumes differs from the
            design's trials in that session.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    root = Path(data_root)
    mask, affine, roi_name = _resolve_roi(root, subject, roi)  # affine None: a bare array, not checked
    if design is None:
        from mdlib.nsd.design import load_design  # imported here: design.py is a sibling layer

        design = load_design(root)
    table = design.trials(subject, sessions)
    chosen = tuple(int(s) for s in np.unique(table["session"]))
    files = [layout.require(root, layout.betas_file(subject, s, fmt)) for s in chosen]  # fail before reading

    params = {"version": CACHE_VERSION, "subject": int(subject), "roi": roi_name, "sessions": list(chosen),
              "fmt": fmt, "zscore": bool(zscore), "average_repeats": bool(average_repeats),
              "scale": layout.BETA_SCALE}
    target = _cache_path(root, subject, roi_name, params, files, table, mask, affine)
    if cache:
        hit = _load_cached(target, params)
        if hit is not None:
            return hit

    betas = _build(root, subject, chosen, table, mask, affine, roi_name, fmt, zscore, average_repeats, progress)
    betas.params = params
    if cache:
        _save_cached(target, betas)
    return betas


def _resolve_roi(root: Path, subject: int, roi) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(mask, affine, name) from an ROI string, a mask array or a nibabel image.

    A bare array has no affine (None): only its shape can be checked against the betas, and the result
    gets NSD's func1pt8mm affine for its shape.
    """
    if isinstance(roi, str):
        mask, affine = roi_mask_and_affine(root, subject, roi)
        return _as_mask(mask), affine, roi.strip()
    if hasattr(roi, "dataobj") and hasattr(roi, "affine"):
        return _as_mask(np.asanyarray(roi.dataobj)), np.asarray(roi.affine, dtype=float), "custom"
    return _as_mask(roi), None, "custom"


def _build(root: Path, subject: int, sessions: tuple[int, ...], table: pd.DataFrame, mask: np.ndarray,
           affine: np.ndarray | None, roi_name: str, fmt: str, zscore: bool, average_repeats: bool,
           progress: bool) -> Betas:
    """Read, z-score and place every session's trials into the result rows (see :func:`load_betas`)."""
    nsd_id = table["nsd_id"].to_numpy(np.int64)
    trial = table["trial"].to_numpy(np.int64)
    session = table["session"].to_numpy(np.int64)
    volume = table["volume"].to_numpy(np.int64)
    shared_trial = table["shared"].to_numpy(bool)
    n_vox = int(mask.sum())

    if average_repeats:
        ids, row_of_trial, counts = np.unique(nsd_id, return_inverse=True, return_counts=True)
        order = None
        out = np.zeros((len(ids), n_vox), dtype=np.float32)
    else:
        order = np.lexsort((trial, nsd_id))  # rows sorted by nsdId, then trial
        row_of_trial = np.empty(len(order), dtype=np.int64)
        row_of_trial[order] = np.arange(len(order))
        out = np.empty((len(order), n_vox), dtype=np.float32)

    constant = np.zeros(n_vox, dtype=bool)
    bar = progress_bar(sessions, desc=f"{layout.subj(subject)} betas ({roi_name})", unit="session",
                       progress=progress)
    for s in bar:
        here = session == s
        x = read_session(root, subject, s, mask, fmt, affine=affine)
        _check_session_length(x.shape[0], int(here.sum()), subject, s, fmt)
        if zscore:
            x, const_s = zscore_per_session(x, return_constant=True)
            constant |= const_s
        if average_repeats:
            _add_rows(out, row_of_trial[here], x[volume[here]])
        else:
            out[row_of_trial[here]] = x[volume[here]]
        del x  # free this session before reading the next
    if constant.any():
        warnings.warn(f"{int(constant.sum())} of {n_vox} voxels were constant within at least one session "
                      "(e.g. outside the brain); their z-scores there were set to 0 (Betas.constant)",
                      RuntimeWarning, stacklevel=3)

    if average_repeats:
        out /= counts[:, None].astype(np.float32)
        shared = np.zeros(len(ids), dtype=bool)
        shared[row_of_trial] = shared_trial
        rows = {"nsd_ids": ids, "n_repeats": counts.astype(np.int64), "shared": shared, "trials": None}
    else:
        rows = {"nsd_ids": nsd_id[order], "n_repeats": np.ones(len(order), dtype=np.int64),
                "shared": shared_trial[order], "trials": trial[order]}
    grid_affine = nsd_affine(mask.shape) if affine is None else affine
    return Betas(responses=out, coords=voxel_coords(mask), mask=mask, affine=grid_affine, subject=int(subject),
                 sessions=sessions, roi=roi_name, constant=constant, **rows)


def _add_rows(acc: np.ndarray, rows: np.ndarray, values: np.ndarray) -> None:
    """``acc[rows[i]] += values[i]`` for every i, counting repeated rows each time.

    (``acc[rows] += values`` would keep only one of two trials of the same image in a session.) A sparse
    one-hot matrix sums the trials of each touched row; it is several times faster than ``np.add.at``.
    """
    touched, inverse = np.unique(rows, return_inverse=True)
    onehot = scipy.sparse.csr_matrix((np.ones(len(rows), dtype=values.dtype), (inverse, np.arange(len(rows)))),
                                     shape=(len(touched), len(rows)))
    acc[touched] += onehot @ values


def _check_session_length(n_volumes: int, n_trials: int, subject: int, session: int, fmt: str) -> None:
    if n_volumes != n_trials:
        raise ValueError(f"{layout.betas_file(subject, session, fmt)} has {n_volumes} volumes but the design "
                         f"lists {n_trials} trials in session {session}: the betas and the design "
                         "(nsd_expdesign.mat) come from different datasets")


# -- the cache ----------------------------------------------------------------------------------------------
def _cache_path(root: Path, subject: int, roi_name: str, params: dict, files: list[Path], table: pd.DataFrame,
                mask: np.ndarray, affine: np.ndarray | None) -> Path:
    """``<root>/mdlib_cache/subjNN/betas_<roi>_<key>.npz``; the key hashes everything the result depends on."""
    parts: list = [params]
    for path in files:  # a re-downloaded or edited file changes size or mtime
        stat = path.stat()
        parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};")
    for column in ("trial", "session", "volume", "nsd_id", "shared"):
        parts.append(np.ascontiguousarray(table[column].to_numpy(np.int64)).tobytes())
    parts.append(np.packbits(mask).tobytes() + str(mask.shape).encode())
    if affine is not None:
        parts.append(np.round(np.asarray(affine, dtype=float), 4).tobytes())
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", roi_name).strip("-") or "roi"
    return paths.cache_dir(root) / layout.subj(subject) / f"betas_{slug}_{cache_key(*parts)}.npz"


def _save_cached(target: Path, betas: Betas) -> None:
    """Write plain arrays (no pickles) to a temporary file, then rename it: never a half-written cache."""
    arrays = {"responses": betas.responses, "nsd_ids": betas.nsd_ids, "n_repeats": betas.n_repeats,
              "shared": betas.shared, "coords": betas.coords, "mask": betas.mask, "affine": betas.affine,
              "constant": betas.constant, "params": np.array(json.dumps(betas.params, sort_keys=True))}
    if betas.trials is not None:
        arrays["trials"] = betas.trials
    write_npz_atomic(target, **arrays)


def _load_cached(target: Path, params: dict) -> Betas | None:
    """The cached Betas if ``target`` exists, is readable and was built with ``params``; else None."""
    if not target.is_file():
        return None
    try:
        with np.load(target, allow_pickle=False) as npz:
            stored = json.loads(str(npz["params"]))
            if stored != json.loads(json.dumps(params, sort_keys=True)):
                return None
            arrays = {name: npz[name] for name in npz.files if name != "params"}
    except Exception as err:  # a damaged cache is rebuilt, never trusted
        warnings.warn(f"ignoring unreadable cache {target} ({type(err).__name__}: {err}); rebuilding it",
                      RuntimeWarning, stacklevel=3)
        return None
    return Betas(responses=arrays["responses"], nsd_ids=arrays["nsd_ids"], n_repeats=arrays["n_repeats"],
                 shared=arrays["shared"], coords=arrays["coords"], mask=arrays["mask"], affine=arrays["affine"],
                 subject=stored["subject"], sessions=tuple(stored["sessions"]), roi=stored["roi"],
                 trials=arrays.get("trials"), constant=arrays["constant"], params=stored)


def _compact(sessions: tuple[int, ...]) -> str:
    """'1-37' for a contiguous run of sessions, else the list."""
    if len(sessions) == 1:
        return str(sessions[0])
    if sessions and list(sessions) == list(range(sessions[0], sessions[-1] + 1)):
        return f"{sessions[0]}-{sessions[-1]}"
    return str(list(sessions))
