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
   (n, H, W, 3) and ``row_sha256`` (n, 32) allocated contiguously and ``nsd_ids`` (n,) int64 written, so that
   the rows and their checksums are plain bytes at known offsets and the file is valid HDF5 throughout (and
   without time stamps: the same source rows give the same file, byte for byte). ``row_sha256[i]`` is the
   SHA-256 of the bytes of ``imgBrick[i]`` as received. ``<final>.part.json`` records how many rows are
   complete (updated after each batch is on disk); a killed run continues from there.
4. When every row is in, one pass over the part computes its MD5 (kept in the fetch state) and each row's
   SHA-256 again, which must equal the recorded one (a row that did not reach the disk intact is caught
   here); then the part is moved into place with ``os.replace``.

Checks (:func:`check_subset`): a run that finds the file changed since it was recorded (its stat), and every
``--verify``, hash each row against ``row_sha256``: a damaged row is re-fetched alone (:func:`repair_rows`),
the other rows are not touched. ``--verify`` also compares a seeded random sample of rows, with the first
and the last, with the bucket's (:func:`spot_check`): the bucket has no per-row checksum, so alterations in
transit when the file was built can only be sampled. A file written before row checksums existed is checked
by its MD5 and the sample, then rewritten locally with them (:func:`add_row_checksums`). docs/fetch.md,
"Checking the per-subject image files", gives the reasoning and the odds of the sample.

The file is what :class:`mdlib.nsd.stimuli.StimulusReader` reads when the brick is absent (docs/data.md,
"The images: the brick and the per-subject files"); it ignores ``row_sha256``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mdlib.cachekey import cache_key
from mdlib.fetch.remote import PART_SUFFIX, FetchError, FetchState, RangedReader, RemoteObject, S3Store, \
    SourceChangedError, retrying, row_digests, scan_rows

#: The dataset of row checksums: (n, 32) uint8, the SHA-256 of each row of ``imgBrick``.
ROW_DIGESTS = "row_sha256"
#: The layout a part file is written in (2: with row checksums); a part of another layout is started over.
FORMAT = 2
#: Rows compared with the bucket by ``--verify`` (besides the first and the last), by default.
DEFAULT_SAMPLE = 100
#: Reads of local rows (a rewrite) and of single rows (checks, repairs) are at most this many bytes each.
_READ_BYTES = 32 << 20


@dataclass(frozen=True)
class BrickInfo:
    """The remote brick's layout: ``shape`` (n, H, W, 3), bytes per row, and where row 0 starts in the file
    (None when the dataset is chunked or compressed: then rows are read through h5py)."""

    shape: tuple[int, ...]
    row_bytes: int
    data_offset: int | None


