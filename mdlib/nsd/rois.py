"""Regions of interest (ROIs) and anatomy on the betas' grid, and mdlib's one voxel order.

NSD ships ROI volumes in ``func1pt8mm`` space, on exactly the grid of the betas (docs/data.md, "ROIs, label
tables and anatomy"): integer labels, -1 outside cortex, 0 unlabelled cortex, 1..N the atlas' labels, named in
``<atlas>.mgz.ctab``. A mask is a boolean (X, Y, Z) array in NIfTI order, and a voxel's position in every
matrix mdlib builds is its position in ``np.nonzero(mask)``: C order over (X, Y, Z), the last axis fastest.
:func:`voxel_coords` is that order, and ``volume[mask]`` (numpy boolean indexing) walks the voxels in the same
order, so it is all one needs.

ROI choices (:func:`roi_mask`):

- ``"nsdgeneral"``: NSD's visual-cortex mask (label > 0); used by most reconstruction papers
  (15,724 voxels for subj01).
- ``"mindiffuser"``: the voxels of the MindDiffuser release (docs/method.md; 11,694 voxels for subj01). Its data
  preparation (St-Yves' NSD scripts) labels each voxel with its ``prf-visualrois`` label where that is > 0 and
  with its ``Kastner2015`` label otherwise, then keeps the groups V1, V2, V3, hV4, V3ab, LO, IPS, VO, PHC, MT,
  MST, which are Kastner2015 labels 1..23 (V1v .. IPS5) and drops "other" (0, SPL1 = 24, FEF = 25). As a
  mask: ``prf-visualrois > 0  OR  Kastner2015 in 1..23``. Label numbers, not names, define it, so it does not
  need the ``.ctab`` files.
- an atlas name (``"prf-visualrois"``, ``"Kastner2015"``, ``"streams"``, ...): every labelled voxel (> 0).
- ``"atlas:name1,name2"`` (e.g. ``"prf-visualrois:V1v,V1d"``): the voxels of those labels, by ctab name.

Label names (:func:`roi_labels`) come from the atlas' ``.mgz.ctab`` file: the subject's
(``nsddata/freesurfer/subjNN/label/``), else fsaverage's (``nsddata/freesurfer/fsaverage/label/``), else, for
the four atlases mdlib reads, NSD's names built in here (:data:`NSD_LABEL_NAMES`).

Taught in ``notebooks/02_voxels_nilearn.ipynb``.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from mdlib.nsd import layout

#: Kastner2015 labels in the MindDiffuser voxel set: 1 (V1v) .. 23 (IPS5); 24 (SPL1) and 25 (FEF) are out.
MINDIFFUSER_KASTNER_LABELS = tuple(range(1, 24))

#: ROI choices that are not plain atlas names.
ROI_UNIONS = ("mindiffuser",)

#: NSD's label names of the atlases in ``layout.ROI_ATLASES`` (label k is entry k - 1; 0 is "Unknown"), as
#: their ``.mgz.ctab`` files give them; :func:`roi_labels` falls back on these when no ctab file is on disk.
NSD_LABEL_NAMES = {
    "nsdgeneral": ("nsdgeneral",),
    "prf-visualrois": ("V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4"),
    "Kastner2015": ("V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4", "VO1", "VO2", "PHC1", "PHC2", "TO2", "TO1",
                    "LO2", "LO1", "V3B", "V3A", "IPS0", "IPS1", "IPS2", "IPS3", "IPS4", "IPS5", "SPL1", "FEF"),
    "streams": ("early", "midventral", "midlateral", "midparietal", "ventral", "lateral", "parietal"),
}

PathLike = str | os.PathLike


# -- grids --------------------------------------------------------------------------------------------------
nsd_affine = layout.nsd_affine

def check_grid(shape_a: tuple[int, ...], shape_b: tuple[int, ...], what_a: str, what_b: str,
               affine_a: np.ndarray | None = None, affine_b: np.ndarray | None = None,
               atol: float = 1e-3) -> None:
    """Raise ValueError unless two volumes share a grid: same (X, Y, Z) shape and, if both given, affine.

    Only the first three axes of each shape are compared, so a 4-D betas file can be checked against a mask.
    """
    if tuple(shape_a[:3]) != tuple(shape_b[:3]):
        raise ValueError(f"grid mismatch: {what_a} has shape {tuple(shape_a[:3])} but {what_b} has shape "
                         f"{tuple(shape_b[:3])} (X, Y, Z); are they from the same subject and space "
                         f"({layout.DEFAULT_SPACE})?")
    if affine_a is not None and affine_b is not None and not np.allclose(affine_a, affine_b, atol=atol):
        raise ValueError(f"grid mismatch: {what_a} and {what_b} have the same shape {tuple(shape_a[:3])} but "
                         f"different affines:\n{np.round(affine_a, 3)}\nvs\n{np.round(affine_b, 3)}")


def voxel_coords(mask: np.ndarray) -> np.ndarray:
    """(n_vox, 3) int64 voxel indices (i, j, k) of ``mask`` in mdlib's canonical voxel order.

    The canonical order is ``np.nonzero(mask)`` of the (X, Y, Z) NIfTI-ordered boolean array: C order, k (Z)
    varying fastest. Column n of every (rows, n_vox) matrix mdlib returns is voxel ``coords[n]``, and
    ``volume[mask]`` lists a volume's values in this same order.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"a mask is a 3-D (X, Y, Z) array, got shape {mask.shape}")
    return np.argwhere(mask.astype(bool, copy=False)).astype(np.int64)  # argwhere == stacked np.nonzero


