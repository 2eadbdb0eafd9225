"""``data_manifest/nsd.yaml``: which NSD files each lesson needs, per subject and purpose.

:func:`load_manifest` reads and checks it; :meth:`NSDManifest.files_for` expands its key templates for
subjects and sessions into :class:`Item` s (S3 key = path under the data root), and
:meth:`NSDManifest.approx_bytes` adds up its size estimates (docs/fetch.md, "Sizes"). The models are listed in
``data_manifest/models.yaml`` (``mdlib.models.model_manifest``), which ``nsd.yaml`` names but does not repeat.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mdlib.nsd import layout

#: The manifest beside the package in a source checkout (``make setup`` installs mdlib in editable mode).
MANIFEST_PATH = Path(__file__).resolve().parents[2] / "data_manifest" / "nsd.yaml"
#: What ``mdlib fetch --what`` accepts: minimal = lessons 01-02, full = every lesson.
PURPOSES = ("minimal", "full")
#: Where the stimuli come from: the subject's images only (default), the whole brick, or none.
STIMULI_CHOICES = ("subset", "brick", "none")


@dataclass(frozen=True)
class Item:
    """One file to fetch: ``key`` in the bucket, the same path under the data root."""

    key: str
    name: str
    lessons: tuple[str, ...]
    subject: int | None = None
    session: int | None = None
    size: int | None = None          # exact bytes when the manifest knows them
    approx_bytes: int | None = None  # the manifest's estimate


@dataclass(frozen=True)
class NSDManifest:
    """The parsed manifest (see ``data_manifest/nsd.yaml`` for the meaning of each field)."""

    bucket: str
    region: str
    purposes: dict[str, dict[str, Any]]
    files: list[dict[str, Any]]
    stimuli: dict[str, Any]
    coco: dict[str, Any]
    models: Path
    source: Path

    # -- sessions and files ----------------------------------------------------------------------------
    def sessions(self, what: str, completed: int, last_session: int | None = None) -> list[int]:
        """The 1-based sessions ``what`` uses for a subject who completed ``completed`` sessions.

        ``last_session`` (1..completed) overrides the purpose's count: sessions 1..last_session.
        """
        _check_purpose(what)
        if last_session is not None:
            if not 1 <= int(last_session) <= completed:
                raise ValueError(f"last_session must be in 1..{completed} (the sessions this subject completed), "
                                 f"got {last_session}")
            return list(range(1, int(last_session) + 1))
        count = self.purposes[what].get("sessions", "all")
        last = completed if count == "all" else min(int(count), completed)
        return list(range(1, last + 1))

    def files_for(self, subjects: Iterable[int], what: str, completed: Mapping[int, int],
                  last_session: int | None = None) -> list[Item]:
        """The bucket files ``what`` needs for ``subjects`` (shared files once), in manifest order.

        ``completed``: subject -> sessions completed (:meth:`mdlib.nsd.design.Design.completed_sessions`).
        """
        _check_purpose(what)
        subjects = [int(s) for s in subjects]
        items: list[Item] = []
        for entry in self.files:
            if what not in entry["purposes"]:
                continue
            per_subject = "{subj}" in entry["key"]
            for s in subjects if per_subject else [None]:
                for session in self._entry_sessions(entry, what, completed.get(s, 0) if s else 0, last_session):
                    items.append(self._item(entry, s, session))
        return items

    def _entry_sessions(self, entry: Mapping[str, Any], what: str, completed: int,
                        last_session: int | None) -> list[int | None]:
        if "{session}" not in entry["key"]:
            return [None]
        spec = entry.get("sessions", "purpose")
        if spec == "purpose":
            return list(self.sessions(what, completed, last_session))
        return [int(k) for k in spec if int(k) <= completed]

    @staticmethod
    def _item(entry: Mapping[str, Any], subject: int | None, session: int | None) -> Item:
        key = entry["key"].format(subj=layout.subj(subject) if subject else "",
                                  session=f"{session:02d}" if session else "")
        return Item(key=key, name=entry["name"], lessons=tuple(entry.get("lessons", ())), subject=subject,
                    session=session, size=_per_subject(entry.get("size"), subject),
                    approx_bytes=_per_subject(entry.get("approx_bytes"), subject))

    def stimuli_local(self, subject: int) -> str:
        """The per-subject stimulus file under the data root (:func:`mdlib.nsd.layout.subject_stimuli`)."""
        return self.stimuli["local"].format(subj=layout.subj(subject))

    def coco_members(self) -> list[dict[str, Any]]:
        """``[{member, local, approx_bytes}]``: the caption files in the COCO zip and where they go."""
        return [dict(m) for m in self.coco["members"]]

    # -- estimates ---------------------------------------------------------------------------------------
    def approx_bytes(self, subjects: Iterable[int], what: str, stimuli: str = "subset", coco: bool = True,
                     last_session: int | None = None) -> int:
        """The manifest's estimate of what ``mdlib fetch`` writes (bytes), for subjects with known estimates.

        Sessions: NSD's completed counts (``layout.NSD_SESSIONS_COMPLETED``) unless ``last_session``.
        """
        subjects = [int(s) for s in subjects]
        completed = {s: layout.NSD_SESSIONS_COMPLETED[s] for s in subjects}
        total = sum(item.approx_bytes or 0 for item in self.files_for(subjects, what, completed, last_session))
        if stimuli == "subset":
            total += len(subjects) * int(self.stimuli["approx_bytes"])
        elif stimuli == "brick":
            total += int(self.stimuli["source_approx_bytes"])
        if coco:
            total += sum(int(m.get("approx_bytes") or 0) for m in self.coco_members())
        return total


def _per_subject(value: Any, subject: int | None) -> int | None:
    """A number, or {subject: number} (None for a subject it does not list)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        found = value.get(subject) if subject is not None else None
        return None if found is None else int(found)
    return int(value)


