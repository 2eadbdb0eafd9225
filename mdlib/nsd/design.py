"""NSD's experimental design: which image each trial showed, in which session, and the train/test split.

``nsd_expdesign.mat`` (docs/data.md, "The design") holds three 1-based arrays:

- ``masterordering`` (1, n_trials): trial t (0-based) showed the image in column ``masterordering[t]`` of
  ``subjectim``; one sequence shared by all eight subjects.
- ``subjectim`` (8, n_images): the 1-based nsdIds each subject saw; its first ``n_shared`` columns are the
  shared images, the same for every subject.
- ``sharedix`` (1, n_shared): the 1-based nsdIds of the shared images.

So for subject s (1-based) and trial t (0-based)::

    nsdId (0-based) = subjectim[s-1, masterordering[t] - 1] - 1
    shared (test)   = masterordering[t] <= n_shared

Sessions are 1-based and consecutive blocks of trials (750 each in NSD, fewer in mini-NSD); a trial's
*volume* is its 0-based position in its session, i.e. the index along the 4th axis of that session's betas
file. Every size is read from the file: the same code reads the real NSD (30,000 trials, 40 sessions,
10,000 images per subject, 1,000 shared) and mini-NSD.

Session selections (``sessions=`` below) are ``None`` (every session the subject completed) or an iterable
of 1-based session numbers: ``range(1, 38)`` is sessions 1..37, the reconstruction papers' setting.

The design file does not say how many sessions each subject completed (NSD: 40, 40, 32, 30, 40, 32, 40, 30).
:meth:`Design.completed_sessions` reads it from the subject's behavioural record, ``responses.tsv`` (one row per
trial the subject did; :func:`load_responses`), when the data root has it, and otherwise scales NSD's counts
to the design's number of sessions, the rule mini-NSD is written with (docs/data.md, "Sessions completed").

Taught in ``notebooks/01_nsd_data.ipynb``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io

from mdlib.nsd import layout

#: The columns of :meth:`Design.trials`, in order.
TRIAL_COLUMNS = ("trial", "session", "volume", "image_index", "nsd_id", "shared", "repeat")

#: The columns of NSD's ``responses.tsv``, in the file's order (docs/data.md, "Behaviour: responses.tsv").
RESPONSE_COLUMNS = ("SUBJECT", "SESSION", "RUN", "TRIAL", "73KID", "10KID", "TIME", "ISOLD", "ISCORRECT", "RT",
                    "CHANGEMIND", "MEMORYRECENT", "MEMORYFIRST", "ISOLDCURRENT", "ISCORRECTCURRENT", "TOTAL1",
                    "TOTAL2", "BUTTON", "MISSINGDATA")
#: Columns of ``responses.tsv`` that are never empty and hold whole numbers.
_WHOLE_RESPONSE_COLUMNS = ("SUBJECT", "SESSION", "RUN", "TRIAL", "73KID", "10KID")

_N_SUBJECTS = len(layout.ALL_SUBJECTS)


@dataclass(eq=False)
class Design:
    """The NSD design, as read from ``nsd_expdesign.mat`` (all values kept 1-based, as in the file).

    Attributes:
        masterordering: (n_trials,) int; 1-based column of ``subjectim`` shown on each trial.
        subjectim: (8, n_images) int; 1-based nsdIds of each subject's images (row s-1 = subject s).
        sharedix: (n_shared,) int; 1-based nsdIds of the shared images.
        trials_per_session: (n_sessions,) int; the number of trials in each session (750 in NSD).
        source: the file it was read from (used in error messages), or None.
        data_root: the data root it was read from (where :meth:`completed_sessions` looks for each subject's
            ``responses.tsv``), or None.
    """

    masterordering: np.ndarray
    subjectim: np.ndarray
    sharedix: np.ndarray
    trials_per_session: np.ndarray
    source: Path | None = None
    data_root: Path | None = None
    _repeat: np.ndarray = field(init=False, repr=False)
    _completed: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.masterordering = np.asarray(self.masterordering, dtype=np.int64).ravel()
        self.subjectim = np.asarray(self.subjectim, dtype=np.int64)
        self.sharedix = np.asarray(self.sharedix, dtype=np.int64).ravel()
        self.trials_per_session = np.asarray(self.trials_per_session, dtype=np.int64).ravel()
        _check_invariants(self)
        self._repeat = _presentation_numbers(self.masterordering)

    # -- sizes ---------------------------------------------------------------------------------------
    @property
    def n_trials(self) -> int:
        return int(self.masterordering.size)

    @property
    def n_sessions(self) -> int:
        return int(self.trials_per_session.size)

    @property
    def n_images(self) -> int:
        """Images per subject (10,000 in NSD)."""
        return int(self.subjectim.shape[1])

    @property
    def n_shared(self) -> int:
        """Shared images, the test set of reconstruction papers (1,000 in NSD)."""
        return int(self.sharedix.size)

    @property
    def session_starts(self) -> np.ndarray:
        """(n_sessions,) 0-based global trial number of each session's first trial."""
        return np.concatenate([[0], np.cumsum(self.trials_per_session)[:-1]])

    def completed_sessions(self, subject: int) -> int:
        """How many sessions ``subject`` (1..8) completed (they are sessions 1..that number).

        The subject's ``responses.tsv`` under :attr:`data_root`, when present, is the record: its highest
        ``SESSION``. Without it, NSD's count (40, 40, 32, 30, 40, 32, 40, 30) scaled to this design's number of
        sessions (:func:`scaled_sessions_completed`): NSD's own count for NSD's 40-session design, and what
        mini-NSD writes for its shorter ones. :meth:`completed_sessions_source` says which one applied.

        Raises:
            ValueError: ``responses.tsv`` is unreadable or lists a session the design does not have.
        """
        return self._completed_record(subject)[0]

    def completed_sessions_source(self, subject: int) -> str:
        """Where :meth:`completed_sessions` took its number from: the ``responses.tsv`` path, or a sentence
        naming the scaling rule."""
        return self._completed_record(subject)[1]

    def _completed_record(self, subject: int) -> tuple[int, str]:
        _check_subject(subject)
        subject = int(subject)
        path = None if self.data_root is None else Path(self.data_root) / str(layout.behav_responses(subject))
        stamp = None
        if path is not None and path.is_file():
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self._completed.get(subject)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        if stamp is None:
            found = (scaled_sessions_completed(subject, self.n_sessions),
                     f"NSD's {layout.NSD_SESSIONS_COMPLETED[subject]} of {_NSD_SESSIONS} sessions scaled to the "
                     f"design's {self.n_sessions} (no {layout.behav_responses(subject)} under the data root)")
        else:
            last = _last_session(path, subject)
            if last > self.n_sessions:
                raise ValueError(f"{path}: lists session {last}, but the design ({self.source or 'design'}) has "
                                 f"{self.n_sessions} sessions; are they from the same dataset?")
            found = (last, str(path))
        self._completed[subject] = (stamp, found)
        return found

    # -- the trial table -----------------------------------------------------------------------------
    def trials(self, subject: int, sessions: Iterable[int] | None = None) -> pd.DataFrame:
        """One row per trial of ``subject`` in ``sessions``, in presentation order.

        Args:
            subject: 1..8.
            sessions: None for every session the subject completed, or an iterable of 1-based session
                numbers (``range(1, 38)`` = sessions 1..37).

        Returns:
            DataFrame with columns
            ``trial`` (0-based global trial number, 0..n_trials-1),
            ``session`` (1-based),
            ``volume`` (0-based index within the session = 4th-axis index into that session's betas file),
            ``image_index`` (the 1-based ``masterordering`` value, a column of ``subjectim``),
            ``nsd_id`` (0-based nsdId = row of ``nsd_stimuli.hdf5``),
            ``shared`` (bool: one of the shared/test images, ``image_index <= n_shared``),
            ``repeat`` (0-based: the image's 0th, 1st or 2nd presentation, counted over the whole experiment).
        """
        chosen = self._resolve_sessions(subject, sessions)
        session = np.repeat(np.arange(1, self.n_sessions + 1), self.trials_per_session)
        trial = np.flatnonzero(np.isin(session, chosen))
        image_index = self.masterordering[trial]
        return pd.DataFrame({
            "trial": trial,
            "session": session[trial],
            "volume": trial - self.session_starts[session[trial] - 1],
            "image_index": image_index,
            "nsd_id": self.subjectim[int(subject) - 1, image_index - 1] - 1,
            "shared": image_index <= self.n_shared,
            "repeat": self._repeat[trial],
        })

    def split(self, subject: int, sessions: Iterable[int] | None = None) -> Split:
        """The reconstruction papers' train/test split of the images ``subject`` saw in ``sessions``.

        Train = the unique non-shared nsdIds shown in the sessions; test = the unique shared nsdIds shown in
        them. With sessions 1..37 of the real design this is 8,859 / 982 images (2,770 test trials); with all
        40 sessions 9,000 / 1,000. ``sessions`` as in :meth:`trials`.
        """
        table = self.trials(subject, sessions)
        return Split(
            subject=int(subject),
            sessions=tuple(int(s) for s in np.unique(table["session"])),
            train_ids=np.unique(table.loc[~table["shared"], "nsd_id"].to_numpy()),
            test_ids=np.unique(table.loc[table["shared"], "nsd_id"].to_numpy()),
            trials=table,
            n_repeats=table.groupby("nsd_id")["trial"].count().rename("n_repeats"),
        )

    def _resolve_sessions(self, subject: int, sessions: Iterable[int] | None) -> np.ndarray:
        """The sorted 1-based session numbers selected, checked against what ``subject`` completed."""
        last = self.completed_sessions(subject)
        if sessions is None:
            return np.arange(1, last + 1)
        if isinstance(sessions, (int, np.integer, str, bytes)):
            hint = f"; for sessions 1..{sessions} write range(1, {sessions + 1})" if \
                isinstance(sessions, (int, np.integer)) else ""
            raise TypeError(f"sessions must be None or an iterable of 1-based session numbers, got "
                            f"{sessions!r}{hint}")
        chosen = np.asarray(list(sessions))
        if chosen.size == 0:
            raise ValueError("sessions is empty: give at least one 1-based session number")
        if not np.issubdtype(chosen.dtype, np.integer):
            raise TypeError(f"session numbers must be integers (1-based); got {list(chosen)!r}")
        bad = chosen[(chosen < 1) | (chosen > last)]
        if bad.size:
            raise ValueError(
                f"subject {subject} has sessions 1..{last} (session numbers are 1-based; the design has "
                f"{self.n_sessions} sessions, and the sessions completed come from "
                f"{self.completed_sessions_source(subject)}); got {sorted(set(bad.tolist()))}")
        return np.unique(chosen)


