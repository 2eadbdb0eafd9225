"""mdlib fetch against a real S3 server on 127.0.0.1 (moto's, started and stopped here) holding a mini-NSD.

The bucket is public like NSD's (anonymous reads, unsigned requests); one betas file is a multipart upload (its
ETag is not an MD5) and the COCO annotations zip is served over plain HTTP by the same server. Nothing here
touches the internet. The lessons 01 to 03 run at the end on the fetched root (whose images come only from the
per-subject file) and on the mini-NSD it was fetched from, and record the same numbers.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from mdlib import fetch
from mdlib.fetch import subset as fetch_subset
from mdlib.nsd import layout
from mdlib.nsd.design import load_design
from mdlib.nsd.stimuli import StimulusReader

BUCKET = "natural-scenes-dataset"
SUBJECT = 1
#: The smallest mini-NSD on which lessons 01 and 02 run: 5 sessions of 24 trials, 40 images, 32 px.
MINI = dict(subjects=(SUBJECT,), n_shared=8, n_per_subject=40, trials_per_session=24, stim_size=32, progress=False)
COCO_KEY = "test-sources/annotations_trainval2017.zip"
#: This betas file is uploaded as a multipart upload: its ETag ("<md5 of md5s>-1") is not the file's MD5.
MULTIPART_KEY = str(layout.betas_file(SUBJECT, 2, "hdf5"))
ROOT = Path(__file__).resolve().parent.parent


# -- the server, the bucket and a client that records (and can break) transfers -------------------------------

@pytest.fixture(scope="module")
def mini_root(mini_nsd):
    return mini_nsd(**MINI)


def _coco_zip(root: Path) -> bytes:
    """An annotations zip like COCO's: the two caption files beside a member the lessons do not need."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("annotations/instances_val2017.json", json.dumps({"annotations": [0] * 50000}))
        for split in ("train2017", "val2017"):
            zf.write(root / layout.coco_captions(split), f"annotations/captions_{split}.json")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(mini_root):
    """moto's S3 server on a free port of 127.0.0.1 with a public bucket holding the mini-NSD."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    url = f"http://{host}:{port}"
    admin = boto3.client("s3", endpoint_url=url, region_name="us-east-2", aws_access_key_id="testing",
                         aws_secret_access_key="testing")
    admin.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "us-east-2"})
    admin.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
         "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]}]}))
    for path in sorted(p for p in mini_root.rglob("*") if p.is_file()):
        key = path.relative_to(mini_root).as_posix()
        if key == MULTIPART_KEY:
            up = admin.create_multipart_upload(Bucket=BUCKET, Key=key, ACL="public-read")
            part = admin.upload_part(Bucket=BUCKET, Key=key, UploadId=up["UploadId"], PartNumber=1,
                                     Body=path.read_bytes())
            admin.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=up["UploadId"],
                                            MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]})
        else:
            admin.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes(), ACL="public-read")
    admin.put_object(Bucket=BUCKET, Key=COCO_KEY, Body=_coco_zip(mini_root), ACL="public-read")
    yield url
    srv.stop()


class RecordingClient:
    """A boto3 S3 client (anonymous) that records every GET (key, Range, bytes delivered) and can break them.

    ``drop_key``/``drop_after``: a GET of that key delivers ``drop_after`` bytes, then the connection 'drops'
    (ConnectionResetError), once. ``fail_key``/``fail_from``: GETs of that key fail from the given call on.
    """

    def __init__(self, endpoint: str, drop_key=None, drop_after=None, fail_key=None, fail_from=None):
        self._client = fetch.s3_client(endpoint, workers=8)
        self.gets: list[dict] = []
        self.drop_key, self.drop_after = drop_key, drop_after
        self.fail_key, self.fail_from = fail_key, fail_from

    def __getattr__(self, name):
        return getattr(self._client, name)

    def get_object(self, **kw):
        same = [g for g in self.gets if g["key"] == kw["Key"]]
        record = {"key": kw["Key"], "range": kw.get("Range"), "bytes": 0}
        self.gets.append(record)
        if kw["Key"] == self.fail_key and len(same) >= self.fail_from:
            raise ConnectionResetError("simulated: connection refused")
        resp = self._client.get_object(**kw)
        drop = self.drop_after if kw["Key"] == self.drop_key and not same else None
        resp["Body"] = _Body(resp["Body"], record, drop)
        return resp

    def received(self, key=None) -> int:
        return sum(g["bytes"] for g in self.gets if key is None or g["key"] == key)


class _Body:
    def __init__(self, body, record, drop_after):
        self._body, self._record, self._drop = body, record, drop_after

    def read(self, n=None):
        if self._drop is not None and self._record["bytes"] >= self._drop:
            raise ConnectionResetError("simulated: connection dropped mid-file")
        data = self._body.read(n) if n is not None else self._body.read()
        if self._drop is not None:
            data = data[:self._drop - self._record["bytes"]]
        self._record["bytes"] += len(data)
        return data

    def close(self):
        self._body.close()


def run_fetch(server, root, client=None, **kw):
    """fetch_nsd against the test server, quietly; returns (report, client, log lines)."""
    client = client or RecordingClient(server)
    lines: list[str] = []
    kw = {"subjects": [SUBJECT], "what": "full", "coco_source": f"{server}/{BUCKET}/{COCO_KEY}", "workers": 4,
          "progress": False, **kw}
    report = fetch.fetch_nsd(root, endpoint_url=server, client=client, log=lines.append, **kw)
    return report, client, lines


@pytest.fixture(scope="module")
def fetched(server, tmp_path_factory):
    """A full fetch of subject 1 into a fresh root, done once (the tests below only read it)."""
    root = tmp_path_factory.mktemp("fetched") / "nsd"
    report, client, lines = run_fetch(server, root)
    return root, report, client, lines


def _subject_ids(root) -> np.ndarray:
    return np.unique(load_design(root).subjectim[SUBJECT - 1] - 1)


def _local_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {fetch.STATE_FILE}


# -- the manifest ------------------------------------------------------------------------------------------------

def _layout_keys(subject: int, sessions: range) -> set[str]:
    """What lessons 01-06 read, written with mdlib.nsd.layout's functions (an independent list)."""
    keys = {layout.expdesign(), layout.stim_info("csv"), layout.betas_file(subject, 1, "nii.gz"),
            layout.anatomy_file(subject, "T1_to_func1pt8mm"), layout.anatomy_file(subject, "brainmask")}
    keys |= {layout.betas_file(subject, k, "hdf5") for k in sessions}
    keys |= {layout.roi_file(subject, a) for a in ("nsdgeneral", "prf-visualrois", "Kastner2015")}
    keys |= {layout.roi_ctab(subject, a) for a in ("nsdgeneral", "prf-visualrois", "Kastner2015")}
    keys.add(layout.behav_responses(subject))
    return {str(k) for k in keys}


