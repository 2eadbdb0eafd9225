"""The COCO 2017 caption files, extracted from the COCO annotations zip (not in the NSD bucket).

The zip (``annotations_trainval2017.zip``, 241 MB, from the COCO website) holds the two caption files the
lessons read (``captions_train2017.json``, ``captions_val2017.json``) beside larger files they do not. It is
opened over HTTP with ranged requests (:class:`~mdlib.fetch.remote.RangedReader`): zipfile reads its central
directory, then only the two members' compressed bytes. Each member is inflated to ``<final>.part``, checked
against the size and CRC-32 in the zip's directory, and moved into place. The source may also be a local zip
(a path) or an ``s3://bucket/key``.

A second run finds the files recorded in the fetch state (same stat) and makes no request at all; a file
that changed is checked against the CRC-32 recorded from the zip, and extracted again if it differs. An
interrupted member is extracted again from its start (deflate streams cannot be resumed midway).
docs/fetch.md, "What it fetches".
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mdlib.fetch.remote import PART_SUFFIX, FetchError, FetchState, HttpSource, RangedReader, S3Store


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            crc = zlib.crc32(block, crc)
    return crc


def local_status(root: Path, members: list[dict[str, Any]], state: FetchState, source: str,
                 verify: bool = False) -> dict[str, str]:
    """``{local: "ok" | "absent" | "check"}`` without touching the source: ``ok`` when the state recorded the
    file from this source and its stat (or, if it changed or ``verify``, its CRC-32) still matches."""
    out = {}
    for m in members:
        rel, path = m["local"], root / m["local"]
        entry = state.get(rel)
        if not path.is_file():
            out[rel] = "absent"
        elif not entry or entry.get("source") != source or entry.get("member") != m["member"]:
            out[rel] = "check"
        elif not verify and state.unchanged(rel, path):
            out[rel] = "ok"
        elif path.stat().st_size == entry.get("size") and _crc32(path) == entry.get("crc32"):
            state.record(rel, path, **{k: v for k, v in entry.items() if k not in ("size", "stat")})
            out[rel] = "ok"
        else:
            out[rel] = "check"
    return out


def open_zip(source: str, store: S3Store | None = None, retries: int = 3) -> tuple[zipfile.ZipFile, Any, Any]:
    """The zip at ``source`` (http(s) URL, ``s3://bucket/key`` or local path), the file object under it (to
    close after the zip), and the object counting its requests (None for a local file). Remote reads are
    paced by ``store``'s rate limit, if any."""
    limit = store.limit if store is not None else None
    if source.startswith(("http://", "https://")):
        http = HttpSource(source, limit=limit)
        reader = RangedReader(http.read_range, http.size(), name=source, retries=retries)
        counter = http.counter
    elif source.startswith("s3://"):
        bucket, _, key = source[5:].partition("/")
        s3 = S3Store(bucket, client=store.client, limit=limit) if store is not None else S3Store(bucket)
        remote = s3.head(key)
        reader = RangedReader(lambda a, b: s3.read_range(key, a, b, remote.etag), remote.size, name=source,
                              retries=retries)
        counter = s3.counter
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FetchError(f"COCO annotations zip not found: {path}")
        reader, counter = open(path, "rb"), None
    try:
        return zipfile.ZipFile(reader), reader, counter
    except zipfile.BadZipFile as err:
        reader.close()
        raise FetchError(f"{source}: not a zip file ({err})") from err


def member_sizes(zf: zipfile.ZipFile, members: list[dict[str, Any]], source: str) -> dict[str, int]:
    """``{local: uncompressed size}`` from the zip's directory; FetchError naming a missing member."""
    names = set(zf.namelist())
    missing = [m["member"] for m in members if m["member"] not in names]
    if missing:
        raise FetchError(f"{source} has no member(s) {missing}: is it COCO 2017's annotations_trainval2017.zip?")
    return {m["local"]: zf.getinfo(m["member"]).file_size for m in members}


def extract_members(zf: zipfile.ZipFile, members: list[dict[str, Any]], root: Path, state: FetchState,
                    source: str, on_bytes: Callable[[int], None] | None = None) -> list[str]:
    """Extract each member whose local copy is not the zip's (size and CRC-32); returns those extracted."""
    done = []
    for m in members:
        rel, path = m["local"], root / m["local"]
        info = zf.getinfo(m["member"])
        record = {"source": source, "member": m["member"], "crc32": info.CRC}
        if path.is_file() and path.stat().st_size == info.file_size and _crc32(path) == info.CRC:
            state.record(rel, path, **record)
            continue
        part = path.with_name(path.name + PART_SUFFIX)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with zf.open(info) as src, open(part, "wb") as out:
                while block := src.read(1 << 20):  # zipfile checks the CRC-32 at the member's end
                    out.write(block)
                    if on_bytes is not None:
                        on_bytes(len(block))
        except zipfile.BadZipFile as err:
            part.unlink(missing_ok=True)
            raise FetchError(f"{source}: member {m['member']} is damaged ({err}); run the fetch again") from err
        if part.stat().st_size != info.file_size:
            part.unlink()
            raise FetchError(f"{source}: member {m['member']} gave {part.stat().st_size} bytes, the zip says "
                             f"{info.file_size}; run the fetch again")
        os.replace(part, path)
        state.record(rel, path, **record)
        done.append(rel)
    return done