@dataclass(eq=False)
class Split:
    """A train/test split of one subject's images (see :meth:`Design.split`).

    Attributes:
        subject: 1..8.
        sessions: the 1-based sessions the split was made from.
        train_ids: sorted unique 0-based nsdIds of the non-shared images seen in those sessions.
        test_ids: sorted unique 0-based nsdIds of the shared images seen in those sessions.
        trials: the trial table of those sessions (columns as in :meth:`Design.trials`).
        n_repeats: Series indexed by nsd_id: how many times each image was shown in those sessions (1..3).
    """

    subject: int
    sessions: tuple[int, ...]
    train_ids: np.ndarray
    test_ids: np.ndarray
    trials: pd.DataFrame
    n_repeats: pd.Series

    @property
    def n_train(self) -> int:
        return int(self.train_ids.size)

    @property
    def n_test(self) -> int:
        return int(self.test_ids.size)

    @property
    def train_trials(self) -> pd.DataFrame:
        return self.trials[~self.trials["shared"]]

    @property
    def test_trials(self) -> pd.DataFrame:
        return self.trials[self.trials["shared"]]

    def __repr__(self) -> str:
        return (f"Split(subject={self.subject}, sessions={_compact(self.sessions)}, train={self.n_train} images "
                f"({len(self.train_trials)} trials), test={self.n_test} images ({len(self.test_trials)} trials))")


