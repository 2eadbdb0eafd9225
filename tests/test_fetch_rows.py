"""Row checksums of the per-subject image file, ``--verify``'s comparison with the bucket, and the one-line
errors of ``mdlib fetch`` for an object that changes during a fetch and for botocore's other errors.

Against the same local S3 server (moto's, on 127.0.0.1) and mini-NSD as tests/test_fetch.py, whose fixtures
and helpers this module reuses. Damage is made by hand: bytes flipped in the file on disk, bytes flipped in
the bucket's answers while the file is built (a client that alters them), an object replaced between HEAD
and GET. Each test also checks what remains on disk.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import boto3
import h5py
import numpy as np
import pytest
from test_fetch import BUCKET, SUBJECT, RecordingClient, _flip_byte, _subject_ids, mini_root, run_fetch
from test_fetch import server as fetch_server

from mdlib import fetch
from mdlib.fetch import subset as fetch_subset
from mdlib.nsd import layout
from mdlib.nsd.stimuli import StimulusReader

__all__ = ["fetch_server", "mini_root"]  # fixtures, imported for this module's tests

ROOT = Path(__file__).resolve().parent.parent
BRICK = str(layout.stimuli())
SUBSET = str(layout.subject_stimuli(SUBJECT))
#: The smallest fetch that builds the subject's image file: the design, session 1's files, the images.
SMALL = dict(what="minimal", last_session=1, coco=False)


@pytest.fixture(scope="module")
def clean_moto():
    """moto keeps its buckets in the process, not in a server: without a reset, tests/test_fetch.py's server
    would find the bucket this module's made (or the reverse) and fail to create it. Reset before and after."""
    from moto.core.base_backend import BackendDict

    BackendDict.reset()
    yield
    BackendDict.reset()


@pytest.fixture(scope="module")
def server(clean_moto, fetch_server):
    """tests/test_fetch.py's server (moto's, on 127.0.0.1, holding the mini-NSD), on a clean moto."""
    return fetch_server