@pytest.mark.parametrize("subject", layout.ALL_SUBJECTS)
def test_manifest_keys_are_the_layout_paths(subject):
    man = fetch.load_manifest()
    done = layout.NSD_SESSIONS_COMPLETED[subject]
    full = {i.key for i in man.files_for([subject], "full", {subject: done})}
    minimal = {i.key for i in man.files_for([subject], "minimal", {subject: done})}
    assert full == _layout_keys(subject, range(1, done + 1))
    assert minimal == _layout_keys(subject, range(1, 11))
    assert man.stimuli_local(subject) == str(layout.subject_stimuli(subject))
    assert man.stimuli["source"] == str(layout.stimuli())
    assert [m["local"] for m in man.coco_members()] == [str(layout.coco_captions(s)) for s in ("train2017", "val2017")]
    assert man.bucket == BUCKET
    assert man.models == ROOT / "data_manifest" / "models.yaml"


def test_fetch_docs_table_states_the_manifests_estimates():
    """docs/fetch.md's "Getting the real data" table is the manifest's estimates (GB, one decimal)."""
    man = fetch.load_manifest()
    text = (ROOT / "docs" / "fetch.md").read_text()
    section = text.split("## Getting the real data", 1)[1].split("\n## ", 1)[0]
    for what in fetch.PURPOSES:
        row = next(line for line in section.splitlines() if line.startswith(f"| `--what {what}`"))
        for subjects in ([1], [1, 2, 5, 7]):
            assert f"{man.approx_bytes(subjects, what) / 1e9:.1f} GB" in row, (what, subjects, row)


def test_plan_runs_groups_nearby_rows():
    ids = np.array([0, 1, 2, 5, 9, 10, 30])
    runs = fetch_subset.plan_runs(ids, row_bytes=10, max_gap_rows=2, max_request_bytes=60)
    assert [(first, a, b, keep.tolist()) for first, a, b, keep in runs] == [
        (0, 0, 6, [0, 1, 2, 5]), (4, 9, 11, [0, 1]), (6, 30, 31, [0])]
    exact = fetch_subset.plan_runs(ids, row_bytes=10, max_gap_rows=0)
    assert sum(b - a for _, a, b, _ in exact) == ids.size


# -- a full fetch ------------------------------------------------------------------------------------------------

