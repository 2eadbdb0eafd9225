"""Lesson 06's figures, small tables and printed sentences: the ablation's images and bars, identification per
image, stage 1 on every common test image, where the objects are (simulated scenes only), and the sentences a
lesson prints from a run's own numbers (so that its prose never quotes numbers of another run).

Every figure function takes arrays or the DataFrames of :func:`mdlib.evaluation.table` and returns a matplotlib
Figure (or None where a figure does not apply, said in a printed sentence by the matching ``*_sentences``
function); every sentence function returns a ``str`` to print.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

#: The identification metrics of the eight-metric table, in its order.
IDENTIFICATION_METRICS = ("AlexNet(2)", "AlexNet(5)", "InceptionV3", "CLIP")
#: The ablation's conditions in the order of a bar chart: no layout, stage 1, stage 2 (two modes), the ceiling.
ABLATION_ORDER = ("without z", "without control", "full", "fast", "true (z, c)")
#: The stage-1 conditions (lesson 04's images), scored on every common test image.
STAGE1_CONDITIONS = ("true (z, c)", "without control", "without z")
#: The reference row that scores "no information": each stimulus against another test image.
CHANCE_ROW = "another test image"
#: Our conditions that have a published counterpart (MindDiffuser's Table 2, subject 1, real NSD).
PAPER_ROWS = {"without z": "MindDiffuser, without z", "without control": "MindDiffuser, without control",
              "full": "MindDiffuser, full"}
#: The rows of the method that lesson 06 depends on (:func:`mdlib.method.table`).
METHOD_ROWS = ("roi", "decoder", "posterior", "n_tokens", "clip_normalization", "num_steps", "noise_index",
               "denoise_steps", "guidance_scale", "keep", "select_by", "loss", "cos_weight", "optimizer", "lr",
               "gamma", "iterations", "update", "fresh_noise", "fast_scale", "fast_through_unet")
#: The decoded feature families whose median r the cross-subject table shows.
DECODING_FAMILIES = ("z", "c", "clip_block1", "clip_embedding")
#: The sd of one image's two-way identification (percent) when its features carry no information: at most that
#: of a uniform score on [0, 100], 100 / sqrt(12).
CHANCE_SD = 100 / math.sqrt(12)

_AXIS_LABELS = {"CLIP-cos": "cosine similarity", "SSIM": "SSIM (1 = identical)", "PCC": "Pearson r of the pixels",
                "PixCorr": "Pearson r of the pixels"}


def _label(labels: Mapping[str, str] | None, metric: str) -> str:
    return (labels or {}).get(metric, metric)


def _fmt(metric: str, value: float) -> str:
    if not np.isfinite(value):
        return "n/a"
    return f"{value:.1f}%" if metric in IDENTIFICATION_METRICS else f"{value:.3f}"


# ------------------------------------------------------------------------------------------------- images

def image_rows(rows: Mapping[str, np.ndarray], ids: Sequence[int], n_show: int = 8, size: float = 1.4,
               title: str | None = None):
    """One labelled row of images per entry of ``rows`` (name -> (n, H, W, 3) uint8 or float in [0, 1], paired
    by position with ``ids``), the first ``n_show`` columns, each column titled with its nsdId.

    Every row carries its name on its left (:func:`mdlib.viz.image_grid`'s ``row_labels``). Returns the Figure;
    its first ``len(rows) x min(n_show, n)`` axes are the images, row by row (what
    :func:`mdlib.viz.mark_placement` expects)."""
    from mdlib.viz import image_grid

    k = min(int(n_show), len(ids))
    if k == 0:
        raise ValueError("no images to show")
    flat = [np.asarray(images[j]) for images in rows.values() for j in range(k)]
    titles = [f"nsdId {int(ids[j])}" if r == 0 else "" for r in range(len(rows)) for j in range(k)]
    return image_grid(flat, titles=titles, ncols=k, size=size, title=title, row_labels=list(rows))


def placement_grid(rows: Mapping[str, np.ndarray], ids: Sequence[int], synthetic: bool, n_show: int = 8):
    """:func:`image_rows` with each image's objects marked (:func:`mdlib.viz.mark_placement`: a cross at their
    centroid, a line along their principal axis). Only simulated scenes (``synthetic``, i.e.
    :attr:`mdlib.presets.Preset.synthetic`) have flat objects on a plain background to measure: otherwise
    returns None and draws nothing."""
    from mdlib.viz import mark_placement

    if not synthetic:
        return None
    k = min(int(n_show), len(ids))
    fig = image_rows(rows, ids, n_show=k, title="where the objects are (+) and which way they point (line)")
    mark_placement(fig, [np.asarray(images[j]) for images in rows.values() for j in range(k)])
    return fig


# -------------------------------------------------------------------------------------------------- tables

def decoding_quality(decoded: Mapping[int, object], families: Sequence[str] = DECODING_FAMILIES):
    """A DataFrame, one row per subject (``"subject s"``), one column per family (``"median r, z"`` ...): the
    median over features of the test-set correlation of each decoded family (:attr:`mdlib.decoding.Decoded.r`)."""
    import pandas as pd

    return pd.DataFrame({f"subject {s}": {f"median r, {k}": float(np.nanmedian(d.r[k])) for k in families
                                          if k in d.r}
                         for s, d in decoded.items()}).T


def cross_subject_table(reports: Mapping[str, object], quality):
    """:func:`mdlib.evaluation.table` of the subjects' ``reports`` (view ``"all"``) with the columns of
    ``quality`` (:func:`decoding_quality`, same row names) joined on the right; its header and labels kept."""
    from mdlib.evaluation import table

    scores = table(reports, "all")
    out = scores.join(quality)
    out.attrs.update(scores.attrs)       # a join drops them
    return out


def placement_table(images: Mapping[str, np.ndarray], stimuli: np.ndarray, synthetic: bool):
    """Where the objects are, per condition (:mod:`mdlib.placement`): a DataFrame with one row per entry of
    ``images`` (name -> (n, H, W, 3), paired with ``stimuli``) and the columns ``"position error (image
    sides)"`` (mean distance of the object centroids, fractions of the image side) and ``"axis error
    (degrees)"`` (mean angle between principal axes, 0-90, over the stimuli whose objects have an axis; NaN
    if none has). ``attrs``: ``n_images``, ``n_axes``, ``n_layouts``. None when the scenes are not ``synthetic``.

    Stimuli with a scene-wide layout (a mini-NSD written with ``layout_share`` > 0, docs/mini_world.md, "Scene
    layouts") also get the column ``"region error"`` (:func:`mdlib.placement.layout_errors`, mean over those
    stimuli): the object measures take the median colour for the background, which is then one region's."""
    import pandas as pd

    from mdlib import placement

    if not synthetic:
        return None
    has_layout = placement.fit_boundary(stimuli).found
    rows = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # a mean over no axis is NaN, said in the sentences
        for name, x in images.items():
            rows[name] = {"position error (image sides)": float(np.nanmean(placement.position_error(x, stimuli))),
                          "axis error (degrees)": float(np.nanmean(placement.axis_error(x, stimuli)))}
            if has_layout.any():
                rows[name]["region error"] = float(np.nanmean(
                    placement.layout_errors(x[has_layout], stimuli[has_layout]).region))
    df = pd.DataFrame(rows).T
    df.attrs.update(n_images=len(stimuli), n_axes=int(np.isfinite(placement.axis_error(stimuli, stimuli)).sum()),
                    n_layouts=int(has_layout.sum()))
    return df


