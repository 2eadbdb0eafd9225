"""mdlib.cachekey: deterministic, sensitive to what matters, the same bytes as the keys mdlib wrote before it
existed (so caches on disk keep their names), and the only place in mdlib that hashes for a cache key."""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mdlib.cachekey import cache_key, file_sha256, float32_bytes

MDLIB = Path(__file__).resolve().parent.parent / "mdlib"


def test_deterministic_across_processes():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    parts = ({"b": [1, 2.5, None], "a": "x"}, "text", b"raw", a)
    here = cache_key(*parts)
    code = ("import numpy as np; from mdlib.cachekey import cache_key; "
            "print(cache_key({'a': 'x', 'b': [1, 2.5, None]}, 'text', b'raw', "
            "np.arange(12, dtype=np.float32).reshape(3, 4)))")
    for seed in ("0", "1"):  # str hashing is randomised per process: the key must not depend on it
        env = {"PYTHONHASHSEED": seed, "PATH": ""}
        got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                             cwd=MDLIB.parent).stdout.strip()
        assert got == here
    assert cache_key(*parts) == here and len(here) == 16 and re.fullmatch("[0-9a-f]{16}", here)


def test_a_known_value():
    """The encoding is fixed: a change here renames every cache on users' disks (bump the sites' versions)."""
    assert cache_key({"version": 1}, np.arange(3, dtype=np.int64), "|", b"\x00") == \
        hashlib.sha256(b'{"version": 1}' + b"int64(3,)" + np.arange(3, dtype=np.int64).tobytes() + b"|\x00"
                       ).hexdigest()[:16]


def test_sensitive_to_dtype_shape_order_and_values():
    a = np.arange(6, dtype=np.int32)
    base = cache_key(a)
    assert cache_key(a.view(np.uint32)) != base                    # same bytes, other dtype
    assert cache_key(a.view(np.float32)) != base
    assert cache_key(a.reshape(2, 3)) != base                      # same bytes, other shape
    assert cache_key(a.reshape(2, 3)) != cache_key(a.reshape(3, 2))
    assert cache_key(a.astype(np.int64)) != base                   # same values, other dtype
    b = a.copy()
    b[4] += 1
    assert cache_key(b) != base                                    # one value
    assert cache_key(a, "x") != cache_key("x", a)                  # order of the parts
    assert cache_key({"a": 1, "b": 2}) == cache_key({"b": 2, "a": 1})  # dict order does not matter (sorted JSON)
    assert cache_key({"a": 1}) != cache_key({"a": 1.5}) != cache_key({"a": "1"})
    assert cache_key("x") != cache_key(["x"])                      # a str is its text, a list its JSON
    f = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    assert cache_key(f) == cache_key(np.ascontiguousarray(f))      # values in C order, whatever the layout


def test_tensors_hash_as_the_arrays_they_equal():
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert cache_key(x) == cache_key(x.numpy())
    assert cache_key(x.t()) == cache_key(x.numpy().T)
    assert cache_key(x.requires_grad_(True)) == cache_key(x.detach().numpy())
    assert cache_key(x.double()) != cache_key(x)
    half, bf16 = cache_key(x.half()), cache_key(x.bfloat16())
    assert half != bf16 and len({half, bf16, cache_key(x.bfloat16().float())}) == 3
    assert cache_key(np.float32(1.5)) == cache_key(np.array(1.5, dtype=np.float32)) != cache_key(1.5)


def test_length_and_algorithm():
    assert len(cache_key("x", n=24)) == 24
    assert cache_key("x", n=None) == hashlib.sha256(b"x").hexdigest()
    assert cache_key("x", n=8, algorithm="sha1") == hashlib.sha1(b"x").hexdigest()[:8]
    with pytest.raises(ValueError, match="algorithm"):
        cache_key("x", algorithm="md5")


def test_reproduces_the_keys_written_before():
    """The schemes the call sites used before this helper, written out with hashlib, give the same keys."""
    spec = {"version": 2, "family": "z", "alphas": [0.1, 1.0], "x": "abc"}
    assert cache_key(spec) == hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    arrays = [np.ones((3, 2), np.float32), np.arange(4)]
    h = hashlib.sha256()
    for a in arrays:  # decoding's _digest
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.data)
    assert cache_key(*arrays) == h.hexdigest()[:16]
    t = torch.linspace(0, 1, 7).reshape(7, 1).double()
    want = hashlib.sha256(b"42" + np.ascontiguousarray(t.float().numpy()).tobytes()).hexdigest()[:24]
    assert cache_key("42", float32_bytes(t), n=24) == want  # stage 1's and stage 2's inputs


def test_file_sha256(tmp_path):
    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 5000
    path.write_bytes(data)
    assert file_sha256(path) == file_sha256(path, block=1000) == hashlib.sha256(data).hexdigest()


def test_hashlib_only_in_the_helper_and_file_checksums():
    """Every cache key goes through cache_key: hashlib is imported only by mdlib.cachekey and for file checksums,
    not cache keys: by mdlib.fetch (against the bucket's MD5s) and by mdlib.models (the Hugging Face cache's blob
    names of the random stand-in files that write_random_hub_cache streams to disk)."""
    allowed = {"cachekey.py", "fetch/remote.py", "models.py"}
    importers = {p.relative_to(MDLIB).as_posix() for p in MDLIB.rglob("*.py")
                 if re.search(r"^\s*(import hashlib|from hashlib import)", p.read_text(), re.M)}
    assert importers <= allowed, importers - allowed
    sites = ["decoding.py", "reconstruct.py", "pipeline.py", "stage1.py", "stage2.py", "features.py", "models.py",
             "nsd/betas.py", "fetch/subset.py"]
    for site in sites:
        assert "from mdlib.cachekey import" in (MDLIB / site).read_text(), site