def _admin(server):
    return boto3.client("s3", endpoint_url=server, region_name="us-east-2", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def _source_rows(mini_root) -> np.ndarray:
    """The subject's rows of the bucket's brick, (n, row bytes) uint8, read with h5py from the source."""
    ids = _subject_ids(mini_root)
    with h5py.File(mini_root / BRICK, "r") as f:
        rows = f["imgBrick"][ids.tolist()]
    return rows.reshape(len(ids), -1)


def _sha256_rows(rows: np.ndarray) -> np.ndarray:
    return np.array([np.frombuffer(hashlib.sha256(r.tobytes()).digest(), np.uint8) for r in rows])


def _row_offset(path: Path, row: int) -> int:
    with h5py.File(path, "r") as f:
        ds = f["imgBrick"]
        return int(ds.id.get_offset()) + row * int(np.prod(ds.shape[1:]))


def _metadata_ranges(server) -> set[str]:
    """The Range headers of the GETs that read the brick's HDF5 metadata (its layout), made the same way."""
    client = RecordingClient(server)
    store = fetch.S3Store(BUCKET, client=client)
    fetch_subset.inspect_brick(store, store.head(BRICK))
    return {g["range"] for g in client.gets}


def _rows_read(client, server, mini_root) -> list[int]:
    """The nsdIds of the brick's rows that ``client``'s GETs read, sorted, with repeats (its metadata reads
    left out); every such GET must be whole rows."""
    with h5py.File(mini_root / BRICK, "r") as f:
        off, rb = int(f["imgBrick"].id.get_offset()), int(np.prod(f["imgBrick"].shape[1:]))
    meta = _metadata_ranges(server)
    ids = []
    for g in client.gets:
        if g["key"] != BRICK or g["range"] in meta:
            continue
        a, b = map(int, re.fullmatch(r"bytes=(\d+)-(\d+)", g["range"]).groups())
        assert (a - off) % rb == 0 and (b + 1 - a) % rb == 0, g
        ids += range((a - off) // rb, (b + 1 - off) // rb)
    return sorted(ids)


def _state(root) -> dict:
    return json.loads((root / fetch.STATE_FILE).read_text())


@pytest.fixture(scope="module")
def built(server, tmp_path_factory):
    """A fetch of the design, session 1's files and the subject's images into a fresh root (read only)."""
    root = tmp_path_factory.mktemp("rows") / "nsd"
    run_fetch(server, root, **SMALL)
    return root


@pytest.fixture
def copy(built, tmp_path):
    """A copy of ``built`` to damage (its files' stats differ from the recorded ones: the next fetch there
    hashes each file again, transferring nothing for a sound one)."""
    root = tmp_path / "nsd"
    shutil.copytree(built, root)
    return root


# -- the checksums ----------------------------------------------------------------------------------------------

def test_each_row_has_its_sha256_and_the_readers_ignore_it(built, mini_root):
    rows = _source_rows(mini_root)
    ids = _subject_ids(mini_root)
    with h5py.File(built / SUBSET, "r") as f:
        assert set(f) == {"imgBrick", "nsd_ids", "row_sha256"}
        assert f["row_sha256"].dtype == np.uint8 and f["row_sha256"].attrs["algorithm"] == "sha256"
        np.testing.assert_array_equal(f["row_sha256"][()], _sha256_rows(rows))
        np.testing.assert_array_equal(f["imgBrick"][()].reshape(len(ids), -1), rows)
    with StimulusReader(built) as reader, StimulusReader(mini_root) as source:
        np.testing.assert_array_equal(reader.read(ids[::-1]), source.read(ids[::-1]))
    assert _state(built)["files"][SUBSET]["row_checksums"] == "sha256"


@pytest.mark.parametrize("block", [1000, 3072, 8 << 20])
def test_scan_rows_gives_the_files_md5_and_each_rows_sha256(tmp_path, rng, block):
    data = rng.integers(0, 256, size=50_000, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    offset, n, rb = 777, 11, 3072                       # rows neither aligned with the blocks nor the file's end
    md5, digests = fetch.remote.scan_rows(path, offset, n, rb, block=block)
    assert md5 == hashlib.md5(data).hexdigest()
    rows = np.frombuffer(data[offset:offset + n * rb], np.uint8).reshape(n, rb)
    np.testing.assert_array_equal(digests, _sha256_rows(rows))
    with pytest.raises(ValueError, match="truncated"):
        fetch.remote.scan_rows(path, offset, 100, rb, block=block)


# -- damage on disk -----------------------------------------------------------------------------------------------

def test_rows_damaged_on_disk_are_named_and_only_they_are_fetched_again(built, copy, server, mini_root, tmp_path,
                                                                        capsys):
    from mdlib.cli import main

    root = copy
    ids = _subject_ids(mini_root)
    path = root / SUBSET
    damaged = [3, len(ids) - 2]
    for row in damaged:
        _flip_byte(path, _row_offset(path, row) + 100, keep_mtime=True)
    before = path.read_bytes()

    # a dry run that verifies: the file, the nsdIds, the command that mends it; nothing written
    args = ["fetch", "--subject", str(SUBJECT), "--what", "minimal", "--last-session", "1", "--no-coco",
            "--data-root", str(root), "--endpoint-url", server, "--dry-run", "--verify", "-q"]
    state = (root / fetch.STATE_FILE).read_text()
    assert main(args) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "fail their checksums" in x)
    assert SUBSET in line and f"nsdIds {ids[damaged[0]]}, {ids[damaged[1]]}." in line
    fix = re.search(r"Fix: `([^`]*)`", line).group(1)
    assert fix == (f"mdlib fetch --subject {SUBJECT} --data-root {root} --endpoint-url {server} --verify")
    assert "repair (2 rows)" in out
    assert path.read_bytes() == before and (root / fetch.STATE_FILE).read_text() == state

    # a plain run sees the file changed (its stat) and re-fetches those two rows alone
    report, client, lines = run_fetch(server, root, **SMALL)
    assert report.replaced == report.repaired == [SUBSET] and report.downloaded == [SUBSET]
    assert any(SUBSET in x and "Re-fetching these rows only" in x for x in lines)
    assert _rows_read(client, server, mini_root) == sorted(ids[damaged])
    assert {g["key"] for g in client.gets} == {BRICK}  # nothing else was fetched
    assert path.read_bytes() == (built / SUBSET).read_bytes()       # the file as built, byte for byte
    assert _state(root)["files"][SUBSET]["md5"] == _state(built)["files"][SUBSET]["md5"]
    assert not list(root.rglob("*.part*"))
    report, client, _ = run_fetch(server, root, **SMALL)
    assert client.gets == [] and report.skipped and not report.replaced


def test_a_damaged_checksum_is_rewritten_without_touching_the_row(built, copy, server, mini_root):
    root = copy
    path = root / SUBSET
    lay = fetch_subset.read_layout(path)
    _flip_byte(path, lay.digest_offset + 5 * 32 + 7)                # row 5's checksum, not its pixels
    report, client, _ = run_fetch(server, root, **SMALL)
    assert report.repaired == [SUBSET]
    assert _rows_read(client, server, mini_root) == [_subject_ids(mini_root)[5]]
    assert path.read_bytes() == (built / SUBSET).read_bytes()


def test_a_file_damaged_outside_its_rows_is_rewritten_locally(built, copy, server):
    root = copy
    path = root / SUBSET
    at = path.read_bytes().index(b"row i: the bytes")             # an attribute's text: HDF5 metadata
    _flip_byte(path, at + 2)
    report, client, lines = run_fetch(server, root, **SMALL)
    assert report.replaced == [SUBSET] and client.gets == []       # nothing transferred
    assert any("Rewriting it from its own rows" in x for x in lines)
    assert path.read_bytes() == (built / SUBSET).read_bytes()


# -- alteration in transit ----------------------------------------------------------------------------------------

class AlteringClient(RecordingClient):
    """Flips the bytes at ``offsets`` (of the brick) in every answer that carries them: a transfer that
    alters data on its way."""

    def __init__(self, endpoint, offsets):
        super().__init__(endpoint)
        self.offsets = sorted(offsets)

    def get_object(self, **kw):
        resp = super().get_object(**kw)
        if kw["Key"] == BRICK:
            start = int(re.match(r"bytes=(\d+)-", kw["Range"]).group(1))
            body, pos = resp["Body"], [start]
            read = body.read

            def altered(n=None):
                data = bytearray(read(n))
                for at in self.offsets:
                    if pos[0] <= at < pos[0] + len(data):
                        data[at - pos[0]] ^= 0xFF
                pos[0] += len(data)
                return bytes(data)
            body.read = altered
        return resp


def _sampled_rows(n: int, sample: int, seed: int) -> np.ndarray:
    """The rows --verify compares, written independently: the seeded draw, the first and the last."""
    drawn = np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False)
    return np.unique(np.concatenate([drawn, [0, n - 1]]))


def test_rows_altered_in_transit_are_caught_by_the_sample(server, mini_root, tmp_path):
    ids = _subject_ids(mini_root)
    n, sample, seed = len(ids), 5, 7
    compared = _sampled_rows(n, sample, seed)
    inside = int(compared[1])                                       # a sampled row, neither first nor last
    outside = int(np.setdiff1d(np.arange(n), compared)[0])          # a row the sample does not compare
    with h5py.File(mini_root / BRICK, "r") as f:
        off, rb = int(f["imgBrick"].id.get_offset()), int(np.prod(f["imgBrick"].shape[1:]))
    root = tmp_path / "nsd"
    altered = AlteringClient(server, [off + int(ids[r]) * rb + 11 for r in (inside, outside)])
    run_fetch(server, root, client=altered, **SMALL)
    path = root / SUBSET
    with h5py.File(path, "r") as f:                                 # the checksums cannot see it: they were
        rows = f["imgBrick"][()].reshape(n, -1)                     # computed from the altered bytes
        np.testing.assert_array_equal(f["row_sha256"][()], _sha256_rows(rows))
    source = _source_rows(mini_root)
    assert [r for r in range(n) if not np.array_equal(rows[r], source[r])] == sorted([inside, outside])

    # a plain run trusts the file; a dry run that verifies names the row it compared, and the fix
    report, client, _ = run_fetch(server, root, **SMALL)
    assert client.gets == [] and SUBSET in report.skipped
    before = path.read_bytes()
    report, client, lines = run_fetch(server, root, dry_run=True, verify=True, verify_sample=sample,
                                      verify_seed=seed, **SMALL)
    line = next(x for x in lines if "differ from its rows" in x)
    assert f"1 of the {compared.size} rows compared with the bucket (seed {seed})" in line
    assert re.search(r"nsdIds ([\d, ]+)\.", line).group(1) == str(ids[inside])   # not the row it did not draw
    assert f"`mdlib fetch --subject {SUBJECT} --data-root {root} --endpoint-url {server} --verify --verify-sample " \
           f"{sample} --verify-seed {seed}` fetches the file again." in line
    assert next(e for e in report.entries if e["path"] == SUBSET)["status"] == "replace (rows differ from the bucket's)"
    # each compared row was read from the bucket (the altered one twice: a second read must agree)
    assert _rows_read(client, server, mini_root) == sorted([*ids[compared], ids[inside]])
    assert path.read_bytes() == before and not list(root.rglob("*.part*"))

    # verifying (not a dry run) fetches the file again, over a sound connection
    report, client, lines = run_fetch(server, root, verify=True, verify_sample=sample, verify_seed=seed, **SMALL)
    assert report.replaced == [SUBSET]
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["imgBrick"][()].reshape(n, -1), source)
    report, client, lines = run_fetch(server, root, verify=True, verify_sample=n, **SMALL)
    assert SUBSET in report.skipped
    assert any(f"the {n} rows compared with the bucket" in x and "equal the bucket's" in x for x in lines)