def test_full_fetch_equals_the_source_byte_for_byte(fetched, mini_root):
    root, report, _, lines = fetched
    man = fetch.load_manifest()
    design = load_design(mini_root)
    planned = {i.key for i in man.files_for([SUBJECT], "full", {SUBJECT: design.completed_sessions(SUBJECT)})}
    coco = {str(layout.coco_captions(s)) for s in ("train2017", "val2017")}
    subset = str(layout.subject_stimuli(SUBJECT))
    assert _local_files(root) == planned | coco | {subset}
    for rel in planned | coco:
        assert (root / rel).read_bytes() == (mini_root / rel).read_bytes(), rel
    assert not (root / layout.stimuli()).exists()  # the brick stays in the bucket
    assert sorted(report.downloaded) == sorted(planned | coco | {subset})
    assert report.skipped == [] and report.replaced == []
    assert report.bytes_received >= sum((root / rel).stat().st_size for rel in planned | coco)
    assert f"{fetch.human(report.bytes_received)} received in {report.requests} GET" in lines[-1]
    state = json.loads((root / fetch.STATE_FILE).read_text())
    assert set(state["files"]) == planned | coco | {subset} and state["parts"] == {}
    assert state["files"][MULTIPART_KEY]["etag"].endswith("-1")  # multipart: size checked, MD5 recorded


def test_the_subject_file_holds_its_images_and_the_reader_reads_it(fetched, mini_root):
    root, _, client, _ = fetched
    ids = _subject_ids(mini_root)
    with h5py.File(mini_root / layout.stimuli(), "r") as f:
        source = f["imgBrick"][ids.tolist()]
        n_rows = f["imgBrick"].shape[0]
    with h5py.File(root / layout.subject_stimuli(SUBJECT), "r") as f:
        np.testing.assert_array_equal(f["nsd_ids"][()], ids)
        np.testing.assert_array_equal(f["imgBrick"][()], source)
    # ranged reads brought the subject's rows (and at most 2-row gaps between them), not the brick
    brick_bytes = (mini_root / layout.stimuli()).stat().st_size
    assert client.received(str(layout.stimuli())) < 0.5 * brick_bytes
    assert len(ids) < n_rows
    rng = np.random.default_rng(0)
    asked = rng.choice(ids, size=12)
    with StimulusReader(root) as fetched_reader, StimulusReader(mini_root) as mini_reader:
        assert fetched_reader.n_stimuli == len(ids)
        np.testing.assert_array_equal(fetched_reader.read(asked), mini_reader.read(asked))
        np.testing.assert_array_equal(fetched_reader.read(asked, size=20), mini_reader.read(asked, size=20))
        other = np.setdiff1d(np.arange(n_rows), ids)[0]
        with pytest.raises(IndexError, match="not in"):
            fetched_reader.read([other])
    assert layout.stimuli_in(root, SUBJECT) == layout.subject_stimuli(SUBJECT)
    assert layout.stimuli_in(mini_root, SUBJECT) == layout.stimuli()


def test_a_second_fetch_transfers_nothing(fetched, server):
    root, first, _, _ = fetched
    report, client, lines = run_fetch(server, root)
    assert client.gets == [] and report.requests == 0 and report.bytes_received == 0
    assert report.downloaded == [] and len(report.skipped) == len(first.entries)
    assert "0 downloaded" in lines[-1]


# -- dry run -----------------------------------------------------------------------------------------------------

def test_dry_run_lists_the_files_and_their_total_and_writes_nothing(server, mini_root, tmp_path):
    root = tmp_path / "nsd"
    report, client, lines = run_fetch(server, root, what="minimal", last_session=2, dry_run=True)
    assert not root.exists()
    sizes = {e["path"]: e["size"] for e in report.entries}
    ids = _subject_ids(mini_root)
    expected = {rel: (mini_root / rel).stat().st_size for rel in _layout_keys(SUBJECT, range(1, 3))}
    expected.update({str(layout.coco_captions(s)): (mini_root / layout.coco_captions(s)).stat().st_size
                     for s in ("train2017", "val2017")})
    stim = MINI["stim_size"] ** 2 * 3
    expected[str(layout.subject_stimuli(SUBJECT))] = len(ids) * stim
    assert sizes == expected
    assert all(e["status"] == "fetch" for e in report.entries)
    assert report.total_bytes == report.bytes_to_transfer == sum(expected.values())
    assert any(rel in "\n".join(lines) for rel in expected)
    assert fetch.human(report.total_bytes) in lines[-1]
    # what was read: the design (to plan the sessions), HDF5 and zip metadata; no file's contents
    assert client.received() < 0.2 * sum(expected.values())


