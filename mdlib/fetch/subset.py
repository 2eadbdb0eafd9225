"""One subject's images from the bucket's brick, by ranged reads, into a local per-subject HDF5 file.

NSD's ``nsd_stimuli.hdf5`` holds ``imgBrick`` (73000, 425, 425, 3) uint8, contiguous and uncompressed: row r
(0-based nsdId r) is ``425 * 425 * 3 = 541,875`` bytes at ``data_offset + r * 541,875``. A subject saw
10,000 of the rows; mdlib reads only those (5.4 GB instead of 39.6 GB):

1. h5py opens the remote file through a :class:`~mdlib.fetch.remote.RangedReader` and reads only its
   metadata (a few small requests): the dataset's shape, layout and ``data_offset``.
2. The subject's sorted nsdIds are grouped into runs of nearby rows (gaps of up to ``max_gap_rows`` rows are
   read through and dropped, a run is at most ``max_request_bytes``), one ranged GET per run, ``workers`` in
   parallel. (A chunked or compressed brick falls back to h5py reads of sorted rows through the reader.)
3. The rows are written, in order, into ``<final>.part``: an HDF5 file created first with its ``imgBrick``
   (n, H, W, 3) allocated contiguously and ``nsd_ids`` (n,) int64 written, so that the rows are plain bytes
   at known offsets and the file is valid HDF5 throughout (and without time stamps: the same source rows give
   the same file, byte for byte). ``<final>.part.json`` records how many rows are
   complete (updated after each batch is on disk); a killed run continues from there.
4. When every row is in, the part is hashed (MD5, kept in the fetch state for later checks) and moved into
   place with ``os.replace``.

The file is what :class:`mdlib.nsd.stimuli.StimulusReader` reads when the brick is absent (docs/data.md,
"The images: the brick and the per-subject files").
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from mdlib.cachekey import cache_key
from mdlib.fetch.remote import PART_SUFFIX, FetchError, FetchState, RangedReader, RemoteObject, S3Store, \
    file_md5, retrying


@dataclass(frozen=True)
class BrickInfo:
    """The remote brick's layout: ``shape`` (n, H, W, 3), bytes per row, and where row 0 starts in the file
    (None when the dataset is chunked or compressed: then rows are read through h5py)."""

    shape: tuple[int, ...]
    row_bytes: int
    data_offset: int | None


def remote_reader(store: S3Store, remote: RemoteObject, retries: int = 3) -> RangedReader:
    """A seekable file object over ``remote`` (small reads cached in 64 kB blocks)."""
    return RangedReader(lambda a, b: store.read_range(remote.key, a, b, remote.etag), remote.size,
                        name=store.url(remote.key), retries=retries)


def inspect_brick(store: S3Store, remote: RemoteObject, dataset: str = "imgBrick", retries: int = 3) -> BrickInfo:
    """Read the remote brick's metadata (a few small ranged requests, no pixels)."""
    try:
        with h5py.File(remote_reader(store, remote, retries), "r") as f:
            ds = f.get(dataset)
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 4 or ds.shape[-1] != 3 or ds.dtype != np.uint8:
                raise FetchError(f"{store.url(remote.key)}: expected dataset {dataset!r} of shape (n, H, W, 3) uint8")
            row_bytes = int(np.prod(ds.shape[1:]))
            offset = ds.id.get_offset() if ds.chunks is None and ds.compression is None else None
            return BrickInfo(tuple(int(n) for n in ds.shape), row_bytes, None if offset is None else int(offset))
    except OSError as err:
        raise FetchError(f"{store.url(remote.key)}: cannot read it as HDF5: {err}") from err


def ids_digest(nsd_ids: np.ndarray) -> str:
    """SHA-256 of the ids as int64 (64 hex digits): which images a subject file holds (its fetch record)."""
    return cache_key(np.asarray(nsd_ids, dtype=np.int64).tobytes(), n=None)


