"""Figures and small tables for lesson 03 (decoding z, c and the CLIP features from voxels with ridge).

Each figure function takes arrays (or dicts of arrays keyed by feature family: ``"z"``, ``"c"``,
``"clip_block1"`` ...) and returns a matplotlib Figure; the table functions return pandas DataFrames. Shapes and
units are in each docstring. Brain maps are drawn over the subject's own anatomy (:mod:`mdlib.viz`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

#: Contour colours of the visual areas on the weight maps, in the order the areas are given.
AREA_COLORS = ("#00e5ff", "#7CFC00", "#ff4dd2", "#ffffff", "#ffd400", "#ff7f0e")


# ------------------------------------------------------------------------------------------------- tables

def targets_table(shapes: Mapping[str, Sequence[int]], families: Mapping[str, np.ndarray]):
    """One row per feature family: the shape of one image's feature (``shapes[name]``, e.g. (4, 64, 64) for
    z) and the number of targets decoded (``families[name]``: (n_images, n_targets))."""
    import pandas as pd

    return pd.DataFrame({"shape per image": {k: str(tuple(int(s) for s in shapes[k])) for k in families},
                         "targets decoded": {k: int(np.shape(v)[1]) for k, v in families.items()}})


def summary_table(scores: Mapping[str, np.ndarray], shuffled: Mapping[str, np.ndarray] | None = None,
                  ceiling: Mapping[str, np.ndarray] | None = None):
    """Median test Pearson r over targets, per family: from the fMRI (``scores``: family -> (n_targets,)),
    with the training targets shuffled (``shuffled``, some families) and from the noiseless responses
    (``ceiling``, simulated data only), and the fMRI's share of that ceiling. Columns whose dict is empty or
    None are left out; a family missing from a dict shows NaN."""
    import pandas as pd

    def med(d):
        return {k: float(np.median(d[k])) if k in d else np.nan for k in scores}

    table = pd.DataFrame({"median r (fMRI)": med(scores)})
    if shuffled:
        table["median r (shuffled targets)"] = pd.Series(med(shuffled))
    if ceiling:
        table["median r (noiseless ceiling)"] = pd.Series(med(ceiling))
        table["fMRI / ceiling"] = table["median r (fMRI)"] / table["median r (noiseless ceiling)"]
    table.index.name = "family"
    return table


def means_only(values: np.ndarray, positions: Sequence[int]) -> np.ndarray:
    """``values`` (n_images, *feature shape) with each channel replaced by its mean over ``positions`` (the
    axes of the feature shape that are places: (2, 3) for z's (n, 4, h, w), 1 for a CLIP block's
    (n, tokens, width)), flattened to (n_images, n_targets). What is left is each image's overall colour per
    channel (z) or its mean over tokens (CLIP): a decoder of these few numbers alone."""
    values = np.asarray(values)
    mean = values.mean(axis=tuple(positions), keepdims=True)
    return np.broadcast_to(mean, values.shape).reshape(len(values), -1)


def means_only_table(true: Mapping[str, np.ndarray], pred: Mapping[str, np.ndarray],
                     positions: Mapping[str, Sequence[int]]):
    """How much of each family's median r a decoder of the channel means alone would get (:func:`means_only`).
    ``true``, ``pred``: family -> (n_test, *feature shape), the test images' features and their decoded
    values; ``positions``: family -> the axes of the feature shape that are places. One row per family:
    the median Pearson r over targets (across the test images) of the decoded features, of their channel
    means only, and of the true features' channel means only (the best such a decoder can do)."""
    import pandas as pd

    from mdlib.ridge import pearson_per_target

    rows = {}
    for k, axes in positions.items():
        t = np.asarray(true[k]).reshape(len(true[k]), -1)
        rows[k] = {"decoded": float(np.median(pearson_per_target(t, np.asarray(pred[k]).reshape(len(t), -1)))),
                   "decoded means only": float(np.median(pearson_per_target(t, means_only(pred[k], axes)))),
                   "true means only": float(np.median(pearson_per_target(t, means_only(true[k], axes))))}
    table = pd.DataFrame(rows).T
    table.index.name = "median r"
    return table


