"""``fetch_nsd``: the lessons' NSD files for some subjects, from the bucket to a local data root.

The order of work:

1. the design (``nsd_expdesign.mat``): its session counts and each subject's nsdIds decide the rest (in a dry
   run it is read into memory, not written);
2. the plan: the manifest's files for the subjects and purpose, HEAD of each (size, ETag) in parallel; any
   missing key stops the fetch before a byte is transferred, with the keys named;
3. the local copies: each checked (size, then MD5 unless the fetch state vouches for it: see
   :mod:`mdlib.fetch.remote`); a wrong or corrupt file is downloaded again, a ``.part`` is continued;
4. the downloads, ``workers`` in parallel, with one progress bar over their bytes;
5. each subject's images from the brick (:mod:`mdlib.fetch.subset`), unless present; a present file whose
   rows fail their checksums has those rows re-fetched, and ``verify`` also compares a sample of its rows
   with the bucket's (the log names what it found, the nsdIds, and the fix);
6. the COCO caption files (:mod:`mdlib.fetch.coco`), unless present.

A dry run writes nothing; with ``verify`` it still hashes every present file and compares the samples, so
``--dry-run --verify`` checks a data root and says what a fetch would mend.

``mdlib fetch`` calls it; docs/fetch.md is its manual.
"""

from __future__ import annotations

import shlex
import tempfile
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mdlib import paths
from mdlib.fetch import coco as _coco
from mdlib.fetch import subset as _subset
from mdlib.fetch.manifest import PURPOSES, STIMULI_CHOICES, Item, NSDManifest, load_manifest
from mdlib.fetch.remote import PART_SUFFIX, FetchError, FetchState, MissingKeyError, RateLimit, RemoteObject, \
    S3Store, check_local, download_file
from mdlib.nsd import layout
from mdlib.progress import bar as progress_bar

_MISSING_HINT = ("The keys come from data_manifest/nsd.yaml for the subjects and sessions asked for: check "
                 "--subject (NSD has subjects 1..8), --last-session, --bucket and --endpoint-url.")


@dataclass
class FetchReport:
    """What a fetch did (or, in a dry run, would do).

    ``entries``: one dict per local file: ``path`` (under the data root), ``source`` (URL), ``kind`` (file,
    subset, coco), ``size`` (bytes; for a subset or COCO member, the size it will have), ``status`` (dry run:
    present, fetch, resume, replace (...), and for a subset repair (N rows) or rewrite (...); after a fetch:
    present, downloaded, replaced, repaired (N rows), rewritten (...)), ``lessons``.
    ``bytes_received`` and ``requests`` count GET requests (ranged or whole) and their bytes; ``head_requests``
    the HEADs.
    """

    data_root: Path
    dry_run: bool
    entries: list[dict[str, Any]] = field(default_factory=list)
    bytes_received: int = 0
    requests: int = 0
    head_requests: int = 0

    def _with(self, *statuses: str) -> list[str]:
        return [e["path"] for e in self.entries if e["status"].split(" ")[0] in statuses]

    @property
    def downloaded(self) -> list[str]:
        """Files written by this fetch (new, resumed, replaced or repaired)."""
        return self._with("downloaded", "replaced", "repaired")

    @property
    def replaced(self) -> list[str]:
        """Files that were there but wrong (size or checksum) and were written again, or, for a subject's
        image file, had their damaged rows re-fetched (repaired)."""
        return self._with("replaced", "repaired")

    @property
    def repaired(self) -> list[str]:
        """Subject image files of which only the damaged rows were re-fetched."""
        return self._with("repaired")

    @property
    def rewritten(self) -> list[str]:
        """Subject image files an older mdlib wrote, given row checksums by a local rewrite."""
        return self._with("rewritten")

    @property
    def skipped(self) -> list[str]:
        """Files already present and verified."""
        return self._with("present")

    @property
    def total_bytes(self) -> int:
        """The size of every planned file."""
        return int(sum(e["size"] or 0 for e in self.entries))

    @property
    def bytes_to_transfer(self) -> int:
        """Dry run: the bytes a fetch would transfer (about: a subset is counted by its images' bytes)."""
        return int(sum(e.get("to_transfer", 0) for e in self.entries))

    def table(self) -> str:
        lines = [f"{'status':<24} {'size':>10}  path (lessons)"]
        for e in self.entries:
            lessons = ",".join(e["lessons"])
            lines.append(f"{e['status']:<24} {human(e['size']):>10}  {e['path']} ({lessons})")
        return "\n".join(lines)

    def summary(self) -> str:
        if self.dry_run:
            return (f"dry run: {len(self.entries)} files, {human(self.total_bytes)} in all; a fetch would transfer "
                    f"about {human(self.bytes_to_transfer)} to {self.data_root} (nothing was written)")
        rewritten = f", {len(self.rewritten)} given row checksums" if self.rewritten else ""
        repaired = f", {len(self.repaired)} by re-fetching its damaged rows only" if self.repaired else ""
        return (f"{len(self.downloaded)} downloaded ({len(self.replaced)} of them replacing a wrong copy{repaired}), "
                f"{len(self.skipped)} already present{rewritten}; {human(self.bytes_received)} received in "
                f"{self.requests} GET request(s); data root {self.data_root}")


