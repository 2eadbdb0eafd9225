"""NSD's relative paths: the one place in mdlib where they are written.

Every path here is relative to a *data root* that mirrors the bucket ``s3://natural-scenes-dataset/``
(see ``docs/data.md``). The same strings serve as S3 keys for ``mdlib fetch`` and as paths under a
local root, so they are POSIX strings. The COCO caption files do not come from the bucket; they live under
``coco/annotations/`` in the data root.

mini-NSD (``mdlib.synth``) writes through these functions, and the loaders read through them, so the two
cannot drift apart. Taught in ``notebooks/01_nsd_data.ipynb``.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np

#: The subjects of NSD (1..8) and the four who completed all 40 sessions (used by reconstruction papers).
ALL_SUBJECTS = (1, 2, 3, 4, 5, 6, 7, 8)
FULL_SUBJECTS = (1, 2, 5, 7)

#: Documented NSD constants. Loaders read sizes from the files; these are only used to check real data and
#: as defaults for messages, never to size arrays.
NSD_N_STIMULI = 73000
NSD_STIMULUS_SIZE = 425
NSD_TRIALS_PER_SESSION = 750
NSD_SESSIONS_COMPLETED = {1: 40, 2: 40, 3: 32, 4: 30, 5: 40, 6: 32, 7: 40, 8: 30}
#: Percent signal change is stored as int16 times this factor.
BETA_SCALE = 300.0

#: The func1pt8mm volume grids (X, Y, Z) of the four subjects reconstruction papers use (docs/data.md,
#: "ROIs, label tables and anatomy").
NSD_GRIDS = {1: (81, 104, 83), 2: (82, 106, 84), 5: (79, 97, 78), 7: (78, 95, 81)}
VOXEL_SIZE_MM = 1.8


def nsd_affine(shape) -> np.ndarray:
    """NSD's func1pt8mm affine (4, 4) for a grid of ``shape`` (X, Y, Z, ...): 1.8 mm voxels, centred, RAS.

    diag(1.8, 1.8, 1.8) and translation -((dims - 1) / 2) * 1.8, e.g. (-72.0, -92.7, -73.8) for subj01
    (docs/data.md, "ROIs, label tables and anatomy"). mini-NSD writes it; loaders use it when a mask comes as a
    bare array without an affine.
    """
    dims = np.asarray(tuple(shape)[:3], dtype=float)
    affine = np.diag([VOXEL_SIZE_MM] * 3 + [1.0])
    affine[:3, 3] = -(dims - 1) / 2 * VOXEL_SIZE_MM
    return affine

#: The beta version MindDiffuser uses (docs/method.md) and the volume space.
DEFAULT_BETAS = "betas_fithrf_GLMdenoise_RR"
DEFAULT_SPACE = "func1pt8mm"

#: ROI atlases available as volumes in func1pt8mm space.
ROI_ATLASES = ("nsdgeneral", "prf-visualrois", "Kastner2015", "streams")

_P = PurePosixPath


def subject_number(subject) -> int:
    """``subject`` as an int in 1..8: whole numbers only (1, ``np.int64(1)``, ``1.0``); a bool, a fraction
    (1.5), a string or a subject NSD does not have raises ValueError naming it."""
    import numbers

    if isinstance(subject, bool) or not isinstance(subject, numbers.Real) or subject != int(subject):
        raise ValueError(f"a subject is a whole number 1..8; got {subject!r}")
    if int(subject) not in ALL_SUBJECTS:
        raise ValueError(f"NSD has subjects 1..8; got subject {subject!r}")
    return int(subject)


def subj(subject: int) -> str:
    """'subj01' for subject 1; raises ValueError for anything but NSD's subjects 1..8 (:func:`subject_number`)."""
    return f"subj{subject_number(subject):02d}"


def expdesign() -> PurePosixPath:
    return _P("nsddata/experiments/nsd/nsd_expdesign.mat")


def stim_info(ext: str = "csv") -> PurePosixPath:
    """``nsd_stim_info_merged.csv`` (or ``.pkl``: a pickle, which mdlib never reads or writes)."""
    return _P(f"nsddata/experiments/nsd/nsd_stim_info_merged.{ext}")