# -- files --------------------------------------------------------------------------------------------------
def load_roi(data_root: PathLike, subject: int, atlas: str) -> tuple[np.ndarray, np.ndarray]:
    """One ROI atlas volume: ``(labels, affine)``.

    Args:
        data_root: the NSD (or mini-NSD) root.
        subject: 1..8.
        atlas: one of ``layout.ROI_ATLASES`` (or another atlas file present under ``roi/``).

    Returns:
        labels: (X, Y, Z) int32: -1 outside cortex, 0 unlabelled cortex, 1..N labels.
        affine: (4, 4) voxel -> subject-space mm (RAS).
    """
    rel = layout.roi_file(subject, atlas)
    if atlas not in layout.ROI_ATLASES and not (Path(data_root) / str(rel)).is_file():
        raise ValueError(f"unknown ROI atlas {atlas!r}: NSD's func1pt8mm atlases are {list(layout.ROI_ATLASES)}")
    path = layout.require(data_root, rel)
    img = _load_nifti(path)
    values = _read_all(img, path)
    if values.ndim == 4 and values.shape[3] == 1:
        values = values[..., 0]
    if values.ndim != 3:
        raise ValueError(f"{path}: an ROI volume must be 3-D (X, Y, Z), got shape {values.shape}")
    if np.issubdtype(values.dtype, np.floating):
        # ROI files may be stored as floats: round to the labels; NaN (never in NSD) counts as outside.
        values = np.rint(np.nan_to_num(values, nan=-1.0))
    return values.astype(np.int32), img.affine.copy()


def roi_labels(data_root: PathLike, subject: int, atlas: str) -> dict[int, str]:
    """The label names of ``atlas``: ``{label: name}``.

    Read from the first ctab file present (:func:`roi_labels_source`): the subject's
    ``nsddata/freesurfer/subjNN/label/<atlas>.mgz.ctab``, else fsaverage's
    ``nsddata/freesurfer/fsaverage/label/<atlas>.mgz.ctab``; every ``N name`` line, 0 ("Unknown") included when
    the file lists it; blank lines, ``#`` comments and extra columns (FreeSurfer's R G B A colours) are
    ignored. With neither file, NSD's names built into mdlib (:data:`NSD_LABEL_NAMES`, 0 = "Unknown") for the
    atlases it knows.

    Raises:
        FileNotFoundError: no ctab file and an atlas mdlib has no names for (the message names both paths).
    """
    source = roi_labels_source(data_root, subject, atlas)
    if source is None:
        return {0: "Unknown", **{k: name for k, name in enumerate(NSD_LABEL_NAMES[atlas], start=1)}}
    return parse_ctab(source.read_text(encoding="utf-8", errors="replace"), source=str(source))


def roi_labels_source(data_root: PathLike, subject: int, atlas: str) -> Path | None:
    """The ctab file :func:`roi_labels` reads for ``atlas``: the subject's, else fsaverage's; None when neither
    is present and mdlib has NSD's names for the atlas built in (:data:`NSD_LABEL_NAMES`).

    Raises:
        FileNotFoundError: neither file, and an atlas without built-in names (names both paths and the fix).
    """
    candidates = (layout.roi_ctab(subject, atlas), layout.fsaverage_roi_ctab(atlas))
    for rel in candidates:
        path = Path(data_root) / str(rel)
        if path.is_file():
            return path
    if atlas in NSD_LABEL_NAMES:
        return None
    where = " or ".join(str(Path(data_root) / str(rel)) for rel in candidates)
    raise FileNotFoundError(f"no label names for atlas {atlas!r}: neither {where} exists, and mdlib has names "
                            f"built in only for {sorted(NSD_LABEL_NAMES)}.\n  To get it: "
                            f"{layout.how_to_get(candidates[0])}")