def noiseless_responses(truth: Mapping[str, np.ndarray], nsd_ids: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """The simulated brain's noiseless responses (%, (n_images, n_voxels) float32) laid out as a betas matrix:
    rows ``nsd_ids`` (0-based), columns the voxels ``coords`` ((n_voxels, 3) i, j, k). ``truth`` is
    :meth:`mdlib.presets.Preset.truth`'s dict (``signal``, ``signal_voxels``, ``signal_nsd_ids``). Voxels the
    simulation gave no signal stay 0."""
    row = {int(n): k for k, n in enumerate(truth["signal_nsd_ids"])}
    col = {tuple(int(x) for x in c): k for k, c in enumerate(truth["signal_voxels"])}
    have = [(v, col[tuple(int(x) for x in c)]) for v, c in enumerate(coords) if tuple(int(x) for x in c) in col]
    out = np.zeros((len(nsd_ids), len(coords)), dtype=np.float32)
    if have:
        dst, src = (list(t) for t in zip(*have))
        out[:, dst] = truth["signal"][[row[int(n)] for n in nsd_ids]][:, src]
    return out


def visual_areas(labels: np.ndarray, names: Mapping[int, str]) -> dict[str, np.ndarray]:
    """Boolean masks of the visual areas of an ROI label array (any shape, e.g. the (X, Y, Z) volume of
    ``prf-visualrois``), the ventral and dorsal parts of an area joined: labels "V1v" and "V1d" give "V1".
    ``names``: label -> name (:func:`mdlib.nsd.rois.roi_labels`); label 0 and below are not areas. Areas with
    no voxel are left out; the order is that of the labels."""
    labels = np.asarray(labels)
    areas: dict[str, np.ndarray] = {}
    for number, name in sorted(names.items()):
        if number <= 0:
            continue
        area = re.sub(r"(?<=\d)[vd]$", "", name)
        hit = labels == number
        areas[area] = areas[area] | hit if area in areas else hit
    return {k: v for k, v in areas.items() if v.any()}


def weight_by_area(weights: Mapping[str, np.ndarray], areas: Mapping[str, np.ndarray], rest: str = "rest of ROI"):
    """Where each decoder's weight is, area by area. ``weights``: family -> (n_voxels,) non-negative weight per
    voxel (e.g. the summed |w| over its targets); ``areas``: name -> (n_voxels,) bool (the voxels of the
    decoded ROI in each area; the voxels in none of them form ``rest``). Returns a DataFrame, one row per
    family plus a row ``"voxels"``: each area's share of the family's weight (of the ROI's voxels, for
    ``"voxels"``), in [0, 1], each row summing to 1. Areas without a voxel are left out."""
    import pandas as pd

    n = len(next(iter(weights.values())))
    groups = {name: np.asarray(m, bool) for name, m in areas.items()}
    groups[rest] = ~np.any(np.stack(list(groups.values())), axis=0) if groups else np.ones(n, bool)
    groups = {g: m for g, m in groups.items() if m.any()}     # e.g. no rest when the ROI is the areas
    rows = {"voxels": {g: float(m.mean()) for g, m in groups.items()}}
    for fam, w in weights.items():
        w = np.asarray(w, dtype=np.float64)
        rows[fam] = {g: float(w[m].sum() / w.sum()) for g, m in groups.items()}
    table = pd.DataFrame(rows).T
    table.index.name = "share of"
    return table


# ------------------------------------------------------------------------------------------------ figures

def alpha_and_accuracy(alphas: np.ndarray, chosen: Mapping[str, np.ndarray], scores: Mapping[str, np.ndarray]):
    """Two panels. Left: for each family in ``chosen`` (family -> (n_targets,) the alpha leave-one-out picked
    for each target), the fraction of its targets at each alpha of the grid ``alphas`` ((k,), log-spaced).
    Right: the test Pearson r per target of each family in ``scores`` (family -> (n_targets,)) as box plots
    (box: quartiles; whiskers: 1.5 x the interquartile range; outliers not drawn)."""
    alphas = np.asarray(alphas, dtype=float)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 1.3]})
    for name, a in chosen.items():
        a = np.asarray(a, dtype=float)
        left.plot(np.log10(alphas), [np.isclose(a, x).mean() for x in alphas], marker=".", label=name)
    left.set_xlabel("log10 alpha (ridge penalty)")
    left.set_ylabel("fraction of the family's targets")
    left.set_title("alpha chosen by leave-one-out")
    left.legend(fontsize=8, loc="upper left", frameon=False)
    names = list(scores)
    right.boxplot([np.asarray(scores[k])[np.isfinite(scores[k])] for k in names], showfliers=False)
    right.set_xticks(range(1, len(names) + 1), names, rotation=40, ha="right")
    right.axhline(0, color="k", lw=0.5)
    right.set_xlabel("feature family")
    right.set_ylabel("Pearson r per target\n(across the test images)")
    right.set_title("decoding accuracy on the test images")
    fig.tight_layout()
    return fig