# ------------------------------------------------------------------------------------------------- figures

def minddiffuser_bars(table, synthetic: bool, conditions: Sequence[str] = ABLATION_ORDER,
                      chance_row: str = CHANCE_ROW):
    """MindDiffuser's three metrics (``CLIP-cos``, ``SSIM``, ``PCC``: columns of ``table``, an
    :func:`mdlib.evaluation.table` with the ``conditions`` and ``chance_row`` as rows), one panel each, a bar
    per condition and the chance row as a dotted line. Metrics left out (all NaN) get no panel.

    Published bars (MindDiffuser's Table 2, real NSD, subject 1) stand beside ours only when the data are not
    ``synthetic``: numbers of tiny models on simulated scenes are never drawn beside real-NSD numbers. The
    legend sits below the panels, never over the bars."""
    from mdlib.evaluation import MINDDIFFUSER_METRICS, PUBLISHED

    labels = table.attrs.get("labels", {})
    conditions = [c for c in conditions if c in table.index]
    shown = [m for m in MINDDIFFUSER_METRICS if m in table.columns and table[m].notna().any()]
    if not shown:
        raise ValueError("no MindDiffuser metric has a value in this table")
    pub = {p.method: p.values for p in PUBLISHED} if not synthetic else {}
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.4), squeeze=False, layout="constrained")
    x = np.arange(len(conditions))
    width = 0.4 if pub else 0.7
    for ax, m in zip(axes[0], shown):
        ax.bar(x - (width / 2 if pub else 0), [table.loc[c, m] for c in conditions], width, color="C0",
               label="this run")
        if pub:
            ax.bar(x + width / 2, [pub[PAPER_ROWS[c]].get(m, np.nan) if c in PAPER_ROWS else np.nan
                                   for c in conditions], width, hatch="//", color="0.85", edgecolor="0.4",
                   label="published (real NSD, subject 1)")
        if chance_row in table.index:
            ax.axhline(table.loc[chance_row, m], color="C3", ls=":", lw=1.5, label=f"{chance_row} (no information)")
        ax.set_xticks(x, conditions, rotation=30, ha="right", fontsize=8)
        ax.set_title(_label(labels, m), fontsize=10)
        ax.set_ylabel(_AXIS_LABELS.get(m, m))
    handles, names = axes[0, 0].get_legend_handles_labels()
    order = sorted(range(len(names)), key=lambda i: names[i].startswith(chance_row))   # the bars first
    fig.legend([handles[i] for i in order], [names[i] for i in order], loc="outside lower center",
               ncols=len(names), fontsize=8, frameon=False)
    fig.suptitle("MindDiffuser's three metrics, per condition of the ablation", fontsize=11)
    return fig


