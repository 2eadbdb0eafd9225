"""Lesson 07's figures, tables and printed sentences: a new subject decoded from a small amount of its data
(:mod:`mdlib.transfer`; docs/new_subject.md).

- the design: :func:`design_figure` (per session, the images of the subject's own, the shared ones, those an
  alignment can use; the test images left) and :func:`design_sentence`;
- the decoded features' accuracy: :func:`summary_table` (methods x z, c and the CLIP families' mean),
  :func:`accuracy_figure` (every family), :func:`accuracy_long` (one row per amount, method and family),
  :func:`curve_figure` (quality against sessions, the number of test images of each amount on its tick) and
  the sentences :func:`verdicts`, :func:`verdict_sentences`, :func:`curve_sentence`;
- the reconstructions: :func:`reconstruction_figure` (a labelled row per method, a column per test image) and
  :func:`metric_sentences`.

Every figure function takes arrays or DataFrames and returns a matplotlib Figure; every sentence function
returns a ``str`` to print, so that a lesson's prose never quotes the numbers of another run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import numpy as np
import pandas as pd

from mdlib.transfer import METHOD_TITLES, METHODS

#: The summary's columns: z, c, and "CLIP", the mean of the CLIP families' medians (blocks 1-6 and embedding).
SUMMARY_FAMILIES = ("z", "c", "CLIP")
#: The methods fitted on the small amount of data (all but the full-data baseline).
HOUR_METHODS = ("align", "shared", "scratch")
#: One colour per method, the same in every figure; "full", the ceiling, in black.
COLOURS = {"align": "C0", "shared": "C2", "scratch": "C1", "full": "k"}
#: Row labels of the reconstruction grid.
ROW_LABELS = {"align": "align (to the references)", "shared": "shared (space of the references)",
              "scratch": "scratch (ridge on the hour)", "full": "full (all its data)"}


def _clip_families(columns) -> list[str]:
    return [c for c in columns if str(c).startswith("clip_")]


def _sessions(k: int) -> str:
    """'1 session', '4 sessions'."""
    return f"{int(k)} session{'' if int(k) == 1 else 's'}"


def _short_family(family: str) -> str:
    return family.replace("clip_", "CLIP ").replace("block", "block ")


# ---------------------------------------------------------------------------------------------- the design

def design_figure(per_session: pd.DataFrame, amounts: Sequence[int] = (), subject: int | None = None):
    """NSD's design for a new subject, per session: left, bars of the images of its own (``other_images``), the
    shared images (``shared_images``) and, if the column is there, those every reference saw too
    (``usable_shared_images``: the alignment pairs); right, the shared images left to test on after its first k
    sessions (``test_images_left``), with the ``amounts`` (numbers of sessions) marked and labelled.

    ``per_session``: :func:`mdlib.transfer.shared_per_session` (indexed by session)."""
    sessions = per_session.index.to_numpy()
    cols = [("other_images", "images of its own", "0.65"), ("shared_images", "shared images", "C3")]
    if "usable_shared_images" in per_session.columns:
        cols.append(("usable_shared_images", "shared, seen by every reference\n(alignment pairs)", "C0"))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.9), layout="constrained",
                                      gridspec_kw={"width_ratios": [1.6, 1]})
    width = 0.8 / len(cols)
    for j, (col, label, colour) in enumerate(cols):
        left.bar(sessions + (j - (len(cols) - 1) / 2) * width, per_session[col], width, color=colour, label=label)
    left.set_xlabel("session")
    left.set_ylabel("distinct images in the session")
    left.set_xticks(sessions[:: max(1, int(np.ceil(len(sessions) / 20)))])
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=len(cols), frameon=False)
    who = f"subject {subject}" if subject is not None else "the new subject"
    left.set_title(f"what each session of {who} holds", fontsize=10)
    right.plot(sessions, per_session["test_images_left"], "o-", color="C3", ms=3)
    for k in amounts:
        if k in per_session.index:
            n = int(per_session.loc[k, "test_images_left"])
            right.plot([k], [n], "o", color="k", ms=6)
            right.annotate(f"{n}", (k, n), textcoords="offset points", xytext=(5, 4), fontsize=8)
    right.set_ylim(0, None)
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("the new subject's data: its first k sessions")
    right.set_ylabel("shared images left to test on")
    right.set_title("the common test set shrinks", fontsize=10)
    return fig


def design_sentence(per_session: pd.DataFrame, amounts: Sequence[int], subject: int,
                    references: Sequence[int] = ()) -> str:
    """The design's numbers for this run, in sentences: what session 1 holds, the mean per session, and the
    test images left after each amount of sessions."""
    first = per_session.iloc[0]
    s1 = int(per_session.index[0])
    lines = [f"Session {s1} of subject {subject} holds {int(first['other_images'])} images of its own and "
             f"{int(first['shared_images'])} shared images"
             + (f", {int(first['usable_shared_images'])} of which every reference ({', '.join(map(str, references))}) "
                "saw too: the pairs an alignment can be fitted on." if "usable_shared_images" in per_session.columns
                else ".")]
    lines.append(f"Over its {len(per_session)} sessions: {per_session['other_images'].mean():.1f} images of its own "
                 f"and {per_session['shared_images'].mean():.1f} shared images per session on average.")
    left = [f"{int(per_session.loc[k, 'test_images_left'])} after {_sessions(k)}" for k in amounts
            if k in per_session.index]
    if left:
        lines.append(f"Shared images left to test on: {', '.join(left)} (of "
                     f"{int(per_session['cumulative_shared_images'].iloc[-1])} it saw in all).")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ accuracy

def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """Methods x (``z``, ``c``, ``CLIP``): the median r of z and c as they are, and ``CLIP`` the mean of the
    CLIP families' medians (``clip_*`` columns). ``table``: :meth:`mdlib.transfer.TransferResult.table`
    (methods x families). Columns whose families are absent are left out."""
    out = pd.DataFrame(index=table.index)
    for f in ("z", "c"):
        if f in table.columns:
            out[f] = table[f]
    clip = _clip_families(table.columns)
    if clip:
        out["CLIP"] = table[clip].mean(axis=1)
    return out


def accuracy_long(results: Mapping[int, object]) -> pd.DataFrame:
    """One row per (amount, method, family) of several :class:`mdlib.transfer.TransferResult` (``results``:
    number of sessions -> result): columns ``sessions``, ``method``, ``family`` (the families and the
    summary's ``CLIP``), ``median_r``, ``n_test``, ``n_hour_images``, ``n_align``."""
    rows = []
    for k, res in results.items():
        table = res.table()
        summary = summary_table(table)
        for m in table.index:
            values = {**table.loc[m].to_dict(), **({"CLIP": summary.loc[m, "CLIP"]} if "CLIP" in summary else {})}
            for f, r in values.items():
                rows.append({"sessions": int(k), "method": m, "family": f, "median_r": float(r),
                             "n_test": int(res.split.test_ids.size), "n_hour_images": int(res.split.hour_ids.size),
                             "n_align": int(res.split.align_ids.size)})
    return pd.DataFrame(rows)


def accuracy_figure(table: pd.DataFrame, n_test: int, sessions: int = 1):
    """Every family's median r (``table``: methods x families, :meth:`TransferResult.table`), one group of bars
    per family, one bar per method, the full-data baseline hatched. The title gives the amount and the number
    of test images; the legend sits below the axes."""
    families = list(table.columns)
    methods = list(table.index)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 * len(families) + 2), 3.8), layout="constrained")
    x = np.arange(len(families))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        ax.bar(x + (j - (len(methods) - 1) / 2) * width, table.loc[m], width, color=COLOURS.get(m, f"C{j}"),
               alpha=0.35 if m == "full" else 1.0, hatch="//" if m == "full" else None, edgecolor="k" if m == "full"
               else None, label=f"{m}: {METHOD_TITLES.get(m, m)}")
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xticks(x, [_short_family(f) for f in families], fontsize=8)
    ax.set_ylabel("median r over the family's features\n(across the test images)")
    ax.set_title(f"decoding accuracy with {_sessions(sessions)} of the new subject, on {n_test} test images",
                 fontsize=10)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig


