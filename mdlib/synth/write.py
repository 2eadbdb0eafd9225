"""Write mini-NSD: a small synthetic NSD in NSD's exact on-disk formats, so the real loaders read it unchanged.

Every NSD file is written at the path :mod:`mdlib.nsd.layout` gives and in the format ``docs/data.md``
describes (design ``.mat``, stimulus-info ``.csv``, ``imgBrick`` HDF5, COCO caption JSON, int16 betas as
``.nii.gz`` and ``.hdf5``, ROI volumes and ``.mgz.ctab`` files, the latter also in fsaverage's label folder,
anatomy, and each of the 8 subjects' behavioural ``responses.tsv``, :mod:`mdlib.synth.behaviour`). Sizes are
parameters; nothing is sized by NSD's constants (73000 images, 425 px, 750 trials).

Besides NSD's files, mini-NSD writes a sidecar that real NSD does not have (and the loaders never need):

- ``<root>/mini_nsd.json``: format version, seed, parameters and sizes (see :func:`write_mini_nsd`; the
  layout parameters appear only when layouts are on, so the default mini-NSD's sidecar is unchanged);
- ``<root>/mini_truth/subjNN.npz``: the simulated brain's ground truth for subject NN (see :func:`load_truth`);
- ``<root>/mini_truth/scenes.npz``: every stimulus's scene description, row = 0-based nsdId.

The sidecar files are ``np.savez_compressed`` archives of plain arrays (no pickles).

Determinism: the same parameters and seed give byte-identical files (the gzip and MATLAB headers carry no
time stamps), and a subject's files do not depend on which other subjects are written.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import scipy.io

import mdlib
from mdlib.nsd import layout
from mdlib.progress import bar as progress_bar
from mdlib.synth import behaviour as _behaviour
from mdlib.synth import brain as _brain
from mdlib.synth import scenes as _scenes

#: Version of the mini-NSD format (bump when the files or the simulation change meaning).
MINI_NSD_VERSION = 2
#: The sidecar files (relative to the data root). They are not NSD paths, so they live here, not in layout.
SIDECAR = PurePosixPath("mini_nsd.json")
SCENES_TRUTH = PurePosixPath("mini_truth/scenes.npz")

#: Default sizes: ~1 minute and ~0.4 GB on a 2-core laptop; enough for ridge decoding in the lessons.
DEFAULTS = dict(
    subjects=layout.FULL_SUBJECTS,
    n_shared=40,
    n_per_subject=400,
    trials_per_session=100,
    stim_size=128,
    grid_scale=0.25,
    n_unseen=10,
    snr_scale=1.0,
    seed=0,
)

_N_DESIGN_SUBJECTS = len(layout.ALL_SUBJECTS)  # subjectim always has a row for each of NSD's 8 subjects
_REPEATS = 3  # NSD shows every image 3 times
# Reconstruction papers used NSD sessions 1-37 of 40 (docs/data.md, "The train/test split of reconstruction
# papers"); mini-NSD reports the same fraction.
_PUBLIC_FRACTION = 37 / 40
_COCO_ID_MAX = 581929  # COCO 2017 image ids are below this


def truth_file(subject: int) -> PurePosixPath:
    """``mini_truth/subjNN.npz``: the simulated brain's ground truth for a subject (mini-NSD only)."""
    return PurePosixPath("mini_truth") / f"{layout.subj(subject)}.npz"


# ------------------------------------------------------------------------------------------------ design

@dataclass
class SyntheticDesign:
    """mini-NSD's drawn experimental design (:func:`make_design`), in nsd_expdesign.mat's conventions (1-based
    values), before it is written as that file. The design read back from disk, NSD's or mini-NSD's, is
    :class:`mdlib.nsd.design.Design`.

    ``masterordering`` (n_trials,): subjectim column (1..n_per_subject) shown on each trial, the same for all
    subjects; ``subjectim`` (8, n_per_subject): 1-based nsdIds, ``subjectim[:, :n_shared] == sharedix``;
    ``sharedix`` (n_shared,): 1-based nsdIds, ascending; ``basiccnt`` (3, n_sessions): trials of each session
    that are the 1st/2nd/3rd presentation of their image; ``sessions_completed``: subject -> sessions done
    (scaled from NSD's 40/32/30); ``n_stimuli``: rows of the image brick (some never shown).
    """

    masterordering: np.ndarray
    subjectim: np.ndarray
    sharedix: np.ndarray
    basiccnt: np.ndarray
    trials_per_session: int
    n_shared: int
    n_stimuli: int
    sessions_completed: dict

    @property
    def n_sessions(self) -> int:
        return self.masterordering.size // self.trials_per_session

    @property
    def n_per_subject(self) -> int:
        return self.subjectim.shape[1]

    def presentation_trials(self) -> np.ndarray:
        """(n_per_subject, 3): 0-based global trial of each subjectim column's 1st, 2nd, 3rd presentation
        (the same for every subject: one masterordering serves all)."""
        order = np.argsort(self.masterordering, kind="stable")  # trials grouped by column, in time order
        return order.reshape(self.n_per_subject, _REPEATS)


