"""NSD's stimuli: the image brick, the stimulus table, and the COCO captions of each image.

- ``nsd_stim_info_merged.csv``: one row per image, indexed here by the 0-based ``nsdId``; ``cocoId`` and
  ``cocoSplit`` say where its captions are, ``cropBox`` how it was cropped from the COCO photo. (The ``.pkl``
  twin is a pickle: mdlib never unpickles data.)
- ``nsd_stimuli.hdf5``: dataset ``imgBrick`` of shape (n_stimuli, H, W, 3) uint8 (73,000 x 425 x 425 x 3 in
  NSD, 39.6 GB): row = 0-based nsdId. :class:`StimulusReader` reads any ids in any order, in bounded batches,
  from it or, when it is absent, from the per-subject files ``mdlib fetch`` writes (``nsd_ids`` gives each
  row's nsdId; 10,000 images, 5.4 GB per subject).
- COCO 2017 ``captions_{train,val}2017.json``: about five captions per image, found through ``cocoId``, in
  ``coco/annotations/`` (where ``mdlib fetch`` puts them) or else ``nsddata_stimuli/stimuli/nsd/annotations/``
  (where nsd_access and many community trees keep them): :data:`CAPTION_PLACES`.

nsdIds are 0-based everywhere in mdlib (the design file's 1-based ids are converted in ``design``).
The formats: docs/data.md. Taught in ``notebooks/01_nsd_data.ipynb``.
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
REQUIRED_STIM_INFO_COLUMNS = ("nsdId", "cocoId", "cocoSplit", "cropBox", "shared1000")

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
    fix = f"replace it: {layout.how_to_get(layout.stim_info('csv'))}"
    try:
        table = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not NSD's stimulus table ({type(err).__name__}: {err}); it is empty or "
                         f"damaged: {fix}") from None
    table = table.drop(columns=[c for c in table.columns if str(c).startswith("Unnamed:")])
    missing = [c for c in REQUIRED_STIM_INFO_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(table.columns)}. This is not NSD's "
                         f"nsd_stim_info_merged.csv or it was cut short: {fix}")
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
#: Where :func:`load_captions` looks for ``captions_<split>.json`` under a data root, in this order: mdlib's
#: own place (``mdlib fetch`` and mini-NSD write there), then the folder beside NSD's stimuli that nsd_access
#: and many community trees use. The first place holding the split's file is read.
CAPTION_PLACES = (layout.coco_captions, layout.nsd_coco_captions)

#: Parsed COCO caption files: path -> ((mtime_ns, size), {cocoId: [captions]}). One entry per file.
_CAPTION_CACHE: dict[Path, tuple[tuple[int, int], dict[int, list[str]]]] = {}


def load_captions(data_root: str | os.PathLike, nsd_ids: Sequence[int] | np.ndarray,
                  stim_info: pd.DataFrame | None = None) -> list[list[str]]:
    """The COCO captions of each nsdId, in the order given: ``captions[i]`` belongs to ``nsd_ids[i]``.

    Each image's ``cocoId`` and ``cocoSplit`` come from ``stim_info`` (read with :func:`load_stim_info` if
    not given); its captions from ``captions_<split>.json`` under ``data_root`` (:func:`caption_file`:
    ``coco/annotations/``, else ``nsddata_stimuli/stimuli/nsd/annotations/``), in the file's order, stripped
    of surrounding whitespace. Each JSON file is parsed once per process (re-read if it changes on disk).

    Raises:
        FileNotFoundError: a needed COCO file is in neither place (the message names both and how to get it).
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
                           f"{caption_file(data_root, split)}")
        captions.append(list(found))
    return captions


def caption_file(data_root: str | os.PathLike, split: str):
    """The COCO caption file of ``split`` ('train2017' or 'val2017') that :func:`load_captions` reads, relative
    to ``data_root`` (a :class:`~pathlib.PurePosixPath` from :data:`CAPTION_PLACES`), or None if neither place
    holds it."""
    for place in CAPTION_PLACES:
        rel = place(split)
        if (Path(data_root) / str(rel)).is_file():
            return rel
    return None


