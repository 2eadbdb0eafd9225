"""Resumable state on disk: a long computation's arrays saved as it goes, read back when it starts again.

An algorithm that can be interrupted (stage 2's published optimisation, :func:`mdlib.stage2.guide_published`)
turns its state into named arrays and back; where and how those arrays are kept is decided here, by the
caller, so the algorithm never touches a file. A :class:`StateStore` keeps one run's state as two files in a
folder of its own::

    <folder>/<name>.npz     the arrays, and the run key they belong to (authoritative; written atomically)
    <folder>/<name>.json    a summary for people (progress, cost so far); never read back

The run key is a hash of everything the run's result depends on (:func:`mdlib.stage2.run_key`): a store
refuses the state of another run, so changed inputs or settings never resume from stale state. A run killed
at any moment leaves the previous complete ``.npz`` (:func:`mdlib.record.write_npz_atomic`), so it loses at
most what it computed since the last save. Files get the permissions of an ordinary ``open()``
(:data:`mdlib.record.FILE_MODE`). docs/reconstruct.md ("Seeds, resuming, failures") describes resuming as users
see it.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mdlib.record import write_json_atomic, write_npz_atomic

#: The file name (without suffix) stage 2's published optimisation has always used; runs in progress keep it.
STAGE2_NAME = "stage2_state"
#: The npz entry that holds the run key (a 0-d unicode array).
KEY_ENTRY = "key"


class Store(Protocol):
    """What an algorithm needs of a place to keep its state (:class:`StateStore` is the one on disk)."""

    def load(self, required: Iterable[str] = ()) -> dict[str, np.ndarray] | None: ...

    def save(self, arrays: Mapping[str, Any], summary: Mapping[str, Any]) -> None: ...


#: A function run key -> the store for that run: what :func:`mdlib.stage2.guide_published` takes (``state=``),
#: since only the algorithm knows its run key.
StoreFactory = Callable[[str], Store]


class StateStore:
    """One run's saved state: ``<folder>/<name>.npz`` (arrays and ``key``) and ``<folder>/<name>.json``.

    Args:
        folder: where the two files live (created on the first save).
        key: the run key; :meth:`load` refuses a file saved under another one.
        name: the files' name without suffix (default :data:`STAGE2_NAME`).
    """

    def __init__(self, folder: str | os.PathLike, key: str, name: str = STAGE2_NAME):
        self.folder = Path(folder).expanduser()
        self.key = str(key)
        self.name = name

    @property
    def path(self) -> Path:
        """The authoritative file, ``<folder>/<name>.npz``."""
        return self.folder / f"{self.name}.npz"

    @property
    def summary_path(self) -> Path:
        """The summary for people, ``<folder>/<name>.json``."""
        return self.folder / f"{self.name}.json"

    def __repr__(self) -> str:
        return f"StateStore({str(self.folder)!r}, key={self.key!r}, name={self.name!r})"

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self, required: Iterable[str] = ()) -> dict[str, np.ndarray] | None:
        """The arrays last saved (all read into memory; the run key left out), or None when nothing is saved.

        Raises ``ValueError`` naming the file and the fix when it cannot be read (e.g. truncated by another
        tool), when it holds another run's state, or when it lacks an entry of ``required`` (written by an
        older version of the algorithm). Nothing is deleted: the user decides.
        """
        path = self.path
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path} cannot be read ({err}): delete it to start this run over") from None
        missing = [k for k in (KEY_ENTRY, *required) if k not in arrays]
        if missing:
            raise ValueError(f"{path} was written by an older mdlib (no {', '.join(missing)}): delete it to start "
                             "this run over")
        key = str(arrays.pop(KEY_ENTRY))
        if key != self.key:
            raise ValueError(f"{path} belongs to another run (key {key}, not {self.key}): delete that folder to "
                             "start this run over")
        return arrays

    def save(self, arrays: Mapping[str, Any], summary: Mapping[str, Any]) -> None:
        """Write the arrays (plain numeric or string arrays, no pickles) and the run key to the ``.npz``
        atomically, then ``summary`` (with the key added) to the ``.json``. A save interrupted at any moment
        leaves the previous ``.npz`` whole."""
        if KEY_ENTRY in arrays:
            raise ValueError(f"{KEY_ENTRY!r} is the store's own entry (the run key); name that array otherwise")
        write_npz_atomic(self.path, **{KEY_ENTRY: np.array(self.key)}, **arrays)
        write_json_atomic(self.summary_path, {KEY_ENTRY: self.key, **summary})


@dataclass(frozen=True)
class StoresUnder:
    """A :data:`StoreFactory` that gives each run a folder of its own under ``root``: run key ``k`` ->
    ``StateStore(root / k, k, name)``. The layout stage 2 has always used: ``<root>/<key>/stage2_state.npz``."""

    root: Path
    name: str = STAGE2_NAME

    def __call__(self, key: str) -> StateStore:
        return StateStore(self.root / str(key), key, self.name)


def stores_under(root: str | os.PathLike, name: str = STAGE2_NAME) -> StoresUnder:
    """Keep each run's state in ``<root>/<run key>/<name>.npz`` (+ ``.json``); pass it as
    ``guide_published(..., state=stores_under(folder))``."""
    return StoresUnder(Path(root).expanduser(), name)
