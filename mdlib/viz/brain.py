"""Figures and tables for lesson 02 (notebooks/02_voxels_nilearn.ipynb): ROIs, voxel reliability, and where
single voxels are, on the subject's own anatomy.

NSD's func1pt8mm volumes are in each subject's own space, not MNI: every map here is drawn over the subject's
``T1_to_func1pt8mm`` (``anat``), never nilearn's MNI template. Positions are in the subject's millimetres
(the volumes' affine, RAS). The general-purpose maps :func:`mdlib.viz.roi_map` and :func:`mdlib.viz.voxel_map`
stay in :mod:`mdlib.viz`; this module adds what the lesson needs beyond them: ROI maps whose colourbar names
the ROIs and whose cuts go through them, and markers drawn in every view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

#: Marker colours for :func:`voxel_locations`, one per voxel, bright on the grey anatomy.
MARKER_COLOURS = ("yellow", "cyan", "magenta", "lime")


# -- where to cut ---------------------------------------------------------------------------------------------
def roi_cuts(mask: np.ndarray, affine: np.ndarray) -> tuple[float, float, float]:
    """Cut coordinates (x, y, z) in mm through an ROI: along each axis, the slice that holds the most of its
    voxels. ``mask``: (X, Y, Z) bool (or labels, > 0 = in the ROI); ``affine``: (4, 4) voxel -> mm, axis-aligned
    as NSD's func1pt8mm grid is. Unlike the centre of mass, which for an ROI in both hemispheres falls
    between them (x = 0, an empty sagittal cut), these slices always go through the ROI (among equally full
    slices, the middle one); an empty mask gives the volume's centre."""
    mask = np.asarray(mask) > 0
    ijk = (np.array(mask.shape, dtype=float) - 1) / 2
    if mask.any():
        for axis in range(3):
            counts = mask.sum(axis=tuple(a for a in range(3) if a != axis))
            best = np.flatnonzero(counts == counts.max())
            ijk[axis] = best[len(best) // 2]          # a tie: the middle one of the fullest slices
    xyz = np.asarray(affine, dtype=float) @ np.r_[ijk, 1.0]
    return tuple(float(v) for v in xyz[:3])


def voxel_mm(coords: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel indices (..., 3) -> positions in the subject's mm (..., 3), through ``affine`` (4, 4)."""
    coords = np.asarray(coords, dtype=float)
    return coords @ np.asarray(affine, dtype=float)[:3, :3].T + np.asarray(affine, dtype=float)[:3, 3]


# -- tables ---------------------------------------------------------------------------------------------------
def roi_size_table(labels: Mapping[str, np.ndarray], names: Mapping[str, Mapping[int, str]]) -> pd.DataFrame:
    """Voxels per ROI: one row per ROI name (in the order the atlases list them), one column per atlas, 0 where
    an atlas has no such ROI. ``labels``: atlas -> (X, Y, Z) int label volume; ``names``: atlas -> the label
    table ``{number: name}`` (:func:`mdlib.nsd.rois.roi_labels`; 0 and below are not ROIs)."""
    counts: dict[str, dict[str, int]] = {}
    for atlas, volume in labels.items():
        values, n = np.unique(np.asarray(volume), return_counts=True)
        found = dict(zip(values.tolist(), n.tolist()))
        counts[atlas] = {name: int(found.get(value, 0)) for value, name in names[atlas].items() if value > 0}
    table = pd.DataFrame(counts).fillna(0).astype(int)
    table.index.name = "ROI"
    return table


# -- brain maps -----------------------------------------------------------------------------------------------
def label_colours(n: int) -> list:
    """``n`` distinct colours for ROI labels: tab20's (pairs of shades, so neighbouring labels such as V1v and
    V1d share a hue) and, past 20, tab20b's darker ones."""
    cols = list(plt.get_cmap("tab20").colors) + list(plt.get_cmap("tab20b").colors)
    return [cols[k % len(cols)] for k in range(n)]


def roi_atlas_map(labels_img, names: Mapping[int, str], anat, title: str | None = None, cut_coords=None,
                  width: float = 11.0):
    """An ROI atlas over the subject's anatomy, three orthogonal cuts, with a colourbar that names the ROIs.

    Args:
        labels_img: a NIfTI image of int labels (-1 / 0: no ROI, 1..N: the atlas' labels), on ``anat``'s grid.
        names: the atlas' label table ``{number: name}`` (:func:`mdlib.nsd.rois.roi_labels`).
        anat: the subject's ``T1_to_func1pt8mm`` (:func:`mdlib.nsd.rois.load_anatomy`).
        title: drawn in the top left corner.
        cut_coords: (x, y, z) mm; None: :func:`roi_cuts`, the slices through most of the atlas' voxels.
        width: inches; the height grows with the number of ROIs so that every name stays legible.

    Returns:
        the Figure; its last axes is the colourbar, one tick per ROI present, labelled with its name.
    """
    import matplotlib.colors as mcolors
    import nibabel as nib
    from nilearn import plotting

    data = np.asanyarray(labels_img.dataobj).astype(np.int64)
    present = [int(v) for v in np.unique(data) if v > 0]
    # Consecutive codes 1..K: one colour per ROI present, whatever the atlas' numbering.
    codes = np.zeros(data.shape, np.int16)
    for k, value in enumerate(present, start=1):
        codes[data == value] = k
    n = max(len(present), 1)
    cmap = mcolors.ListedColormap(label_colours(n))
    if cut_coords is None:
        cut_coords = roi_cuts(data > 0, labels_img.affine)
    height = max(3.6, 0.15 * n + 1.2)
    head = 0.4 / height                      # a band above the cuts for the title: it never covers the brain
    fig = plt.figure(figsize=(width, height), facecolor="black")
    plotting.plot_roi(nib.Nifti1Image(codes, labels_img.affine), bg_img=anat, cut_coords=cut_coords,
                      display_mode="ortho", figure=fig, axes=(0.0, 0.0, 0.84, 1 - head), cmap=cmap,
                      vmin=0.5, vmax=n + 0.5, colorbar=False, black_bg=True, alpha=0.8, draw_cross=False)
    if title:
        fig.text(0.01, 1 - head / 2, title, color="white", fontsize=12, va="center", ha="left")
    cax = fig.add_axes((0.87, 0.06, 0.018, 0.88 - head))
    norm = mcolors.BoundaryNorm(np.arange(0.5, n + 1.5), n)
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax, ticks=np.arange(1, n + 1))
    bar.ax.set_yticklabels([names.get(v, str(v)) for v in present] or [""], fontsize=8 if n <= 12 else 7,
                           color="white")
    bar.ax.tick_params(colors="white", length=2)
    bar.outline.set_edgecolor("white")
    return fig


def value_map(stat_img, anat, title: str | None = None, label: str | None = None, threshold: float | None = None,
              cut_coords=None, vmax: float | None = None, cmap: str = "inferno", width: float = 11.0,
              height: float = 3.6):
    """Per-voxel values over the subject's anatomy (:func:`mdlib.viz.voxel_map`: a NIfTI on the betas' grid,
    NaN = no value; values under ``threshold`` transparent), with the title in a band above the cuts and the
    colourbar labelled with ``label`` (the quantity and its unit). Returns the Figure."""
    from mdlib import viz

    head = 0.4 / height
    fig = plt.figure(figsize=(width, height), facecolor="black")
    display = viz.voxel_map(stat_img, anat, threshold=threshold, vmax=vmax, cmap=cmap, cut_coords=cut_coords,
                            figure=fig, axes=(0.0, 0.0, 1.0, 1 - head), draw_cross=False)
    if title:
        fig.text(0.01, 1 - head / 2, title, color="white", fontsize=12, va="center", ha="left")
    cbar_ax = getattr(display, "_colorbar_ax", None)     # nilearn's colourbar: ticks on its left
    if label and cbar_ax is not None:
        cbar_ax.yaxis.set_label_position("right")
        cbar_ax.set_ylabel(label, color="white", fontsize=9)
    return fig


def voxel_locations(anat, points: Mapping[str, Sequence[float]], outlines: Mapping[str, object] | None = None,
                    colours: Sequence[str] = MARKER_COLOURS, row_height: float = 2.8, width: float = 9.0):
    """Where single voxels are: one row per voxel, three orthogonal cuts through it, the voxel marked in each.

    Args:
        anat: the subject's ``T1_to_func1pt8mm``.
        points: label -> (x, y, z) mm (:func:`voxel_mm`). Each row cuts through its own point, so the marker is
            in every view (nilearn shows a marker only on cuts that pass near it).
        outlines: optional label -> a NIfTI mask, outlined in the row's colour (the area the voxel belongs to).
        colours: one per row.

    Returns:
        the Figure, rows in the order of ``points``; no colourbar (the T1's grey levels are not a quantity).
    """
    from nilearn import plotting

    n = len(points)
    head = 0.35                              # inches above each row for its title: titles never cover a cut
    height = (row_height + head) * n
    fig = plt.figure(figsize=(width, height), facecolor="black")
    for r, ((label, xyz), colour) in enumerate(zip(points.items(), colours)):
        xyz = tuple(float(v) for v in xyz)
        top = 1 - r * (row_height + head) / height
        display = plotting.plot_anat(
            anat, display_mode="ortho", cut_coords=xyz, figure=fig, colorbar=False, black_bg=True,
            draw_cross=False, axes=(0.0, top - (row_height + head) / height, 1.0, row_height / height))
        fig.text(0.01, top - head / 2 / height, f"{label}: ({xyz[0]:.1f}, {xyz[1]:.1f}, {xyz[2]:.1f}) mm",
                 color=colour, fontsize=11, va="center", ha="left")
        if outlines and label in outlines:
            display.add_contours(outlines[label], levels=[0.5], colors=[colour], linewidths=1.2)
        display.add_markers([xyz], marker_color=colour, marker_size=70, edgecolors="black", linewidths=1)
    return fig


# -- plots ----------------------------------------------------------------------------------------------------
def noise_ceiling_histogram(nc: np.ndarray, inside: np.ndarray, roi: str = "nsdgeneral", n: int = 3):
    """The distribution of voxels' noise ceilings (``nc``, (n_vox,) in %) inside and outside an ROI
    (``inside``, (n_vox,) bool), as densities so both are visible whatever their sizes; medians as lines."""
    nc, inside = np.asarray(nc, dtype=float), np.asarray(inside, dtype=bool)
    fig, ax = plt.subplots(figsize=(6.5, 3.2), constrained_layout=True)
    bins = np.linspace(0, 100, 41)
    for members, name, colour in ((~inside, f"outside {roi}", "tab:blue"), (inside, f"inside {roi}", "tab:orange")):
        values = nc[members & np.isfinite(nc)]
        if values.size:
            ax.hist(values, bins, alpha=0.6, density=True, color=colour,
                    label=f"{name} ({values.size} voxels)")
            ax.axvline(np.median(values), color=colour, ls="--", lw=1.5, label=f"median {name}")
    ax.set_xlabel(f"noise ceiling NC({n}), % of variance")
    ax.set_ylabel("density (per % point)")
    ax.set_xlim(0, 100)
    ax.legend(loc="upper right", fontsize=8)
    return fig


def agreement(x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str, title: str | None = None):
    """Two per-voxel measures that should agree, (n_vox,) each: a scatter with the identity line; the title
    gives their Pearson r over the voxels where both are finite (unless ``title`` is given)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    fig, ax = plt.subplots(figsize=(4.4, 4.4), constrained_layout=True)
    ax.scatter(x[ok], y[ok], s=4, alpha=0.35, linewidths=0)
    lo = float(min(x[ok].min(), y[ok].min(), 0)) if ok.any() else 0.0
    hi = float(max(x[ok].max(), y[ok].max())) if ok.any() else 1.0
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is None:
        r = float(np.corrcoef(x[ok], y[ok])[0, 1]) if ok.sum() > 1 else float("nan")
        title = f"r = {r:.2f} over {int(ok.sum())} voxels"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    return fig


__all__ = ["MARKER_COLOURS", "agreement", "label_colours", "noise_ceiling_histogram", "roi_atlas_map", "roi_cuts",
           "roi_size_table", "value_map", "voxel_locations", "voxel_mm"]