def _break_adjacent_repeats(mo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Move trials so that no image is shown on two consecutive trials (NSD never does that)."""
    mo = mo.copy()
    n = mo.size
    for _ in range(10 * n):
        bad = np.flatnonzero(mo[1:] == mo[:-1]) + 1
        if bad.size == 0:
            return mo
        t = bad[0]
        u = int(rng.integers(n))
        # swap t and u if neither ends up next to an equal value
        a, b = mo[t], mo[u]
        mo[t], mo[u] = b, a
        ok = all(mo[p] != mo[p + 1] for p in (t - 1, t, u - 1, u) if 0 <= p < n - 1)
        if not ok:
            mo[t], mo[u] = a, b
    raise RuntimeError("could not order the trials without immediate repeats; use more images")


def make_design(n_shared: int, n_per_subject: int, trials_per_session: int, n_unseen: int = 10,
                seed: int = 0) -> SyntheticDesign:
    """Draw a design like NSD's: each subject sees ``n_per_subject`` images 3 times, the first ``n_shared``
    columns shared by all 8 subjects, the others distinct per subject.

    Each image's 3 presentations fall at independent uniformly random times over the whole experiment (then
    sorted), so repeats spread over sessions; some images have their last repeat in the final sessions, so
    keeping only the early sessions (as papers using NSD sessions 1-37 did) leaves some test images with
    fewer than 3 repeats. Every session mixes shared and non-shared images; no image is shown twice in a row.
    """
    _check_design_params(n_shared, n_per_subject, trials_per_session, n_unseen)
    rng = np.random.default_rng((int(seed), 101))
    n_trials = _REPEATS * n_per_subject
    n_sessions = n_trials // trials_per_session
    for _ in range(1000):
        keys = rng.random((n_per_subject, _REPEATS))
        mo = np.argsort(keys.ravel(), kind="stable") // _REPEATS  # 0-based column on each trial
        mo = _break_adjacent_repeats(mo, rng)
        per_session = mo.reshape(n_sessions, trials_per_session)
        if ((per_session < n_shared).any(1) & (per_session >= n_shared).any(1)).all():
            break
    else:
        raise RuntimeError("could not mix shared and non-shared images in every session; use more images")
    m = n_per_subject - n_shared
    n_stimuli = n_shared + _N_DESIGN_SUBJECTS * m + n_unseen
    perm = rng.permutation(n_stimuli)  # nsdIds are scattered: shared images are not the first rows
    sharedix = np.sort(perm[:n_shared]) + 1
    subjectim = np.empty((_N_DESIGN_SUBJECTS, n_per_subject), np.int64)
    for s in range(_N_DESIGN_SUBJECTS):
        subjectim[s, :n_shared] = sharedix
        subjectim[s, n_shared:] = perm[n_shared + s * m: n_shared + (s + 1) * m] + 1
    # repetition number of each trial: how many times its image was shown before
    rep = np.zeros(n_trials, np.int64)
    seen = np.zeros(n_per_subject, np.int64)
    for t, c in enumerate(mo):
        rep[t] = seen[c]
        seen[c] += 1
    basiccnt = np.zeros((_REPEATS, n_sessions), np.int64)
    np.add.at(basiccnt, (rep, np.arange(n_trials) // trials_per_session), 1)
    full = max(layout.NSD_SESSIONS_COMPLETED.values())
    completed = {k: max(1, int(round(n_sessions * v / full))) for k, v in layout.NSD_SESSIONS_COMPLETED.items()}
    return SyntheticDesign(masterordering=mo + 1, subjectim=subjectim, sharedix=sharedix, basiccnt=basiccnt,
                           trials_per_session=int(trials_per_session), n_shared=int(n_shared),
                           n_stimuli=int(n_stimuli), sessions_completed=completed)


def _check_design_params(n_shared, n_per_subject, trials_per_session, n_unseen):
    for name, v in (("n_shared", n_shared), ("n_per_subject", n_per_subject),
                    ("trials_per_session", trials_per_session), ("n_unseen", n_unseen)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int, got {v!r}")
    if n_shared < 1:
        raise ValueError(f"n_shared must be >= 1, got {n_shared}")
    if n_per_subject < n_shared + 1:
        raise ValueError(f"n_per_subject ({n_per_subject}) must exceed n_shared ({n_shared})")
    if n_unseen < 0:
        raise ValueError(f"n_unseen must be >= 0, got {n_unseen}")
    n_trials = _REPEATS * n_per_subject
    if trials_per_session < 2 or n_trials % trials_per_session:
        raise ValueError(f"trials_per_session ({trials_per_session}) must divide the {n_trials} trials "
                         f"(3 x n_per_subject) into whole sessions")
    n_sessions = n_trials // trials_per_session
    if n_sessions > 99:
        raise ValueError(f"{n_sessions} sessions: NSD file names allow at most 99; use longer sessions")
    if _REPEATS * n_shared < n_sessions or _REPEATS * (n_per_subject - n_shared) < n_sessions:
        raise ValueError(f"every one of the {n_sessions} sessions needs shared and non-shared trials: need "
                         f"3 x n_shared >= {n_sessions} and 3 x (n_per_subject - n_shared) >= {n_sessions}")
    if n_per_subject < 4:
        raise ValueError("n_per_subject must be >= 4 (to avoid showing an image twice in a row)")


# ------------------------------------------------------------------------------------------ file writers

def _mat_bytes(mdict: dict) -> bytes:
    """A MATLAB v5 file as bytes, with a fixed header text (scipy writes the creation time there)."""
    buf = io.BytesIO()
    scipy.io.savemat(buf, mdict, format="5", do_compression=False, oned_as="row")
    data = bytearray(buf.getvalue())
    header = b"MATLAB 5.0 MAT-file, Platform: mini-NSD (mdlib), Created by: mdlib.synth.write_mini_nsd"
    data[:116] = header.ljust(116, b" ")
    return bytes(data)


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Save a NIfTI-1 ``.nii.gz`` keeping ``data``'s dtype (no scaling), qform = sform = ``affine`` (code 1).

    Compressed here rather than by nibabel so that the gzip header holds no time stamp (byte-reproducible).
    """
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0, compresslevel=6) as gz:
        gz.write(img.to_bytes())