def test_a_transfer_that_alters_bytes_now_changes_nothing(built, copy, server, mini_root):
    """Two reads of the same row disagree: nothing can be concluded, and nothing on disk is changed."""
    root = copy
    run_fetch(server, root, **SMALL)                                # re-records the copy's stats

    rb = _source_rows(mini_root).shape[1]

    class Flaky(RecordingClient):
        """Alters the first GET of whole rows only (not the metadata's 64 kB reads): a second read differs."""
        flipped = False

        def get_object(self, **kw):
            resp = super().get_object(**kw)
            m = re.fullmatch(r"bytes=(\d+)-(\d+)", kw.get("Range", ""))
            whole_rows = m is not None and (int(m[2]) + 1 - int(m[1])) % rb == 0
            if kw["Key"] == BRICK and whole_rows and not self.flipped:
                Flaky.flipped = True
                read = resp["Body"].read
                resp["Body"].read = lambda n=None: bytes(x ^ 1 for x in read(n))
            return resp
    before = (root / SUBSET).read_bytes()
    state = (root / fetch.STATE_FILE).read_text()
    with pytest.raises(fetch.FetchError, match="two reads of the same rows .* nothing was changed on disk"):
        run_fetch(server, root, client=Flaky(server), verify=True, verify_sample=3, verify_seed=1, **SMALL)
    assert (root / SUBSET).read_bytes() == before
    assert _state(root)["files"][SUBSET] == json.loads(state)["files"][SUBSET]