def human(n: int | None) -> str:
    """Bytes in SI units, e.g. 5.42 GB."""
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


class _Bar:
    """A tqdm bar that threads may update."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool) -> None:
        scale = unit == "B"
        self._bar = progress_bar(total=total, desc=desc, unit=unit, unit_scale=scale,
                                 unit_divisor=1000 if scale else 1, progress=enabled and total != 0)
        self._lock = threading.Lock()

    def update(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def fetch_nsd(data_root: str | Path | None = None, subjects: Iterable[int] = (1,), what: str = "minimal", *,
              endpoint_url: str | None = None, bucket: str | None = None, client: Any = None,
              last_session: int | None = None, stimuli: str = "subset", coco: bool = True,
              coco_source: str | None = None, workers: int = 8, retries: int = 3, dry_run: bool = False,
              verify: bool = False, progress: bool = True, manifest: NSDManifest | str | Path | None = None,
              max_gap_rows: int = 2, max_request_bytes: int = 32 << 20, max_rate: float | None = None,
              verify_sample: int = _subset.DEFAULT_SAMPLE, verify_seed: int | None = None,
              log: Callable[[str], None] = print) -> FetchReport:
    """Fetch what ``what`` needs for ``subjects`` into ``data_root`` (default ``$MDLIB_DATA/nsd``).

    Args:
        what: ``"minimal"`` (lessons 01-02: betas of sessions 1-10) or ``"full"`` (every lesson, every session
            the subject completed); ``last_session`` overrides the sessions (1..last_session).
        endpoint_url, bucket, client: where the bucket is (default: AWS, ``natural-scenes-dataset``,
            anonymous); ``client`` is a ready boto3 S3 client.
        stimuli: ``"subset"`` (each subject's images into ``subsets/subjNN_stimuli.hdf5``), ``"brick"`` (the
            whole 39.6 GB brick) or ``"none"``.
        coco, coco_source: extract the COCO caption files from the annotations zip at ``coco_source``
            (default: the manifest's URL; also a local zip or ``s3://bucket/key``).
        workers: parallel transfers. retries: retries after a dropped connection (each resumes).
        max_rate: a cap on the bytes per second received, all transfers together (None: no cap).
        dry_run: list what would be fetched and its size (HEAD requests and a few metadata reads; nothing is
            written). verify: re-hash every present file instead of trusting the fetch state (also in a dry
            run), and compare ``verify_sample`` random rows of each subject's image file, with its first and
            last, with the bucket's (``verify_seed``: the sample's seed; None: a fresh one, logged).

    Returns a :class:`FetchReport`. Raises :class:`MissingKeyError` (naming the keys) before transferring
    anything if the bucket lacks a file, :class:`FetchError` if a transfer fails (run again to resume).
    """
    man = manifest if isinstance(manifest, NSDManifest) else load_manifest(manifest)
    if what not in PURPOSES:
        raise ValueError(f"what must be one of {PURPOSES}, got {what!r}")
    if stimuli not in STIMULI_CHOICES:
        raise ValueError(f"stimuli must be one of {STIMULI_CHOICES}, got {stimuli!r}")
    subjects = sorted({int(s) for s in subjects})
    for s in subjects:
        layout.subj(s)  # validates
    root = paths.data_root(data_root, "nsd").expanduser()
    from mdlib.synth.write import SIDECAR

    if (root / SIDECAR).is_file():
        raise FetchError(f"{root} holds a mini-NSD ({SIDECAR}): fetch the real NSD into another --data-root")
    store = S3Store(bucket or man.bucket, client=client, endpoint_url=endpoint_url, region=man.region,
                    workers=workers, limit=RateLimit(max_rate) if max_rate else None)
    hash_files = not dry_run or verify  # a dry run hashes nothing, unless asked to verify
    fix = _FixCommand(root, endpoint_url, bucket)
    state = FetchState(root, write=not dry_run)
    report = FetchReport(root, dry_run)
    coco_counters: list[Any] = []
    coco_plan = None
    try:
        design, design_fetched = _design(store, root, state, dry_run, verify, retries, hash_files)
        completed = {s: design.completed_sessions(s) for s in subjects}
        items = man.files_for(subjects, what, completed, last_session)
        if stimuli == "brick":
            items.append(Item(key=str(layout.stimuli()), name="stimuli_brick", lessons=tuple(man.stimuli["lessons"]),
                              approx_bytes=int(man.stimuli["source_approx_bytes"])))
        stim_key = str(man.stimuli["source"])
        keys = [i.key for i in items] + ([stim_key] if stimuli == "subset" else [])
        remotes = _head_all(store, keys, workers)
        statuses = _local_statuses(items, remotes, root, state, verify, hash_files, workers, store)
        brick = _LazyBrick(store, remotes.get(stim_key), man.stimuli["dataset"], retries)
        spot = dict(sample=verify_sample, seed=verify_seed, dataset=man.stimuli["dataset"], workers=workers,
                    retries=retries)
        subsets = _plan_subsets(man, design, subjects, remotes.get(stim_key), root, state, verify, hash_files,
                                store, brick, spot, fix, dry_run, log) if stimuli == "subset" else []
        coco_plan = _plan_coco(man, root, state, coco_source or man.coco["url"], verify, dry_run, store,
                               coco_counters) if coco else None

        for item in items:
            remote, status = remotes[item.key], statuses[item.key]
            if design_fetched and item.key == str(layout.expdesign()):
                status = design_fetched
            report.entries.append(_entry(item.key, store.url(item.key), "file", remote.size, status, item.lessons,
                                         _to_transfer(root, item.key, remote, status)))
        for sub in subsets:
            size = sub["size"] if sub["size"] is not None else len(sub["ids"]) * brick().row_bytes
            report.entries.append(_entry(sub["rel"], store.url(stim_key), "subset", size, sub["status"],
                                         tuple(man.stimuli["lessons"]), _subset_transfer(sub, size, brick)))
        if coco_plan is not None:
            for m in coco_plan["members"]:
                report.entries.append(_entry(m["local"], f"{coco_plan['source']}#{m['member']}", "coco", m["size"],
                                             m["status"], tuple(man.coco.get("lessons", ())),
                                             0 if m["status"] == "present" else m["size"] or 0))
        if dry_run:
            _tally(report, [store.counter, *coco_counters])
            log(report.table())
            log(report.summary())
            return report

        _download_all(store, items, remotes, statuses, root, state, report, workers, retries, progress)
        for sub in subsets:
            _build_subset(store, sub, brick, root, state, report, man, workers, retries, progress,
                          max_gap_rows, max_request_bytes)
        if coco_plan is not None:
            _extract_coco(coco_plan, root, state, report, progress, retries, store, coco_counters)
        _tally(report, [store.counter, *coco_counters])
        log(report.summary())
        return report
    finally:
        if coco_plan is not None and coco_plan["zip"] is not None:
            coco_plan["zip"].close()
            coco_plan["raw"].close()
        _tally(report, [store.counter, *coco_counters])


def _tally(report: FetchReport, counters: list[Any]) -> None:
    report.requests = sum(c.requests for c in counters)
    report.bytes_received = sum(c.bytes for c in counters)
    report.head_requests = sum(c.heads for c in counters)


def _entry(path: str, source: str, kind: str, size: int | None, status: str, lessons: Iterable[str],
           to_transfer: int) -> dict[str, Any]:
    return {"path": path, "source": source, "kind": kind, "size": size, "status": status,
            "lessons": list(lessons), "to_transfer": int(to_transfer)}


# -- the design --------------------------------------------------------------------------------------------

def _design(store: S3Store, root: Path, state: FetchState, dry_run: bool, verify: bool, retries: int,
            hash_files: bool):
    """The design, and "downloaded"/"replaced" if this fetched it ("" if it was there): fetched first, since
    it decides the plan; in a dry run read into memory unless present."""
    from mdlib.nsd.design import load_design

    rel = str(layout.expdesign())
    try:
        remote = store.head(rel)
    except MissingKeyError as err:
        raise MissingKeyError(store.bucket, err.keys, _MISSING_HINT) from None
    status = check_local(root / rel, rel, remote, state, verify, hash_files=hash_files, source=store.url(rel))
    if status in ("ok", "unverified"):
        return load_design(root), ""
    if dry_run:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / rel
            path.parent.mkdir(parents=True)
            path.write_bytes(store.read_range(rel, 0, remote.size, remote.etag))
            return load_design(tmp), ""
    download_file(store, remote, root / rel, rel, state, retries=retries, fresh=status != "absent")
    return load_design(root), "downloaded" if status == "absent" else "replaced"


# -- bucket files ----------------------------------------------------------------------------------------

def _head_all(store: S3Store, keys: list[str], workers: int) -> dict[str, RemoteObject]:
    """HEAD every key in parallel; one MissingKeyError naming every missing key."""
    keys = list(dict.fromkeys(keys))

    def head(key: str):
        try:
            return store.head(key)
        except MissingKeyError:
            return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        found = dict(zip(keys, pool.map(head, keys)))
    missing = [k for k, v in found.items() if v is None]
    if missing:
        raise MissingKeyError(store.bucket, missing, _MISSING_HINT)
    return found


def _local_statuses(items: list[Item], remotes: dict[str, RemoteObject], root: Path, state: FetchState,
                    verify: bool, hash_files: bool, workers: int, store: S3Store) -> dict[str, str]:
    """Each file's status: present / fetch / resume / replace (why). Hashing runs in parallel."""
    def status(item: Item) -> str:
        remote = remotes[item.key]
        local = check_local(root / item.key, item.key, remote, state, verify, hash_files=hash_files,
                            source=store.url(item.key))
        if local in ("ok", "unverified"):
            return "present" if local == "ok" else "present (unverified)"
        if local == "absent":
            part = root / (item.key + PART_SUFFIX)
            resumable = part.is_file() and state.part_etag(item.key) == remote.etag and \
                part.stat().st_size <= remote.size
            return f"resume ({human(part.stat().st_size)} here)" if resumable else "fetch"
        return f"replace ({local})"

    with ThreadPoolExecutor(max_workers=max(1, min(workers, 4))) as pool:
        return dict(zip([i.key for i in items], pool.map(status, items)))