def _require_caption_file(data_root: str | os.PathLike, split: str) -> Path:
    rel = caption_file(data_root, split)
    if rel is not None:
        return Path(data_root) / str(rel)
    tried = "\n".join(f"    {Path(data_root) / str(place(split))}" for place in CAPTION_PLACES)
    raise FileNotFoundError(
        f"COCO captions missing: captions_{split}.json is in neither place mdlib looks (in this order):\n{tried}\n"
        f"  To get it: {layout.how_to_get(layout.coco_captions(split))}. A copy kept for nsd_access in "
        f"{layout.nsd_coco_captions(split).parent}/ is read too.")


def _coco_captions(data_root: str | os.PathLike, split: str) -> dict[int, list[str]]:
    """{cocoId: [captions]} of one COCO caption file, parsed once while the file is unchanged."""
    path = _require_caption_file(data_root, split).resolve()
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
    """Reads NSD images by nsdId from ``nsd_stimuli.hdf5``, per-subject files, or another file of that layout.

    A file holds dataset ``imgBrick`` (n, H, W, 3) uint8. By default row r is nsdId r. A file made for a
    subset of images (e.g. one subject's) may also hold a 1-d integer dataset ``nsd_ids`` of length n giving
    the nsdId of each row; then only those nsdIds can be read.

    Under a data root the reader takes the brick (``nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5``) when it is
    there; otherwise every per-subject file ``mdlib fetch`` wrote (``.../nsd/subsets/subjNN_stimuli.hdf5``,
    :func:`mdlib.nsd.layout.subject_stimuli`), read as one set: an nsdId held by several (a shared image) is
    read from the first subject's file.

    Use as a context manager (or call :meth:`close`)::

        with StimulusReader(data_root) as stimuli:
            images = stimuli.read([2950, 17, 2950], size=256)   # (3, 256, 256, 3) uint8

    Args:
        data_root: the NSD data root, read as above unless ``path`` is given.
        path: an explicit HDF5 file to read instead.
        batch_size: how many images are read from disk at once (bounds the memory used while reading).
    """

    DATASET = "imgBrick"
    IDS_DATASET = "nsd_ids"

    def __init__(self, data_root: str | os.PathLike | None, path: str | os.PathLike | None = None,
                 batch_size: int = 64) -> None:
        if path is None:
            found = layout.stimuli_sources(data_root) if data_root is not None else []
            paths = [Path(data_root) / str(rel) for rel in found] or [layout.require(data_root, layout.stimuli())]
        else:
            paths = [Path(path)]
            if not paths[0].is_file():
                raise FileNotFoundError(f"stimulus file missing: {paths[0]}")
        self.paths = paths
        self.path = paths[0]
        self.batch_size = int(batch_size)
        self._files: list[h5py.File] = []
        try:
            self._datasets, row_ids = [], []
            for p in paths:
                self._files.append(self._open(p))
                self._datasets.append(self._image_dataset(self._files[-1], p))
                row_ids.append(self._read_row_ids(self._files[-1], self._datasets[-1], p))
            self._file = self._files[0]
            self._images = self._datasets[0]
            self._index(row_ids)
        except Exception:
            self.close()
            raise

    # -- opening and checking --------------------------------------------------------------------------
    @staticmethod
    def _open(path: Path) -> h5py.File:
        try:
            return h5py.File(path, "r")
        except OSError as err:
            raise ValueError(f"{path}: cannot open this HDF5 file (truncated or corrupt? re-download "
                             f"it): {err}") from err

    def _image_dataset(self, file: h5py.File, path: Path) -> h5py.Dataset:
        ds = file.get(self.DATASET)
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 4 or ds.shape[-1] != 3 or ds.dtype != np.uint8:
            found = f"shape {ds.shape}, {ds.dtype}" if isinstance(ds, h5py.Dataset) else "no such dataset"
            raise ValueError(f"{path}: expected dataset '{self.DATASET}' of shape (n, H, W, 3) uint8; "
                             f"found {found}")
        if self._datasets and ds.shape[1:3] != self._datasets[0].shape[1:3]:
            raise ValueError(f"{path}: images of {ds.shape[1:3]} pixels, but {self.paths[0]} holds "
                             f"{self._datasets[0].shape[1:3]}; the stimulus files must agree")
        return ds

    def _read_row_ids(self, file: h5py.File, images: h5py.Dataset, path: Path) -> np.ndarray | None:
        """The nsdId of each row when the file says so (a subset file), else None (row = nsdId)."""
        if self.IDS_DATASET not in file:
            return None
        ids = np.asarray(file[self.IDS_DATASET][()]).ravel()
        if not np.issubdtype(ids.dtype, np.integer) or ids.size != images.shape[0] or \
                np.unique(ids).size != ids.size or (ids.size and ids.min() < 0):
            raise ValueError(f"{path}: '{self.IDS_DATASET}' must hold {images.shape[0]} distinct "
                             f"non-negative integer nsdIds (one per row of '{self.DATASET}')")
        return ids.astype(np.int64)

    def _index(self, row_ids: list[np.ndarray | None]) -> None:
        """Global rows: the files' rows one after the other (``_starts[k]`` = first global row of file k)."""
        sizes = [int(ds.shape[0]) for ds in self._datasets]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if len(row_ids) == 1:
            self._row_ids = row_ids[0]
            return
        self._row_ids = np.concatenate([np.arange(n) if ids is None else ids for n, ids in zip(sizes, row_ids)])

    @property
    def _where(self) -> str:
        if len(self.paths) == 1:
            return str(self.path)
        return f"{len(self.paths)} files ({', '.join(map(str, self.paths))})"

    # -- what the files hold ---------------------------------------------------------------------------
    @property
    def n_stimuli(self) -> int:
        """Images held (73,000 for NSD's brick; 10,000 for one subject's file; distinct ones for several)."""
        return int(self._images.shape[0]) if len(self.paths) == 1 else int(np.unique(self._row_ids).size)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the stored images ((425, 425) in NSD)."""
        return int(self._images.shape[1]), int(self._images.shape[2])

    @property
    def nsd_ids(self) -> np.ndarray:
        """The 0-based nsdIds held, in row order (for several files: each once, where first found)."""
        if self._row_ids is None:
            return np.arange(self.n_stimuli)
        _, first = np.unique(self._row_ids, return_index=True)
        return self._row_ids[np.sort(first)].copy()

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
        """Global rows holding ``nsd_ids`` (the first file's where several hold one); IndexError for ids
        not held."""
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
        order = np.argsort(held, kind="stable")  # equal ids: the earliest row (first file) sorts first
        pos = np.searchsorted(held, ids, sorter=order).clip(max=max(held.size - 1, 0))
        rows = order[pos] if held.size else pos
        bad = ids[held[rows] != ids] if held.size else ids
        if bad.size:
            span = f"{held.min()}..{held.max()}" if held.size else "none"
            raise IndexError(f"nsdId(s) {bad[:10].tolist()} not in {self._where}: it holds "
                             f"{self.n_stimuli} nsdIds (a subset, {span}), listed in its '{self.IDS_DATASET}' "
                             "dataset")
        return rows

    def _read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Global rows (sorted, unique), file by file; a contiguous run is read as one slice."""
        which = np.searchsorted(self._starts, rows, side="right") - 1
        parts = []
        for k in np.unique(which):
            local = rows[which == k] - self._starts[k]
            try:
                if local[-1] - local[0] + 1 == local.size:
                    parts.append(self._datasets[k][int(local[0]):int(local[-1]) + 1])
                else:
                    parts.append(self._datasets[k][local])
            except OSError as err:
                raise ValueError(f"{self.paths[k]}: cannot read rows of '{self.DATASET}' (truncated or corrupt "
                                 f"file?): {err}") from err
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    # -- life cycle ------------------------------------------------------------------------------------
    def close(self) -> None:
        for file in self._files:
            if file.id.valid:
                file.close()

    def __enter__(self) -> StimulusReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if len(self.paths) > 1:
            kind = f"union of {len(self.paths)} subset files"
        else:
            kind = "subset" if self._row_ids is not None else "row = nsdId"
        return f"StimulusReader({str(self.path)!r}, n_stimuli={self.n_stimuli}, image_size={self.image_size}, {kind})"


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """One (H, W, 3) uint8 image resized to (size, size, 3) with PIL bicubic."""
    return np.asarray(Image.fromarray(image).resize((int(size), int(size)), RESIZE_FILTER))