def test_dry_run_on_a_complete_root_has_nothing_to_transfer(fetched, server):
    root, _, _, _ = fetched
    report, client, _ = run_fetch(server, root, dry_run=True)
    assert report.bytes_to_transfer == 0 and client.gets == []
    assert {e["status"] for e in report.entries} == {"present"}


# -- interruptions, corruption, missing keys ---------------------------------------------------------------------

def test_a_fetch_that_failed_mid_file_resumes_with_the_remainder(server, mini_root, tmp_path):
    root = tmp_path / "nsd"
    key = str(layout.betas_file(SUBJECT, 1, "hdf5"))
    size = (mini_root / key).stat().st_size
    cut = size // 3
    broken = RecordingClient(server, drop_key=key, drop_after=cut)
    small = dict(what="minimal", last_session=1, stimuli="none", coco=False)
    with pytest.raises(fetch.FetchError, match="run the fetch again to resume") as err:
        run_fetch(server, root, client=broken, retries=0, **small)
    assert key in str(err.value)
    part = root / (key + ".part")
    assert part.stat().st_size == cut and not (root / key).exists()  # no partial file at the final path

    report, client, _ = run_fetch(server, root, **small)
    assert [g["range"] for g in client.gets if g["key"] == key] == [f"bytes={cut}-"]
    assert client.received(key) == size - cut
    assert (root / key).read_bytes() == (mini_root / key).read_bytes() and not part.exists()
    assert key in report.downloaded
    # the other files were complete after the first run: not transferred again
    assert {g["key"] for g in client.gets} == {key}


def test_a_fetch_killed_mid_file_by_sigkill_resumes_with_the_remainder(server, mini_root, tmp_path):
    """`mdlib fetch` in its own process, capped by --max-rate so that the kill lands mid-file, killed with
    SIGKILL (no handler runs) while the session's betas are partly in their .part; the rerun transfers the
    rest of each interrupted file and the files not yet begun, nothing else."""
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "nsd"
    key = str(layout.betas_file(SUBJECT, 1, "hdf5"))
    part = root / (key + ".part")
    rate, workers = 100_000, 2
    small = dict(what="minimal", last_session=1, stimuli="none", coco=False)
    cmd = [sys.executable, "-m", "mdlib.cli", "fetch", "--subject", str(SUBJECT), "--what", "minimal",
           "--last-session", "1", "--stimuli", "none", "--no-coco", "--data-root", str(root), "--endpoint-url",
           server, "--workers", str(workers), "--max-rate", f"{rate // 1000}k", "-q"]
    log = tmp_path / "fetch.log"
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not (part.is_file() and part.stat().st_size > 0):
            assert proc.poll() is None, f"the fetch ended before {key} was begun:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no bytes of {key} after 60 s:\n{log.read_text()}"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    elapsed = time.monotonic() - t0
    cut = part.stat().st_size
    size = (mini_root / key).stat().st_size
    assert 0 < cut < size and not (root / key).exists()  # killed mid-file; nothing at the final path
    planned = sorted(i.key for i in fetch.load_manifest().files_for(
        [SUBJECT], "minimal", {SUBJECT: load_design(mini_root).completed_sessions(SUBJECT)}, 1))
    done = [k for k in planned if (root / k).is_file()]
    parts = {k: (root / (k + ".part")).stat().st_size for k in planned if (root / (k + ".part")).is_file()}
    for k in done:  # what is at a final path is complete
        assert (root / k).read_bytes() == (mini_root / k).read_bytes(), k
    # the cap held: what arrived before the kill fits the rate (plus one read, a tenth of a second's, each)
    assert sum((root / k).stat().st_size for k in done) + sum(parts.values()) <= rate * elapsed + workers * rate / 10

    todo = [k for k in planned if k not in done]
    remainder = sum((mini_root / k).stat().st_size - parts.get(k, 0) for k in todo)
    report, client, lines = run_fetch(server, root, **small)
    assert report.bytes_received == client.received() == remainder
    assert f"{fetch.human(remainder)} received" in lines[-1]
    assert [g["range"] for g in client.gets if g["key"] == key] == [f"bytes={cut}-"]
    assert sorted({g["key"] for g in client.gets}) == sorted(report.downloaded) == todo
    assert sorted(report.skipped) == sorted(done)
    for k in planned:
        assert (root / k).read_bytes() == (mini_root / k).read_bytes(), k
    assert not list(root.rglob("*.part"))
    assert json.loads((root / fetch.STATE_FILE).read_text())["parts"] == {}