def _to_transfer(root: Path, key: str, remote: RemoteObject, status: str) -> int:
    if status.startswith("present"):
        return 0
    if status.startswith("resume"):
        return remote.size - (root / (key + PART_SUFFIX)).stat().st_size
    return remote.size


def _download_all(store: S3Store, items: list[Item], remotes: dict[str, RemoteObject], statuses: dict[str, str],
                  root: Path, state: FetchState, report: FetchReport, workers: int, retries: int,
                  progress: bool) -> None:
    todo = [i for i in items if not statuses[i.key].startswith("present")]
    entries = {e["path"]: e for e in report.entries}
    bar = _Bar(sum(entries[i.key]["to_transfer"] for i in todo), "NSD files", "B", progress)

    stop = threading.Event()  # set on Ctrl-C: the running downloads stop at their next MB, parts kept

    def on_bytes(n: int) -> None:
        if stop.is_set():
            raise FetchError("interrupted: run the fetch again to resume")
        bar.update(n)

    def one(item: Item) -> None:
        status = statuses[item.key]
        download_file(store, remotes[item.key], root / item.key, item.key, state, expected_size=item.size,
                      on_bytes=on_bytes, retries=retries, fresh=status.startswith("replace"))
        entries[item.key]["status"] = "replaced" if status.startswith("replace") else "downloaded"

    failures = []
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = [(i, pool.submit(one, i)) for i in todo]
            try:
                for item, future in futures:
                    err = future.exception()
                    if err is not None:
                        failures.append((item.key, err))
            except KeyboardInterrupt:
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        bar.close()
    if failures:
        if len(failures) == 1:
            raise failures[0][1]
        lines = "\n".join(f"  {key}: {err}" for key, err in failures[:10])
        raise FetchError(f"{len(failures)} of {len(todo)} download(s) failed (the others are complete and in "
                         f"place; run the fetch again to resume):\n{lines}") from failures[0][1]