def remote_reader(store: S3Store, remote: RemoteObject, retries: int = 3) -> RangedReader:
    """A seekable file object over ``remote`` (small reads cached in 64 kB blocks)."""
    return RangedReader(lambda a, b: store.read_range(remote.key, a, b, remote.etag, remote.size), remote.size,
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


def name_ids(nsd_ids: np.ndarray, limit: int = 20) -> str:
    """``"17, 2034, 5120"`` (the first ``limit``, then how many more): nsdIds in a message."""
    ids = [str(int(i)) for i in np.asarray(nsd_ids).ravel()]
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more


# -- the file's layout -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SubsetLayout:
    """Where a per-subject file keeps its rows: ``shape`` (n, H, W, 3), bytes per row, the offsets of row 0
    of ``imgBrick`` and of ``row_sha256`` (None: a file written before row checksums existed), its
    ``nsd_ids`` and its attributes."""

    shape: tuple[int, ...]
    row_bytes: int
    data_offset: int
    digest_offset: int | None
    ids: np.ndarray
    attrs: dict[str, Any]

    @property
    def n_rows(self) -> int:
        return int(self.shape[0])


def read_layout(path: Path) -> SubsetLayout:
    """The layout of a per-subject file; ValueError if it is not one (unreadable, or not contiguous)."""
    try:
        with h5py.File(path, "r") as f:
            ds, ids = f.get("imgBrick"), f.get("nsd_ids")
            if not isinstance(ds, h5py.Dataset) or not isinstance(ids, h5py.Dataset) or ds.ndim != 4 or \
                    ds.dtype != np.uint8 or ds.id.get_offset() is None:
                raise ValueError(f"{path}: not a per-subject image file (imgBrick, nsd_ids)")
            digest_offset = None
            if ROW_DIGESTS in f:
                dg = f[ROW_DIGESTS]
                if dg.shape != (ds.shape[0], 32) or dg.dtype != np.uint8 or dg.id.get_offset() is None:
                    raise ValueError(f"{path}: {ROW_DIGESTS} is not (n, 32) uint8, contiguous")
                digest_offset = int(dg.id.get_offset())
            return SubsetLayout(tuple(int(n) for n in ds.shape), int(np.prod(ds.shape[1:])),
                                int(ds.id.get_offset()), digest_offset, np.asarray(ids[()], dtype=np.int64),
                                {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()})
    except (OSError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: cannot read it as HDF5: {err}") from err


def recorded_digests(path: Path, lay: SubsetLayout) -> np.ndarray:
    """The row checksums a file records, (n, 32) uint8 (read as bytes at their offset, as they were written)."""
    with open(path, "rb") as f:
        f.seek(lay.digest_offset)
        data = f.read(lay.n_rows * 32)
    if len(data) != lay.n_rows * 32:
        raise ValueError(f"{path}: truncated ({ROW_DIGESTS} incomplete)")
    return np.frombuffer(data, dtype=np.uint8).reshape(lay.n_rows, 32)


def _progress_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _create_part(part: Path, shape: tuple[int, ...], nsd_ids: np.ndarray, attrs: dict) -> SubsetLayout:
    """The part file with ``imgBrick`` and ``row_sha256`` allocated (not filled) and ``nsd_ids`` written."""
    part.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(part, "w") as f:
        for name, dims in ((b"imgBrick", shape), (ROW_DIGESTS.encode(), (shape[0], 32))):
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            dcpl.set_obj_track_times(False)  # no time stamps: the same images give the same bytes
            h5py.h5d.create(f.id, name, h5py.h5t.NATIVE_UINT8, h5py.h5s.create_simple(dims), dcpl=dcpl)
        f[ROW_DIGESTS].attrs["algorithm"] = "sha256"
        f[ROW_DIGESTS].attrs["covers"] = "row i: the bytes of imgBrick[i] in C order"
        f.create_dataset("nsd_ids", data=np.asarray(nsd_ids, dtype=np.int64), track_times=False)
        f.attrs.update(attrs)
    return read_layout(part)


def _resume_point(part: Path, expect: dict, shape: tuple[int, ...]) -> tuple[int, SubsetLayout] | None:
    """(rows done, layout) of a part that a previous run left for the same source, ids and format, else None."""
    progress = _progress_path(part)
    if not (part.is_file() and progress.is_file()):
        return None
    try:
        saved = json.loads(progress.read_text())
        if any(saved.get(k) != v for k, v in expect.items()):
            return None
        lay = read_layout(part)
    except (OSError, ValueError, KeyError):
        return None
    same = lay.shape == tuple(shape) and [lay.data_offset, lay.digest_offset] == saved.get("offsets")
    return (int(saved["rows_done"]), lay) if same else None


def _save_progress(part: Path, expect: dict, rows_done: int, lay: SubsetLayout) -> None:
    progress = _progress_path(part)
    tmp = progress.with_name(progress.name + ".tmp")
    tmp.write_text(json.dumps({**expect, "rows_done": int(rows_done),
                               "offsets": [lay.data_offset, lay.digest_offset]}))
    os.replace(tmp, progress)


def _discard_part(part: Path) -> None:
    part.unlink(missing_ok=True)
    _progress_path(part).unlink(missing_ok=True)


# -- reading rows from the brick ----------------------------------------------------------------------------

def _rows_by_range(store: S3Store, remote: RemoteObject, info: BrickInfo, run, reader, dataset) -> tuple[bytes, int]:
    """One ranged GET of source rows [start, end), keeping the wanted ones: (their bytes, bytes received)."""
    _, start, end, keep = run
    rb = info.row_bytes
    data = store.read_range(remote.key, info.data_offset + start * rb, info.data_offset + end * rb, remote.etag,
                            remote.size)
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


class _BrickRows:
    """Reads of the brick's rows (ranged GETs, or h5py for a chunked brick), retried; a context manager."""

    def __init__(self, store: S3Store, remote: RemoteObject, info: BrickInfo, dataset: str, retries: int) -> None:
        self.store, self.remote, self.info, self.dataset, self.retries = store, remote, info, dataset, retries
        self.reader = None if info.data_offset is not None else h5py.File(remote_reader(store, remote, retries), "r")
        self._read = _rows_by_range if self.reader is None else _rows_by_h5py

    def workers(self, wanted: int) -> int:
        """Parallel reads: ``wanted``, or 1 through h5py (one file object)."""
        return max(1, wanted) if self.reader is None else 1

    def run(self, run) -> tuple[bytes, int]:
        where = f"{self.store.url(self.remote.key)} rows {run[1]}..{run[2] - 1}"
        return retrying(lambda: self._read(self.store, self.remote, self.info, run, self.reader, self.dataset),
                        self.retries, where)

    def rows(self, nsd_ids: np.ndarray, workers: int) -> np.ndarray:
        """The rows ``nsd_ids`` (sorted, unique) as (k, row_bytes) uint8: consecutive ids share a GET. For a
        few rows (they are all in memory)."""
        runs = plan_runs(nsd_ids, self.info.row_bytes, max_gap_rows=0, max_request_bytes=_READ_BYTES)
        with ThreadPoolExecutor(max_workers=self.workers(workers)) as pool:
            parts = [data for data, _ in pool.map(self.run, runs)]
        return np.frombuffer(b"".join(parts), dtype=np.uint8).reshape(len(nsd_ids), self.info.row_bytes)

    def digests(self, nsd_ids: np.ndarray, workers: int) -> np.ndarray:
        """The SHA-256 of the rows ``nsd_ids`` (sorted, unique), (k, 32) uint8; each read is hashed in its
        thread and dropped, so any number of rows costs little memory."""
        rb = self.info.row_bytes
        runs = plan_runs(nsd_ids, rb, max_gap_rows=0, max_request_bytes=_READ_BYTES)
        out = np.empty((len(nsd_ids), 32), dtype=np.uint8)
        with ThreadPoolExecutor(max_workers=self.workers(workers)) as pool:
            for batch in _batches(runs, rb, max_runs=4 * self.workers(workers)):
                for (first, _, _, keep), digests in zip(batch, pool.map(lambda r: row_digests(self.run(r)[0], rb),
                                                                        batch)):
                    out[first:first + len(keep)] = digests
        return out

    def __enter__(self) -> _BrickRows:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.reader is not None:
            self.reader.close()


def _checked_ids(nsd_ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(nsd_ids, dtype=np.int64)
    if ids.size == 0 or np.any(np.diff(ids) <= 0) or ids[0] < 0:
        raise ValueError("nsd_ids must be sorted, unique and non-negative")
    return ids


def _expect(store: S3Store, remote: RemoteObject, ids: np.ndarray, shape: tuple[int, ...]) -> dict[str, Any]:
    """What a part must have been started for to be continued (its progress file records it)."""
    return {"source": store.url(remote.key), "etag": remote.etag, "ids_sha256": ids_digest(ids),
            "shape": list(shape), "format": FORMAT}


def _attrs(store: S3Store, remote: RemoteObject, subject: int | None) -> dict[str, Any]:
    return {"source": store.url(remote.key), "source_etag": remote.etag, "subject": int(subject or 0),
            "written_by": "mdlib fetch"}


def _record(state: FetchState, rel: str, path: Path, store: S3Store, remote: RemoteObject, ids: np.ndarray,
            md5: str) -> None:
    state.record(rel, path, etag=remote.etag, md5=md5, source=store.url(remote.key), ids_sha256=ids_digest(ids),
                 kind="subset", n_images=int(ids.size), row_checksums="sha256")


# -- writing a file -------------------------------------------------------------------------------------------

def build_subset(store: S3Store, remote: RemoteObject, nsd_ids: np.ndarray, path: Path, rel: str,
                 state: FetchState, *, info: BrickInfo | None = None, subject: int | None = None,
                 dataset: str = "imgBrick", workers: int = 8, retries: int = 3, max_gap_rows: int = 2,
                 max_request_bytes: int = 32 << 20, on_rows: Callable[[int], None] | None = None) -> int:
    """Write the rows ``nsd_ids`` (sorted, unique, 0-based) of the remote brick, and their checksums, to
    ``path``; returns the bytes received. Resumes a part left by an earlier run for the same source ETag and
    ids. A file already at ``path`` stays there until the new one is complete."""
    ids = _checked_ids(nsd_ids)
    info = info or inspect_brick(store, remote, dataset, retries)
    if ids[-1] >= info.shape[0]:
        raise FetchError(f"{store.url(remote.key)} holds {info.shape[0]} images, but nsdId {int(ids[-1])} is asked "
                         "for: is the design from another dataset?")
    shape = (int(ids.size), *info.shape[1:])
    part = path.with_name(path.name + PART_SUFFIX)
    try:
        with _BrickRows(store, remote, info, dataset, retries) as brick:
            received, md5 = _write_part(
                part, _expect(store, remote, ids, shape), _attrs(store, remote, subject), ids, shape,
                info.row_bytes, lambda done: plan_runs(ids[done:], info.row_bytes, max_gap_rows, max_request_bytes),
                brick.run, brick.workers(workers), on_rows)
    except SourceChangedError as err:
        _discard_part(part)  # rows of a version the bucket no longer has
        kept = f", {path} is untouched" if path.exists() else ""
        raise err.with_discarded(f"the partial file {part} was discarded{kept}") from None
    os.replace(part, path)
    _progress_path(part).unlink(missing_ok=True)
    _record(state, rel, path, store, remote, ids, md5)
    return received


def add_row_checksums(store: S3Store, remote: RemoteObject, nsd_ids: np.ndarray, path: Path, rel: str,
                      state: FetchState, *, subject: int | None = None,
                      on_rows: Callable[[int], None] | None = None) -> None:
    """Rewrite ``path`` in the current layout, with row checksums, from its own rows (local reads, nothing
    transferred): for a file written before row checksums existed, or one damaged outside its rows. The
    caller has checked the rows (MD5 against the fetch state, or each row against its checksum). The result
    is the file a fresh build gives; the old one stays in place until the new one is complete."""
    ids = _checked_ids(nsd_ids)
    old = read_layout(path)
    if not np.array_equal(old.ids, ids):
        raise ValueError(f"{path}: holds other images than the ones asked for")
    rb = old.row_bytes
    part = path.with_name(path.name + PART_SUFFIX)
    fd = os.open(path, os.O_RDONLY)

    def local_run(run) -> tuple[bytes, int]:
        _, start, end, _ = run
        data = os.pread(fd, (end - start) * rb, old.data_offset + start * rb)
        if len(data) != (end - start) * rb:
            raise FetchError(f"{path}: truncated while rows {start}..{end - 1} were read")
        return data, 0

    try:
        _, md5 = _write_part(part, _expect(store, remote, ids, old.shape), _attrs(store, remote, subject), ids,
                             old.shape, rb, lambda done: plan_runs(np.arange(done, ids.size), rb, 0, _READ_BYTES),
                             local_run, 2, on_rows)
    finally:
        os.close(fd)
    os.replace(part, path)
    _progress_path(part).unlink(missing_ok=True)
    _record(state, rel, path, store, remote, ids, md5)


def _write_part(part: Path, expect: dict, attrs: dict, ids: np.ndarray, shape: tuple[int, ...], row_bytes: int,
                plan: Callable[[int], list], read_run: Callable[[Any], tuple[bytes, int]], workers: int,
                on_rows: Callable[[int], None] | None) -> tuple[int, str]:
    """Fill ``part`` (continuing it if ``expect`` matches its progress file) with the rows ``read_run`` gives
    for the runs ``plan(rows done)`` returns (relative to the first row not done), each row's SHA-256 beside
    it; then check it in one pass. Returns (bytes received, the part's MD5)."""
    resumed = _resume_point(part, expect, shape)
    if resumed is None:
        _discard_part(part)
        done, lay = 0, _create_part(part, shape, ids, attrs)
        _save_progress(part, expect, done, lay)
    else:
        done, lay = resumed

    def read_and_hash(run) -> tuple[bytes, int, np.ndarray]:
        data, nbytes = read_run(run)
        return data, nbytes, row_digests(data, row_bytes)  # in the worker threads: hashlib releases the GIL

    received = 0
    fd = os.open(part, os.O_WRONLY)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for batch in _batches(plan(done), row_bytes, max_runs=4 * max(1, workers)):
                for (first, _, _, keep), (data, nbytes, digests) in zip(batch, pool.map(read_and_hash, batch)):
                    os.pwrite(fd, data, lay.data_offset + (done + first) * row_bytes)
                    os.pwrite(fd, digests.tobytes(), lay.digest_offset + (done + first) * 32)
                    received += nbytes
                    if on_rows is not None:
                        on_rows(len(keep))
                os.fsync(fd)
                last = batch[-1]
                _save_progress(part, expect, done + last[0] + len(last[3]), lay)
    finally:
        os.close(fd)
    _check_part(part, shape, ids)
    md5, on_disk = scan_rows(part, lay.data_offset, lay.n_rows, row_bytes)
    bad = np.flatnonzero(np.any(on_disk != recorded_digests(part, lay), axis=1))
    if bad.size:  # written, but not read back as written: start again from the first of them
        _save_progress(part, expect, int(bad[0]), lay)
        raise FetchError(f"{part}: {bad.size} row(s) do not read back as they were written (nsdIds "
                         f"{name_ids(ids[bad])}): check the disk (free space, errors), then run the same command "
                         "again; it continues from the first of them")
    return received, md5


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


def _check_part(part: Path, shape: tuple[int, ...], ids: np.ndarray) -> None:
    with h5py.File(part, "r") as f:
        if tuple(f["imgBrick"].shape) != tuple(shape) or not np.array_equal(f["nsd_ids"][()], ids):
            raise FetchError(f"{part}: the written file does not hold the expected images; delete it and run "
                             "the fetch again")


# -- checking a file -----------------------------------------------------------------------------------------

@dataclass
class SpotCheck:
    """``--verify``'s comparison with the bucket: ``sample`` rows drawn at random (``seed``; None: a fresh
    seed, then recorded in :attr:`seed`) plus the first and the last row. ``info`` gives the brick's layout
    (called only when a comparison is made)."""

    store: S3Store
    remote: RemoteObject
    info: Callable[[], BrickInfo]
    sample: int = DEFAULT_SAMPLE
    seed: int | None = None
    dataset: str = "imgBrick"
    workers: int = 8
    retries: int = 3

    def rows(self, n_rows: int) -> np.ndarray:
        """The rows to compare (sorted, unique): the sample, the first and the last."""
        if self.seed is None:
            self.seed = int(np.random.SeedSequence().entropy % (1 << 31))
        rng = np.random.default_rng(self.seed)
        drawn = rng.choice(n_rows, size=min(max(0, int(self.sample)), n_rows), replace=False)
        return np.unique(np.concatenate([drawn, [0, n_rows - 1]]).astype(np.int64))


def spot_check(spot: SpotCheck, ids: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compare rows of the bucket's brick with what was written: ``reference`` (n, 32) holds each local row's
    expected SHA-256 (its recorded checksum). Returns (the rows compared, the rows that differ). A row that
    differs is read a second time: if the two reads of the bucket disagree, the transfer is altering bytes
    now and nothing can be concluded (FetchError)."""
    rows = spot.rows(len(ids))
    with _BrickRows(spot.store, spot.remote, spot.info(), spot.dataset, spot.retries) as brick:
        first = brick.digests(ids[rows], spot.workers)
        differ = rows[np.any(first != reference[rows], axis=1)]
        if differ.size:
            again = brick.digests(ids[differ], spot.workers)
            unstable = differ[np.any(again != first[np.isin(rows, differ)], axis=1)]
            if unstable.size:
                raise FetchError(_unstable(spot.store.url(spot.remote.key), ids[unstable]))
    return rows, differ


def _unstable(url: str, nsd_ids: np.ndarray, kept: str = "nothing was changed on disk") -> str:
    return (f"{url}: two reads of the same rows (nsdIds {name_ids(nsd_ids)}) gave different bytes: something "
            f"between this machine and the bucket alters data in transit, so no check or repair can be trusted "
            f"now; {kept}. Check the network path (a proxy?), then run the same command again")


@dataclass
class SubsetCheck:
    """What :func:`check_subset` found. ``status``:

    - ``ok``, ``absent``, ``unverified`` (a dry run did not hash the changed file);
    - ``stale``, ``corrupt``: fetch the file again (``reason`` says why);
    - ``differs``: rows compared with the bucket differ from it (``rows``): fetch the file again;
    - ``damaged``: ``rows`` fail their checksums: re-fetch those rows (:func:`repair_rows`);
    - ``rewrite``: the rows are right but the file lacks row checksums (an older mdlib wrote it) or is
      damaged outside its rows: rewrite it locally (:func:`add_row_checksums`).

    ``rows`` are row indices (``ids[rows]`` their nsdIds); ``compared``: rows compared with the bucket (0 if
    none); ``seed``: the sample's seed; ``old``: the file has no row checksums.
    """

    status: str
    reason: str = ""
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    compared: int = 0
    seed: int | None = None
    old: bool = False


def check_subset(path: Path, rel: str, remote: RemoteObject, nsd_ids: np.ndarray, state: FetchState, *,
                 verify: bool = False, hash_files: bool = True, spot: SpotCheck | None = None) -> SubsetCheck:
    """Check the per-subject file at ``path`` against its fetch record (``state``), its row checksums and,
    with ``verify`` and ``spot``, a sample of the bucket's rows (see the module's docstring). Trusted
    without reading when the record's stat still matches, unless ``verify``. A file with no record is
    adopted when it says it comes from this source for these images and every row matches its checksum.
    Records what it verified in ``state``; writes nothing else."""
    ids = np.asarray(nsd_ids, dtype=np.int64)
    if not path.is_file():
        return SubsetCheck("absent")
    entry = state.get(rel)
    if entry:
        if entry.get("etag") != remote.etag:
            return SubsetCheck("stale", "made from another version of the brick")
        if entry.get("ids_sha256") != ids_digest(ids):
            return SubsetCheck("stale", "holds other images")
        if not verify and state.unchanged(rel, path):
            return SubsetCheck("ok", old=entry.get("row_checksums") is None)
    if not hash_files:
        return SubsetCheck("unverified" if entry else "stale", "" if entry else "not in the fetch state")
    try:
        lay = read_layout(path)
    except ValueError:
        return SubsetCheck("corrupt", "not readable as HDF5")
    if not entry and (lay.attrs.get("source_etag") != remote.etag or lay.digest_offset is None):
        return SubsetCheck("stale", "not in the fetch state")
    if lay.shape[0] != ids.size or not np.array_equal(lay.ids, ids):
        return SubsetCheck("corrupt" if entry else "stale", "its nsd_ids are not the subject's images")
    try:
        md5, on_disk = scan_rows(path, lay.data_offset, lay.n_rows, lay.row_bytes)
    except ValueError:
        return SubsetCheck("corrupt", "truncated")
    md5_ok = bool(entry) and md5 == entry.get("md5")
    old = lay.digest_offset is None
    if old and not md5_ok:
        return SubsetCheck("corrupt", "its MD5 differs from the one recorded when it was fetched, and it has no "
                           "row checksums to tell which rows", old=True)
    recorded = on_disk if old else recorded_digests(path, lay)  # an old file's rows are vouched for by its MD5
    bad = np.flatnonzero(np.any(on_disk != recorded, axis=1))
    compared, seed = 0, None
    if verify and spot is not None:
        rows, differ = spot_check(spot, ids, recorded)
        compared, seed = int(rows.size), spot.seed
        if differ.size:
            return SubsetCheck("differs", "rows differ from the bucket's", differ, compared, seed, old)
    if bad.size:
        return SubsetCheck("damaged", "rows fail their checksums", bad, compared, seed)
    if old and verify:
        return SubsetCheck("rewrite", "no row checksums", compared=compared, seed=seed, old=True)
    if entry and not md5_ok and not old:
        return SubsetCheck("rewrite", "damaged outside its rows", compared=compared, seed=seed)
    if old:
        state.record(rel, path, **{k: v for k, v in entry.items() if k not in ("size", "stat")})
    else:
        kept = {k: v for k, v in (entry or {}).items() if k not in ("size", "stat")}
        state.record(rel, path, **{**kept, "etag": remote.etag, "md5": md5, "ids_sha256": ids_digest(ids),
                                   "source": kept.get("source") or str(lay.attrs.get("source", "")),
                                   "kind": "subset", "n_images": int(ids.size), "row_checksums": "sha256"})
    return SubsetCheck("ok", compared=compared, seed=seed, old=old)


def repair_rows(store: S3Store, remote: RemoteObject, info: BrickInfo, path: Path, rel: str, nsd_ids: np.ndarray,
                rows: np.ndarray, state: FetchState, *, dataset: str = "imgBrick", workers: int = 8,
                retries: int = 3, batch_rows: int = 64) -> int:
    """Re-fetch the rows ``rows`` (row indices) of ``path`` from the bucket and write them in place, in
    batches of ``batch_rows``; returns the bytes received. Nothing else in the file is touched. For each row
    the bucket's bytes are written if they match the row's recorded checksum (the local row was damaged); if
    they match the local row, the checksum was the damaged part and is rewritten; if neither, a second read
    must agree with the first (the bucket's row is then taken as it is, with its checksum), else FetchError
    and nothing more is written."""
    ids = np.asarray(nsd_ids, dtype=np.int64)
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    lay = read_layout(path)
    recorded = recorded_digests(path, lay).copy()
    state.invalidate(rel)  # until this is done, any run checks the file again
    before = store.counter.bytes
    with _BrickRows(store, remote, info, dataset, retries) as brick:
        fd = os.open(path, os.O_RDWR)
        try:
            for lo in range(0, rows.size, max(1, int(batch_rows))):
                _repair_batch(brick, fd, lay, ids, rows[lo:lo + batch_rows], recorded, workers)
            os.fsync(fd)
        finally:
            os.close(fd)
    md5, on_disk = scan_rows(path, lay.data_offset, lay.n_rows, lay.row_bytes)
    still = np.flatnonzero(np.any(on_disk != recorded_digests(path, lay), axis=1))
    if still.size:
        raise FetchError(f"{path}: {still.size} row(s) still fail their checksums after the repair (nsdIds "
                         f"{name_ids(ids[still])}): check the disk, then run the same command again")
    _record(state, rel, path, store, remote, ids, md5)
    return store.counter.bytes - before


def _repair_batch(brick: _BrickRows, fd: int, lay: SubsetLayout, ids: np.ndarray, rows: np.ndarray,
                  recorded: np.ndarray, workers: int) -> None:
    """One batch of :func:`repair_rows`: read the rows from the bucket, decide, write rows and checksums."""
    rb = lay.row_bytes
    fresh = brick.rows(ids[rows], workers)
    got = row_digests(fresh, rb)
    mine = row_digests(b"".join(os.pread(fd, rb, lay.data_offset + int(r) * rb) for r in rows), rb)
    unsure = np.flatnonzero(np.any(got != recorded[rows], axis=1) & np.any(got != mine, axis=1))
    if unsure.size:  # the bucket's row matches nothing we have: believe it only if it reads the same twice
        again = brick.digests(ids[rows[unsure]], workers)
        if np.any(again != got[unsure]):
            raise FetchError(_unstable(brick.store.url(brick.remote.key), ids[rows[unsure]],
                                       "the rows repaired before them are kept, these are unchanged, and the "
                                       "next run checks the file again"))
    for k, r in enumerate(rows):
        if not np.array_equal(got[k], mine[k]):
            os.pwrite(fd, fresh[k].tobytes(), lay.data_offset + int(r) * rb)
        if not np.array_equal(got[k], recorded[r]):
            os.pwrite(fd, got[k].tobytes(), lay.digest_offset + int(r) * 32)
