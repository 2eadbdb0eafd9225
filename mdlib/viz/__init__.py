"""Figures for the lessons: image grids and brain maps on the subject's own anatomy.

NSD's func1pt8mm volumes are in each subject's own space, not MNI: every brain map here is drawn over the
subject's ``T1_to_func1pt8mm`` (nilearn's default MNI background would be misaligned), so ``anat`` is a
required argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np


def image_grid(images: Sequence[np.ndarray] | np.ndarray, titles: Sequence[str] | None = None, ncols: int = 8,
               size: float = 1.6, title: str | None = None, wrap: int = 28,
               row_labels: Sequence[str] | None = None):
    """Show images (each (H, W, 3) uint8 or float in [0, 1]) in a grid; titles are wrapped to ``wrap`` chars.

    ``row_labels``: one label per row, written left of the row's first image (wrapped to 14 characters); the
    figure widens to hold them. ``fig.axes`` stay the images, in order."""
    import textwrap

    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    labels = None
    if row_labels is not None:
        if len(row_labels) != nrows:
            raise ValueError(f"{len(row_labels)} row labels for {nrows} rows")
        labels = ["\n".join(textwrap.wrap(str(t), 14)) for t in row_labels]
    # Inches left of the images for the row labels: 8 pt text, about 0.6 em a character.
    left = max(len(line) for t in labels for line in t.split("\n")) * 8 * 0.6 / 72 + 0.15 if labels else 0.0
    # Each line of a title is wrapped on its own: the line breaks the caller put in are kept.
    wrapped = (["\n".join(w for part in str(t).split("\n") for w in textwrap.wrap(part, wrap) or [""])
                for t in titles] if titles is not None else None)
    # The axes are placed by hand: each row is an image plus room for the longest title (7 pt lines), so long
    # captions never run into the row above (tight_layout sizes the axes' boxes, not the square images in them).
    lines = max(t.count("\n") + 1 for t in wrapped) if wrapped else 0
    head = lines * 7 * 1.25 / 72 + 0.08 if lines else 0.0      # inches of title above each image
    gap, top = 0.06, (0.45 if title else 0.05)
    width, height = left + size * ncols, (size + head) * nrows + top
    fig = plt.figure(figsize=(width, height))
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        bottom = height - top - (r + 1) * (size + head)
        ax = fig.add_axes(((left + c * size + gap / 2) / width, bottom / height, (size - gap) / width,
                           (size - gap) / height))
        ax.imshow(np.asarray(img))
        ax.axis("off")
        if wrapped is not None:
            ax.set_title(wrapped[i], fontsize=7, pad=2)
        if labels is not None and c == 0:
            ax.text(-0.06, 0.5, labels[r], transform=ax.transAxes, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, y=1 - 0.1 / height, va="top")
    return fig


def mark_placement(fig, images: Sequence[np.ndarray] | np.ndarray, color: str = "white"):
    """Mark, on each image of an :func:`image_grid` figure (``fig.axes`` in the order of ``images``), where its
    objects are and which way they point (:func:`mdlib.placement.placement`, lesson 06): a cross at their
    centroid and, where the mask is elongated (>= :data:`mdlib.placement.MIN_ELONGATION`), a line along its
    principal axis, a third of the image long. Returns the (n, 4) array of (x, y, angle, elongation)."""
    import matplotlib.patheffects as pe

    from mdlib import placement

    outline = [pe.withStroke(linewidth=3, foreground="black")]
    found = []
    for ax, img in zip(fig.axes, images):
        # One image at a time: a grid may mix sizes (stimuli beside smaller reconstructions).
        img = np.asarray(img)
        p = placement.placement(img[None])
        x, y, angle, elong = p.x[0], p.y[0], p.angle[0], p.elongation[0]
        found.append((x, y, angle, elong))
        if not np.isfinite(x):
            continue
        h, w = img.shape[:2]
        cx, cy = x * w - 0.5, y * h - 0.5          # imshow puts pixel k's centre at k
        ax.plot([cx], [cy], marker="+", ms=9, mew=2, color=color, path_effects=outline)
        if elong >= placement.MIN_ELONGATION:
            # Screen angles are counter-clockwise and image rows grow downwards: dy = -sin.
            dx, dy = np.cos(np.deg2rad(angle)) * w / 6, -np.sin(np.deg2rad(angle)) * h / 6
            ax.plot([cx - dx, cx + dx], [cy - dy, cy + dy], lw=2, color=color, path_effects=outline)
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
    return np.array(found, dtype=float).reshape(-1, 4)


def roi_map(labels_img, anat, title: str | None = None, cut_coords=None, display_mode: str = "ortho",
            cmap: str = "tab20", **kwargs):
    """An ROI label volume (int, 0/-1 = none) over the subject's anatomy, with nilearn's ``plot_roi``."""
    import nibabel as nib
    from nilearn import plotting

    data = np.asanyarray(labels_img.dataobj)
    shown = nib.Nifti1Image(np.where(data > 0, data, 0).astype(np.int16), labels_img.affine)
    return plotting.plot_roi(shown, bg_img=anat, title=title, cut_coords=cut_coords,
                             display_mode=display_mode, cmap=cmap, colorbar=True, black_bg=True, **kwargs)


def voxel_map(stat_img, anat, title: str | None = None, threshold: float | None = None, vmax: float | None = None,
              cmap: str = "inferno", cut_coords=None, display_mode: str = "ortho", **kwargs):
    """Per-voxel values (a NIfTI on the betas grid, NaN = no value) over the subject's anatomy."""
    import nibabel as nib
    from nilearn import plotting

    data = np.asarray(stat_img.get_fdata(), dtype=np.float32)
    finite = np.isfinite(data)
    shown = nib.Nifti1Image(np.where(finite, data, 0.0).astype(np.float32), stat_img.affine)
    if vmax is None and finite.any():
        vmax = float(np.nanpercentile(np.abs(data[finite]), 99))
    positive = not (data[finite] < 0).any()
    return plotting.plot_stat_map(shown, bg_img=anat, title=title, threshold=threshold, vmax=vmax,
                                  cmap=cmap if positive else "RdBu_r", symmetric_cbar=not positive,
                                  cut_coords=cut_coords, display_mode=display_mode, black_bg=True, **kwargs)