# -- per-subject stimuli ---------------------------------------------------------------------------------

class _LazyBrick:
    """The brick's layout (:func:`mdlib.fetch.subset.inspect_brick`), read once, when first needed."""

    def __init__(self, store: S3Store, remote: RemoteObject | None, dataset: str, retries: int) -> None:
        self.store, self.remote, self.dataset, self.retries = store, remote, dataset, retries
        self._info: Any = None
        self._lock = threading.Lock()

    def __call__(self) -> Any:
        with self._lock:
            if self._info is None:
                self._info = _subset.inspect_brick(self.store, self.remote, self.dataset, self.retries)
            return self._info


@dataclass
class _FixCommand:
    """The command that mends a subject's image file, for messages: ``mdlib fetch ... --verify``."""

    root: Path
    endpoint_url: str | None
    bucket: str | None

    def __call__(self, subject: int, seed: int | None = None, sample: int | None = None) -> str:
        """The command; with ``seed`` (and ``sample``, if not the default) it draws the same rows again."""
        words = ["mdlib", "fetch", "--subject", str(subject), "--data-root", str(self.root)]
        if self.endpoint_url:
            words += ["--endpoint-url", self.endpoint_url]
        if self.bucket:
            words += ["--bucket", self.bucket]
        words.append("--verify")
        if sample is not None and sample != _subset.DEFAULT_SAMPLE:
            words += ["--verify-sample", str(sample)]
        if seed is not None:
            words += ["--verify-seed", str(seed)]
        return " ".join(shlex.quote(w) for w in words)