def test_max_rate_paces_ranged_reads_from_the_bucket_and_over_http(server, mini_root):
    """The cap holds for the brick's ranged reads (the subject file) and the COCO zip's (HTTP) too, and one
    RateLimit is shared: 60 kB at 200 kB/s take at least 0.25 s (the first 20 kB read is not waited for)."""
    import time

    from mdlib.fetch.remote import HttpSource, RateLimit

    limit = RateLimit(200_000)
    assert limit.block == 20_000
    store = fetch.S3Store(BUCKET, client=RecordingClient(server), limit=limit)
    http = HttpSource(f"{server}/{BUCKET}/{COCO_KEY}", limit=limit)
    brick = str(layout.stimuli())
    t0 = time.monotonic()
    data = store.read_range(brick, 100, 40_100)
    zipped = http.read_range(0, 20_000)
    assert time.monotonic() - t0 >= 0.25
    assert data == (mini_root / brick).read_bytes()[100:40_100] and store.counter.bytes == 40_000
    assert zipped[:4] == b"PK\x03\x04" and http.counter.bytes == 20_000


def test_ctrl_c_stops_the_downloads_and_keeps_their_parts(server, mini_root, tmp_path, monkeypatch):
    """SIGINT during a transfer: the running downloads stop at their next block and keep their parts."""
    import signal
    import threading
    import time

    root = tmp_path / "nsd"
    key = str(layout.betas_file(SUBJECT, 1, "hdf5"))
    size = (mini_root / key).stat().st_size
    monkeypatch.setattr(fetch.remote, "CHUNK", 64 << 10)
    got_sigint = threading.Event()

    def on_sigint(signum, frame):
        got_sigint.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)

    class Interrupting(RecordingClient):
        def get_object(self, **kw):
            resp = super().get_object(**kw)
            if kw["Key"] == key:
                body = resp["Body"]
                first = body.read

                def read(n=None):
                    data = first(n)
                    if not got_sigint.is_set():
                        os.kill(os.getpid(), signal.SIGINT)
                        got_sigint.wait(10)
                        time.sleep(0.3)  # the main thread tells the downloads to stop
                    return data
                body.read = read
            return resp

    try:
        with pytest.raises(KeyboardInterrupt):
            run_fetch(server, root, client=Interrupting(server), what="minimal", last_session=1, stimuli="none",
                      coco=False, workers=1)
    finally:
        signal.signal(signal.SIGINT, previous)
    part = root / (key + ".part")
    cut = part.stat().st_size
    assert 0 < cut < size and not (root / key).exists()
    _, client, _ = run_fetch(server, root, what="minimal", last_session=1, stimuli="none", coco=False)
    assert [g["range"] for g in client.gets if g["key"] == key] == [f"bytes={cut}-"]
    assert client.received(key) == size - cut
    assert (root / key).read_bytes() == (mini_root / key).read_bytes()


def test_a_dropped_connection_is_resumed_within_the_run(server, mini_root, tmp_path):
    root = tmp_path / "nsd"
    key = str(layout.betas_file(SUBJECT, 1, "hdf5"))
    size = (mini_root / key).stat().st_size
    client = RecordingClient(server, drop_key=key, drop_after=1000)
    run_fetch(server, root, client=client, retries=2, what="minimal", last_session=1, stimuli="none", coco=False)
    assert [g["range"] for g in client.gets if g["key"] == key] == ["bytes=0-", "bytes=1000-"]
    assert client.received(key) == size
    assert (root / key).read_bytes() == (mini_root / key).read_bytes()


def test_an_interrupted_subject_file_resumes_from_its_last_complete_batch(server, mini_root, tmp_path):
    root = tmp_path / "nsd"
    brick = str(layout.stimuli())
    ids = _subject_ids(mini_root)
    row = MINI["stim_size"] ** 2 * 3
    opts = dict(what="minimal", last_session=1, coco=False, workers=1, max_gap_rows=0, max_request_bytes=row)
    # one row per request, 4 requests per batch (4 x workers): the 11th request fails, 2 batches are on disk
    broken = RecordingClient(server, fail_key=brick, fail_from=10)
    with pytest.raises(fetch.FetchError, match="resume"):
        run_fetch(server, root, client=broken, retries=0, **opts)
    dest = root / layout.subject_stimuli(SUBJECT)
    assert not dest.exists()
    progress = json.loads(Path(str(dest) + ".part.json").read_text())
    assert progress["rows_done"] == 8

    report, client, _ = run_fetch(server, root, **opts)
    data_gets = [g for g in client.gets if g["key"] == brick and g["bytes"] == row]
    assert len(data_gets) == len(ids) - 8  # only the missing rows
    with h5py.File(mini_root / brick, "r") as f, h5py.File(dest, "r") as g:
        np.testing.assert_array_equal(g["imgBrick"][()], f["imgBrick"][ids.tolist()])
    assert not Path(str(dest) + ".part").exists() and not Path(str(dest) + ".part.json").exists()


