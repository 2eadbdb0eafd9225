"""mini-NSD's behavioural files: NSD's ``responses.tsv``, one per subject, from a simulated old/new task.

In NSD each image is shown for 3 s every 4 s, and the subject presses button 1 if the image is new to the
experiment and button 2 if it was shown before (a continuous recognition task). ``responses.tsv``
(``nsddata/ppdata/subjNN/behav/responses.tsv``) holds one row per stimulus trial the subject did, in
presentation order, with the columns :data:`mdlib.nsd.design.RESPONSE_COLUMNS`; docs/data.md ("Behaviour:
responses.tsv") describes them. This module writes that file for mini-NSD's design:

- which image each trial showed, its session and its repeat come from the design (``73KID``, ``10KID``,
  ``SESSION``, ``ISOLD``, ``MEMORYRECENT``, ``MEMORYFIRST``, ``ISOLDCURRENT``: computed, not drawn);
- runs and trial numbers follow NSD's layout (12 runs of 63 and 62 stimulus trials in a 750-trial session;
  a shorter session gets proportionally fewer runs), and ``TIME`` (days from midnight of the first session's
  day) places trials 4 s apart with blank trials between some of them, runs a few minutes apart and
  sessions days apart;
- the answers are drawn: the chance of answering "old" to a repeated image decays with the number of trials
  since its last presentation (recent repeats are recognised far better than old ones), the chance of a
  false alarm rises slowly over the experiment; some trials get no answer, a few a change of mind; reaction
  times are log-normal, faster for confident hits.

Everything is drawn from a generator of its own, ``numpy.random.default_rng((seed, 301, subject))``, so the
behaviour depends only on the seed, the design and the subject, and adding it left every other mini-NSD file
unchanged.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mdlib.nsd import layout

#: NSD's columns, in the file's order (the same tuple as ``mdlib.nsd.design.RESPONSE_COLUMNS``).
COLUMNS = ("SUBJECT", "SESSION", "RUN", "TRIAL", "73KID", "10KID", "TIME", "ISOLD", "ISCORRECT", "RT",
           "CHANGEMIND", "MEMORYRECENT", "MEMORYFIRST", "ISOLDCURRENT", "ISCORRECTCURRENT", "TOTAL1", "TOTAL2",
           "BUTTON", "MISSINGDATA")
#: How each column is written: whole numbers (``NaN`` where a value is missing) or decimals.
_FLOAT_FORMATS = {"TIME": "%.10f", "RT": "%.3f"}

_TRIAL_SECONDS = 4.0  # NSD: 3 s image, 1 s gap
_NSD_RUN_TRIALS = 62.5  # NSD: 750 stimulus trials in 12 runs of 63 (odd runs) and 62 (even runs)
_SLOTS_PER_TRIAL = 1.2  # NSD: 75 trial slots per run, the rest blank
_SECONDS_PER_DAY = 86400.0
_SEED_STREAM = 301  # the generator's key: (seed, 301, subject); no other mini-NSD stream uses 301


def run_lengths(trials_per_session: int) -> list[int]:
    """Stimulus trials in each run of a session: NSD's 12 runs of 63, 62, 63, ... for 750 trials; a session of
    another length is cut into ``round(T / 62.5)`` runs (at least 1), odd runs taking the extra trials."""
    n_trials = int(trials_per_session)
    n_runs = max(1, int(round(n_trials / _NSD_RUN_TRIALS)))
    base, extra = divmod(n_trials, n_runs)
    order = list(range(0, n_runs, 2)) + list(range(1, n_runs, 2))  # 0-based: odd runs (1, 3, ...) first
    lengths = [base] * n_runs
    for k in order[:extra]:
        lengths[k] += 1
    return lengths


def memory_columns(masterordering: np.ndarray, trials_per_session: int) -> dict[str, np.ndarray]:
    """The design's side of the task, for every trial (0-based t) of ``masterordering`` (1-based columns):
    ``ISOLD`` (shown before), ``MEMORYRECENT`` (stimulus trials between t and the image's most recent earlier
    showing; NaN if none), ``MEMORYFIRST`` (trials between t and its first showing, only for a third or later
    showing, else NaN: on a second showing the first is the most recent) and ``ISOLDCURRENT`` (shown before
    in t's session)."""
    mo = np.asarray(masterordering).ravel()
    n = mo.size
    recent = np.full(n, np.nan)
    first = np.full(n, np.nan)
    old_current = np.zeros(n, np.int64)
    last_seen: dict[int, int] = {}
    first_seen: dict[int, int] = {}
    for t, column in enumerate(mo.tolist()):
        if column in last_seen:
            prev = last_seen[column]
            recent[t] = t - prev - 1
            if first_seen[column] != prev:
                first[t] = t - first_seen[column] - 1
            old_current[t] = int(prev // trials_per_session == t // trials_per_session)
        else:
            first_seen[column] = t
        last_seen[column] = t
    return {"ISOLD": (~np.isnan(recent)).astype(np.int64), "MEMORYRECENT": recent, "MEMORYFIRST": first,
            "ISOLDCURRENT": old_current}


def simulate_responses(masterordering: np.ndarray, subjectim: np.ndarray, trials_per_session: int,
                       subject: int, n_sessions: int, seed: int) -> pd.DataFrame:
    """One subject's ``responses.tsv`` table for sessions 1..``n_sessions`` of a design.

    ``masterordering`` (n_trials,) 1-based ``subjectim`` columns, ``subjectim`` (8, n_images) 1-based nsdIds,
    as in nsd_expdesign.mat; ``trials_per_session`` a whole number (every session the same length, as in NSD
    and mini-NSD). Returns a DataFrame with :data:`COLUMNS` (NaN where NSD has NaN), one row per trial.
    """
    subject = layout.subject_number(subject)
    T = int(trials_per_session)
    n = int(n_sessions) * T
    mo = np.asarray(masterordering, dtype=np.int64).ravel()
    if not 1 <= n_sessions or n > mo.size:
        raise ValueError(f"n_sessions must be in 1..{mo.size // T} for this design, got {n_sessions}")
    rng = np.random.default_rng((int(seed), _SEED_STREAM, subject))
    columns = mo[:n]
    memory = {k: v[:n] for k, v in memory_columns(mo, T).items()}
    session = np.arange(n) // T + 1
    run, trial = _run_and_trial(n_sessions, T)
    answers = _answers(rng, memory, progress=np.arange(n) / max(1, mo.size - 1), trials_per_session=T)
    time = _trial_times(rng, n_sessions, T)
    table = pd.DataFrame({
        "SUBJECT": np.full(n, subject, np.int64),
        "SESSION": session,
        "RUN": run,
        "TRIAL": trial,
        "73KID": np.asarray(subjectim, dtype=np.int64)[subject - 1, columns - 1],
        "10KID": columns,
        "TIME": time,
        "ISOLD": memory["ISOLD"],
        "ISCORRECT": answers["ISCORRECT"],
        "RT": answers["RT"],
        "CHANGEMIND": answers["CHANGEMIND"],
        "MEMORYRECENT": memory["MEMORYRECENT"],
        "MEMORYFIRST": memory["MEMORYFIRST"],
        "ISOLDCURRENT": memory["ISOLDCURRENT"],
        "ISCORRECTCURRENT": answers["ISCORRECTCURRENT"],
        "TOTAL1": answers["TOTAL1"],
        "TOTAL2": answers["TOTAL2"],
        "BUTTON": answers["BUTTON"],
        "MISSINGDATA": np.zeros(n, np.int64),
    })
    return table[list(COLUMNS)]


def responses_tsv(table: pd.DataFrame) -> bytes:
    """The table as NSD's text: a header row, tab-separated, ``\\n`` line ends, whole numbers without a decimal
    point, ``NaN`` for missing values, ``TIME`` with 10 decimals (days) and ``RT`` with 3 (ms)."""
    cells = []
    for name in COLUMNS:
        values = table[name].to_numpy(dtype=float)
        fmt = _FLOAT_FORMATS.get(name, "%d")
        text = np.full(values.shape, "NaN", dtype=object)
        ok = np.isfinite(values)
        text[ok] = [fmt % v for v in values[ok]]
        cells.append(text)
    lines = ["\t".join(COLUMNS)] + ["\t".join(row) for row in zip(*cells)]
    return ("\n".join(lines) + "\n").encode("ascii")


# -- the simulation -----------------------------------------------------------------------------------------
def _run_and_trial(n_sessions: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    """1-based RUN and TRIAL (the stimulus trial within its run) of every trial."""
    lengths = run_lengths(T)
    run = np.concatenate([np.full(length, k + 1) for k, length in enumerate(lengths)])
    trial = np.concatenate([np.arange(1, length + 1) for length in lengths])
    return np.tile(run, n_sessions).astype(np.int64), np.tile(trial, n_sessions).astype(np.int64)


def _trial_times(rng: np.random.Generator, n_sessions: int, T: int) -> np.ndarray:
    """TIME of every trial: days since midnight of the first session's day (MATLAB serial-date units)."""
    lengths = run_lengths(T)
    days = np.concatenate([[0], np.cumsum(rng.integers(3, 11, size=n_sessions - 1))]).astype(float)
    times = []
    for day in days:
        start = day + rng.uniform(0.35, 0.75)  # session start: between 8:24 and 18:00
        for length in lengths:
            n_slots = max(length, int(round(length * _SLOTS_PER_TRIAL)))
            # stimulus trials take `length` of the run's slots; the first slot always shows an image
            slots = np.sort(np.concatenate([[0], 1 + rng.choice(n_slots - 1, size=length - 1, replace=False)]))
            times.append(start + slots * _TRIAL_SECONDS / _SECONDS_PER_DAY)
            start += (n_slots * _TRIAL_SECONDS + rng.uniform(60, 240)) / _SECONDS_PER_DAY  # a break between runs
    return np.concatenate(times)


def _answers(rng: np.random.Generator, memory: dict[str, np.ndarray], progress: np.ndarray,
             trials_per_session: int) -> dict[str, np.ndarray]:
    """Button presses and what follows from them: BUTTON (1 new, 2 old; NaN none), TOTAL1/TOTAL2 (presses of
    each button), CHANGEMIND (1 when both buttons were pressed), ISCORRECT, ISCORRECTCURRENT, RT (ms, to
    the last press)."""
    n = progress.size
    is_old = memory["ISOLD"] == 1
    since = np.nan_to_num(memory["MEMORYRECENT"], nan=0.0)
    # a subject's own memory and bias
    h_long = np.clip(rng.normal(0.58, 0.04), 0.45, 0.7)  # hit rate long after the last showing
    fa_first = np.clip(rng.normal(0.08, 0.02), 0.02, 0.15)  # false alarms at the start ...
    fa_last = fa_first + np.clip(rng.normal(0.10, 0.02), 0.04, 0.16)  # ... and at the end of the experiment
    tau = float(trials_per_session)  # trials over which a repeat's advantage decays (one session)
    p_hit = h_long + (0.96 - h_long) * np.exp(-since / tau) + 0.04 * ~np.isnan(memory["MEMORYFIRST"])
    p_old = np.where(is_old, np.clip(p_hit, 0, 0.99), fa_first + (fa_last - fa_first) * progress)
    says_old = rng.random(n) < p_old
    answered = rng.random(n) >= rng.uniform(0.005, 0.025)
    change = answered & (rng.random(n) < 0.03)
    double = answered & ~change & (rng.random(n) < 0.02)
    final = np.where(says_old, 2, 1)
    presses = {1: np.zeros(n, np.int64), 2: np.zeros(n, np.int64)}
    for b in (1, 2):
        presses[b] += answered & (final == b)  # the final press
        presses[b] += double & (final == b)  # the same button twice
        presses[b] += change & (final != b)  # first the other button
    correct = (final == 2) == is_old
    correct_current = (final == 2) == (memory["ISOLDCURRENT"] == 1)
    # reaction times: a confident hit on a recent repeat is fast, an uncertain answer slow
    median = np.where(is_old & says_old, 650 + 450 * (1 - np.exp(-since / tau)), 950.0)
    median = np.where(correct, median, median * 1.2) + 900 * change
    rt = np.clip(median * np.exp(rng.normal(0, 0.3, n)), 250, 3950)
    nan = np.full(n, np.nan)
    return {
        "BUTTON": np.where(answered, final, nan),
        "TOTAL1": presses[1],
        "TOTAL2": presses[2],
        "CHANGEMIND": np.where(answered, change.astype(float), nan),
        "ISCORRECT": np.where(answered, correct.astype(float), nan),
        "ISCORRECTCURRENT": np.where(answered, correct_current.astype(float), nan),
        "RT": np.where(answered, rt, nan),
    }