def weight_maps(weights: Mapping[str, np.ndarray], mask: np.ndarray, affine: np.ndarray, anat,
                areas: Mapping[str, np.ndarray], cut_coords=None, vmax: float | None = None):
    """One row per family: its decoder's weight per voxel on the subject's anatomy, with the outlines of the
    visual ``areas``.

    Args:
        weights: family -> (n_voxels,) non-negative weight per voxel of ``mask`` (canonical voxel order), e.g.
            the summed |w| over the family's targets. Each row shows it relative to a uniform spread:
            weight / mean weight, so 1 is the weight every voxel would carry if all carried the same.
        mask, affine: (X, Y, Z) bool, the decoded ROI; (4, 4) its affine (``Betas.mask``, ``Betas.affine``).
        anat: the background, a NIfTI on the same grid (:func:`mdlib.nsd.rois.load_anatomy`).
        areas: name -> (X, Y, Z) bool, each drawn as an outline (:func:`visual_areas`), in :data:`AREA_COLORS`.
        cut_coords: (x, y, z) mm of the three slices; default: the centre of the areas' voxels.
        vmax: the top of the colour scale (default: the 99th percentile over all rows).
    """
    import nibabel as nib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    from mdlib import viz
    from mdlib.nsd.reliability import volume_from_values

    mask = np.asarray(mask, bool)
    rel = {k: np.asarray(w, dtype=np.float64) / np.mean(w) for k, w in weights.items()}
    if vmax is None:
        vmax = float(np.percentile(np.concatenate(list(rel.values())), 99))
    if cut_coords is None:
        cut_coords = _area_cut(areas, mask, affine)
    n = len(rel)
    row_h, foot = 2.6, 0.55
    height = n * row_h + foot
    fig = plt.figure(figsize=(9.5, height))
    for i, (name, values) in enumerate(rel.items()):
        bottom = (foot + (n - 1 - i) * row_h) / height
        display = viz.voxel_map(volume_from_values(values, mask, affine), anat, vmax=vmax, vmin=0.0,
                                threshold=1e-6 * vmax, cut_coords=cut_coords, colorbar=False, figure=fig,
                                axes=(0.10, bottom, 0.76, row_h / height * 0.96), draw_cross=False)
        for (area, m), color in zip(areas.items(), AREA_COLORS):
            display.add_contours(nib.Nifti1Image(np.asarray(m, np.float32), affine), levels=[0.5],
                                 colors=[color], linewidths=1.2)
        fig.text(0.02, bottom + row_h / height / 2, name, rotation=90, va="center", ha="left", fontsize=11,
                 color="black")
    cax = fig.add_axes((0.89, foot / height + 0.03, 0.018, 1 - foot / height - 0.08))
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, vmax), cmap="inferno"), cax=cax)
    bar.set_label("decoder weight / the ROI's mean weight\n(sum of |w| over the family's targets)")
    handles = [Line2D([], [], color=c, lw=2, label=a) for a, c in zip(areas, AREA_COLORS)]
    if handles:
        legend = fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=True,
                            bbox_to_anchor=(0.48, 0.0), title="outlines: visual areas (prf-visualrois)",
                            fontsize=9, title_fontsize=9)
        legend.get_frame().set_facecolor("0.25")
        for text in [*legend.get_texts(), legend.get_title()]:
            text.set_color("white")
    return fig