def _flip_byte(path: Path, at: int, keep_mtime: bool = False) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_corrupted_and_truncated_files_are_detected_and_replaced(fetched, server, mini_root, tmp_path):
    source, _, _, _ = fetched
    root = tmp_path / "nsd"
    shutil.copytree(source, root)  # a moved root: every file is re-hashed once, none is downloaded
    plain = str(layout.roi_file(SUBJECT, "nsdgeneral"))
    quiet = str(layout.anatomy_file(SUBJECT, "brainmask"))
    truncated = str(layout.betas_file(SUBJECT, 3, "hdf5"))
    captions = str(layout.coco_captions("val2017"))
    subset = str(layout.subject_stimuli(SUBJECT))
    _flip_byte(root / plain, 100)                     # same size, one byte changed: MD5 differs from the ETag
    _flip_byte(root / quiet, 50, keep_mtime=True)     # ... with its modification time put back
    _flip_byte(root / MULTIPART_KEY, 5000)            # multipart ETag: compared with the MD5 recorded at download
    _flip_byte(root / captions, 10)                   # checked against the zip's CRC-32
    _flip_byte(root / subset, (root / subset).stat().st_size - 10)  # checked against the MD5 recorded when built
    with open(root / truncated, "r+b") as f:
        f.truncate(1000)
    report, client, _ = run_fetch(server, root)
    assert sorted(report.replaced) == sorted([plain, quiet, MULTIPART_KEY, truncated, subset, captions])
    assert {g["key"] for g in client.gets} == {plain, quiet, MULTIPART_KEY, truncated, str(layout.stimuli())}
    for rel in (plain, quiet, MULTIPART_KEY, truncated, captions):
        assert (root / rel).read_bytes() == (mini_root / rel).read_bytes(), rel
    assert (root / subset).read_bytes() == (source / subset).read_bytes()


def test_verify_rehashes_what_the_state_vouches_for(fetched, server, mini_root, tmp_path):
    source, _, _, _ = fetched
    root = tmp_path / "nsd"
    shutil.copytree(source, root)
    run_fetch(server, root)                      # re-records every file of the moved root (hashing, no GET)
    rel = str(layout.stim_info("csv"))
    _flip_byte(root / rel, 20)
    state = json.loads((root / fetch.STATE_FILE).read_text())
    st = (root / rel).stat()                     # a change the recorded stat cannot see
    state["files"][rel]["stat"] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    (root / fetch.STATE_FILE).write_text(json.dumps(state))
    report, client, _ = run_fetch(server, root)
    assert report.replaced == [] and client.gets == []
    report, client, _ = run_fetch(server, root, verify=True)
    # the brick's GETs: --verify's comparison of a sample of the subject file's rows (tests/test_fetch_rows.py)
    assert report.replaced == [rel] and {g["key"] for g in client.gets} == {rel, str(layout.stimuli())}
    assert (root / rel).read_bytes() == (mini_root / rel).read_bytes()


def test_a_missing_key_is_named(server, tmp_path, capsys):
    from mdlib.cli import main

    root = tmp_path / "nsd"
    with pytest.raises(fetch.MissingKeyError) as err:  # the bucket holds subject 1 only
        run_fetch(server, root, subjects=[2], what="minimal")
    roi = str(layout.roi_file(2, "nsdgeneral"))
    assert roi in err.value.keys and f"s3://{BUCKET}/{roi}" in str(err.value)
    assert "--subject" in str(err.value)
    assert _local_files(root) == {str(layout.expdesign())}  # only the design, which names the files to fetch

    rc = main(["fetch", "--subject", "1", "--data-root", str(root), "--endpoint-url", server, "--bucket",
               "no-such-bucket", "--no-coco", "-q"])
    assert rc == 1 and "nsddata/experiments/nsd/nsd_expdesign.mat" in capsys.readouterr().err