def plan_runs(nsd_ids: np.ndarray, row_bytes: int, max_gap_rows: int = 2,
              max_request_bytes: int = 32 << 20) -> list[tuple[int, int, int, np.ndarray]]:
    """Group sorted unique ids into reads: ``(first output row, first source row, end source row, rows kept
    relative to the first source row)``. Rows within ``max_gap_rows`` of each other share a read; a read is at
    most ``max_request_bytes`` (or one row)."""
    ids = np.asarray(nsd_ids, dtype=np.int64)
    max_rows = max(1, int(max_request_bytes) // int(row_bytes))
    runs: list[tuple[int, int, int, np.ndarray]] = []
    start = 0
    for i in range(1, ids.size + 1):
        if i == ids.size or ids[i] - ids[i - 1] - 1 > max_gap_rows or ids[i] - ids[start] + 1 > max_rows:
            runs.append((start, int(ids[start]), int(ids[i - 1]) + 1, ids[start:i] - ids[start]))
            start = i
    return runs


def _progress_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _create_part(part: Path, shape: tuple[int, ...], nsd_ids: np.ndarray, attrs: dict) -> int:
    """The part file with ``imgBrick`` allocated (not filled) and ``nsd_ids`` written; returns the data offset."""
    part.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(part, "w") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        dcpl.set_obj_track_times(False)  # no time stamps: the same images give the same bytes
        h5py.h5d.create(f.id, b"imgBrick", h5py.h5t.NATIVE_UINT8, h5py.h5s.create_simple(shape), dcpl=dcpl)
        f.create_dataset("nsd_ids", data=np.asarray(nsd_ids, dtype=np.int64), track_times=False)
        f.attrs.update(attrs)
    return _part_offset(part, shape)


def _part_offset(part: Path, shape: tuple[int, ...]) -> int:
    with h5py.File(part, "r") as f:
        ds = f["imgBrick"]
        if tuple(ds.shape) != tuple(shape) or ds.id.get_offset() is None:
            raise ValueError("layout changed")
        return int(ds.id.get_offset())


def _resume_point(part: Path, expect: dict, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(rows done, data offset) of a part that a previous run left for the same source and ids, else None."""
    progress = _progress_path(part)
    if not (part.is_file() and progress.is_file()):
        return None
    try:
        saved = json.loads(progress.read_text())
        if any(saved.get(k) != v for k, v in expect.items()):
            return None
        offset = _part_offset(part, shape)
    except (OSError, ValueError, KeyError):
        return None
    return (int(saved["rows_done"]), offset) if offset == saved.get("data_offset") else None


def subset_status(path: Path, rel: str, remote: RemoteObject, nsd_ids: np.ndarray, state: FetchState,
                  verify: bool = False, hash_files: bool = True) -> str:
    """``"ok"`` (built from this source for these ids, unchanged or same MD5), ``"absent"``, ``"stale"`` (from
    another source version or id list), ``"corrupt"``, or ``"unverified"`` (dry run, file changed)."""
    if not path.is_file():
        return "absent"
    entry = state.get(rel)
    if not entry or entry.get("etag") != remote.etag or entry.get("ids_sha256") != ids_digest(nsd_ids):
        return "stale"
    if not verify and state.unchanged(rel, path):
        return "ok"
    if not hash_files:
        return "unverified"
    if file_md5(path).hexdigest() != entry.get("md5"):
        return "corrupt"
    state.record(rel, path, **{k: v for k, v in entry.items() if k not in ("size", "stat")})
    return "ok"


def build_subset(store: S3Store, remote: RemoteObject, nsd_ids: np.ndarray, path: Path, rel: str,
                 state: FetchState, *, info: BrickInfo | None = None, subject: int | None = None,
                 dataset: str = "imgBrick", workers: int = 8, retries: int = 3, max_gap_rows: int = 2,
                 max_request_bytes: int = 32 << 20, on_rows: Callable[[int], None] | None = None) -> int:
    """Write the rows ``nsd_ids`` (sorted, unique, 0-based) of the remote brick to ``path``; returns the
    bytes received. Resumes a part left by an earlier run for the same source ETag and ids."""
    ids = np.asarray(nsd_ids, dtype=np.int64)
    if ids.size == 0 or np.any(np.diff(ids) <= 0) or ids[0] < 0:
        raise ValueError("nsd_ids must be sorted, unique and non-negative")
    info = info or inspect_brick(store, remote, dataset, retries)
    if ids[-1] >= info.shape[0]:
        raise FetchError(f"{store.url(remote.key)} holds {info.shape[0]} images, but nsdId {int(ids[-1])} is asked "
                         "for: is the design from another dataset?")
    shape = (int(ids.size), *info.shape[1:])
    part = path.with_name(path.name + PART_SUFFIX)
    expect = {"source": store.url(remote.key), "etag": remote.etag, "ids_sha256": ids_digest(ids),
              "shape": list(shape)}
    resumed = _resume_point(part, expect, shape)
    if resumed is None:
        part.unlink(missing_ok=True)
        attrs = {"source": store.url(remote.key), "source_etag": remote.etag, "subject": int(subject or 0),
                 "written_by": "mdlib fetch"}
        done, offset = 0, _create_part(part, shape, ids, attrs)
        _save_progress(part, expect, done, offset)
    else:
        done, offset = resumed
    received = 0
    runs = plan_runs(ids[done:], info.row_bytes, max_gap_rows, max_request_bytes)
    # a chunked or compressed brick is read through h5py, over one file object: one read at a time
    reader = None if info.data_offset is not None else h5py.File(remote_reader(store, remote, retries), "r")
    read_rows = _rows_by_range if reader is None else _rows_by_h5py

    def fetch_run(run):
        where = f"{store.url(remote.key)} rows {run[1]}..{run[2] - 1}"
        return retrying(lambda: read_rows(store, remote, info, run, reader, dataset), retries, where)

    fd = os.open(part, os.O_WRONLY)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers) if reader is None else 1) as pool:
            for batch in _batches(runs, info.row_bytes, max_runs=4 * max(1, workers)):
                for (first, _, _, keep), (data, nbytes) in zip(batch, pool.map(fetch_run, batch)):
                    os.pwrite(fd, data, offset + (done + first) * info.row_bytes)
                    received += nbytes
                    if on_rows is not None:
                        on_rows(len(keep))
                os.fsync(fd)
                last = batch[-1]
                _save_progress(part, expect, done + last[0] + len(last[3]), offset)
    finally:
        os.close(fd)
        if reader is not None:
            reader.close()
    _check_part(part, shape, ids)
    md5 = file_md5(part).hexdigest()
    os.replace(part, path)
    _progress_path(part).unlink(missing_ok=True)
    state.record(rel, path, etag=remote.etag, md5=md5, source=store.url(remote.key), ids_sha256=ids_digest(ids),
                 kind="subset", n_images=int(ids.size))
    return received


def _batches(runs: list, row_bytes: int, max_runs: int, max_bytes: int = 256 << 20):
    """Consecutive runs in batches of at most ``max_runs`` runs and about ``max_bytes`` (the memory in flight);
    each batch is written and recorded as done before the next is read."""
    batch, size = [], 0
    for run in runs:
        if batch and (len(batch) == max_runs or size + (run[2] - run[1]) * row_bytes > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(run)
        size += (run[2] - run[1]) * row_bytes
    if batch:
        yield batch


def _rows_by_range(store: S3Store, remote: RemoteObject, info: BrickInfo, run, reader, dataset) -> tuple[bytes, int]:
    """One ranged GET of source rows [start, end), keeping the wanted ones: (their bytes, bytes received)."""
    _, start, end, keep = run
    rb = info.row_bytes
    data = store.read_range(remote.key, info.data_offset + start * rb, info.data_offset + end * rb, remote.etag)
    if keep.size == end - start:
        return data, len(data)
    rows = np.frombuffer(data, dtype=np.uint8).reshape(end - start, rb)[keep]
    return rows.tobytes(), len(data)


def _rows_by_h5py(store: S3Store, remote: RemoteObject, info: BrickInfo, run, reader, dataset) -> tuple[bytes, int]:
    """Rows of a chunked or compressed brick through h5py (sorted indices, as HDF5 requires)."""
    _, start, _, keep = run
    before = store.counter.bytes
    rows = reader[dataset][(start + keep).tolist()]
    return np.ascontiguousarray(rows).tobytes(), store.counter.bytes - before


def _save_progress(part: Path, expect: dict, rows_done: int, offset: int) -> None:
    progress = _progress_path(part)
    tmp = progress.with_name(progress.name + ".tmp")
    tmp.write_text(json.dumps({**expect, "rows_done": int(rows_done), "data_offset": int(offset)}))
    os.replace(tmp, progress)


def _check_part(part: Path, shape: tuple[int, ...], ids: np.ndarray) -> None:
    with h5py.File(part, "r") as f:
        if tuple(f["imgBrick"].shape) != tuple(shape) or not np.array_equal(f["nsd_ids"][()], ids):
            raise FetchError(f"{part}: the written file does not hold the expected images; delete it and run "
                             "the fetch again")