def curve_figure(long: pd.DataFrame, families: Sequence[str] = SUMMARY_FAMILIES):
    """Quality against the amount of the new subject's data: one panel per family (``z``, ``c``, ``CLIP``), x the
    number of sessions, one line per method; the full-data baseline dashed, scored on the same test images at
    each amount, so that its changes show what the test set alone does. Each tick says how many test images
    that amount leaves. ``long``: :func:`accuracy_long`."""
    families = [f for f in families if f in set(long["family"])]
    amounts = sorted(set(long["sessions"]))
    n_test = long.groupby("sessions")["n_test"].first()
    fig, axes = plt.subplots(1, len(families), figsize=(3.6 * len(families), 3.6), squeeze=False,
                             layout="constrained", sharey=False)
    for ax, f in zip(axes[0], families):
        part = long[long["family"] == f]
        for m in [m for m in METHODS if m in set(part["method"])]:
            rows = part[part["method"] == m].sort_values("sessions")
            ax.plot(rows["sessions"], rows["median_r"], "--" if m == "full" else "o-", color=COLOURS.get(m),
                    ms=4, label=f"{m}: {METHOD_TITLES.get(m, m)}")
        ax.set_xticks(amounts, [f"{k}\n({int(n_test[k])} test)" for k in amounts], fontsize=8)
        ax.set_xlabel("sessions of the new subject (test images)", fontsize=9)
        ax.set_ylabel("median r")
        ax.set_title("CLIP (mean of its families)" if f == "CLIP" else f, fontsize=10)
        ax.axhline(0, color="0.3", lw=0.8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    fig.suptitle("decoding accuracy against the amount of the new subject's data", fontsize=11)
    return fig


def verdicts(summary: pd.DataFrame) -> dict[str, bool]:
    """Yes/no answers from one amount's :func:`summary_table`, keyed ``"<a> beats <b> on <family>"``: each
    method that uses the references against ``scratch``, and ``full`` against every hour method."""
    out = {}
    for f in summary.columns:
        for m in ("shared", "align"):
            if {m, "scratch"} <= set(summary.index):
                out[f"{m} beats scratch on {f}"] = bool(summary.loc[m, f] > summary.loc["scratch", f])
        if "full" in summary.index:
            hour = [m for m in HOUR_METHODS if m in summary.index]
            out[f"full beats every hour method on {f}"] = bool(all(summary.loc["full", f] > summary.loc[m, f]
                                                                   for m in hour))
    return out


def verdict_sentences(summary: pd.DataFrame, n_test: int, sessions: int = 1) -> str:
    """One amount's results in sentences, family by family: the best method fitted on the small amount, what
    the references add to ridge from scratch, and how much of the gap to the full data it closes."""
    lines = [f"With {_sessions(sessions)}, on the same {n_test} test images for every method (median r):"]
    for f in summary.columns:
        col = summary[f]
        hour = [m for m in HOUR_METHODS if m in col.index]
        best = max(hour, key=lambda m: col[m])
        text = f"  {f}: best of the small-data methods is {best} ({col[best]:.3f})"
        if "scratch" in col.index:
            for m in ("shared", "align"):
                if m in col.index:
                    d = col[m] - col["scratch"]
                    text += f"; {m} {'beats' if d > 0 else 'does not beat'} scratch ({col[m]:.3f} vs {col['scratch']:.3f})"
        if "full" in col.index and "scratch" in col.index:
            gap = col["full"] - col["scratch"]
            text += f"; full data: {col['full']:.3f}"
            if gap > 0 and best != "scratch":
                text += f" ({best} closes {100 * (col[best] - col['scratch']) / gap:.0f}% of scratch's gap to it)"
        lines.append(text + ".")
    return "\n".join(lines)


def curve_sentence(long: pd.DataFrame, family: str = "z") -> str:
    """The curve's caveats with this run's numbers: the test images per amount, how far the full-data
    baseline moved (the test set's doing: its decoder is the same at every amount), and how noisy one
    feature's r is on the smallest test set (standard error of Fisher's z, 1 / sqrt(n - 3))."""
    n_test = long.groupby("sessions")["n_test"].first()
    amounts = list(n_test.index)
    lines = ["Test images per amount: " + ", ".join(f"{int(n_test[k])} with {_sessions(k)}" for k in amounts) + "."]
    full = long[(long["method"] == "full") & (long["family"] == family)].set_index("sessions")["median_r"]
    if len(full) > 1:
        lines.append(f"The full-data decoder is the same at every amount, yet its median r for {family} runs from "
                     f"{full.min():.3f} to {full.max():.3f}: that spread is the test sets' doing, not the data's.")
    last, n_last = amounts[-1], int(n_test[amounts[-1]])
    se = 1 / math.sqrt(n_last - 3) if n_last > 3 else math.inf
    lines.append(f"The last point ({_sessions(last)}) rests on {n_last} test images: one feature's r over so few "
                 f"images has a standard error of about {se:.2f} (in Fisher's z), so read its differences "
                 "between methods, on the same images, rather than its level.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- reconstructions

def reconstruction_figure(stimuli: np.ndarray, recon: Mapping[str, np.ndarray], ids: Sequence[int],
                          n_show: int = 8, sessions: int = 1):
    """The stimuli, then one labelled row per method (``recon``: method -> (n, H, W, 3) images, paired with
    ``ids`` and ``stimuli``), a column per test image titled with its nsdId (:func:`mdlib.viz.evaluation.
    image_rows`)."""
    from mdlib.viz.evaluation import image_rows

    rows = {"stimulus": stimuli, **{ROW_LABELS.get(m, m): images for m, images in recon.items()}}
    return image_rows(rows, ids, n_show=n_show,
                      title=f"stage 1 from each method's decoded (z, c), {_sessions(sessions)} of the new subject")


def metric_sentences(table: pd.DataFrame, floor: str = "another test image") -> str:
    """The reconstructions' scores in sentences, metric by metric (the eight-metric table's columns that
    ``table`` has values for: an :func:`mdlib.evaluation.table`, one row per method plus the ``floor`` row): the
    methods best first, and which of them do not beat the floor. Identification is in percent; for the
    correlation distances (EffNet-B, SwAV) lower is better."""
    from mdlib.evaluation import EIGHT_METRICS
    from mdlib.evalnets import METRICS_BY_NAME

    labels = table.attrs.get("labels", {})
    methods = [m for m in table.index if m != floor]
    lines = []
    for metric in EIGHT_METRICS:
        if metric not in table.columns or not table[metric].notna().any():
            continue
        kind = METRICS_BY_NAME[metric].kind if metric in METRICS_BY_NAME else "pixels"
        sign = -1.0 if kind == "distance" else 1.0                       # a distance: lower is better

        def fmt(v, kind=kind):
            return f"{v:.1f}%" if kind == "identification" else f"{v:.3f}"

        order = sorted(methods, key=lambda r: -sign * table.loc[r, metric])
        text = (f"{labels.get(metric, metric)}{' (lower is better)' if sign < 0 else ''}, best first: "
                + ", ".join(f"{r} {fmt(table.loc[r, metric])}" for r in order))
        if floor in table.index:
            f = table.loc[floor, metric]
            below = [r for r in order if not sign * table.loc[r, metric] > sign * f]
            text += f"; {floor}: {fmt(f)}" + (f", not beaten by {', '.join(below)}" if below else
                                               ", beaten by every method")
        lines.append(text + ".")
    return "\n".join(lines)


__all__ = ["COLOURS", "HOUR_METHODS", "ROW_LABELS", "SUMMARY_FAMILIES", "accuracy_figure", "accuracy_long",
           "curve_figure", "curve_sentence", "design_figure", "design_sentence", "metric_sentences",
           "reconstruction_figure", "summary_table", "verdict_sentences", "verdicts"]