def _write_design(root: Path, d: SyntheticDesign) -> None:
    # MATLAB stores these as doubles, as the real file does: loaders must cast to int.
    _write_bytes(root / layout.expdesign(), _mat_bytes({
        "masterordering": d.masterordering[None, :].astype(np.float64),
        "subjectim": d.subjectim.astype(np.float64),
        "sharedix": d.sharedix[None, :].astype(np.float64),
        "basiccnt": d.basiccnt.astype(np.float64),
    }))


def _stim_info(d: SyntheticDesign, rng: np.random.Generator) -> tuple[pd.DataFrame, dict]:
    """nsd_stim_info_merged's table (row = nsdId) and each stimulus's original COCO (width, height)."""
    n = d.n_stimuli
    coco_ids = rng.choice(np.arange(1, _COCO_ID_MAX), size=n, replace=False)
    split = np.where(rng.random(n) < 0.85, "train2017", "val2017")
    sizes = [(640, 480), (640, 427), (500, 375), (480, 640), (427, 640), (640, 640)]
    wh = [sizes[i] for i in rng.integers(len(sizes), size=n)]
    crop = []
    for w, h in wh:
        # NSD cropped each COCO image to a square; the box is (top, bottom, left, right) fractions cut away.
        cut = abs(w - h) / max(w, h)
        a = round(float(cut * rng.uniform(0.3, 0.7)), 6) if cut else 0
        b = round(cut - a, 6) if cut else 0
        crop.append(str((0, 0, a, b) if w > h else (a, b, 0, 0)))
    df = pd.DataFrame({
        "cocoId": coco_ids.astype(np.int64),
        "cocoSplit": split,
        "cropBox": crop,
        "loss": np.round(rng.uniform(0, 0.1, n) * (rng.random(n) < 0.5), 6),
        "nsdId": np.arange(n, dtype=np.int64),
        "flagged": rng.random(n) < 0.02,
        "BOLD5000": rng.random(n) < 0.03,
        "shared1000": np.isin(np.arange(n), d.sharedix - 1),
    })
    trials = d.presentation_trials()  # (n_per_subject, 3) 0-based trial of each column's presentations
    for k in layout.ALL_SUBJECTS:
        df[f"subject{k}"] = np.isin(np.arange(n), d.subjectim[k - 1] - 1).astype(np.int64)
    last_trial = {k: d.sessions_completed[k] * d.trials_per_session for k in layout.ALL_SUBJECTS}
    for k in layout.ALL_SUBJECTS:
        for r in range(_REPEATS):
            col = np.zeros(n, np.int64)
            num = trials[:, r] + 1  # 1-based global trial number
            col[d.subjectim[k - 1] - 1] = np.where(num <= last_trial[k], num, 0)  # 0: never shown
            df[f"subject{k}_rep{r}"] = col
    return df, dict(zip(range(n), wh))