def _plan_subsets(man: NSDManifest, design: Any, subjects: list[int], remote: RemoteObject, root: Path,
                  state: FetchState, verify: bool, hash_files: bool, store: S3Store, brick: _LazyBrick,
                  spot: dict[str, Any], fix: _FixCommand, dry_run: bool,
                  log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Each subject's image file: its check (:func:`mdlib.fetch.subset.check_subset`), the status it gives,
    and a log line for anything a user should know (damage found, its nsdIds, and what mends it)."""
    plans = []
    for s in subjects:
        rel = man.stimuli_local(s)
        ids = np.unique(np.asarray(design.subjectim[s - 1], dtype=np.int64) - 1)
        check = _subset.check_subset(root / rel, rel, remote, ids, state, verify=verify, hash_files=hash_files,
                                     spot=_subset.SpotCheck(store, remote, brick, **spot) if verify else None)
        if check.status in ("ok", "unverified"):
            status = "present" if check.status == "ok" else "present (unverified)"
        elif check.status == "absent":
            part = root / (rel + PART_SUFFIX)
            status = "resume" if part.is_file() else "fetch"
        elif check.status == "damaged":
            status = f"repair ({len(check.rows)} rows)"
        elif check.status == "rewrite":
            status = f"rewrite ({check.reason})"
        else:
            status = f"replace ({check.reason or check.status})"
        message = _describe(rel, s, ids, check, fix, dry_run, verify, spot["sample"])
        if message:
            log(message)
        size = (root / rel).stat().st_size if status.startswith(("present", "repair", "rewrite")) else None
        plans.append({"subject": s, "rel": rel, "ids": ids, "remote": remote, "status": status, "size": size,
                      "check": check})
    return plans


def _describe(rel: str, subject: int, ids: np.ndarray, check: Any, fix: _FixCommand, dry_run: bool,
              verify: bool, sample: int) -> str:
    """One line on what the check of a subject's image file found and what is (or would be) done about it."""
    rows, names = check.rows, _subset.name_ids(ids[check.rows])
    compared = f"the {check.compared} rows compared with the bucket (seed {check.seed})"
    if check.status == "damaged":
        return (f"{rel}: {len(rows)} row(s) fail their checksums (they changed on disk after they were fetched): "
                f"nsdIds {names}. " + (f"Fix: `{fix(subject)}` re-fetches these rows only." if dry_run else
                                       "Re-fetching these rows only; the other rows are kept."))
    if check.status == "differs":
        return (f"{rel}: {len(rows)} of {compared} differ from its rows: nsdIds {names}. They were altered in "
                "transit when the file was fetched, and rows not compared may be too. "
                + (f"Fix: `{fix(subject, check.seed, sample)}` fetches the file again." if dry_run else
                   "Fetching the file again; the current one stays in place until the new one is complete."))
    if check.status == "rewrite" and check.old:
        return (f"{rel}: written by an older mdlib, without row checksums; its MD5 matches the one recorded when "
                f"it was fetched and {compared} equal the bucket's. "
                + (f"`{fix(subject)}` adds row checksums (a local rewrite; nothing is transferred)." if dry_run
                   else "Adding row checksums (a local rewrite; nothing is transferred)."))
    if check.status == "rewrite":
        return (f"{rel}: every row matches its checksum, but the file's other bytes (HDF5 metadata) differ from "
                "the ones recorded. " + (f"`{fix(subject)}` rewrites it from its own rows (nothing is "
                                         "transferred)." if dry_run else
                                         "Rewriting it from its own rows (nothing is transferred)."))
    if check.status == "corrupt":
        return f"{rel}: {check.reason}: " + ("a fetch would fetch it again." if dry_run else "fetching it again.")
    if check.status == "ok" and check.old:
        return (f"{rel}: no row checksums (written by an older mdlib): `{fix(subject)}` compares it with the "
                "bucket and adds them.")
    if check.status == "ok" and verify and check.compared:
        return f"{rel}: every row matches its checksum, and {compared} equal the bucket's."
    return ""


def _subset_transfer(sub: dict[str, Any], size: int, brick: _LazyBrick) -> int:
    """Bytes a subject's image file would transfer (about: rows, not the gaps read through)."""
    status = sub["status"]
    if status.startswith(("present", "rewrite")):
        return 0
    if status.startswith("repair"):
        return len(sub["check"].rows) * brick().row_bytes
    return size


def _build_subset(store: S3Store, sub: dict[str, Any], brick: _LazyBrick, root: Path, state: FetchState,
                  report: FetchReport, man: NSDManifest, workers: int, retries: int, progress: bool,
                  max_gap_rows: int, max_request_bytes: int) -> None:
    status, rel, check = sub["status"], sub["rel"], sub["check"]
    if status.startswith("present"):
        return
    entry = next(e for e in report.entries if e["path"] == rel)
    path, dataset = root / rel, man.stimuli["dataset"]
    if status.startswith("repair"):
        try:
            _subset.repair_rows(store, sub["remote"], brick(), path, rel, sub["ids"], check.rows, state,
                                dataset=dataset, workers=workers, retries=retries)
        except FetchError as err:
            raise FetchError(f"{rel}: re-fetching the rows with nsdIds {_subset.name_ids(sub['ids'][check.rows])} "
                             f"failed; the other rows are intact and the next run checks the file again. {err}"
                             ) from err
        entry["status"] = f"repaired ({len(check.rows)} rows)"
        return
    bar = _Bar(len(sub["ids"]), f"{layout.subj(sub['subject'])} images", "img", progress)
    try:
        if status.startswith("rewrite"):
            _subset.add_row_checksums(store, sub["remote"], sub["ids"], path, rel, state, subject=sub["subject"],
                                      on_rows=bar.update)
        else:
            _subset.build_subset(store, sub["remote"], sub["ids"], path, rel, state, info=brick(),
                                 subject=sub["subject"], dataset=dataset, workers=workers, retries=retries,
                                 max_gap_rows=max_gap_rows, max_request_bytes=max_request_bytes,
                                 on_rows=bar.update)
    finally:
        bar.close()
    if status.startswith("rewrite"):
        entry["status"] = "rewritten (row checksums added)" if check.old else "replaced (rewritten locally)"
    else:
        entry["status"] = "replaced" if status.startswith("replace") else "downloaded"
    entry["size"] = path.stat().st_size


# -- COCO captions ---------------------------------------------------------------------------------------

def _plan_coco(man: NSDManifest, root: Path, state: FetchState, source: str, verify: bool, dry_run: bool,
               store: S3Store, counters: list) -> dict[str, Any]:
    members = man.coco_members()
    local = _coco.local_status(root, members, state, source, verify)
    plan = {"source": source, "members": [], "zip": None, "raw": None}
    sizes: dict[str, int] = {}
    if any(v != "ok" for v in local.values()):
        zf, raw, counter = _coco.open_zip(source, store)
        plan["zip"], plan["raw"] = zf, raw
        if counter is not None:
            counters.append(counter)
        try:
            sizes = _coco.member_sizes(zf, members, source)
        except FetchError:
            zf.close()
            raw.close()
            raise
    for m in members:
        status = {"ok": "present", "absent": "fetch", "check": "check"}[local[m["local"]]]
        size = (root / m["local"]).stat().st_size if status == "present" else sizes.get(m["local"])
        plan["members"].append({**m, "status": status, "size": size})
    return plan


def _extract_coco(plan: dict[str, Any], root: Path, state: FetchState, report: FetchReport, progress: bool,
                  retries: int, store: S3Store, counters: list) -> None:
    todo = [m for m in plan["members"] if m["status"] != "present"]
    if not todo:
        return
    bar = _Bar(sum(m["size"] or 0 for m in todo), "COCO captions", "B", progress)
    try:
        written = _coco.extract_members(plan["zip"], todo, root, state, plan["source"], on_bytes=bar.update)
    finally:
        bar.close()
    before = {m["local"]: m["status"] for m in todo}
    for e in report.entries:
        if e["kind"] == "coco" and e["path"] in before:
            if e["path"] not in written:
                e["status"] = "present"
            else:
                e["status"] = "replaced" if before[e["path"]] == "check" else "downloaded"