def test_a_chunked_compressed_brick_is_read_through_h5py(server, mini_root, tmp_path):
    """Not NSD's layout, but a brick that is not contiguous still gives the right rows (h5py reads)."""
    import boto3

    with h5py.File(mini_root / layout.stimuli(), "r") as f:
        images = f["imgBrick"][()]
    path = tmp_path / "chunked.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("imgBrick", data=images, chunks=(3, *images.shape[1:]), compression="gzip")
    admin = boto3.client("s3", endpoint_url=server, region_name="us-east-2", aws_access_key_id="testing",
                         aws_secret_access_key="testing")
    admin.put_object(Bucket=BUCKET, Key="test-sources/chunked.hdf5", Body=path.read_bytes(), ACL="public-read")
    store = fetch.S3Store(BUCKET, client=RecordingClient(server))
    remote = store.head("test-sources/chunked.hdf5")
    info = fetch_subset.inspect_brick(store, remote)
    assert info.data_offset is None and info.shape == images.shape
    ids = np.array([1, 2, 7, 40, 41, 200])
    state = fetch.remote.FetchState(tmp_path / "root")
    dest = tmp_path / "root" / "subset.hdf5"
    fetch_subset.build_subset(store, remote, ids, dest, "subset.hdf5", state, info=info, workers=2)
    with StimulusReader(None, path=dest) as reader:
        np.testing.assert_array_equal(reader.read(ids[::-1]), images[ids[::-1]])


def test_the_manifest_size_is_checked_when_it_is_known(server, mini_root, tmp_path):
    rel = str(layout.stim_info("csv"))
    data = yaml.safe_load((ROOT / "data_manifest" / "nsd.yaml").read_text())
    entry = next(e for e in data["files"] if e["key"] == rel)
    small = dict(what="minimal", last_session=1, stimuli="none", coco=False)
    for size, root in ((mini_root.joinpath(rel).stat().st_size, tmp_path / "right"), (12345, tmp_path / "wrong")):
        entry["size"] = size
        manifest = tmp_path / f"nsd-{size}.yaml"
        manifest.write_text(yaml.safe_dump(data))
        if size == 12345:
            with pytest.raises(fetch.FetchError, match="manifest .* expects 12345") as err:
                run_fetch(server, root, manifest=manifest, **small)
            assert rel in str(err.value) and not (root / rel).exists()
        else:
            run_fetch(server, root, manifest=manifest, **small)
            assert (root / rel).read_bytes() == (mini_root / rel).read_bytes()


def test_a_mini_nsd_root_is_not_fetched_into(server, mini_root):
    with pytest.raises(fetch.FetchError, match="mini-NSD"):
        run_fetch(server, mini_root, dry_run=True)


# -- the command -------------------------------------------------------------------------------------------------

def test_cli_dry_run_lists_files_and_models(server, tmp_path, capsys):
    from mdlib import models
    from mdlib.cli import main

    root = tmp_path / "nsd"
    rc = main(["fetch", "--subject", "1", "--what", "minimal", "--last-session", "1", "--data-root", str(root),
               "--endpoint-url", server, "--coco-source", f"{server}/{BUCKET}/{COCO_KEY}", "--models",
               "--dry-run", "-q"])
    out = capsys.readouterr().out
    assert rc == 0 and not root.exists()
    assert str(layout.betas_file(1, 1, "hdf5")) in out and str(layout.subject_stimuli(1)) in out
    assert "dry run:" in out
    manifest = models.model_manifest()
    for role in ("stable_diffusion", "clip_vision", "clip_eval"):
        assert manifest[role]["id"] in out and models.fetch_command(role) in out
    assert manifest["clip_text"]["id"] not in out  # nothing to fetch for it


def test_cli_models_calls_mdlib_models_and_refuses_offline(monkeypatch, tmp_path, capsys):
    from mdlib import models
    from mdlib.cli import main

    assert main(["fetch", "--what", "none", "--models", "-q"]) == 1
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    calls = []
    monkeypatch.setattr(models, "hub_offline", lambda: False)
    monkeypatch.setattr(models, "fetch_models", lambda roles, cache_dir=None: calls.append((roles, cache_dir))
                        or {r: tmp_path / r for r in roles})
    assert main(["fetch", "--what", "none", "--models", "--hf-cache", str(tmp_path), "-q"]) == 0
    assert calls == [(("stable_diffusion", "clip_vision", "clip_eval"), str(tmp_path))]


def test_the_reader_reads_several_subject_files_as_one(tmp_path, rng):
    images = rng.integers(0, 256, size=(10, 8, 8, 3), dtype=np.uint8)  # nsdIds 0..9
    held = {1: [0, 2, 3, 7], 2: [2, 5, 7, 9]}                          # 2 and 7 are shared
    for s, ids in held.items():
        path = tmp_path / layout.subject_stimuli(s)
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            f.create_dataset("imgBrick", data=images[ids])
            f.create_dataset("nsd_ids", data=np.array(ids))
    assert layout.stimuli_sources(tmp_path) == [layout.subject_stimuli(1), layout.subject_stimuli(2)]
    with StimulusReader(tmp_path, batch_size=3) as reader:
        assert reader.n_stimuli == 6 and reader.nsd_ids.tolist() == [0, 2, 3, 7, 5, 9]
        asked = [9, 0, 7, 2, 5, 9, 3]
        np.testing.assert_array_equal(reader.read(asked), images[asked])
        with pytest.raises(IndexError, match=r"\[4\] not in 2 files"):
            reader.read([4])
    assert layout.stimuli_in(tmp_path, 2) == layout.subject_stimuli(2)
    assert layout.stimuli_in(tmp_path, 5) == layout.subject_stimuli(1)


