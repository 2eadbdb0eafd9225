"""Remote sources and the local side of a verified, resumable, atomic download.

- :class:`S3Store`: a bucket read anonymously (boto3 with botocore's UNSIGNED signature), as NSD's public
  bucket allows; ``endpoint_url`` points it at another S3 server (the tests' moto server on 127.0.0.1).
- :class:`RateLimit`: a cap on the bytes per second received by every transfer that shares it (``--max-rate``).
- :class:`HttpSource`: one file over HTTP(S) with ``Range`` requests (the COCO annotations zip).
- :class:`RangedReader`: a read-only, seekable file object over either, issuing one ranged GET per large read
  and caching small ones in blocks, so that h5py and zipfile can open a remote file and read only what they
  need (the stimulus brick's metadata, the zip's directory and two members).
- :class:`FetchState`: ``<data root>/mdlib_fetch_state.json``, what mdlib fetched and verified: per local
  file its size, MD5, the source's ETag and the file's stat at that time. A later run that finds the same
  stat skips the file without re-hashing it (gigabytes); a changed stat (an edited or replaced file) makes it
  hash the file again and compare. ``--verify`` re-hashes everything.
- :func:`download_file`: one object to ``<final>.part``, continued with ``Range: bytes=N-`` when a previous
  run left a part, checked (size against HEAD and the manifest; MD5 against the ETag when the ETag is a plain
  MD5, i.e. has no ``-``: multipart uploads' ETags are not MD5s, then size only), then moved into place with
  ``os.replace``: a file is at its final path only when complete and verified.
- Every GET is made with the ETag HEAD gave (``If-Match``) and its answer checked against the size HEAD gave
  (the total in ``Content-Range``): an object that changed between HEAD and GET raises
  :class:`SourceChangedError` at once, whatever the server does with ``If-Match``, and no byte of another
  version is appended to a part.
- :func:`row_digests`, :func:`scan_rows`: SHA-256 of each row of a file's image block (the per-subject image
  file's row checksums, :mod:`mdlib.fetch.subset`).

docs/fetch.md, "How it transfers", describes this for users.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Suffix of a file being downloaded (``<final>.part``) next to its final path.
PART_SUFFIX = ".part"
#: The state file under the data root (see :class:`FetchState`).
STATE_FILE = "mdlib_fetch_state.json"
#: Bytes per read of a download stream (and per progress update).
CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A fetch failed; the message names the file or key, and what to do (usually: run it again to resume)."""


class MissingKeyError(FetchError):
    """Keys the manifest asks for are not in the bucket; ``keys`` lists them, the message names them."""

    def __init__(self, bucket: str, keys: list[str], hint: str = "") -> None:
        self.bucket, self.keys = bucket, list(keys)
        shown = "\n".join(f"  s3://{bucket}/{k}" for k in self.keys[:20])
        more = f"\n  ... and {len(self.keys) - 20} more" if len(self.keys) > 20 else ""
        super().__init__(f"{len(self.keys)} key(s) not found in bucket {bucket!r}:\n{shown}{more}"
                         + (f"\n{hint}" if hint else ""))


