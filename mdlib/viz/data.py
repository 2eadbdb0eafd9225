"""Figures and tables for lesson 01 (notebooks/01_nsd_data.ipynb): NSD's files, design, split and responses.

Every function takes plain arrays or DataFrames (what :mod:`mdlib.nsd` returns) and gives back a pandas
DataFrame or a matplotlib Figure, so the lesson's cells stay one line long and the figures are tested on small
made-up inputs (tests/test_viz_data.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

TRAIN_COLOUR, TEST_COLOUR = "tab:blue", "tab:orange"


# -- tables -------------------------------------------------------------------------------------------------
def file_table(root: str | os.PathLike, files: Mapping[str, str | os.PathLike]) -> pd.DataFrame:
    """One row per file: what it is, its path relative to the data root ``root``, and its size in MB (NaN when
    the file is absent). ``files`` maps a description to a relative path (as :mod:`mdlib.nsd.layout` gives)."""
    from pathlib import Path

    rows = []
    for what, rel in files.items():
        path = Path(root) / str(rel)
        rows.append({"what": what, "path under the data root": str(rel),
                     "MB": round(path.stat().st_size / 1e6, 2) if path.is_file() else np.nan})
    return pd.DataFrame(rows).set_index("what")


def split_table(design, subject: int) -> pd.DataFrame:
    """The papers' split rule (:meth:`mdlib.nsd.design.Design.split`) applied to sessions 1..n for every n the
    subject completed: one row per n (index ``last session``), columns ``train images``, ``test images``,
    ``test trials`` and ``test images with 3 repeats``."""
    rows = {}
    for last in range(1, design.completed_sessions(subject) + 1):
        s = design.split(subject, range(1, last + 1))
        rows[last] = {"train images": s.n_train, "test images": s.n_test, "test trials": len(s.test_trials),
                      "test images with 3 repeats": int((s.n_repeats[s.test_ids] >= 3).sum())}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("last session")


# -- figures ------------------------------------------------------------------------------------------------
def trials_per_session(trials: pd.DataFrame, title: str | None = None):
    """Stacked bars: per session, the trials that showed a training image and those that showed a shared (test)
    image. ``trials``: :meth:`Design.trials` (columns ``session`` and ``shared``). The legend sits above the
    bars, never on them."""
    counts = trials.groupby(["session", "shared"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=[False, True], fill_value=0)
    sessions = counts.index.to_numpy()
    fig, ax = plt.subplots(figsize=(9, 3.2), constrained_layout=True)
    ax.bar(sessions, counts[False], width=0.85, color=TRAIN_COLOUR, label="training images")
    ax.bar(sessions, counts[True], width=0.85, bottom=counts[False], color=TEST_COLOUR,
           label="shared (test) images")
    ax.set_xlabel("session")
    ax.set_ylabel("trials")
    ax.set_xlim(sessions.min() - 0.6, sessions.max() + 0.6)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    if title:
        ax.set_title(title, loc="left")
    ax.legend(loc="lower right", bbox_to_anchor=(1, 1), ncols=2, frameon=False, fontsize=9)
    return fig


def split_growth(table: pd.DataFrame, last_session: int | None = None, title: str | None = None):
    """How the papers' split grows with the session range: training images (left) and test images, all and
    those seen 3 times (right), against the last session included. ``table``: :func:`split_table`;
    ``last_session``: the range this run uses, marked by a dashed line (None: not marked)."""
    x = table.index.to_numpy()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2), sharex=True, constrained_layout=True)
    left.plot(x, table["train images"], marker=".", color=TRAIN_COLOUR)
    right.plot(x, table["test images"], marker=".", color=TEST_COLOUR, label="test images (seen at least once)")
    right.plot(x, table["test images with 3 repeats"], marker=".", ls="--", color=TEST_COLOUR,
               label="test images seen 3 times")
    for ax, what in ((left, "training images"), (right, "test images")):
        ax.set_xlabel("sessions used: 1 to ...")
        ax.set_ylabel(what)
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        if last_session is not None:
            ax.axvline(last_session, color="0.4", ls=":", lw=1.2, label="this run's range")
    left.set_title("train: every non-shared image seen", fontsize=10)
    right.set_title("test: the shared images seen", fontsize=10)
    # One legend for both panels, below them: it never covers a curve.
    handles, labels = right.get_legend_handles_labels()
    fig.legend(left.get_lines()[:1] + handles, ["training images"] + labels, loc="outside lower center",
               ncols=4, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def betas_matrix(responses: np.ndarray, session: int, n_voxels: int = 300, percentile: float = 99.0):
    """One session's single-trial betas as an image: voxels (rows, the first ``n_voxels``) x trials (columns).

    ``responses``: (n_trials, n_vox) percent signal change (:func:`mdlib.nsd.betas.read_session`). The colour
    scale is symmetric about 0 (white = no change) and set from the data: +-the ``percentile`` of |beta| over
    the voxels shown, so only the most extreme 1% saturate.
    """
    shown = np.asarray(responses, dtype=float)[:, :n_voxels].T
    limit = float(np.nanpercentile(np.abs(shown), percentile)) if np.isfinite(shown).any() else 1.0
    limit = limit if limit > 0 else 1.0
    fig, ax = plt.subplots(figsize=(9, 3.4), constrained_layout=True)
    im = ax.imshow(shown, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set_xlabel(f"trial in session {session}")
    ax.set_ylabel(f"voxel (first {shown.shape[0]})")
    fig.colorbar(im, ax=ax, label="beta (% signal change)", extend="both")
    ax.set_title(f"single-trial betas of session {session} (colour limits: the {percentile:g}th percentile of "
                 f"|beta|, {limit:.1f}%)", fontsize=10)
    return fig


def session_drift(raw: np.ndarray, zscored: np.ndarray, session: np.ndarray, title: str | None = None):
    """One voxel over every trial of a session range, before and after z-scoring within each session.

    ``raw`` and ``zscored``: (n_trials,) the voxel's betas in percent signal change and in z-scores, in the
    order the trials were run; ``session``: (n_trials,) the session of each trial. Each panel draws the trials
    as dots and each session's mean as a red segment; the left shows the session-to-session steps (drifts),
    the right the same trials once each session has mean 0 and sd 1.
    """
    session = np.asarray(session)
    t = np.arange(session.size)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), constrained_layout=True)
    panels = ((raw, "beta (% signal change)", "raw betas"),
              (zscored, "beta (z-score within its session)", "z-scored within each session"))
    for ax, (values, ylabel, name) in zip(axes, panels):
        values = np.asarray(values, dtype=float)
        ax.plot(t, values, ".", ms=2, color="0.55", label="one trial")
        for k, s in enumerate(np.unique(session)):
            rows = np.flatnonzero(session == s)
            ax.hlines(values[rows].mean(), rows[0], rows[-1], color="tab:red", lw=2.5,
                      label="session mean" if k == 0 else None)
            if k:
                ax.axvline(rows[0] - 0.5, color="0.85", lw=0.8, zorder=0)
        ax.set_xlabel("trial, in the order run (grey lines: session boundaries)")
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper right", ncols=2, fontsize=9, frameon=False, markerscale=3)
    if title:
        fig.suptitle(title, x=0.01, ha="left", fontsize=11)
    return fig


def reliability_change(before: np.ndarray, after: np.ndarray, before_label: str = "raw",
                       after_label: str = "z-scored within each session", title: str | None = None):
    """Per voxel, split-half reliability (:func:`mdlib.nsd.reliability.split_half_reliability`) before (x) and
    after (y) a preprocessing step, with the diagonal: voxels above it became more reliable. ``before`` and
    ``after``: (n_vox,) correlations."""
    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    fig, ax = plt.subplots(figsize=(4.2, 4.2), constrained_layout=True)
    ax.scatter(before, after, s=10, alpha=0.6, color="tab:purple", linewidths=0)
    finite = np.isfinite(before) & np.isfinite(after)
    lo = float(min(before[finite].min(), after[finite].min(), 0)) if finite.any() else 0.0
    hi = float(max(before[finite].max(), after[finite].max())) if finite.any() else 1.0
    pad = 0.03 * (hi - lo or 1)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1, label="no change")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_aspect("equal")
    ax.set_xlabel(f"split-half reliability, {before_label}")
    ax.set_ylabel(f"split-half reliability, {after_label}")
    above = int((after[finite] > before[finite]).sum())
    ax.set_title(title or f"{above} of {int(finite.sum())} voxels above the diagonal", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    return fig


__all__ = ["betas_matrix", "file_table", "reliability_change", "session_drift", "split_growth", "split_table",
           "trials_per_session"]