def identification_boxes(reports: Mapping[str, object], labels: Mapping[str, str] | None = None):
    """Two-way identification per image (percent of the other stimuli beaten), as box plots: one group per
    report (``reports``: name -> :class:`mdlib.evaluation.Report`), one box per identification metric it has.
    Chance (50%) is a dotted line; the legend sits right of the axes. None when no report has an
    identification metric (their networks were left out)."""
    names = list(reports)
    ident = [m for m in IDENTIFICATION_METRICS if any(m in r.per_image for r in reports.values())]
    if not ident:
        return None
    fig, ax = plt.subplots(figsize=(2.0 + 1.1 * len(names) * len(ident) ** 0.5, 3.4), layout="constrained")
    step = len(ident) + 1
    for j, m in enumerate(ident):
        vals = [np.asarray(reports[c].per_image.get(m, [np.nan]), dtype=float) for c in names]
        ax.boxplot(vals, positions=np.arange(len(names)) * step + j, widths=0.8, patch_artist=True,
                   boxprops={"facecolor": f"C{j}", "alpha": 0.5}, medianprops={"color": "k"}, showfliers=False)
    ax.axhline(50, color="0.4", ls=":", lw=1)
    ax.set_xticks(np.arange(len(names)) * step + (len(ident) - 1) / 2, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(-3, 103)
    ax.set_ylabel("two-way identification\nper image (%)")
    ax.set_title("identification, image by image (chance: 50%, dotted)", fontsize=10)
    ax.legend([plt.Rectangle((0, 0), 1, 1, color=f"C{j}", alpha=0.5) for j in range(len(ident))],
              [_label(labels, m) for m in ident], fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def stage1_bars(table, conditions: Sequence[str] = STAGE1_CONDITIONS):
    """Stage 1 on many images: left, two-way identification (%) per condition and identification metric, with
    chance (50%) dotted (no left panel when every identification network was left out); right, PixCorr and
    SSIM. ``table``: :func:`mdlib.evaluation.table` of the ``conditions``. Legends sit right of each panel."""
    labels = table.attrs.get("labels", {})
    conditions = [c for c in conditions if c in table.index]
    ident = [m for m in IDENTIFICATION_METRICS if m in table.columns and table[m].notna().any()]
    n = int(table["images"].max()) if "images" in table.columns else 0
    fig, axes = plt.subplots(1, 2 if ident else 1, figsize=(11 if ident else 5.5, 3.4), squeeze=False,
                             layout="constrained")
    x = np.arange(len(conditions))
    panels = [(axes[0, 0], ident, "two-way identification (%)", "identification (chance: 50%, dotted)")] if ident else []
    panels.append((axes[0, -1], ["PixCorr", "SSIM"], "PixCorr (r) and SSIM", "pixel metrics"))
    for ax, metrics, ylabel, title in panels:
        width = 0.8 / len(metrics)
        for j, m in enumerate(metrics):
            ax.bar(x + (j - (len(metrics) - 1) / 2) * width, [table.loc[c, m] for c in conditions], width,
                   color=f"C{j + (0 if metrics is ident else 4)}", label=_label(labels, m))
        ax.set_xticks(x, conditions, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    axes[0, -1].axhline(0, color="0.3", lw=0.8)                       # PixCorr can be negative
    if ident:
        axes[0, 0].axhline(50, color="0.4", ls=":", lw=1)
        axes[0, 0].set_ylim(0, 100)
    fig.suptitle(f"stage 1 on {n} common test images", fontsize=11)
    return fig


# ----------------------------------------------------------------------------------------------- sentences

def ablation_sentences(table, metrics: Sequence[str] = ("PCC", "SSIM", "CLIP-cos", *IDENTIFICATION_METRICS),
                       baseline: str = "without control") -> str:
    """What the ablation did in this run, from ``table`` (an :func:`mdlib.evaluation.table`, view ``"all"``):
    each condition against stage 1 alone (``baseline``), metric by metric, for the metrics it has."""
    labels = table.attrs.get("labels", {})
    shown = [m for m in metrics if m in table.columns and table[m].notna().any()]
    n = int(table.loc[baseline, "images"]) if "images" in table.columns else None
    lines = [f"In this run ({n} images), against stage 1 alone ({baseline}):" if n else
             f"In this run, against stage 1 alone ({baseline}):"]
    for cond, what in (("full", "published stage 2"), ("fast", "fast stage 2"),
                       ("without z", "no z, text-to-image"), ("true (z, c)", "the ceiling")):
        if cond in table.index:
            changes = ", ".join(f"{_label(labels, m)} {_fmt(m, table.loc[baseline, m])} -> "
                                f"{_fmt(m, table.loc[cond, m])}" for m in shown)
            lines.append(f"  {cond} ({what}): {changes}")
    if CHANCE_ROW in table.index:
        lines.append(f"  {CHANCE_ROW} (no information): "
                     + ", ".join(f"{_label(labels, m)} {_fmt(m, table.loc[CHANCE_ROW, m])}" for m in shown))
    return "\n".join(lines)


def placement_sentences(layout) -> str:
    """What :func:`placement_table` found, in sentences (or why it was not measured, when ``layout`` is None)."""
    if layout is None:
        return ("Placement is measured on simulated scenes only (flat shapes on a plain background); these images "
                "are photographs, so this section is skipped.")
    n, k = layout.attrs.get("n_images"), layout.attrs.get("n_axes")
    pos, ang = "position error (image sides)", "axis error (degrees)"

    n_lay = layout.attrs.get("n_layouts", 0)
    lines = [f"{n} images; {k} of the stimuli have objects with an axis (the axis error counts those only"
             + (")." if k else "; none here, so no axis error).")]
    if n_lay:
        lines.append(f"{n_lay} of the stimuli have a scene-wide layout (a boundary between two large regions): "
                     "on those the object measures are unreliable (they take the median colour, one region's, "
                     "for the background); the region error, the share of the image on the wrong side of the "
                     "stimulus's boundary (0 to 0.5), measures the layout.")
    for row, what in (("true (z, c)", "the stimulus' own (z, c), the img2img ceiling"),
                      ("without control", "the decoded (z, c), stage 1"),
                      ("full", "published stage 2"), ("fast", "fast stage 2"),
                      ("without z", "no z"), (CHANCE_ROW, "chance")):
        if row in layout.index:
            a = layout.loc[row, ang]
            angle = f", axis error {a:.0f} degrees" if np.isfinite(a) else ""
            region = f", region error {layout.loc[row, 'region error']:.3f}" if n_lay else ""
            lines.append(f"  {row} ({what}): position error {layout.loc[row, pos]:.2f} image sides{angle}{region}")
    return "\n".join(lines)


def stage1_sentences(table) -> str:
    """Stage 1 on many images, in sentences: the decoded (z, c)'s identification against chance (with the
    standard error of a chance mean over these images) and what dropping z costs in pixels."""
    labels = table.attrs.get("labels", {})
    n = int(table["images"].max())
    se = CHANCE_SD / math.sqrt(max(n, 1))
    lines = []
    for m in IDENTIFICATION_METRICS:
        if m in table.columns and table[m].notna().any() and "without control" in table.index:
            lines.append(f"By {_label(labels, m)}, stage 1 from the decoded (z, c) identifies its stimulus "
                         f"{table.loc['without control', m]:.1f}% of the time over {n} images; a reconstruction "
                         f"with no information would score 50% give or take {se:.1f} (one standard error).")
    if {"without z", "without control"} <= set(table.index):
        a, b = table.loc["without control"], table.loc["without z"]
        lines.append(f"Dropping z (without z) changes PixCorr from {a['PixCorr']:.3f} to {b['PixCorr']:.3f} "
                     f"and SSIM from {a['SSIM']:.3f} to {b['SSIM']:.3f}.")
    return "\n".join(lines)


def cross_subject_sentences(cross, metrics: Sequence[str] = ("PCC", "SSIM", "CLIP"),
                            quality: str = "median r, z") -> str:
    """The subjects ranked by how well their z decodes (``quality``, a column of ``cross``) and by each metric
    of ``metrics`` that ``cross`` has (best first), and whether the orders agree."""
    labels = cross.attrs.get("labels", {})
    if len(cross) < 2:
        return f"Only {cross.index[0]}: no comparison across subjects."

    def order(col: str) -> list[str]:
        return list(cross[col].sort_values(ascending=False).index)

    lines = ["Best decoded z first (median r): "
             + ", ".join(f"{s} ({cross.loc[s, quality]:.3f})" for s in order(quality))]
    for m in metrics:
        if m in cross.columns and cross[m].notna().any():
            same = "the same order" if order(m) == order(quality) else "a different order"
            lines.append(f"By {_label(labels, m)}, best first: "
                         + ", ".join(f"{s} ({_fmt(m, cross.loc[s, m])})" for s in order(m)) + f": {same}.")
    return "\n".join(lines)


__all__ = ["ABLATION_ORDER", "CHANCE_ROW", "CHANCE_SD", "DECODING_FAMILIES", "IDENTIFICATION_METRICS", "METHOD_ROWS",
           "PAPER_ROWS", "STAGE1_CONDITIONS", "ablation_sentences", "cross_subject_sentences", "cross_subject_table",
           "decoding_quality", "identification_boxes", "image_rows", "minddiffuser_bars", "placement_grid",
           "placement_sentences", "placement_table", "stage1_bars", "stage1_sentences"]