def _write_captions(root: Path, df: pd.DataFrame, scene_list: list, wh: dict, seed: int,
                    rng: np.random.Generator, layouts: dict | None = None) -> None:
    """COCO-format caption files: 5 captions per stimulus, plus a few COCO images that NSD does not use
    (the loaders must match by cocoId, not by position), drawn with the stimuli's ``layouts`` options
    (:func:`mdlib.synth.scenes.random_scene`'s ``layout_share`` and ``layout_kinds``; None: none). Annotations
    are shuffled, as in COCO."""
    files = {s: {"info": {"description": "mini-NSD captions (synthetic, COCO 2017 format)",
                          "version": str(MINI_NSD_VERSION), "year": 2017},
                 "licenses": [], "images": [], "annotations": []} for s in ("train2017", "val2017")}
    entries = [(int(r.cocoId), r.cocoSplit, scene_list[i], wh[i]) for i, r in enumerate(df.itertuples())]
    n_extra = max(2, len(df) // 100)
    used = set(int(c) for c in df["cocoId"])
    extra_ids = [c for c in rng.choice(np.arange(1, _COCO_ID_MAX), size=4 * n_extra, replace=False)
                 if int(c) not in used][:n_extra]
    for j, cid in enumerate(extra_ids):
        sc = _scenes.random_scene(np.random.default_rng((seed, 203, j)), **(layouts or {}))
        entries.append((int(cid), "train2017" if j % 2 == 0 else "val2017", sc, (640, 480)))
    ann_id = 1
    for cid, split, sc, (w, h) in entries:
        files[split]["images"].append({"id": cid, "file_name": f"{cid:012d}.jpg", "width": w, "height": h})
        caps = _scenes.captions(sc, np.random.default_rng((seed, 202, cid)), n=5)
        for cap in caps:
            files[split]["annotations"].append({"id": ann_id, "image_id": cid, "caption": cap})
            ann_id += 1
    for split, content in files.items():
        order = rng.permutation(len(content["annotations"]))
        content["annotations"] = [content["annotations"][i] for i in order]
        _write_bytes(root / layout.coco_captions(split), json.dumps(content).encode())


def _write_brick(root: Path, scene_list: list, size: int) -> None:
    """``imgBrick`` (n, size, size, 3) uint8, contiguous and uncompressed like NSD's, written in blocks."""
    path = root / layout.stimuli()
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("imgBrick", shape=(len(scene_list), size, size, 3), dtype=np.uint8)
        block = 256
        for s0 in range(0, len(scene_list), block):
            ds[s0:s0 + block] = np.stack([_scenes.render(sc, size) for sc in scene_list[s0:s0 + block]])


def _read_brick_rows(root: Path, rows: np.ndarray) -> np.ndarray:
    """Rows of the brick in the given order (h5py needs increasing indices: sort, read, un-sort)."""
    rows = np.asarray(rows)
    order = np.argsort(rows)
    with h5py.File(root / layout.stimuli(), "r") as f:
        data = f["imgBrick"][np.sort(rows)]
    out = np.empty_like(data)
    out[order] = data
    return out


def _write_subject_static(root: Path, b: _brain.SimulatedBrain) -> None:
    """ROI volumes, ctab files and anatomy of one subject."""
    s, aff = b.subject, b.anat.affine
    for atlas, vol in b.rois.items():
        _save_nifti(root / layout.roi_file(s, atlas), vol.astype(np.int16), aff)
        _write_bytes(root / layout.roi_ctab(s, atlas), _brain.ctab_text(atlas).encode())
    _save_nifti(root / layout.anatomy_file(s, "T1_to_func1pt8mm"), b.anat.t1, aff)
    _save_nifti(root / layout.anatomy_file(s, "mean"), b.anat.mean, aff)
    _save_nifti(root / layout.anatomy_file(s, "brainmask"), b.anat.brainmask.astype(np.int16), aff)


def _write_fsaverage_ctabs(root: Path) -> None:
    """The atlases' ctab files in NSD's fsaverage label folder, where nsd_access reads them."""
    for atlas in _brain.ROI_LABELS:
        _write_bytes(root / layout.fsaverage_roi_ctab(atlas), _brain.ctab_text(atlas).encode())


def _write_responses(root: Path, d: SyntheticDesign, seed: int) -> None:
    """NSD's behavioural file for each of the design's 8 subjects, over the sessions each one completed
    (:mod:`mdlib.synth.behaviour`; its own random stream, so no other file changes)."""
    for s in layout.ALL_SUBJECTS:
        table = _behaviour.simulate_responses(d.masterordering, d.subjectim, d.trials_per_session, s,
                                              d.sessions_completed[s], seed)
        _write_bytes(root / layout.behav_responses(s), _behaviour.responses_tsv(table))


def _write_session(root: Path, b: _brain.SimulatedBrain, d: SyntheticDesign, session: int) -> None:
    """betas_sessionSS as .nii.gz (X, Y, Z, T) and .hdf5 (T, Z, Y, X), int16 = % x 300, zero off-brain."""
    T = d.trials_per_session
    t0 = (session - 1) * T
    columns = d.masterordering[t0:t0 + T] - 1
    psc = b.session_betas(columns, session)  # (n_brain, T) %
    vals = np.clip(np.rint(psc * layout.BETA_SCALE), np.iinfo(np.int16).min, np.iinfo(np.int16).max)
    vol = b.volume(vals.astype(np.int16))  # (X, Y, Z, T), 0 off-brain
    _save_nifti(root / layout.betas_file(b.subject, session, "nii.gz"), vol, b.anat.affine)
    path = root / layout.betas_file(b.subject, session, "hdf5")
    with h5py.File(path, "w") as f:
        # HDF5 (i, j, k) = NIfTI (k, j, i): time first, chunked one voxel's time series per chunk like NSD.
        f.create_dataset("betas", data=np.ascontiguousarray(vol.transpose(3, 2, 1, 0)), chunks=(T, 1, 1, 1))


def _write_truth(root: Path, b: _brain.SimulatedBrain, d: SyntheticDesign) -> None:
    """The ground-truth sidecar of a subject (see :func:`load_truth`)."""
    sig = np.flatnonzero(b.signal_sd > 0)
    ijk = np.stack(np.unravel_index(b.voxels[sig], b.anat.dims), axis=1).astype(np.int16)
    gains, offsets = zip(*(b.session_drift(s) for s in range(1, d.sessions_completed[b.subject] + 1)))
    nan = np.float32(np.nan)
    area_vol = _brain.true_areas(b.anat)
    arrays = dict(
        subject=np.int16(b.subject), dims=np.asarray(b.anat.dims, np.int16), affine=b.anat.affine,
        brainmask=b.anat.brainmask.astype(np.uint8),
        tissue=(b.anat.brainmask.astype(np.int8) + b.anat.cortex + 2 * b.anat.white).astype(np.int8),
        area=area_vol, area_names=np.array(("none",) + _brain.KASTNER2015),
        signal_sd=b.volume(b.signal_sd), noise_sd=b.volume(b.noise_sd), ncsnr=b.volume(b.ncsnr),
        reliability=b.volume(b.reliability), nc1=b.volume(b.noise_ceiling(1)),
        nc3=b.volume(b.noise_ceiling(_REPEATS)), baseline=b.volume(b.baseline),
        prf_x=b.volume(b.prf_x, nan), prf_y=b.volume(b.prf_y, nan), prf_sigma=b.volume(b.prf_sigma, nan),
        lowlevel_fraction=b.volume(b.lowlevel_fraction, nan),
        session_gain=np.stack([b.volume(g, np.float32(1)) for g in gains]),
        session_offset=np.stack([b.volume(o) for o in offsets]),
        noise_shared=np.float32(b.noise_shared),
        signal=b.signal[:, sig], signal_voxels=ijk,
        signal_nsd_ids=(d.subjectim[b.subject - 1] - 1).astype(np.int64),
    )
    path = root / truth_file(b.subject)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    _write_bytes(path, _normalise_zip(buf.getvalue()))


def _normalise_zip(data: bytes) -> bytes:
    """Re-write a zip (an .npz) with fixed member time stamps, so that equal arrays give equal bytes."""
    import zipfile

    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            zi = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(zi, src.read(info.filename))
    return out.getvalue()


def _write_scenes_truth(root: Path, scene_list: list) -> None:
    arrays = _scenes.scene_arrays(scene_list)
    arrays.update(
        encoded=np.stack([_scenes.encode(s) for s in scene_list]),
        feature_names=np.array(_scenes.FEATURE_NAMES), shape_names=np.array(_scenes.SHAPES),
        colour_names=np.array(list(_scenes.COLOURS)), background_names=np.array(list(_scenes.BACKGROUNDS)),
        texture_names=np.array(list(_scenes.TEXTURES)),
    )
    if "layout_kind" in arrays:   # only when some scene has a layout: the default file stays as it was
        arrays.update(layout_kind_names=np.array(_scenes.LAYOUT_KINDS))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    _write_bytes(root / SCENES_TRUTH, _normalise_zip(buf.getvalue()))


def _remove_previous(root: Path) -> None:
    """Delete the files of a mini-NSD written earlier under ``root`` (listed in its sidecar), so that none of
    its sessions or subjects survive beside the new ones. Nothing else under ``root`` is touched."""
    path = root / SIDECAR
    if not path.is_file():
        return
    try:
        files = json.loads(path.read_text()).get("files", [])
    except (OSError, ValueError):
        files = []
    for rel in files:
        target = (root / rel).resolve()
        if root.resolve() in target.parents and target.is_file():
            target.unlink()
    path.unlink()


def load_truth(root, subject: int) -> dict[str, np.ndarray]:
    """The ground truth of a mini-NSD subject, as a dict of arrays (volumes are (X, Y, Z), NIfTI order).

    Keys: ``dims``, ``affine``; ``brainmask`` (uint8); ``tissue`` (int8: 0 outside the brain, 1 CSF,
    2 grey matter (cortex), 3 white matter); ``area`` (int16: -1 off cortex, 0 none, k =
    ``area_names[k]``, the same numbering as Kastner2015's labels) and ``area_names``; per voxel, float32:
    ``signal_sd`` (% signal change: sd of the noiseless response over the subject's images), ``noise_sd`` (%,
    single trial), ``ncsnr`` (= signal_sd / noise_sd), ``reliability`` (expected correlation between two
    single-trial responses across images, ncsnr^2 / (1 + ncsnr^2)), ``nc1`` and ``nc3`` (NSD noise ceilings,
    % variance, for 1 and 3 averaged trials), ``baseline`` (%), ``prf_x``, ``prf_y``, ``prf_sigma`` (pRF
    centre and sd, fractions of the image side from the left / top; NaN without a pRF), ``lowlevel_fraction``
    (share of the signal driven by low-level features; NaN without signal); ``session_gain``,
    ``session_offset`` (n_sessions, X, Y, Z); ``noise_shared`` (fraction of noise variance common to all
    voxels); ``signal`` (n_per_subject, n_signal) float32 noiseless responses (%) with ``signal_voxels``
    (n_signal, 3) their (i, j, k) and ``signal_nsd_ids`` (n_per_subject,) each row's 0-based nsdId.
    """
    path = Path(root) / truth_file(subject)
    if not path.is_file():
        raise FileNotFoundError(f"no mini-NSD ground truth at {path}: is {root} a mini-NSD root "
                                "(written by mdlib.synth.write_mini_nsd)?")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# --------------------------------------------------------------------------------------------- entry point

def write_mini_nsd(root, subjects=DEFAULTS["subjects"], n_shared: int = DEFAULTS["n_shared"],
                   n_per_subject: int = DEFAULTS["n_per_subject"],
                   trials_per_session: int = DEFAULTS["trials_per_session"],
                   stim_size: int = DEFAULTS["stim_size"], grid_scale: float = DEFAULTS["grid_scale"],
                   n_unseen: int = DEFAULTS["n_unseen"], snr_scale: float = DEFAULTS["snr_scale"],
                   seed: int = DEFAULTS["seed"], progress: bool = True, layout_share: float = 0.0,
                   layout_kinds=_scenes.LAYOUT_KINDS) -> dict:
    """Write a mini-NSD under ``root`` and return a summary dict.

    Parameters
    ----------
    root: the data root (created); NSD's relative paths (:mod:`mdlib.nsd.layout`) are written beneath it.
    subjects: subjects whose betas, ROIs and anatomy are written (any of 1, 2, 5, 7: those with a known
        func1pt8mm grid). The design and stimulus info always cover NSD's 8 subjects.
    n_shared: images shown to every subject (NSD: 1000). n_per_subject: images per subject (NSD: 10000), each
        shown 3 times. trials_per_session: trials per session (NSD: 750); must divide 3 x n_per_subject.
    stim_size: image side in pixels (NSD: 425). grid_scale: each subject's func1pt8mm grid is NSD's
        (``layout.NSD_GRIDS``) times this, voxels stay 1.8 mm.
    n_unseen: stimuli in the brick that no subject sees. snr_scale: multiplies every voxel's ncsnr
        (1.0 gives NSD-like 0.2-0.9 in visual cortex). seed: everything is a deterministic function of it.
    progress: show a tqdm bar over the (subject, session) files.
    layout_share, layout_kinds: the share of scenes (stimuli and the unused COCO images alike) given a
        large-scale layout, and its kinds (:func:`mdlib.synth.scenes.random_scene`; docs/mini_world.md,
        "Scene layouts"). An experiment in which stage 2 did not restore the layouts (benchmarks/README.md),
        off by default: with ``layout_share=0`` every file is byte-identical to what this writer wrote before
        layouts existed, and the sidecar does not mention them. Otherwise each scene is the one the same seed
        gives without layouts, plus its layout if it drew one, and ``parameters`` records both options.

    Returns a dict: ``root``, ``version``, ``parameters``, ``n_stimuli``, ``n_sessions``, ``subjects`` (per
    subject: grid, voxel counts), ``seconds`` (wall time), ``bytes`` (on disk), ``n_files``.
    """
    t_start = time.perf_counter()
    root = Path(root).expanduser()
    _refuse_other_data(root)
    subjects = tuple(int(s) for s in (subjects if np.ndim(subjects) else (subjects,)))
    if not subjects or len(set(subjects)) != len(subjects):
        raise ValueError(f"subjects must be a non-empty list of distinct subjects, got {subjects!r}")
    if not isinstance(stim_size, (int, np.integer)) or not 16 <= stim_size <= 1024:
        raise ValueError(f"stim_size must be an int in 16..1024 pixels, got {stim_size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not 0 < float(grid_scale) <= 1:
        raise ValueError(f"grid_scale must be in (0, 1] (1 = NSD's own grid), got {grid_scale!r}")
    layout_share, layout_kinds = _scenes.check_layout_options(layout_share, layout_kinds)
    # Only when on do the layout options reach the scenes and the sidecar: off, nothing written changes.
    layouts = dict(layout_share=layout_share, layout_kinds=layout_kinds) if layout_share > 0 else {}
    grids = {s: _brain.subject_grid(s, grid_scale) for s in subjects}  # validates subjects and the scale
    if (root / layout.expdesign()).exists() and not (root / SIDECAR).exists():
        raise FileExistsError(f"{root} holds an NSD design file but no {SIDECAR}: it looks like a real NSD; "
                              "mini-NSD will not write over it (choose another root)")
    design = make_design(n_shared, n_per_subject, trials_per_session, n_unseen, seed)
    _remove_previous(root)
    params = dict(subjects=list(subjects), n_shared=int(n_shared), n_per_subject=int(n_per_subject),
                  trials_per_session=int(trials_per_session), stim_size=int(stim_size),
                  grid_scale=float(grid_scale), n_unseen=int(n_unseen), snr_scale=float(snr_scale), seed=int(seed))
    if layouts:
        params.update(layout_share=layout_share, layout_kinds=list(layout_kinds))

    # Shared files: design, stimulus info, captions, image brick.
    _write_design(root, design)
    scene_list = [_scenes.random_scene(np.random.default_rng((int(seed), 201, i)), **layouts)
                  for i in range(design.n_stimuli)]
    info_rng = np.random.default_rng((int(seed), 102))
    df, wh = _stim_info(design, info_rng)
    stim_path = root / layout.stim_info("csv")
    stim_path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(stim_path)  # the leading unnamed column is the index, as in NSD's csv
    _write_captions(root, df, scene_list, wh, int(seed), info_rng, layouts)
    _write_brick(root, scene_list, int(stim_size))
    _write_scenes_truth(root, scene_list)
    _write_responses(root, design, int(seed))
    _write_fsaverage_ctabs(root)

    # Per subject: simulated brain, ROIs, anatomy, betas, truth.
    per_subject = {}
    total = sum(design.sessions_completed[s] for s in subjects)
    with progress_bar(total=total, desc="mini-NSD betas", unit="session", progress=progress) as bar:
        for s in subjects:
            bar.set_postfix_str(f"{layout.subj(s)}: simulating")
            cols = design.subjectim[s - 1] - 1
            images = _read_brick_rows(root, cols)
            b = _brain.simulate_brain(s, grids[s], images, [scene_list[i] for i in cols], seed=int(seed),
                                      snr_scale=float(snr_scale))
            _write_subject_static(root, b)
            _write_truth(root, b, design)
            for sess in range(1, design.sessions_completed[s] + 1):
                bar.set_postfix_str(f"{layout.subj(s)} session {sess:02d}")
                _write_session(root, b, design, sess)
                bar.update(1)
            per_subject[s] = dict(
                grid=list(grids[s]), n_sessions=design.sessions_completed[s],
                n_brain_voxels=int(b.anat.brainmask.sum()), n_cortex_voxels=int(b.anat.cortex.sum()),
                n_nsdgeneral=int((b.rois["nsdgeneral"] == 1).sum()),
                n_visualrois=int((b.rois["prf-visualrois"] > 0).sum()),
                n_kastner=int((b.rois["Kastner2015"] > 0).sum()),
                n_signal_voxels=int((b.signal_sd > 0).sum()),
                median_ncsnr_nsdgeneral=float(np.median(b.volume(b.ncsnr)[b.rois["nsdgeneral"] == 1])),
            )

    written = [layout.expdesign(), layout.stim_info("csv"), layout.stimuli(), SCENES_TRUTH,
               layout.coco_captions("train2017"), layout.coco_captions("val2017")]
    written += [layout.behav_responses(s) for s in layout.ALL_SUBJECTS]
    written += [layout.fsaverage_roi_ctab(a) for a in layout.ROI_ATLASES]
    for s in subjects:
        written += [truth_file(s), layout.anatomy_file(s, "T1_to_func1pt8mm"), layout.anatomy_file(s, "mean"),
                    layout.anatomy_file(s, "brainmask")]
        written += [layout.roi_file(s, a) for a in layout.ROI_ATLASES] + [layout.roi_ctab(s, a) for a in
                                                                          layout.ROI_ATLASES]
        written += [layout.betas_file(s, k, f) for k in range(1, design.sessions_completed[s] + 1)
                    for f in ("nii.gz", "hdf5")]
    n_pub = max(1, int(round(design.n_sessions * _PUBLIC_FRACTION)))
    mo_pub = design.masterordering[: n_pub * design.trials_per_session]
    meta = dict(
        format="mini-NSD", version=MINI_NSD_VERSION, mdlib_version=mdlib.__version__, seed=int(seed),
        parameters=params,
        sizes=dict(n_stimuli=design.n_stimuli, n_trials=int(design.masterordering.size),
                   n_sessions=design.n_sessions, trials_per_session=design.trials_per_session,
                   stim_size=int(stim_size), beta_scale=layout.BETA_SCALE,
                   sessions_completed={str(k): v for k, v in design.sessions_completed.items()},
                   public_sessions_analog=n_pub,
                   n_train_images_public=int(np.unique(mo_pub[mo_pub > n_shared]).size),
                   n_test_images_public=int(np.unique(mo_pub[mo_pub <= n_shared]).size),
                   n_test_trials_public=int((mo_pub <= n_shared).sum()),
                   subjects={str(k): v for k, v in per_subject.items()}),
        sidecar=dict(truth={str(s): str(truth_file(s)) for s in subjects}, scenes=str(SCENES_TRUTH)),
        files=[str(rel) for rel in written],
        note=("Synthetic data in NSD's file formats, written by mdlib.synth.write_mini_nsd; not NSD. "
              "mini_nsd.json and mini_truth/ are mini-NSD's own sidecar (ground truth of the simulation)."),
    )
    _write_bytes(root / SIDECAR, (json.dumps(meta, indent=2) + "\n").encode())

    n_bytes = sum(os.path.getsize(root / rel) for rel in written) + os.path.getsize(root / SIDECAR)
    n_files = len(written) + 1
    return dict(root=str(root), version=MINI_NSD_VERSION, parameters=params, n_stimuli=design.n_stimuli,
                n_sessions=design.n_sessions, subjects=per_subject, seconds=time.perf_counter() - t_start,
                bytes=n_bytes, n_files=n_files)


#: Top-level folders of an NSD data root (docs/data.md): a root holding any of them without mini-NSD's sidecar
#: holds other data, which mini-NSD must never overwrite.
NSD_TOP_LEVEL = ("nsddata", "nsddata_betas", "nsddata_stimuli", "nsddata_timeseries", "nsddata_rawdata", "coco")


def _refuse_other_data(root: Path) -> None:
    if (root / SIDECAR).is_file() or not root.is_dir():
        return
    found = sorted(name for name in NSD_TOP_LEVEL if (root / name).exists())
    if found:
        raise FileExistsError(
            f"{root} holds other data ({', '.join(found)}) and no {SIDECAR}: it looks like a real NSD, and mini-NSD "
            f"is never written over it. Write mini-NSD into another folder (`mdlib mini OTHER_FOLDER`, or "
            f"DATA_ROOT in the lessons), or read this one with the nsd preset.")


def ensure_mini_nsd(root, progress: bool = True, **params) -> Path:
    """Write a mini-NSD at ``root`` unless one of this version is already there; returns ``root``.

    An existing mini-NSD (marked by its ``mini_nsd.json``) is kept whatever its parameters, so a learner's own
    ``mdlib mini --n-per-subject ...`` survives; one written by another version of the writer is rewritten.
    """
    root = Path(root).expanduser()
    sidecar = root / SIDECAR
    if sidecar.is_file():
        try:
            version = json.loads(sidecar.read_text()).get("version")
        except (OSError, ValueError):
            version = None
        if version == MINI_NSD_VERSION:
            return root
        print(f"mini-NSD at {root} is version {version}, this mdlib writes {MINI_NSD_VERSION}: rewriting")
    else:
        print(f"writing mini-NSD to {root} (about 15 s) ...", flush=True)
    write_mini_nsd(root, progress=progress, **params)
    return root
