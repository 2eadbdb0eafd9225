"""Content hashes, written once: the keys that name mdlib's caches, and file checksums.

:func:`cache_key` feeds its parts, in order, to one hash and returns the first ``n`` hex digits. It names the
cached betas (:mod:`mdlib.nsd.betas`), targets (:mod:`mdlib.features`) and decoded features
(:mod:`mdlib.decoding`), stage-1 images (:mod:`mdlib.stage1`), stage-2 states (:mod:`mdlib.stage2`), run
folders (:mod:`mdlib.reconstruct`, :mod:`mdlib.pipeline`), the images a fetched subject file holds
(:mod:`mdlib.fetch.subset`) and models' fingerprints (:mod:`mdlib.models`). Where the caches live:
docs/data.md, "Where the data lives"; how ``mdlib reconstruct`` shares them: docs/reconstruct.md.

Each part becomes bytes as follows, and the bytes of all parts are hashed one after the other, with nothing
between them:

- ``bytes`` (or ``bytearray``, ``memoryview``): as they are;
- ``str``: its UTF-8 encoding (not JSON-quoted);
- a NumPy array or scalar: ``f"{dtype}{shape}"`` (e.g. ``"float32(2, 3)"``), then its values in C order;
- a torch tensor: the same as the NumPy array it equals (bfloat16: ``"bfloat16(...)"`` and its raw bytes);
- anything else (dict, list, number, bool, None): ``json.dumps(part, sort_keys=True)``, UTF-8.

Parts are not separated, so a caller whose strings could run into each other ambiguously should put a
separator (``"|"``) into them, as the callers do; and a str is not quoted, so ``"1"`` and ``1`` give the same
bytes: keep each part's type fixed at a call site (a dict of settings is the usual part).

The encoding reproduces the keys mdlib computed before this module existed, so caches already on disk keep
their names; changing it would rename them all, so a different scheme needs a bumped cache version at the
call site instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np

#: Hash algorithms the call sites use (sha1: short, non-security tags; sha256: everything else).
ALGORITHMS = ("sha256", "sha1")


def _tensor_bytes(t) -> Iterable[bytes]:
    import torch

    t = t.detach().to("cpu").contiguous()
    dtype = str(t.dtype).removeprefix("torch.")
    yield f"{dtype}{tuple(t.shape)}".encode()
    if t.dtype == torch.bfloat16:  # no NumPy dtype: its raw bytes
        yield t.reshape(-1).view(torch.int16).numpy().tobytes()
    else:
        yield t.numpy().tobytes()


def _part_bytes(part: Any) -> Iterable[bytes]:
    if isinstance(part, (bytes, bytearray, memoryview)):
        yield bytes(part)
    elif isinstance(part, str):
        yield part.encode()
    elif isinstance(part, (np.ndarray, np.generic)):
        a = np.asarray(part)
        yield f"{a.dtype}{a.shape}".encode()
        yield a.tobytes()  # C order, whatever the memory layout
    elif "torch" in sys.modules and isinstance(part, sys.modules["torch"].Tensor):
        yield from _tensor_bytes(part)
    else:
        yield json.dumps(part, sort_keys=True).encode()


def cache_key(*parts: Any, n: int | None = 16, algorithm: str = "sha256") -> str:
    """The first ``n`` hex digits (all of them if None) of the ``algorithm`` hash of ``parts``.

    Each part is turned into bytes as the module docstring says (str: UTF-8; bytes: as is; arrays and
    tensors: dtype, shape, values; other values: sorted JSON). Deterministic across processes and machines
    (no Python ``hash``); sensitive to each part's value, its dtype and shape, and to the parts' order.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    h = hashlib.new(algorithm)
    for part in parts:
        for chunk in _part_bytes(part):
            h.update(chunk)
    digest = h.hexdigest()
    return digest if n is None else digest[:n]


def float32_bytes(t) -> bytes:
    """A tensor's (or array's) values as float32 in C order, without dtype or shape: the part by which stage-1
    and stage-2 keys (:mod:`mdlib.stage1`, :func:`mdlib.stage2.run_key`) have always hashed their inputs."""
    if "torch" in sys.modules and isinstance(t, sys.modules["torch"].Tensor):
        t = t.detach().float().cpu().numpy()
    return np.ascontiguousarray(t, dtype=np.float32).tobytes()


def file_sha256(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """The SHA-256 checksum of a file's bytes (64 hex digits), read ``block`` bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for data in iter(lambda: f.read(block), b""):
            digest.update(data)
    return digest.hexdigest()
