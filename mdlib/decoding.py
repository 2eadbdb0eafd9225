"""Decode a subject's test images' features from fMRI, once, cached: what stages 1 and 2 start from.

Lesson 03 teaches the decoders step by step; lessons 04-06 need only their output, the decoded features of
the test images. :func:`decode_features` runs the whole chain (betas -> standardised voxels -> ridge per
feature family -> test-set predictions) and caches each family's predictions in
``<data root>/mdlib_cache/decoded/`` as ``.npz``, keyed by a hash of everything that determines them (the
training voxels and targets themselves, the method and its parameters), so a changed input can never be
served a stale result and an interrupted run keeps the families already done.

Families (docs/method.md): ``z`` (VAE latents), ``c`` (caption embeddings, tokens 1.. only: token 0 is
constant, see :func:`mdlib.features.restore_bos`), ``clip_block1`` ... ``clip_block6`` and ``clip_embedding``
(the structural features of stage 2).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from mdlib import features, paths, selection
from mdlib.cachekey import cache_key
from mdlib.nsd.betas import load_betas
from mdlib.record import write_npz_atomic
from mdlib.ridge import DEFAULT_ALPHAS, RidgeDecoder, pearson_per_target, r2_from_mse

#: Bump when cached predictions change meaning.
CACHE_VERSION = 2
METHODS = ("ridge", "fastl2lir")
#: The released reconstruction's FastL2LiR voxel counts per family: z 4000 and c 125 (the decoders
#: Reconstruction.py loads, lines 184 and 343; its training scripts write 3000 and 450), CLIP 850
#: (Structural_feature_decoding.py line 149). docs/method.md, row "decoders".
RELEASED_N_SELECT = {"z": 4000, "c": 125, "clip": 850}
#: How test voxels are standardised: with the training images' mean and sd, or with their own (released).
STANDARDIZE = ("train", "test")
#: Voxels of the released code's ROI for subject 1: the mini path scales n_select by n_voxels / this.
RELEASED_N_VOXELS = 11694


@dataclass
class Decoded:
    """Decoded features of a subject's test images (lessons 04-06).

    Attributes:
        nsd_ids: (n,) int64 0-based nsdIds of the test images, ascending.
        pred: family -> (n, *shape) float32 predictions: ``z`` (n, 4, h, w); ``c`` (n, n_tokens - 1, width)
            (BOS row not included); ``clip_blockK`` (n, 50, width); ``clip_embedding`` (n, dim).
        true: family -> the same shapes: the features of the images themselves (stage 1's ceiling).
        r: family -> (t,) float64 Pearson r per feature over the test images (NaN for constant features).
        alpha: family -> (t,) the ridge alpha of each feature.
        cv_r2: family -> (t,) leave-one-out R^2 of each feature on the training images (``method="ridge"``;
            NaN with FastL2LiR, which cross-validates nothing): how decodable a feature is, known without
            looking at the test set.
        score: family -> (t,) the score stage 2 selects features by (:mod:`mdlib.selection`): ``cv_r2``
            (``select_by="loo-r2"``) or the 5-fold cross-validated ``|r|`` of the decoder
            (``select_by="cv5-r"``, the CLIP blocks only). ``params["select_by"]`` says which.
        params: how they were made (JSON-able).
    """

    nsd_ids: np.ndarray
    pred: dict[str, np.ndarray]
    true: dict[str, np.ndarray]
    r: dict[str, np.ndarray] = field(default_factory=dict)
    alpha: dict[str, np.ndarray] = field(default_factory=dict)
    cv_r2: dict[str, np.ndarray] = field(default_factory=dict)
    score: dict[str, np.ndarray] = field(default_factory=dict)
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for fam, value in self.cv_r2.items():   # the leave-one-out R^2 is the default selection score
            self.score.setdefault(fam, value)

    def __repr__(self) -> str:
        fams = ", ".join(f"{k} {tuple(v.shape[1:])} (median r {np.nanmedian(self.r[k]):.3f})" if k in self.r
                         else f"{k} {tuple(v.shape[1:])}" for k, v in self.pred.items())
        return f"Decoded({len(self.nsd_ids)} test images: {fams})"


def family_names(sd=None, clip=None) -> list[str]:
    """Families available from the given models: z and c from Stable Diffusion, the rest from CLIP."""
    names = ["z", "c"] if sd is not None else []
    if clip is not None:
        names += [f"clip_{n}" for n in features.clip_feature_names()]
    return names


def scaled_n_select(n_voxels: int, n_select: dict[str, int] | None = None, scale_to_roi: bool = False) -> dict:
    """FastL2LiR's voxels per family key (``z``, ``c``, ``clip``), at most ``n_voxels``; ``scale_to_roi``:
    in proportion to ``n_voxels`` / the released ROI's 11,694 voxels (the mini path's smaller brains)."""
    base = dict(RELEASED_N_SELECT if n_select is None else n_select)
    if scale_to_roi:
        return {k: max(1, min(n_voxels, round(v * n_voxels / RELEASED_N_VOXELS))) for k, v in base.items()}
    return {k: min(v, n_voxels) for k, v in base.items()}


def decode_features(data_root: str | os.PathLike, subject: int, sd=None, clip=None, *,
                    families: list[str] | None = None, roi: str = "nsdgeneral", sessions=None,
                    method: str = "ridge", alphas=DEFAULT_ALPHAS, n_select: dict[str, int] | None = None,
                    n_tokens: int = features.RELEASED_N_TOKENS, posterior: str = "sample", seed: int = 0,
                    scale_n_select: bool = False, standardize: str = "train", n_train: int | None = None,
                    n_captions: int | None = None,
                    clip_resize: str = features.DEFAULT_RESIZE, select_by: str = "loo-r2",
                    device=None, cache: bool = True, progress: bool = True) -> Decoded:
    """Fit the decoders on the training images and predict the test images' features (lessons 04-06).

    Args:
        data_root: the NSD (or mini-NSD) root. subject: 1..8.
        sd, clip: the models whose features are the targets (:func:`mdlib.models.load_sd`,
            :func:`mdlib.models.load_clip_vision`).
        families: which to decode (default: every family of the given models, :func:`family_names`).
        roi, sessions: the voxels and sessions (:func:`mdlib.nsd.betas.load_betas`).
        method: ``"ridge"`` (alpha per feature by leave-one-out over ``alphas``: lesson 03's) or
            ``"fastl2lir"`` (the released code's: ``n_select`` voxels per feature, alpha 0.15).
        n_select: FastL2LiR's voxels per family key ``z``/``c``/``clip`` (default: the released counts,
            capped at the ROI's size); scale_n_select: in proportion to the ROI's size (:func:`scaled_n_select`).
        n_tokens, posterior, seed, n_captions, clip_resize: the targets (:func:`mdlib.features.extract_targets`).
        standardize: ``"train"``: every voxel z-scored with the training images' mean and sd (lesson 03);
            ``"test"``: the test images with their own mean and sd, as the released code does.
        n_train: fit on the first n training images only (ascending nsdId; the released decoders fit on the
            first 8,000 of 8,859); None: all.
        select_by: the selection score of the CLIP blocks (:mod:`mdlib.selection`): ``"loo-r2"`` (ridge only)
            or ``"cv5-r"`` (5 more fits per block, on consecutive fifths of the training images).
        device: where the ridge runs (None: CUDA when available).
        cache: read/write ``<data root>/mdlib_cache/decoded/``.
    Returns :class:`Decoded` (docs/method.md, rows "voxels" to "feature selection").
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if standardize not in STANDARDIZE:
        raise ValueError(f"standardize must be one of {STANDARDIZE}, got {standardize!r}")
    if select_by not in selection.SCORES:
        raise ValueError(f"select_by must be one of {selection.SCORES}, got {select_by!r}")
    if n_train is not None and (int(n_train) != n_train or n_train < 2):
        raise ValueError(f"n_train must be an int >= 2 or None, got {n_train!r}")
    available = family_names(sd, clip)
    families = list(available if families is None else families)
    unknown = [f for f in families if f not in available]
    if unknown:
        raise ValueError(f"cannot decode {unknown}: available from the given models: {available} "
                         f"(z and c need sd, the clip_* families need clip)")
    if select_by == "loo-r2" and method != "ridge" and any(f.startswith("clip_block") for f in families):
        raise ValueError(f"the {method} decoder gives no leave-one-out R^2 to select the CLIP features by: use "
                         "select_by='cv5-r' (the released criterion)")
    betas = load_betas(data_root, subject, roi, sessions, progress=progress)
    train, test = betas.train_rows, betas.test_rows
    if n_train is not None:
        train = train[:int(n_train)]
    if len(train) < 2 or len(test) < 1:
        raise ValueError(f"subject {subject}: {len(train)} training and {len(test)} test images in sessions "
                         f"{betas.sessions}: too few to decode")
    X = betas.responses
    mu, sd_x = voxel_mean_sd(X[train])
    # "test": the released code (Reconstruction.py line 311) z-scores the test set with its own statistics
    mu_t, sd_t = voxel_mean_sd(X[test]) if standardize == "test" else (mu, sd_x)
    X_train, X_test = (X[train] - mu) / sd_x, (X[test] - mu_t) / sd_t
    groups = sorted({"clip" if f.startswith("clip_") else f for f in families})
    targets = features.extract_targets(data_root, betas.nsd_ids, sd, clip, targets=groups, n_tokens=n_tokens,
                                       posterior=posterior, seed=seed, n_captions=n_captions, resize=clip_resize,
                                       progress=progress)
    selects = scaled_n_select(betas.n_voxels, n_select, scale_to_roi=scale_n_select)
    x_key = cache_key(X_train, X_test)
    folder = paths.cache_dir(data_root) / "decoded"
    out = Decoded(nsd_ids=betas.nsd_ids[test].copy(), pred={}, true={},
                  params={"subject": subject, "roi": betas.roi, "sessions": list(betas.sessions),
                          "method": method, "n_tokens": n_tokens, "posterior": posterior, "seed": seed,
                          "standardize": standardize, "n_train": len(train), "n_captions": n_captions,
                          "clip_resize": clip_resize, "select_by": select_by})
    for fam in families:
        full = np.asarray(targets[fam])
        if fam == "c":
            full = np.asarray(features.drop_bos(full))
        shape = full.shape[1:]
        Y = full.reshape(len(full), -1)
        cv5 = select_by == "cv5-r" and fam.startswith("clip_block")
        spec = {"version": CACHE_VERSION, "family": fam, "method": method, "x": x_key, "y": cache_key(Y[train]),
                "alphas": [float(a) for a in np.atleast_1d(alphas)] if method == "ridge" else None,
                "n_select": selects["clip" if fam.startswith("clip_") else fam] if method == "fastl2lir" else None,
                **({"select_by": "cv5-r"} if cv5 else {})}
        path = folder / f"subj{subject:02d}_{fam}_{cache_key(spec)}.npz"

        def new_decoder(quiet: bool = False):
            kw = {"device": device, "progress": progress and not quiet}
            if method == "ridge":
                return RidgeDecoder(alphas=alphas, cv="loo", **kw)
            return RidgeDecoder.fastl2lir(n_select=spec["n_select"], **kw)

        if cache and path.is_file():
            with np.load(path) as f:
                pred, alpha, cv_mse = f["pred"], f["alpha"], f["cv_mse"]
                score = f["score"] if "score" in f.files else None
        else:
            dec = new_decoder()
            pred = np.asarray(dec.fit_predict(X_train, Y[train], X_test), dtype=np.float32)
            alpha = np.broadcast_to(np.asarray(dec.alpha_, dtype=np.float64), (Y.shape[1],)).copy()
            cv_mse = (np.full(Y.shape[1], np.nan) if dec.cv_mse_ is None
                      else np.asarray(dec.cv_mse_, dtype=np.float64))
            score = (selection.kfold_abs_r(X_train, Y[train], lambda a, b, c: new_decoder(True).fit_predict(a, b, c))
                     if cv5 else None)
            if cache:
                write_npz_atomic(path, pred=pred, alpha=alpha, cv_mse=cv_mse, nsd_ids=out.nsd_ids,
                                 spec=np.array(json.dumps(spec)), **({} if score is None else {"score": score}))
        out.pred[fam] = pred.reshape(len(test), *shape)
        out.true[fam] = Y[test].reshape(len(test), *shape).astype(np.float32)
        out.r[fam] = pearson_per_target(Y[test], pred)
        out.alpha[fam] = alpha
        out.cv_r2[fam] = r2_from_mse(cv_mse, Y[train])
        out.score[fam] = out.cv_r2[fam] if score is None else np.asarray(score, dtype=np.float64)
    return out


def voxel_mean_sd(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each voxel's mean and sd (ddof 0) over the rows of (n, voxels) ``X``; a constant voxel gets sd 1 (it stays 0
    once centred). The statistics every standardisation of voxels uses (here and in :mod:`mdlib.transfer`)."""
    mu, sd = X.mean(0), X.std(0)
    sd[sd == 0] = 1.0
    return mu, sd