def _check_purpose(what: str) -> None:
    if what not in PURPOSES:
        raise ValueError(f"what must be one of {PURPOSES} (minimal: lessons 01-02; full: every lesson), got {what!r}")


def load_manifest(path: str | os.PathLike | None = None) -> NSDManifest:
    """Read and check ``data_manifest/nsd.yaml`` (or ``path``).

    Raises:
        FileNotFoundError: no manifest (mdlib installed without its source checkout: pass ``path``).
        ValueError: a malformed entry (names the entry and the field).
    """
    import yaml

    source = Path(path) if path is not None else MANIFEST_PATH
    if not source.is_file():
        raise FileNotFoundError(f"NSD manifest missing: {source}; run from a checkout of the course repository "
                                "(it is data_manifest/nsd.yaml there) or pass its path")
    with open(source, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if data.get("version") != 1:
        raise ValueError(f"{source}: unknown manifest version {data.get('version')!r} (this mdlib reads 1)")
    purposes = dict(data.get("purposes") or {})
    if set(purposes) != set(PURPOSES):
        raise ValueError(f"{source}: purposes must be {PURPOSES}, found {sorted(purposes)}")
    files = [dict(e) for e in data.get("files") or []]
    for i, entry in enumerate(files):
        name = entry.get("name", f"files[{i}]")
        for field in ("name", "key", "purposes"):
            if field not in entry:
                raise ValueError(f"{source}: entry {name!r} has no {field!r}")
        unknown = set(entry["purposes"]) - set(PURPOSES)
        if unknown:
            raise ValueError(f"{source}: entry {name!r} has unknown purposes {sorted(unknown)}")
        spec = entry.get("sessions", "purpose")
        if spec != "purpose" and not (isinstance(spec, list) and all(isinstance(k, int) for k in spec)):
            raise ValueError(f"{source}: entry {name!r}: sessions must be 'purpose' or a list of ints, got {spec!r}")
    for section, fields in (("stimuli", ("source", "local", "dataset")), ("coco", ("url", "members"))):
        missing = [f for f in fields if f not in (data.get(section) or {})]
        if missing:
            raise ValueError(f"{source}: section {section!r} lacks {missing}")
    return NSDManifest(bucket=str(data["bucket"]), region=str(data.get("region", "us-east-2")),
                       purposes=purposes, files=files, stimuli=dict(data["stimuli"]), coco=dict(data["coco"]),
                       models=source.parent / str(data.get("models", "models.yaml")), source=source)