# -- files written before row checksums -----------------------------------------------------------------------------

def _write_old_format(path: Path, rows: np.ndarray, ids: np.ndarray, shape: tuple, attrs: dict) -> None:
    """The file an older mdlib wrote: imgBrick allocated early, nsd_ids, the attributes; no row checksums."""
    with h5py.File(path, "w") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        dcpl.set_obj_track_times(False)
        h5py.h5d.create(f.id, b"imgBrick", h5py.h5t.NATIVE_UINT8, h5py.h5s.create_simple(shape), dcpl=dcpl)
        f.create_dataset("nsd_ids", data=ids, track_times=False)
        f.attrs.update(attrs)
        f["imgBrick"][...] = rows.reshape(shape)


@pytest.fixture
def old_root(built, copy, mini_root):
    """``copy`` with the subject's file in the older format, recorded in the fetch state as an older mdlib
    recorded it (its MD5, no ``row_checksums``)."""
    root = copy
    path = root / SUBSET
    with h5py.File(path, "r") as f:
        shape, attrs = f["imgBrick"].shape, dict(f.attrs)
    _write_old_format(path, _source_rows(mini_root), _subject_ids(mini_root), shape, attrs)
    state = _state(root)
    entry = state["files"][SUBSET]
    entry.pop("row_checksums")
    st = path.stat()
    entry.update(md5=hashlib.md5(path.read_bytes()).hexdigest(), size=st.st_size,
                 stat=[st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    (root / fetch.STATE_FILE).write_text(json.dumps(state))
    return root


def test_an_older_file_is_checked_then_given_row_checksums(built, old_root, server, mini_root):
    root, path = old_root, old_root / SUBSET
    old = path.read_bytes()
    report, client, lines = run_fetch(server, root, **SMALL)       # a plain run: said, nothing done
    assert client.gets == [] and SUBSET in report.skipped and path.read_bytes() == old
    assert any(SUBSET in x and "no row checksums (written by an older mdlib)" in x and "--verify`" in x
               for x in lines)
    report, client, lines = run_fetch(server, root, dry_run=True, verify=True, verify_sample=4, verify_seed=3,
                                      **SMALL)
    assert any("adds row checksums (a local rewrite; nothing is transferred)" in x for x in lines)
    assert path.read_bytes() == old and not list(root.rglob("*.part*"))

    report, client, lines = run_fetch(server, root, verify=True, verify_sample=4, verify_seed=3, **SMALL)
    assert report.rewritten == [SUBSET] and report.replaced == []
    assert "1 given row checksums" in lines[-1]
    ids = _subject_ids(mini_root)
    assert _rows_read(client, server, mini_root) == sorted(ids[_sampled_rows(len(ids), 4, 3)])
    assert path.read_bytes() == (built / SUBSET).read_bytes()       # what a fresh build writes
    assert _state(root)["files"][SUBSET]["row_checksums"] == "sha256"
    assert not list(root.rglob("*.part*"))


def test_a_damaged_older_file_is_fetched_again_whole(built, old_root, server, mini_root):
    root, path = old_root, old_root / SUBSET
    _flip_byte(path, _row_offset(path, 2) + 1)
    report, client, lines = run_fetch(server, root, **SMALL)
    assert report.replaced == [SUBSET]
    assert any("no row checksums to tell which rows: fetching it again" in x for x in lines)
    assert path.read_bytes() == (built / SUBSET).read_bytes()


def test_the_docs_odds_of_the_sample_are_the_hypergeometric_ones():
    """docs/fetch.md's table: the chance that m rows drawn from n include at least one of k altered rows."""
    text = (ROOT / "docs" / "fetch.md").read_text()
    rows = re.findall(r"^\s*\| (\d[\d,]*) \| (\d+) \| (\d+) \| (\d+(?:\.\d+)?) % \|$", text, flags=re.M)
    assert len(rows) >= 4
    for n, m, k, pct in rows:
        n, m, k = int(n.replace(",", "")), int(m), int(k)
        p = 1 - math.comb(n - k, m) / math.comb(n, m)
        assert f"{100 * p:.{len(pct.partition('.')[2])}f}" == pct, (n, m, k, pct)


# -- an object that changes during the fetch; botocore's errors ------------------------------------------------------

class ShrinkingClient(RecordingClient):
    """Before its first GET of ``key`` (after the fetch's HEAD of it), the bucket's object is replaced with a
    shorter one; ``ignore_if_match``: a server that ignores If-Match; ``drop_after``: that first GET drops after
    so many bytes and the object changes before the next one (a resume within the run)."""

    def __init__(self, endpoint, key, short, ignore_if_match=False, drop_after=None):
        super().__init__(endpoint, drop_key=key if drop_after else None, drop_after=drop_after)
        self.key, self.short, self.ignore = key, short, ignore_if_match
        self.admin = _admin(endpoint)

    def get_object(self, **kw):
        done = [g for g in self.gets if g["key"] == self.key]
        if kw["Key"] == self.key and len(done) == (1 if self.drop_after else 0):
            self.admin.put_object(Bucket=BUCKET, Key=self.key, Body=self.short, ACL="public-read")
        if kw["Key"] == self.key and self.ignore:
            kw.pop("IfMatch", None)
        return super().get_object(**kw)


@pytest.mark.parametrize("case", ["if-match", "content-range", "invalid-range"])
def test_an_object_that_shrinks_between_head_and_get_ends_in_one_line(server, mini_root, tmp_path, monkeypatch,
                                                                     capsys, case):
    from mdlib import cli

    key = str(layout.betas_file(SUBJECT, 1, "hdf5"))
    original = (mini_root / key).read_bytes()
    short = original[:len(original) // 4]
    client = ShrinkingClient(server, key, short, ignore_if_match=case != "if-match",
                             drop_after=len(original) // 2 if case == "invalid-range" else None)
    monkeypatch.setattr(fetch.remote, "s3_client", lambda *a, **k: client)
    root = tmp_path / "nsd"
    args = ["fetch", "--subject", str(SUBJECT), "--what", "minimal", "--last-session", "1", "--stimuli", "none",
            "--no-coco", "--data-root", str(root), "--endpoint-url", server, "--workers", "1", "-q",
            "--retries", "1" if case == "invalid-range" else "0"]
    try:
        code = cli.main(args)
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err
        assert err.count("\n") == 1 and err.startswith("error: ")                   # one line
        assert f"s3://{BUCKET}/{key} changed on the server during the fetch" in err
        assert f"HEAD said {len(original)} bytes" in err
        assert {"if-match": "another ETag", "content-range": f"says it has {len(short)} bytes",
                "invalid-range": f"refused as out of range (the object now has {len(short)} bytes)"}[case] in err
        assert f"the partial download {root / key}.part was discarded" in err
        assert "Run the same command again to fetch the current version" in err
        # nothing of the old version is kept, nothing is at the final path; the other files are complete
        assert not (root / key).exists() and not (root / (key + ".part")).exists()
        assert _state(root)["parts"] == {}
        for rel in _state(root)["files"]:
            assert (root / rel).read_bytes() == (mini_root / rel).read_bytes(), rel
        # the command the message names fetches the current version
        monkeypatch.setattr(fetch.remote, "s3_client", lambda *a, **k: RecordingClient(server))
        assert cli.main(args) == 0
        assert (root / key).read_bytes() == short
    finally:
        _admin(server).put_object(Bucket=BUCKET, Key=key, Body=original, ACL="public-read")


def test_a_stale_manifest_size_ends_in_one_line(server, mini_root, tmp_path):
    import yaml

    rel = str(layout.stim_info("csv"))
    data = yaml.safe_load((ROOT / "data_manifest" / "nsd.yaml").read_text())
    next(e for e in data["files"] if e["key"] == rel)["size"] = 12345
    manifest = tmp_path / "nsd.yaml"
    manifest.write_text(yaml.safe_dump(data))
    root = tmp_path / "nsd"
    with pytest.raises(fetch.FetchError) as err:
        run_fetch(server, root, manifest=manifest, what="minimal", last_session=1, stimuli="none", coco=False,
                  workers=1)
    message = str(err.value)
    assert "\n" not in message and rel in message and "expects 12345" in message
    assert "correct (or remove) the size of this key in the manifest" in message
    assert not (root / rel).exists() and not (root / (rel + ".part")).exists()


def test_botocores_other_errors_end_in_one_line(server, tmp_path, monkeypatch, capsys):
    """Errors that are not network failures are not retried as if they were, and end in one line: a request
    botocore refuses (an invalid bucket name), an error answer, and any botocore error that escapes."""
    from botocore.exceptions import ClientError, NoCredentialsError

    from mdlib import cli

    root = tmp_path / "nsd"
    base = ["fetch", "--data-root", str(root), "--endpoint-url", server, "--no-coco", "-q"]
    assert cli.main([*base, "--bucket", "no such bucket!"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HEAD failed (ParamValidationError: " in err and "Check --bucket" in err
    assert "could not reach" not in err

    class Failing(RecordingClient):
        def head_object(self, **kw):
            raise ClientError({"Error": {"Code": "InternalError", "Message": "We encountered an internal error"},
                               "ResponseMetadata": {"HTTPStatusCode": 500}}, "HeadObject")
    monkeypatch.setattr(fetch.remote, "s3_client", lambda *a, **k: Failing(server))
    assert cli.main(base) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HEAD failed (ClientError: An error occurred (InternalError)" in err

    def escaping(*a, **k):
        raise NoCredentialsError()
    monkeypatch.setattr(fetch, "fetch_nsd", escaping)
    assert cli.main(base) == 1
    err = capsys.readouterr().err
    assert err == ("error: an S3 request failed (NoCredentialsError: Unable to locate credentials); check --bucket "
                   "and --endpoint-url, then run the same command again: finished files are kept and partial ones "
                   "resume\n")
    assert not any(p.is_file() for p in root.rglob("*")) if root.exists() else True


def test_a_chunked_brick_is_checked_and_repaired_through_h5py(server, mini_root, tmp_path):
    """Not NSD's layout: rows of a chunked, compressed brick are compared and re-fetched through h5py reads."""
    with h5py.File(mini_root / BRICK, "r") as f:
        images = f["imgBrick"][()]
    source = tmp_path / "chunked.hdf5"
    with h5py.File(source, "w") as f:
        f.create_dataset("imgBrick", data=images, chunks=(3, *images.shape[1:]), compression="gzip")
    key = "test-sources/chunked-rows.hdf5"
    _admin(server).put_object(Bucket=BUCKET, Key=key, Body=source.read_bytes(), ACL="public-read")
    store = fetch.S3Store(BUCKET, client=RecordingClient(server))
    remote = store.head(key)
    info = fetch_subset.inspect_brick(store, remote)
    ids = np.array([1, 2, 7, 40, 41, 60])
    state = fetch.remote.FetchState(tmp_path / "root")
    dest = tmp_path / "root" / "subset.hdf5"
    fetch_subset.build_subset(store, remote, ids, dest, "subset.hdf5", state, info=info, workers=2)
    built = dest.read_bytes()
    _flip_byte(dest, _row_offset(dest, 3) + 9)
    spot = fetch_subset.SpotCheck(store, remote, lambda: info, sample=2, seed=0)
    check = fetch_subset.check_subset(dest, "subset.hdf5", remote, ids, state, verify=True, spot=spot)
    assert check.status == "damaged" and check.rows.tolist() == [3] and check.compared == 4
    fetch_subset.repair_rows(store, remote, info, dest, "subset.hdf5", ids, check.rows, state)
    assert dest.read_bytes() == built
    check = fetch_subset.check_subset(dest, "subset.hdf5", remote, ids, state, verify=True, spot=spot)
    assert check.status == "ok"
    with StimulusReader(None, path=dest) as reader:
        np.testing.assert_array_equal(reader.read(ids), images[ids])