def load_design(data_root: str | os.PathLike) -> Design:
    """Read ``nsddata/experiments/nsd/nsd_expdesign.mat`` under ``data_root`` and check NSD's invariants.

    Session lengths: the column sums of ``basiccnt`` (3, n_sessions) when the file has it and they add up to
    the number of trials (750 each in NSD, fewer in mini-NSD); otherwise NSD's 750 trials per session.

    Raises:
        FileNotFoundError: the file is absent (the message names the NSD path and how to get it).
        ValueError: the file is unreadable, or breaks NSD's structure (the message names the file).
    """
    path = layout.require(data_root, layout.expdesign())
    mat = _loadmat(path)
    missing = [k for k in ("masterordering", "subjectim", "sharedix") if k not in mat]
    if missing:
        raise ValueError(f"{path}: not an NSD design file, missing variable(s) {missing}")
    masterordering = _as_ints(mat["masterordering"], "masterordering", path).ravel()
    return Design(
        masterordering=masterordering,
        subjectim=_as_ints(mat["subjectim"], "subjectim", path),
        sharedix=_as_ints(mat["sharedix"], "sharedix", path).ravel(),
        trials_per_session=_session_lengths(mat, masterordering.size, path),
        source=path,
        data_root=Path(data_root),
    )


def scaled_sessions_completed(subject: int, n_sessions: int) -> int:
    """NSD's sessions completed by ``subject`` (``layout.NSD_SESSIONS_COMPLETED``) scaled from NSD's 40 to a
    design of ``n_sessions``: ``max(1, round(n_sessions * count / 40))``. NSD's own count when ``n_sessions`` is
    40; mini-NSD is written with this rule (12 sessions: 12 for subjects 1, 2, 5, 7, 10 for 3 and 6, 9 for 4
    and 8)."""
    _check_subject(subject)
    return max(1, int(round(int(n_sessions) * layout.NSD_SESSIONS_COMPLETED[int(subject)] / _NSD_SESSIONS)))