class SourceChangedError(FetchError):
    """The remote object changed between HEAD and GET (another ETag, or another size).

    ``found`` says how it differs; ``discarded`` what the fetch threw away because of it (a part of the old
    version). The message is one line: the object, both versions, what was discarded, and the fix.
    """

    def __init__(self, url: str, expected: RemoteObject, found: str, discarded: str = "") -> None:
        self.url, self.expected, self.found, self.discarded = url, expected, found, discarded
        head = f"{expected.size} bytes, ETag {expected.etag or 'none'}" if expected.size >= 0 else \
            f"ETag {expected.etag or 'none'}"
        super().__init__(
            f"{url} changed on the server during the fetch: HEAD said {head}, but {found}"
            + (f"; {discarded}" if discarded else "") + ". Run the same command again to fetch the current "
            "version (if data_manifest/nsd.yaml gives a size for it, check that size too)")

    def with_discarded(self, what: str) -> SourceChangedError:
        return SourceChangedError(self.url, self.expected, self.found, what)


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Errors worth a retry: network failures (no route, a refused, dropped or stalled connection, a short
    read), as opposed to answers ('missing', 'forbidden', 'invalid range') and botocore's own errors about the
    request (an invalid bucket name, a bad endpoint), which no retry mends (see :func:`one_line`)."""
    import urllib3.exceptions
    from botocore import exceptions as boto

    return (boto.ConnectionError, boto.HTTPClientError, boto.IncompleteReadError, urllib3.exceptions.HTTPError,
            ConnectionError, TimeoutError, http.client.HTTPException, urllib.error.URLError)


def one_line(err: BaseException) -> str:
    """``err``'s type and message on one line (botocore's validation messages span several)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def request_failed(url: str, what: str, err: BaseException) -> str:
    """The message for an S3 request that failed without a network failure (an error answer, or botocore
    refusing the request): what failed, on one line, and what to check."""
    return (f"{url}: {what} failed ({one_line(err)}). Check --bucket and --endpoint-url (and, for an error the "
            "server reports, try again later); finished files are kept and partial ones resume.")


def unreachable(url: str, err: BaseException) -> str:
    """The message for a server that cannot be reached: what failed, and what to do."""
    return (f"could not reach {url} ({type(err).__name__}: {err}). Check the network connection (the machine "
            "must reach the S3 endpoint; --endpoint-url names another), then run the same command again: "
            "finished files are kept and partial ones resume.")


@dataclass(frozen=True)
class RemoteObject:
    """An object as HEAD describes it: ``size`` in bytes, ``etag`` without its quotes."""

    key: str
    size: int
    etag: str

    @property
    def md5(self) -> str | None:
        """The object's MD5 (hex) when its ETag is one (single-part uploads), else None."""
        return self.etag if re.fullmatch(r"[0-9a-f]{32}", self.etag) else None