def test_no_stimulus_file_says_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="mdlib fetch") as err:
        StimulusReader(tmp_path)
    assert str(layout.stimuli()) in str(err.value) and "subsets/subjNN_stimuli.hdf5" in str(err.value)


# -- the lessons on fetched data ---------------------------------------------------------------------------------

#: Lesson 03 on PRESET "nsd" would load Stable Diffusion v1-4 and CLIP ViT-B/32: the shipped tiny models instead,
#: the mini path's, on both roots (lesson 03's advanced settings).
TINY_MODELS = {"ADVANCED": {"sd_model": "tiny-trained", "clip_model": "tiny-trained"}}


@pytest.mark.slow
@pytest.mark.notebook
def test_lessons_01_to_03_on_fetched_data_record_what_they_record_on_mini_nsd(fetched, mini_root, tmp_path):
    """Both roots on the real-data path (PRESET "nsd": the fetched root has no mini-NSD sidecar); lesson 03 with
    the tiny models and the mini path's sizes. Only the number of stored images differs: the fetched root holds
    the subject's own images, mini-NSD the brick; lesson 03's targets (the images through the VAE and CLIP, the
    captions through the text encoder) come out the same from either."""
    from mdlib import course
    from mdlib.features import clip_feature_names

    root, _, _, _ = fetched
    assert not (root / layout.stimuli()).exists()
    results = {}
    for name, data_root in (("fetched", root), ("mini", mini_root)):
        summary = course.run_course("nsd", data_root=data_root, out=tmp_path / name, only=["01", "02"],
                                    progress=False)
        summary = course.run_course("nsd", data_root=data_root, out=tmp_path / name, only=["03"],
                                    parameters=TINY_MODELS, progress=False)
        results[name] = summary["results"]
    got, want = results["fetched"], results["mini"]
    assert set(got) == set(want) == {"01_nsd_data", "02_voxels_nilearn", "03_ridge_decoding"}
    with h5py.File(mini_root / layout.stimuli(), "r") as f:
        brick_shape = list(f["imgBrick"].shape)
    assert want["01_nsd_data"].pop("stimulus_brick_shape") == brick_shape
    assert got["01_nsd_data"].pop("stimulus_brick_shape") == [len(_subject_ids(mini_root)), *brick_shape[1:]]
    assert got == want
    assert got["01_nsd_data"]["nifti_equals_hdf5"] is True
    assert got["01_nsd_data"]["n_sessions"] == load_design(mini_root).n_sessions
    r03 = got["03_ridge_decoding"]
    assert set(r03["median_r"]) == {"z", "c", *(f"clip_{n}" for n in clip_feature_names())}
    assert set(r03["median_r_fastl2lir"]) == {"z", "c", "clip_block1"} and r03["median_r_ceiling"] == {}
    assert r03["n_voxels"] == got["01_nsd_data"]["n_voxels_nsdgeneral"]


def test_the_manifest_is_valid_yaml_with_models_by_reference():
    data = yaml.safe_load((ROOT / "data_manifest" / "nsd.yaml").read_text())
    assert data["models"] == "models.yaml" and "stable_diffusion" not in json.dumps(data)


def test_no_network_ends_in_one_clear_line(tmp_path, capsys):
    """An endpoint that refuses connections (no network): exit status 1, one message naming the endpoint and
    the fix, no traceback, and nothing written but the (empty) data root."""
    import socket

    from mdlib import cli

    with socket.socket() as s:                      # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "nsd"
    code = cli.main(["fetch", "--data-root", str(root), "--endpoint-url", f"http://127.0.0.1:{port}",
                     "--retries", "0", "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert "could not reach" in err and "Check the network connection" in err and "Traceback" not in err
    assert not any(p.is_file() for p in root.rglob("*")) if root.exists() else True


def test_fetch_refuses_zero_workers(capsys):
    from mdlib import cli

    with pytest.raises(SystemExit) as err:
        cli.main(["fetch", "--workers", "0"])
    assert err.value.code == 2 and "--workers: must be at least 1, got 0" in capsys.readouterr().err