def load_responses(data_root: str | os.PathLike, subject: int) -> pd.DataFrame:
    """NSD's behavioural record of ``subject``: ``nsddata/ppdata/subjNN/behav/responses.tsv``.

    One row per stimulus trial the subject did, in presentation order (row k of sessions 1..n is the design's
    trial k), with NSD's columns as in the file (:data:`RESPONSE_COLUMNS`) and its conventions: ``73KID`` and
    ``10KID`` are 1-based (``73KID - 1`` is mdlib's nsdId, ``10KID`` the design's ``image_index``), ``SESSION``,
    ``RUN`` and ``TRIAL`` 1-based, ``TIME`` in days, ``RT`` in ms, ``BUTTON`` 1 (new) or 2 (old), NaN where the
    subject pressed nothing. docs/data.md, "Behaviour: responses.tsv", describes every column.

    Raises:
        FileNotFoundError: the file is absent (the message names the NSD path and how to get it).
        ValueError: it is not NSD's responses.tsv (columns missing, ids not whole numbers, another subject).
    """
    _check_subject(subject)
    path = layout.require(data_root, layout.behav_responses(subject))
    table = _read_tsv(path)
    missing = [c for c in RESPONSE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(table.columns)}. This is not NSD's "
                         f"responses.tsv (tab-separated, a header row) or it was cut short: re-download it")
    for column in _WHOLE_RESPONSE_COLUMNS:
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(float)
        if values.size and (not np.all(np.isfinite(values)) or not np.all(values == np.round(values))
                            or values.min() < 1):
            raise ValueError(f"{path}: {column} must hold whole numbers >= 1 on every row (1-based, as in NSD)")
        table[column] = values.astype(np.int64)
    others = sorted(set(table["SUBJECT"].tolist()) - {int(subject)})
    if others:
        raise ValueError(f"{path}: the file of subject {subject} holds rows of subject(s) {others}")
    return table


# -- helpers -----------------------------------------------------------------------------------------------
_NSD_SESSIONS = max(layout.NSD_SESSIONS_COMPLETED.values())  # NSD's design: 40 sessions


def _read_tsv(path: Path, usecols=None) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep="\t", usecols=usecols)
    except ValueError as err:  # includes EmptyDataError, ParserError and "usecols do not match columns"
        raise ValueError(f"{path}: cannot read it as NSD's responses.tsv (tab-separated, a header row; "
                         f"re-download it): {type(err).__name__}: {err}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a text file ({err}); re-download it") from err


def _last_session(path: Path, subject: int) -> int:
    """The highest SESSION in a responses.tsv (only that column is read)."""
    sessions = pd.to_numeric(_read_tsv(path, usecols=["SESSION"])["SESSION"], errors="coerce").to_numpy(float)
    if sessions.size == 0 or not np.all(np.isfinite(sessions)) or not np.all(sessions == np.round(sessions)) \
            or sessions.min() < 1:
        raise ValueError(f"{path}: SESSION must hold 1-based session numbers on every row (subject {subject}'s "
                         "record of the sessions completed); re-download it")
    return int(sessions.max())


