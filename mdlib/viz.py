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
               size: float = 1.6, title: str | None = None, wrap: int = 28):
    """Show images (each (H, W, 3) uint8 or float in [0, 1]) in a grid; titles are wrapped to ``wrap`` chars."""
    import textwrap

    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows * (1.35 if titles else 1.0)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, img in enumerate(images):
        ax = axes.flat[i]
        ax.imshow(np.asarray(img))
        if titles is not None:
            ax.set_title("\n".join(textwrap.wrap(str(titles[i]), wrap)), fontsize=7)
    if title:
        fig.suptitle(title)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the suptitle
    else:
        fig.tight_layout()
    return fig


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