def stimuli() -> PurePosixPath:
    """The image brick: HDF5 dataset ``imgBrick`` of shape (n_stimuli, H, W, 3) uint8, row = 0-based nsdId."""
    return _P("nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5")


#: Where mdlib keeps per-subject stimulus files (mdlib's own folder: the bucket has no such files).
SUBJECT_STIMULI_DIR = _P("nsddata_stimuli/stimuli/nsd/subsets")


def subject_stimuli(subject: int) -> PurePosixPath:
    """One subject's images only: ``nsddata_stimuli/stimuli/nsd/subsets/subjNN_stimuli.hdf5``.

    Written by ``mdlib fetch`` (ranged reads of the bucket's brick), not part of the bucket: dataset
    ``imgBrick`` (n, H, W, 3) uint8 with the subject's images (10,000 in NSD, about 5.4 GB instead of the
    brick's 39.6 GB), dataset ``nsd_ids`` (n,) int64, the 0-based nsdId of each row, ascending, and dataset
    ``row_sha256`` (n, 32) uint8, each row's SHA-256 (checked by ``mdlib fetch --verify``; docs/fetch.md).
    """
    return SUBJECT_STIMULI_DIR / f"{subj(subject)}_stimuli.hdf5"


def stimuli_sources(root: Path | str) -> list[PurePosixPath]:
    """The stimulus files the loaders read under ``root``: the brick if it is there, else every per-subject
    file there (:func:`subject_stimuli`, read as one set); ``[]`` if there is neither."""
    root = Path(root)
    if (root / str(stimuli())).is_file():
        return [stimuli()]
    return [subject_stimuli(s) for s in ALL_SUBJECTS if (root / str(subject_stimuli(s))).is_file()]


def stimuli_in(root: Path | str, subject: int | None = None) -> PurePosixPath:
    """The one stimulus file that holds ``subject``'s images under ``root``: the brick if present, else the
    subject's own file if present (any subject's if ``subject`` is None), else the brick's path (absent)."""
    sources = stimuli_sources(root)
    if subject is not None and subject_stimuli(subject) in sources:
        return subject_stimuli(subject)
    return sources[0] if sources else stimuli()


def betas_dir(subject: int, space: str = DEFAULT_SPACE, betas: str = DEFAULT_BETAS) -> PurePosixPath:
    return _P(f"nsddata_betas/ppdata/{subj(subject)}/{space}/{betas}")


def betas_file(subject: int, session: int, fmt: str = "nii.gz", space: str = DEFAULT_SPACE,
               betas: str = DEFAULT_BETAS) -> PurePosixPath:
    """``betas_sessionSS.nii.gz`` (X, Y, Z, T) or ``betas_sessionSS.hdf5`` (dataset ``betas``, (T, Z, Y, X))."""
    if fmt not in ("nii.gz", "hdf5"):
        raise ValueError(f"betas format must be 'nii.gz' or 'hdf5', got {fmt!r}")
    if not 1 <= int(session) <= 99:
        raise ValueError(f"session numbers are 1-based (1..40 in NSD), got {session!r}")
    return betas_dir(subject, space, betas) / f"betas_session{int(session):02d}.{fmt}"


def ppdata_dir(subject: int, space: str = DEFAULT_SPACE) -> PurePosixPath:
    return _P(f"nsddata/ppdata/{subj(subject)}/{space}")


def roi_file(subject: int, atlas: str, space: str = DEFAULT_SPACE) -> PurePosixPath:
    """An ROI volume: -1 outside cortex, 0 unlabelled cortex, 1..N labels."""
    return ppdata_dir(subject, space) / "roi" / f"{atlas}.nii.gz"


def roi_ctab(subject: int, atlas: str) -> PurePosixPath:
    """The label names of an atlas: text lines ``N name``."""
    return _P(f"nsddata/freesurfer/{subj(subject)}/label/{atlas}.mgz.ctab")


def fsaverage_roi_ctab(atlas: str) -> PurePosixPath:
    """The same label table in NSD's fsaverage folder (where nsd_access reads it): text lines ``N name``."""
    return _P(f"nsddata/freesurfer/fsaverage/label/{atlas}.mgz.ctab")