def _loadmat(path: Path) -> dict:
    try:
        return scipy.io.loadmat(str(path))
    except Exception as err:  # scipy raises MatReadError, OSError, ValueError, IndexError... on bad files
        raise ValueError(f"{path}: cannot read this MATLAB file (truncated or corrupt? re-download it): "
                         f"{type(err).__name__}: {err}") from err


def _as_ints(values: np.ndarray, name: str, path: Path) -> np.ndarray:
    """MATLAB stores the design as doubles: check they are whole numbers and return int64."""
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.number) or values.size == 0:
        raise ValueError(f"{path}: {name} must be a non-empty numeric array, got dtype {values.dtype}, "
                         f"shape {values.shape}")
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
        raise ValueError(f"{path}: {name} must hold whole numbers (1-based indices)")
    return values.astype(np.int64)


def _session_lengths(mat: dict, n_trials: int, path: Path) -> np.ndarray:
    """Trials per session: the column sums of ``basiccnt`` if consistent, else NSD's fixed 750."""
    if "basiccnt" in mat:
        per_session = _as_ints(mat["basiccnt"], "basiccnt", path)
        per_session = per_session.sum(axis=0) if per_session.ndim == 2 else per_session.ravel()
        if per_session.sum() == n_trials and np.all(per_session > 0):
            return per_session
    per = layout.NSD_TRIALS_PER_SESSION
    if n_trials % per:
        raise ValueError(f"{path}: {n_trials} trials is not a whole number of {per}-trial sessions, and the "
                         "file has no basiccnt (3, n_sessions) whose column sums give the session lengths")
    return np.full(n_trials // per, per, dtype=np.int64)


def _check_invariants(design: Design) -> None:
    """NSD's structure: 8 subjects; indices in range; each subject's first n_shared images are sharedix."""
    where = design.source if design.source is not None else "design"
    mo, im, shared = design.masterordering, design.subjectim, design.sharedix
    if im.ndim != 2 or im.shape[0] != _N_SUBJECTS:
        raise ValueError(f"{where}: subjectim must have shape ({_N_SUBJECTS}, n_images), got {im.shape}")
    if mo.size == 0 or mo.min() < 1 or mo.max() > im.shape[1]:
        raise ValueError(f"{where}: masterordering values must lie in 1..{im.shape[1]} (columns of subjectim, "
                         f"1-based); found {mo.min() if mo.size else 'none'}..{mo.max() if mo.size else ''}")
    if im.min() < 1:
        raise ValueError(f"{where}: subjectim holds 1-based nsdIds, found a value {im.min()} < 1")
    if shared.size > im.shape[1] or not np.array_equal(im[:, :shared.size], np.broadcast_to(shared, (
            _N_SUBJECTS, shared.size))):
        raise ValueError(f"{where}: each subject's first {shared.size} images (subjectim[s, :n_shared]) must "
                         "equal sharedix")
    for s, row in enumerate(im, start=1):
        if np.unique(row).size != row.size:
            raise ValueError(f"{where}: subject {s} is listed with the same nsdId twice in subjectim")
    if design.trials_per_session.sum() != mo.size or np.any(design.trials_per_session < 1):
        raise ValueError(f"{where}: session lengths {design.trials_per_session.tolist()} do not add up to "
                         f"the {mo.size} trials")


def _presentation_numbers(masterordering: np.ndarray) -> np.ndarray:
    """0-based count of earlier trials showing the same image, for every trial."""
    return pd.Series(masterordering).groupby(masterordering).cumcount().to_numpy(np.int64)


def _check_subject(subject: int) -> None:
    if isinstance(subject, bool) or not isinstance(subject, (int, np.integer)) or \
            int(subject) not in layout.ALL_SUBJECTS:
        raise ValueError(f"NSD has subjects 1..{_N_SUBJECTS}; got subject {subject!r}")


def _compact(sessions: tuple[int, ...]) -> str:
    """'1-37' for a contiguous run, else the list."""
    if sessions and list(sessions) == list(range(sessions[0], sessions[-1] + 1)):
        return f"{sessions[0]}-{sessions[-1]}"
    return str(list(sessions))