class RateLimit:
    """At most ``rate`` bytes per second, over all the transfers (threads) that share it.

    A transfer reads its stream in :attr:`block`-byte reads (a tenth of a second's worth) and calls
    :meth:`take` after each: the caller sleeps until the bytes received so far fit the rate. Like curl's
    ``--limit-rate`` and the AWS CLI's ``max_bandwidth``, for a link shared with others.
    """

    def __init__(self, rate: float) -> None:
        if not rate > 0:
            raise ValueError(f"a rate must be a positive number of bytes per second, got {rate!r}")
        self.rate = float(rate)
        self._lock = threading.Lock()
        self._due = 0.0  # the monotonic time by which the bytes taken so far are paid for

    @property
    def block(self) -> int:
        """Bytes per read: a tenth of a second's worth, between 1 kB and :data:`CHUNK`."""
        return int(min(CHUNK, max(1024, self.rate // 10)))

    def take(self, n: int) -> None:
        """Account for ``n`` bytes just received; sleep until they fit the rate."""
        with self._lock:
            now = time.monotonic()
            self._due = max(self._due, now) + n / self.rate
            wait = self._due - now
        if wait > 0:
            time.sleep(wait)


def parse_rate(text: str) -> int:
    """Bytes per second from ``"250000"``, ``"500k"``, ``"2.5M"``, ``"1G"`` (SI, as the fetch's summary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmg]?)b?(?:/s)?\s*", str(text), flags=re.IGNORECASE)
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()] if m else 0.0
    if value < 1:
        raise ValueError(f"not a rate in bytes per second: {text!r} (e.g. 500000, 500k, 2M)")
    return int(value)


class _Counter:
    """Requests and bytes received, shared by threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.heads = 0
        self.bytes = 0

    def add(self, requests: int = 0, nbytes: int = 0, heads: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.bytes += nbytes
            self.heads += heads


def _blocks(body: Any, counter: _Counter, limit: RateLimit | None) -> Any:
    """The blocks of a response body as they arrive, counted in ``counter`` and paced by ``limit``."""
    size = CHUNK if limit is None else limit.block
    while block := body.read(size):
        counter.add(nbytes=len(block))
        if limit is not None:
            limit.take(len(block))
        yield block


def s3_client(endpoint_url: str | None = None, region: str = "us-east-2", workers: int = 8):
    """A boto3 S3 client that signs nothing (anonymous reads of a public bucket), with a connection pool
    for ``workers`` threads, botocore's standard retries, and path-style addressing for a custom endpoint."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    config = Config(signature_version=UNSIGNED, max_pool_connections=max(10, workers + 2),
                    retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=20, read_timeout=120,
                    s3={"addressing_style": "path"} if endpoint_url else {})
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, region_name=region,
                                          config=config)


class S3Store:
    """One bucket, read anonymously. Counts GET requests and bytes received (``counter``).

    Args:
        bucket: the bucket name (NSD: ``natural-scenes-dataset``).
        client: a boto3 S3 client to use (default: :func:`s3_client` with ``endpoint_url`` and ``region``).
        limit: a :class:`RateLimit` every GET's bytes are paced by (None: as fast as the link goes).
    """

    def __init__(self, bucket: str, client: Any = None, endpoint_url: str | None = None,
                 region: str = "us-east-2", workers: int = 8, limit: RateLimit | None = None) -> None:
        self.bucket = bucket
        self.client = client if client is not None else s3_client(endpoint_url, region, workers)
        self.counter = _Counter()
        self.limit = limit

    def blocks(self, body: Any) -> Any:
        """The blocks of a GET's body (from :meth:`open_range`) as they arrive, counted and paced."""
        return _blocks(body, self.counter, self.limit)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def head(self, key: str) -> RemoteObject:
        """Size and ETag of ``key``; :class:`MissingKeyError` if the bucket does not have it."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            meta = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound", "403", "AccessDenied", "Forbidden"):
                raise MissingKeyError(self.bucket, [key]) from None
            raise FetchError(request_failed(self.url(key), "HEAD", err)) from None
        except _transient_errors() as err:   # no network, DNS, a refused or dropped connection (after retries)
            raise FetchError(unreachable(self.url(key), err)) from None
        except BotoCoreError as err:         # botocore refused the request (an invalid bucket name, ...)
            raise FetchError(request_failed(self.url(key), "HEAD", err)) from None
        finally:
            self.counter.add(heads=1)
        return RemoteObject(key, int(meta["ContentLength"]), str(meta.get("ETag", "")).strip('"'))

    def open_range(self, key: str, start: int, end: int | None = None, etag: str | None = None,
                   size: int | None = None):
        """A streaming body of bytes ``start`` .. ``end - 1`` (to the end if None) of ``key``, only if its
        ETag is still ``etag`` (S3's If-Match) and its size still ``size`` (the total in the answer's
        Content-Range): an object that changed since HEAD raises :class:`SourceChangedError`, also from a
        server that ignores If-Match (it answers InvalidRange, or with the new object's bytes and size)."""
        from botocore.exceptions import BotoCoreError, ClientError

        rng = f"bytes={int(start)}-" + ("" if end is None else str(int(end) - 1))
        kwargs = {"Bucket": self.bucket, "Key": key, "Range": rng}
        if etag:
            kwargs["IfMatch"] = f'"{etag}"'
        expected = RemoteObject(key, -1 if size is None else int(size), etag or "")
        self.counter.add(requests=1)
        try:
            resp = self.client.get_object(**kwargs)
        except ClientError as err:
            error = err.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in ("412", "PreconditionFailed"):
                raise SourceChangedError(self.url(key), expected, "the GET found another ETag (If-Match failed)") \
                    from None
            if code in ("416", "InvalidRange"):
                now = error.get("ActualObjectSize")
                raise SourceChangedError(self.url(key), expected, f"a GET of {rng} was refused as out of range"
                                         + (f" (the object now has {now} bytes)" if now else "")) from None
            if code in ("404", "NoSuchKey", "403", "AccessDenied"):
                raise MissingKeyError(self.bucket, [key]) from None
            raise FetchError(request_failed(self.url(key), f"GET {rng}", err)) from None
        except _transient_errors():
            raise
        except BotoCoreError as err:
            raise FetchError(request_failed(self.url(key), f"GET {rng}", err)) from None
        total = _content_range_total(resp.get("ContentRange"))
        problem = None
        if total is None and start > 0:
            problem = f"the server ignored the Range header of a GET of {rng} (no Content-Range)"
        elif size is not None and total is not None and total != size:
            problem = f"a GET of {rng} says it has {total} bytes"
        if problem is not None:
            resp["Body"].close()
            if total is None:
                raise FetchError(f"{self.url(key)}: {problem}; mdlib needs ranged reads: check --endpoint-url")
            raise SourceChangedError(self.url(key), expected, problem)
        return resp["Body"]

    def read_range(self, key: str, start: int, end: int, etag: str | None = None, size: int | None = None) -> bytes:
        """Bytes ``start`` .. ``end - 1`` of ``key``, exactly (a short answer raises ConnectionError); ``etag``
        and ``size``: what HEAD said (see :meth:`open_range`)."""
        if end <= start:
            return b""
        body = self.open_range(key, start, end, etag, size)
        try:
            data = b"".join(self.blocks(body))
        finally:
            body.close()
        if len(data) != end - start:
            raise ConnectionError(f"{self.url(key)}: asked for {end - start} bytes at {start}, got {len(data)}")
        return data


def _content_range_total(value: str | None) -> int | None:
    """The total size in a Content-Range header (``bytes 100-299/300`` -> 300); None if absent or ``*``."""
    m = re.fullmatch(r"\s*bytes\s+(?:\d+-\d+|\*)/(\d+)\s*", value or "")
    return int(m.group(1)) if m else None


class HttpSource:
    """One file over HTTP(S), read with ``Range`` requests (the server must answer 206 Partial Content)."""

    def __init__(self, url: str, timeout: float = 60.0, limit: RateLimit | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self.counter = _Counter()
        self.limit = limit
        self._size: int | None = None

    def size(self) -> int:
        if self._size is None:
            req = urllib.request.Request(self.url, method="HEAD")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    length = resp.headers.get("Content-Length")
            except urllib.error.HTTPError as err:
                raise FetchError(f"{self.url}: HTTP {err.code} {err.reason}") from None
            except (urllib.error.URLError, OSError) as err:
                raise FetchError(f"{self.url}: cannot reach it ({err}); check the network, or download the file "
                                 "yourself and give its local path instead of the URL") from err
            finally:
                self.counter.add(heads=1)
            if length is None:
                raise FetchError(f"{self.url}: the server does not say the file's size (no Content-Length)")
            self._size = int(length)
        return self._size

    def read_range(self, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        req = urllib.request.Request(self.url, headers={"Range": f"bytes={start}-{end - 1}"})
        self.counter.add(requests=1)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                if resp.status != 206:
                    raise FetchError(f"{self.url}: the server ignores Range requests (HTTP {resp.status}); download "
                                     "the file yourself and give its local path instead of the URL")
                data = b"".join(_blocks(resp, self.counter, self.limit))
        except urllib.error.HTTPError as err:
            raise FetchError(f"{self.url}: HTTP {err.code} {err.reason} for bytes {start}-{end - 1}") from None
        if len(data) != end - start:
            raise ConnectionError(f"{self.url}: asked for {end - start} bytes at {start}, got {len(data)}")
        return data


def retrying(call: Callable[[], Any], retries: int, what: str) -> Any:
    """``call()``, retried up to ``retries`` times after transient errors (0.5 s, 1 s, 2 s, ... apart)."""
    transient = _transient_errors()
    for attempt in range(retries + 1):
        try:
            return call()
        except transient as err:
            if attempt == retries:
                raise FetchError(f"{what}: failed after {retries + 1} attempt(s): {type(err).__name__}: {err}; "
                                 "run the fetch again to resume") from err
            time.sleep(min(0.5 * 2 ** attempt, 30.0))
    raise AssertionError("unreachable")


class RangedReader(io.RawIOBase):
    """A read-only, seekable binary file over ``read_range(start, end) -> bytes`` of a ``size``-byte file.

    Reads of at least ``block`` bytes are one request each; smaller ones (file metadata: HDF5 headers, a zip's
    directory) are served from ``block``-aligned blocks kept in a small LRU cache, so that the many tiny reads
    of a file's metadata cost few requests. Transient errors are retried (``retries``).
    """

    def __init__(self, read_range: Callable[[int, int], bytes], size: int, name: str = "",
                 block: int = 1 << 16, cache_blocks: int = 64, retries: int = 3) -> None:
        super().__init__()
        self._read_range, self._size, self.name = read_range, int(size), name
        self._block, self._cache_blocks, self._retries = int(block), int(cache_blocks), int(retries)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position in {self.name}")
        self._pos = base + int(offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        if n == 0:
            return 0
        data = self._read(self._pos, n)
        view[:n] = data
        self._pos += n
        return n

    def _fetch(self, start: int, end: int) -> bytes:
        return retrying(lambda: self._read_range(start, end), self._retries, f"{self.name} bytes {start}-{end - 1}")

    def _read(self, start: int, n: int) -> bytes:
        if n >= self._block:
            return self._fetch(start, start + n)
        first, last = start // self._block, (start + n - 1) // self._block
        parts = []
        for b in range(first, last + 1):
            if b not in self._cache:
                lo = b * self._block
                self._cache[b] = self._fetch(lo, min(lo + self._block, self._size))
                while len(self._cache) > self._cache_blocks:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(b)
            parts.append(self._cache[b])
        joined = b"".join(parts)
        offset = start - first * self._block
        return joined[offset:offset + n]


# -- local state -----------------------------------------------------------------------------------------

def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [int(st.st_size), int(st.st_mtime_ns), int(st.st_ctime_ns), int(st.st_ino)]


def file_md5(path: Path, upto: int | None = None) -> Any:
    """The MD5 object of ``path``'s first ``upto`` bytes (all if None), read in 8 MB blocks."""
    md5 = hashlib.md5()
    left = path.stat().st_size if upto is None else int(upto)
    with open(path, "rb") as f:
        while left > 0:
            block = f.read(min(8 << 20, left))
            if not block:
                break
            md5.update(block)
            left -= len(block)
    return md5


def row_digests(data: Any, row_bytes: int) -> Any:
    """SHA-256 of each ``row_bytes``-byte row of ``data`` (bytes-like, a whole number of rows): a (k, 32)
    uint8 array, row i's digest in row i."""
    import numpy as np

    view = memoryview(data).cast("B")
    if len(view) % int(row_bytes):
        raise ValueError(f"{len(view)} bytes are not a whole number of {row_bytes}-byte rows")
    k = len(view) // int(row_bytes)
    out = np.empty((k, 32), dtype=np.uint8)
    for i in range(k):
        out[i] = np.frombuffer(hashlib.sha256(view[i * row_bytes:(i + 1) * row_bytes]).digest(), dtype=np.uint8)
    return out


def scan_rows(path: Path, data_offset: int, n_rows: int, row_bytes: int, block: int = 8 << 20) -> tuple[str, Any]:
    """One pass over ``path``: the MD5 of the whole file (hex) and the SHA-256 of each of the ``n_rows`` rows
    of ``row_bytes`` bytes that start at byte ``data_offset`` ((n_rows, 32) uint8). The MD5 runs in a second
    thread (hashlib releases the GIL for large buffers), so that with a spare core the two hashes overlap."""
    import numpy as np

    md5 = hashlib.md5()
    digests = np.zeros((int(n_rows), 32), dtype=np.uint8)
    end = int(data_offset) + int(n_rows) * int(row_bytes)
    row, row_hash, pos = 0, hashlib.sha256(), 0
    with open(path, "rb") as f, ThreadPoolExecutor(max_workers=1) as pool:
        while chunk := f.read(block):
            pending = pool.submit(md5.update, chunk)
            view = memoryview(chunk)
            lo, hi = max(pos, int(data_offset)), min(pos + len(chunk), end)
            while lo < hi:
                row_end = int(data_offset) + (row + 1) * int(row_bytes)
                take = min(hi, row_end) - lo
                row_hash.update(view[lo - pos:lo - pos + take])
                lo += take
                if lo == row_end:
                    digests[row] = np.frombuffer(row_hash.digest(), dtype=np.uint8)
                    row, row_hash = row + 1, hashlib.sha256()
            pending.result()
            pos += len(chunk)
    if row != n_rows:
        raise ValueError(f"{path}: ends after {row} of its {n_rows} rows (truncated)")
    return md5.hexdigest(), digests


class FetchState:
    """``<data root>/mdlib_fetch_state.json``: per local file (relative path) what was fetched and verified.

    ``files[rel]``: ``size``, ``md5`` (of the local file), ``etag`` (of the source), ``source`` (its URL),
    ``stat`` ([size, mtime_ns, ctime_ns, inode] when recorded) and kind-specific fields. ``parts[rel]``: the
    source ETag a ``.part`` file was started from (a part from another version of the source is discarded).
    Thread-safe; every change is written at once (atomically), so a killed run keeps what it completed.
    """

    VERSION = 1

    def __init__(self, root: Path, write: bool = True) -> None:
        self.path = Path(root) / STATE_FILE
        self.write = write
        self._lock = threading.Lock()
        self.data: dict[str, Any] = {"version": self.VERSION, "files": {}, "parts": {}}
        if self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
                if loaded.get("version") == self.VERSION:
                    self.data.update({k: dict(loaded.get(k) or {}) for k in ("files", "parts")})
            except (OSError, ValueError):
                pass  # an unreadable state only costs re-hashing

    def get(self, rel: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self.data["files"].get(str(rel))
            return dict(entry) if entry else None

    def unchanged(self, rel: str, path: Path) -> bool:
        """True if ``path`` has exactly the stat recorded when it was verified."""
        entry = self.get(rel)
        return bool(entry) and path.is_file() and entry.get("stat") == _stat_key(path)

    def record(self, rel: str, path: Path, **info: Any) -> None:
        with self._lock:
            self.data["files"][str(rel)] = {"size": path.stat().st_size, **info, "stat": _stat_key(path)}
            self.data["parts"].pop(str(rel), None)
            self._save()

    def forget(self, rel: str) -> None:
        with self._lock:
            self.data["files"].pop(str(rel), None)
            self._save()

    def invalidate(self, rel: str) -> None:
        """Forget the stat recorded for ``rel``, so that the next run checks the file again instead of
        trusting it (its damage was found but not yet mended)."""
        with self._lock:
            entry = self.data["files"].get(str(rel))
            if entry is not None:
                entry["stat"] = None
                self._save()

    def drop_part(self, rel: str) -> None:
        with self._lock:
            if self.data["parts"].pop(str(rel), None) is not None:
                self._save()

    def part_etag(self, rel: str) -> str | None:
        with self._lock:
            return self.data["parts"].get(str(rel))

    def start_part(self, rel: str, etag: str) -> None:
        with self._lock:
            self.data["parts"][str(rel)] = etag
            self._save()

    def _save(self) -> None:
        if not self.write:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path)


# -- one file --------------------------------------------------------------------------------------------

def check_local(path: Path, rel: str, remote: RemoteObject, state: FetchState, verify: bool = False,
                hash_files: bool = True, source: str = "") -> str:
    """What the local copy of ``remote`` at ``path`` is: ``"ok"``, ``"absent"``, ``"wrong size"``,
    ``"corrupt"`` (checksum mismatch), or (``hash_files=False``, for dry runs) ``"unverified"``.

    Trusted without hashing when the state recorded this very file (same stat) from the same ETag, unless
    ``verify``. Otherwise hashed and compared with the ETag's MD5, or with the MD5 recorded at download when
    the ETag is not an MD5; with neither, the size alone decides.
    """
    if not path.is_file():
        return "absent"
    if path.stat().st_size != remote.size:
        return "wrong size"
    entry = state.get(rel)
    same_source = bool(entry) and entry.get("etag") == remote.etag
    if same_source and not verify and state.unchanged(rel, path):
        return "ok"
    if not hash_files:
        return "unverified"
    md5 = file_md5(path).hexdigest()
    expected = remote.md5 or (entry.get("md5") if same_source else None)
    if expected is not None and md5 != expected:
        return "corrupt"
    state.record(rel, path, etag=remote.etag, md5=md5, source=source)
    return "ok"


def download_file(store: S3Store, remote: RemoteObject, path: Path, rel: str, state: FetchState, *,
                  expected_size: int | None = None, on_bytes: Callable[[int], None] | None = None,
                  retries: int = 3, fresh: bool = False) -> int:
    """Download ``remote`` to ``path`` through ``<path>.part``; returns the bytes received.

    A part left by an earlier run from the same ETag is continued with a ranged GET from its length (``fresh``
    discards it). Transient errors resume from where the part stopped, up to ``retries`` times; after that a
    :class:`FetchError` leaves the part for the next run. The complete part must have the bucket's size
    (and ``expected_size``, the manifest's, when known) and, when the ETag is an MD5, that MD5; a mismatch
    discards it and downloads once more from the start, then raises.
    """
    part = path.with_name(path.name + PART_SUFFIX)
    path.parent.mkdir(parents=True, exist_ok=True)
    if part.exists() and (fresh or state.part_etag(rel) != remote.etag):
        part.unlink()
    if expected_size is not None and int(expected_size) != remote.size:
        raise FetchError(f"{store.url(remote.key)} has {remote.size} bytes but the manifest (data_manifest/"
                         f"nsd.yaml) expects {expected_size}: a different version of the file? If the bucket's "
                         "is the right one, correct (or remove) the size of this key in the manifest and run the "
                         "same command again; nothing was downloaded for it")
    transient = _transient_errors()
    received, failures, restarts = 0, 0, 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if have > remote.size:
            part.unlink()
            have = 0
        if have == 0:
            state.start_part(rel, remote.etag)
        md5 = file_md5(part) if have else hashlib.md5()
        try:
            with open(part, "ab") as out:
                if have < remote.size:
                    body = store.open_range(remote.key, have, etag=remote.etag, size=remote.size)
                    try:
                        for block in store.blocks(body):  # counted, and paced under a RateLimit
                            out.write(block)
                            md5.update(block)
                            received += len(block)
                            if on_bytes is not None:
                                on_bytes(len(block))
                    finally:
                        body.close()
        except SourceChangedError as err:
            # the part holds bytes of the version HEAD described, which the bucket no longer has: useless
            part.unlink(missing_ok=True)
            state.drop_part(rel)
            kept = f", {path} is untouched" if path.exists() else ""
            raise err.with_discarded(f"the partial download {part} was discarded{kept}") from None
        except transient as err:
            failures += 1
            if failures > retries:
                kept = part.stat().st_size if part.exists() else 0
                raise FetchError(f"{store.url(remote.key)}: transfer failed ({type(err).__name__}: {err}); "
                                 f"{kept} of {remote.size} bytes kept in {part}: run the fetch again to "
                                 "resume") from err
            time.sleep(min(0.5 * 2 ** (failures - 1), 30.0))
            continue
        size = part.stat().st_size
        if size < remote.size:  # the stream ended early: resume
            failures += 1
            if failures > retries:
                raise FetchError(f"{store.url(remote.key)}: the stream kept ending early ({size} of {remote.size} "
                                 f"bytes in {part}); run the fetch again to resume")
            continue
        problem = None
        if size != remote.size:
            problem = f"{size} bytes where the bucket says {remote.size}"
        elif remote.md5 is not None and md5.hexdigest() != remote.md5:
            problem = f"MD5 {md5.hexdigest()} where the bucket's ETag says {remote.md5}"
        if problem is None:
            os.replace(part, path)
            state.record(rel, path, etag=remote.etag, md5=md5.hexdigest(), source=store.url(remote.key))
            return received
        part.unlink()
        restarts += 1
        if restarts > 1:
            raise FetchError(f"{store.url(remote.key)}: downloaded twice and both copies were wrong ({problem}); "
                             "nothing was written to " + str(path))