def behav_responses(subject: int) -> PurePosixPath:
    """NSD's per-trial behaviour of a subject: ``responses.tsv``, tab-separated, one row per stimulus trial."""
    return _P(f"nsddata/ppdata/{subj(subject)}/behav/responses.tsv")


def anatomy_file(subject: int, name: str = "T1_to_func1pt8mm", space: str = DEFAULT_SPACE) -> PurePosixPath:
    """Anatomy on the betas' grid: ``T1_to_func1pt8mm``, ``mean`` or ``brainmask``."""
    return ppdata_dir(subject, space) / f"{name}.nii.gz"


def coco_captions(split: str) -> PurePosixPath:
    """COCO 2017 caption annotations (from the COCO site, not the NSD bucket); split 'train2017' or 'val2017'."""
    if split not in ("train2017", "val2017"):
        raise ValueError(f"COCO split must be 'train2017' or 'val2017', got {split!r}")
    return _P(f"coco/annotations/captions_{split}.json")


def nsd_coco_captions(split: str) -> PurePosixPath:
    """The same COCO caption file where nsd_access and many community trees keep it, beside the stimuli
    (not in the NSD bucket either); :func:`mdlib.nsd.stimuli.load_captions` reads it when
    :func:`coco_captions` is absent."""
    coco_captions(split)  # checks the split
    return _P(f"nsddata_stimuli/stimuli/nsd/annotations/captions_{split}.json")


#: Where each file comes from, for error messages that say how to get a missing file.
def how_to_get(rel: PurePosixPath | str) -> str:
    rel = str(rel)
    if rel.startswith("coco/"):
        return ("`mdlib fetch --data-root <data root>` extracts it from the COCO 2017 annotations zip; or download "
                "annotations_trainval2017.zip from the COCO website and place "
                f"{Path(rel).name} at <data root>/{rel}; or run `mdlib mini <data root>` for mini-NSD")
    if rel == str(stimuli()) or rel.startswith(str(SUBJECT_STIMULI_DIR) + "/"):
        return ("`mdlib fetch --subject N --data-root <data root>` writes one subject's images (about 5.4 GB) to "
                f"<data root>/{subject_stimuli(1).parent}/subjNN_stimuli.hdf5, which the loaders read when the "
                f"brick (<data root>/{stimuli()}, 39.6 GB) is absent; or write a synthetic mini-NSD with "
                "`mdlib mini <data root>`")
    return (f"`mdlib fetch --subject N --what minimal|full --data-root <data root>` fetches the lessons' files "
            f"(after accepting the NSD terms); or fetch this one from s3://natural-scenes-dataset/{rel}, e.g. "
            f"`aws s3 cp --no-sign-request s3://natural-scenes-dataset/{rel} <data root>/{rel}`; "
            "or write a synthetic mini-NSD with `mdlib mini <data root>`")


def require(root: Path | str, rel: PurePosixPath | str) -> Path:
    """The absolute path of ``rel`` under ``root``; FileNotFoundError naming the NSD path and the fix if absent."""
    path = Path(root) / str(rel)
    if not path.is_file():
        fix = _mini_fix(Path(root)) or how_to_get(rel)
        raise FileNotFoundError(f"NSD file missing: {path}\n  (NSD path: {rel})\n  To get it: {fix}")
    return path


def _mini_fix(root: Path) -> str | None:
    """For a mini-NSD root (its ``mini_nsd.json`` sidecar), how to write what is missing: mini-NSD is written
    for a list of subjects, so a file of another subject comes from writing it again with that subject."""
    import json

    try:
        meta = json.loads((root / "mini_nsd.json").read_text())
    except (OSError, ValueError):
        return None
    subjects = sorted(int(s) for s in meta.get("parameters", {}).get("subjects", []))
    return (f"this folder holds a mini-NSD (mini_nsd.json) written for subjects {subjects}; write it again with "
            f"the subjects you need, e.g. `mdlib mini {root} --subjects {' '.join(map(str, subjects))} N` "
            "(docs/data.md, \"mini-NSD\")")