def parse_ctab(text: str, source: str = "ctab") -> dict[int, str]:
    """Parse ctab text (``N name [R G B A]`` per line) into ``{N: name}``; see :func:`roi_labels`."""
    labels: dict[int, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) < 2:
            raise ValueError(f"{source}, line {lineno}: expected 'N name', got {line.strip()!r}")
        try:
            labels[int(fields[0])] = fields[1]
        except ValueError:
            raise ValueError(f"{source}, line {lineno}: label number must be an integer, got {line.strip()!r}")
    return labels


def load_anatomy(data_root: PathLike, subject: int, name: str = "T1_to_func1pt8mm") -> nib.Nifti1Image:
    """An anatomical volume on the betas' grid, as a nibabel image (for nilearn backgrounds).

    ``name`` is ``"T1_to_func1pt8mm"`` (the default, a background for brain maps), ``"mean"`` (mean EPI) or
    ``"brainmask"``. Subject space, not MNI: plot subject maps on the subject's own anatomy.
    """
    return _load_nifti(layout.require(data_root, layout.anatomy_file(subject, name)))


# -- masks --------------------------------------------------------------------------------------------------
def roi_mask(data_root: PathLike, subject: int, roi: str = "nsdgeneral") -> np.ndarray:
    """A boolean (X, Y, Z) mask for an ROI choice (see the module docstring for the choices)."""
    return roi_mask_and_affine(data_root, subject, roi)[0]


def roi_mask_and_affine(data_root: PathLike, subject: int, roi: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`roi_mask` plus the affine of the ROI file(s) it came from."""
    if not isinstance(roi, str) or not roi.strip():
        raise TypeError(f"roi must be a non-empty string such as 'nsdgeneral', got {roi!r}")
    roi = roi.strip()
    if roi == "mindiffuser":
        return _mindiffuser_mask(data_root, subject)
    atlas, _, names = roi.partition(":")
    labels, affine = load_roi(data_root, subject, atlas)
    if not names:
        return labels > 0, affine
    wanted = _label_numbers(roi_labels(data_root, subject, atlas), names, atlas)
    return np.isin(labels, wanted), affine


def _mindiffuser_mask(data_root: PathLike, subject: int) -> tuple[np.ndarray, np.ndarray]:
    """``prf-visualrois > 0 OR Kastner2015 in 1..23`` (the MindDiffuser release's voxels; module docstring)."""
    prf, affine = load_roi(data_root, subject, "prf-visualrois")
    kastner, kastner_affine = load_roi(data_root, subject, "Kastner2015")
    check_grid(prf.shape, kastner.shape, "prf-visualrois", "Kastner2015", affine, kastner_affine)
    return (prf > 0) | np.isin(kastner, MINDIFFUSER_KASTNER_LABELS), affine


def _label_numbers(labels: dict[int, str], names: str, atlas: str) -> list[int]:
    """Label numbers of the comma-separated ``names`` (case-insensitive); ValueError listing valid names."""
    by_name = {name.lower(): number for number, name in labels.items() if number > 0}
    wanted, unknown = [], []
    for name in (n.strip() for n in names.split(",")):
        if not name:
            continue
        if name.lower() in by_name:
            wanted.append(by_name[name.lower()])
        else:
            unknown.append(name)
    if unknown or not wanted:
        valid = [name for number, name in sorted(labels.items()) if number > 0]
        raise ValueError(f"unknown {atlas} label(s) {unknown or names!r}; valid names: {', '.join(valid)}")
    return wanted


def _load_nifti(path: Path) -> nib.Nifti1Image:
    """nibabel.load with a clear error for a corrupt or truncated file."""
    try:
        return nib.load(str(path))
    except Exception as err:  # nibabel raises ImageFileError, EOFError, OSError... on bad files
        raise ValueError(f"{path}: cannot read this NIfTI file (truncated or corrupt? re-download it): "
                         f"{type(err).__name__}: {err}") from err


def _read_all(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    """The whole (small, 3-D) volume in its stored dtype; ValueError naming the file if it is damaged."""
    try:
        return np.asanyarray(img.dataobj)
    except Exception as err:  # gzip/zlib errors, EOFError, short reads
        raise ValueError(f"{path}: cannot read the data of this NIfTI file (truncated or corrupt? re-download "
                         f"it): {type(err).__name__}: {err}") from err
