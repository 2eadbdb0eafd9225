"""NSD's stimuli: the image brick, the stimulus table, and the COCO captions of each image.

- ``nsd_stim_info_merged.csv``: one row per image, indexed here by the 0-based ``nsdId``; ``cocoId`` and
  ``cocoSplit`` say where its captions are, ``cropBox`` how it was cropped from the COCO photo. (The ``.pkl``
  twin is a pickle: mdlib never unpickles data.)
- ``nsd_stimuli.hdf5``: dataset ``imgBrick`` of shape (n_stimuli, H, W, 3) uint8 (73,000 x 425 x 425 x 3 in
  NSD, 39.6 GB): row = 0-based nsdId. :class:`StimulusReader` reads any ids in any order, in bounded batches.
- COCO 2017 ``captions_{train,val}2017.json``: about five captions per image, found through ``cocoId``.

nsdIds are 0-based everywhere in mdlib (the design file's 1-based ids are converted in ``design``).
Taught in ``notebooks/01_nsd_data.ipynb``.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from PIL import Image

from mdlib.nsd import layout

#: Columns of ``nsd_stim_info_merged.csv`` that mdlib relies on.
REQUIRED_STIM_INFO_COLUMNS = ("nsdId", "cocoId", "cocoSplit", "cropBox")

#: PIL filter used by :meth:`StimulusReader.read` to resize (bicubic, as torchvision's default for PIL).
RESIZE_FILTER = Image.Resampling.BICUBIC


# -- stimulus table --------------------------------------------------------------------------------------
def load_stim_info(data_root: str | os.PathLike) -> pd.DataFrame:
    """``nsd_stim_info_merged.csv`` as a DataFrame indexed by the 0-based ``nsdId`` (sorted).

    Columns as in NSD (``cocoId``, ``cocoSplit`` ('train2017'/'val2017'), ``cropBox``, ``shared1000``,
    ``subjectK``, ``subjectK_repR``, ...). ``cropBox`` becomes a tuple of four floats (top, bottom, left,
    right: fractions of the COCO image cropped away on each side).

    Raises:
        FileNotFoundError: the csv is absent (the message names the NSD path and how to get it).
        ValueError: a required column is missing, an nsdId repeats, or a cropBox cannot be parsed.
    """
    path = layout.require(data_root, layout.stim_info("csv"))
    table = pd.read_csv(path)
    table = table.drop(columns=[c for c in table.columns if str(c).startswith("Unnamed:")])
    missing = [c for c in REQUIRED_STIM_INFO_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(table.columns)}")
    if table["nsdId"].duplicated().any():
        raise ValueError(f"{path}: nsdId values repeat; each image must have one row")
    table["cropBox"] = [_parse_crop_box(box, path) for box in table["cropBox"]]
    return table.set_index("nsdId").sort_index()


def _parse_crop_box(text: object, path: Path) -> tuple[float, float, float, float]:
    """'(0, 0, 0.1249, 0.1249)' -> (0.0, 0.0, 0.1249, 0.1249)."""
    if isinstance(text, tuple):
        parts = list(text)
    else:
        parts = str(text).strip().strip("()[]").split(",")
    try:
        box = tuple(float(p) for p in parts)
    except ValueError:
        box = ()
    if len(box) != 4:
        raise ValueError(f"{path}: cannot parse cropBox {text!r}; expected '(top, bottom, left, right)'")
    return box


# -- captions --------------------------------------------------------------------------------------------
#: Parsed COCO caption files: path -> ((mtime_ns, size), {cocoId: [captions]}). One entry per file.
_CAPTION_CACHE: dict[Path, tuple[tuple[int, int], dict[int, list[str]]]] = {}


def load_captions(data_root: str | os.PathLike, nsd_ids: Sequence[int] | np.ndarray,
                  stim_info: pd.DataFrame | None = None) -> list[list[str]]:
    """The COCO captions of each nsdId, in the order given: ``captions[i]`` belongs to ``nsd_ids[i]``.

    Each image's ``cocoId`` and ``cocoSplit`` come from ``stim_info`` (read with :func:`load_stim_info` if
    not given); its captions from ``coco/annotations/captions_<split>.json`` under ``data_root``, in the
    file's order, stripped of surrounding whitespace. Each JSON file is parsed once per process (re-read if
    it changes on disk).

    Raises:
        FileNotFoundError: a needed COCO file is absent (the message says how to get it).
        KeyError: an nsdId is not in the stimulus table, or its cocoId has no captions (names both ids).
    """
    info = load_stim_info(data_root) if stim_info is None else stim_info
    ids = [int(i) for i in np.asarray(nsd_ids).ravel()]
    unknown = [i for i in ids if i not in info.index]
    if unknown:
        raise KeyError(f"nsdId(s) {unknown[:10]} not in the stimulus table (it holds {len(info)} images, "
                       f"nsdId {info.index.min()}..{info.index.max()})")
    rows = info.loc[ids, ["cocoId", "cocoSplit"]]
    by_split = {split: _coco_captions(data_root, split) for split in sorted(set(rows["cocoSplit"]))}
    captions = []
    for nsd_id, coco_id, split in zip(ids, rows["cocoId"], rows["cocoSplit"]):
        found = by_split[split].get(int(coco_id))
        if not found:
            raise KeyError(f"no COCO captions for nsdId {nsd_id} (cocoId {int(coco_id)}, {split}) in "
                           f"{layout.coco_captions(split)}")
        captions.append(list(found))
    return captions


def _coco_captions(data_root: str | os.PathLike, split: str) -> dict[int, list[str]]:
    """{cocoId: [captions]} of one COCO caption file, parsed once while the file is unchanged."""
    path = layout.require(data_root, layout.coco_captions(split)).resolve()
    stat = path.stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _CAPTION_CACHE.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        with open(path, encoding="utf-8") as f:
            coco = json.load(f)
        by_image: dict[int, list[str]] = defaultdict(list)
        for note in coco["annotations"]:
            by_image[int(note["image_id"])].append(str(note["caption"]).strip())
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a COCO caption file (needs 'annotations' with 'image_id' and "
                         f"'caption'): {type(err).__name__}: {err}") from err
    _CAPTION_CACHE[path] = (stamp, dict(by_image))
    return _CAPTION_CACHE[path][1]


# -- images ----------------------------------------------------------------------------------------------
class StimulusReader:
    """Reads NSD images by nsdId from ``nsd_stimuli.hdf5`` (or another file with the same layout).

    The file holds dataset ``imgBrick`` (n, H, W, 3) uint8. By default row r is nsdId r. A file made for a
    subset of images (e.g. one subject's) may also hold a 1-d integer dataset ``nsd_ids`` of length n giving
    the nsdId of each row; then only those nsdIds can be read.

    Use as a context manager (or call :meth:`close`)::

        with StimulusReader(data_root) as stimuli:
            images = stimuli.read([2950, 17, 2950], size=256)   # (3, 256, 256, 3) uint8

    Args:
        data_root: the NSD data root; ``nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5`` is read unless ``path``.
        path: an explicit HDF5 file to read instead.
        batch_size: how many images are read from disk at once (bounds the memory used while reading).
    """

    DATASET = "imgBrick"
    IDS_DATASET = "nsd_ids"

    def __init__(self, data_root: str | os.PathLike | None, path: str | os.PathLike | None = None,
                 batch_size: int = 64) -> None:
        if path is None:
            self.path = layout.require(data_root, layout.stimuli())
        else:
            self.path = Path(path)
            if not self.path.is_file():
                raise FileNotFoundError(f"stimulus file missing: {self.path}")
        self.batch_size = int(batch_size)
        self._file = self._open()
        try:
            self._images = self._image_dataset()
            self._row_ids = self._read_row_ids()
        except Exception:
            self._file.close()
            raise

    # -- opening and checking --------------------------------------------------------------------------
    def _open(self) -> h5py.File:
        try:
            return h5py.File(self.path, "r")
        except OSError as err:
            raise ValueError(f"{self.path}: cannot open this HDF5 file (truncated or corrupt? re-download "
                             f"it): {err}") from err

    def _image_dataset(self) -> h5py.Dataset:
        ds = self._file.get(self.DATASET)
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 4 or ds.shape[-1] != 3 or ds.dtype != np.uint8:
            found = f"shape {ds.shape}, {ds.dtype}" if isinstance(ds, h5py.Dataset) else "no such dataset"
            raise ValueError(f"{self.path}: expected dataset '{self.DATASET}' of shape (n, H, W, 3) uint8; "
                             f"found {found}")
        return ds

    def _read_row_ids(self) -> np.ndarray | None:
        """The nsdId of each row when the file says so (a subset file), else None (row = nsdId)."""
        if self.IDS_DATASET not in self._file:
            return None
        ids = np.asarray(self._file[self.IDS_DATASET][()]).ravel()
        if not np.issubdtype(ids.dtype, np.integer) or ids.size != self._images.shape[0] or \
                np.unique(ids).size != ids.size or (ids.size and ids.min() < 0):
            raise ValueError(f"{self.path}: '{self.IDS_DATASET}' must hold {self._images.shape[0]} distinct "
                             f"non-negative integer nsdIds (one per row of '{self.DATASET}')")
        return ids.astype(np.int64)

    # -- what the file holds ---------------------------------------------------------------------------
    @property
    def n_stimuli(self) -> int:
        """Images in the file (73,000 for NSD's brick)."""
        return int(self._images.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the stored images ((425, 425) in NSD)."""
        return int(self._images.shape[1]), int(self._images.shape[2])

    @property
    def nsd_ids(self) -> np.ndarray:
        """The 0-based nsdIds the file holds, in row order."""
        return np.arange(self.n_stimuli) if self._row_ids is None else self._row_ids.copy()

    # -- reading ---------------------------------------------------------------------------------------
    def read(self, nsd_ids: Sequence[int] | np.ndarray, size: int | None = None) -> np.ndarray:
        """Images of ``nsd_ids`` (0-based, any order, repeats allowed) as (len(ids), H', W', 3) uint8.

        ``size`` resizes each image to ``size`` x ``size`` pixels with PIL bicubic (:data:`RESIZE_FILTER`);
        None keeps the stored size. Rows are read from disk sorted and without repeats (as HDF5 requires), in
        batches of ``batch_size``, then put back in the order asked for.

        Raises:
            IndexError: an nsdId the file does not hold (the message names the valid range).
        """
        if size is not None and (int(size) != size or size < 1):
            raise ValueError(f"size must be a positive number of pixels, got {size!r}")
        rows = self._rows(nsd_ids)
        height, width = (int(size), int(size)) if size is not None else self.image_size
        out = np.empty((rows.size, height, width, 3), dtype=np.uint8)
        unique_rows, where = np.unique(rows, return_inverse=True)
        for start in range(0, unique_rows.size, self.batch_size):
            block = self._read_rows(unique_rows[start:start + self.batch_size])
            if size is not None:
                block = np.stack([resize(image, size) for image in block])
            wanted = (where >= start) & (where < start + len(block))
            out[wanted] = block[where[wanted] - start]
        return out

    def _rows(self, nsd_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows of the file holding ``nsd_ids``; IndexError for ids it does not hold."""
        ids = np.asarray(nsd_ids).ravel()
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"nsdIds must be integers (0-based), got dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        if self._row_ids is None:
            bad = ids[(ids < 0) | (ids >= self.n_stimuli)]
            if bad.size:
                raise IndexError(f"nsdId(s) {bad[:10].tolist()} out of range: {self.path} holds nsdIds "
                                 f"0..{self.n_stimuli - 1} (0-based)")
            return ids
        held = self._row_ids
        order = np.argsort(held)
        pos = np.searchsorted(held, ids, sorter=order).clip(max=max(held.size - 1, 0))
        rows = order[pos] if held.size else pos
        bad = ids[held[rows] != ids] if held.size else ids
        if bad.size:
            span = f"{held.min()}..{held.max()}" if held.size else "none"
            raise IndexError(f"nsdId(s) {bad[:10].tolist()} not in {self.path}: it holds {held.size} nsdIds "
                             f"(a subset, {span}), listed in its '{self.IDS_DATASET}' dataset")
        return rows

    def _read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows (sorted, unique) of ``imgBrick``; a contiguous run is read as one slice."""
        try:
            if rows[-1] - rows[0] + 1 == rows.size:
                return self._images[int(rows[0]):int(rows[-1]) + 1]
            return self._images[rows]
        except OSError as err:
            raise ValueError(f"{self.path}: cannot read rows of '{self.DATASET}' (truncated or corrupt "
                             f"file?): {err}") from err

    # -- life cycle ------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> StimulusReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "subset" if self._row_ids is not None else "row = nsdId"
        return f"StimulusReader({str(self.path)!r}, n_stimuli={self.n_stimuli}, image_size={self.image_size}, {kind})"


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """One (H, W, 3) uint8 image resized to (size, size, 3) with PIL bicubic."""
    return np.asarray(Image.fromarray(image).resize((int(size), int(size)), RESIZE_FILTER))