def _area_cut(areas: Mapping[str, np.ndarray], mask: np.ndarray, affine: np.ndarray) -> tuple[float, float, float]:
    """(x, y, z) mm through the areas: y and z at the centre of their voxels, x at the centre of those in the
    left hemisphere (x below the ROI's centre), so the sagittal slice cuts cortex, not the midline."""
    import nibabel as nib

    where = np.any(np.stack([np.asarray(m, bool) for m in areas.values()]), axis=0) if areas else mask
    xyz = nib.affines.apply_affine(affine, np.argwhere(where))
    centre = nib.affines.apply_affine(affine, np.argwhere(mask)).mean(0)
    left = xyz[xyz[:, 0] < centre[0]]
    x = (left if len(left) else xyz)[:, 0].mean()
    return float(x), float(xyz[:, 1].mean()), float(xyz[:, 2].mean())


def weight_by_area_figure(table):
    """Bar chart of :func:`weight_by_area`'s table: for each family, each area's share of the decoder's
    weight divided by its share of the voxels. 1 (the dashed line): the area carries as much weight as it has
    voxels; above 1, the decoder leans on it."""
    fams = [i for i in table.index if i != "voxels"]
    ratio = table.loc[fams] / table.loc["voxels"]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    width = 0.8 / max(1, len(fams))
    x = np.arange(len(table.columns))
    for j, fam in enumerate(fams):
        ax.bar(x + (j - (len(fams) - 1) / 2) * width, ratio.loc[fam].to_numpy(), width, label=fam)
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.set_xticks(x, [f"{c}\n({100 * table.loc['voxels', c]:.0f}% of voxels)" for c in table.columns], fontsize=8)
    ax.set_ylabel("share of the weight /\nshare of the voxels")
    ax.set_title("where each decoder's weight is, area by area")
    top = float(np.nanmax(ratio.to_numpy())) if ratio.size else 1.0
    ax.set_ylim(0, max(1.5, top * 1.25))
    ax.legend(title="decoder", fontsize=8, title_fontsize=8, ncol=len(fams), loc="upper left", frameon=False)
    fig.tight_layout()
    return fig


def latent_grid(stimuli: np.ndarray, z_true: np.ndarray, z_pred: np.ndarray, img_true: np.ndarray,
                img_pred: np.ndarray, channel: int = 0):
    """Five rows, one column per test image: the stimulus ((n, H, W, 3) uint8); channel ``channel`` of its
    true and of its decoded latent z ((n, 4, h, w), one shared colour scale, with a colorbar); and what the VAE
    decoder draws from each ((n, 3, H', W') floats in [0, 1], clipped)."""
    n = len(stimuli)
    lat_t, lat_p = np.asarray(z_true)[:, channel], np.asarray(z_pred)[:, channel]
    lo, hi = np.percentile(np.concatenate([lat_t.ravel(), lat_p.ravel()]), [1, 99])
    rows = [("stimulus", list(stimuli)), (f"true z\n(channel {channel})", list(lat_t)),
            (f"decoded z\n(channel {channel})", list(lat_p)),
            ("VAE(true z)", [np.clip(np.transpose(i, (1, 2, 0)), 0, 1) for i in img_true]),
            ("VAE(decoded z)", [np.clip(np.transpose(i, (1, 2, 0)), 0, 1) for i in img_pred])]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.7 * n + 1.6, 1.75 * len(rows)), squeeze=False)
    for i, (label, panels) in enumerate(rows):
        for j, p in enumerate(panels):
            ax = axes[i, j]
            im = ax.imshow(p, cmap="viridis", vmin=lo, vmax=hi) if p.ndim == 2 else ax.imshow(p)
            if p.ndim == 2:
                latent_image = im
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
        axes[i, 0].set_ylabel(label, fontsize=9)
    fig.subplots_adjust(left=0.09, right=0.86, top=0.97, bottom=0.02, wspace=0.05, hspace=0.08)
    top, bottom = axes[1, -1].get_position(), axes[2, -1].get_position()
    cax = fig.add_axes((0.88, bottom.y0, 0.015, top.y1 - bottom.y0))
    fig.colorbar(latent_image, cax=cax).set_label(f"latent value (channel {channel})", fontsize=9)
    return fig


__all__ = ["AREA_COLORS", "alpha_and_accuracy", "latent_grid", "means_only", "means_only_table",
           "noiseless_responses", "summary_table", "targets_table", "visual_areas", "weight_by_area",
           "weight_by_area_figure", "weight_maps"]
