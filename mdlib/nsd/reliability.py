"""How reliable is each voxel? Split-half correlation, NSD's noise-ceiling SNR, and maps back to volumes.

All functions take single-trial responses, (n_trials, n_vox) with image ids per trial, as
``load_betas(..., average_repeats=False)`` returns them (``.responses`` and ``.nsd_ids``). Only images shown
at least twice carry information about noise, so images with a single trial are ignored throughout.

- :func:`split_half_reliability`: the correlation, across images, between two repeats of each image.
- :func:`ncsnr` and :func:`noise_ceiling`: NSD's definitions (Allen et al., Nature Neuroscience 2022).
- :func:`volume_from_values`: per-voxel values back into an (X, Y, Z) NIfTI image for nilearn plots.

The correlations are :func:`mdlib.stats.pearson`'s (0 where undefined). mini-NSD's simulated brain has these
values built in, so the lesson can check them (docs/mini_world.md, "The simulated brains"). Taught in
``notebooks/02_voxels_nilearn.ipynb``.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

from mdlib.nsd.rois import voxel_coords
from mdlib.stats import pearson

SPLITS = ("first_two", "odd_even")


def repeated_images(image_ids: np.ndarray, min_repeats: int = 2) -> tuple[np.ndarray, list[np.ndarray]]:
    """The images with at least ``min_repeats`` trials, and the row indices of each one's trials.

    Returns ``(ids, rows)``: ``ids`` sorted; ``rows[i]`` the rows of image ``ids[i]`` in their original order
    (the order of repeats used by :func:`split_half_reliability`).
    """
    image_ids = np.asarray(image_ids).ravel()
    order = np.argsort(image_ids, kind="stable")  # stable: keeps each image's trials in row order
    ids, starts, counts = np.unique(image_ids[order], return_index=True, return_counts=True)
    keep = counts >= min_repeats
    return ids[keep], [order[s:s + c] for s, c in zip(starts[keep], counts[keep])]


def split_half_reliability(trial_responses: np.ndarray, image_ids: np.ndarray,
                           split: str = "first_two") -> np.ndarray:
    """Per-voxel Pearson correlation, across images, between two halves of each image's repeats.

    Args:
        trial_responses: (n_trials, n_vox) single-trial responses (z-scored betas, say).
        image_ids: (n_trials,) the image of each trial (nsdIds).
        split: ``"first_two"`` (default): repeat 0 vs repeat 1, i.e. each image's first and second trial in
            row order (any further repeats unused); ``"odd_even"``: the mean of its even-numbered repeats (0, 2,
            ...) vs the mean of its odd-numbered ones (1, 3, ...): all trials used, halves unequal for 3 repeats.

    Returns:
        (n_vox,) float64 correlations in [-1, 1], over the images with >= 2 repeats; 0 for a voxel whose
        halves have no variance (the correlation is undefined there), never NaN.
    """
    x = _check(trial_responses, image_ids)
    ids, rows = repeated_images(image_ids, 2)
    if len(ids) < 2:
        raise ValueError("split-half reliability needs at least 2 images with >= 2 repeats")
    if split == "first_two":
        first = x[[r[0] for r in rows]]
        second = x[[r[1] for r in rows]]
    elif split == "odd_even":
        first = np.stack([x[r[0::2]].mean(axis=0) for r in rows])
        second = np.stack([x[r[1::2]].mean(axis=0) for r in rows])
    else:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return pearson(first, second, axis=0, undefined=0.0, clip=True)


def ncsnr(trial_responses: np.ndarray, image_ids: np.ndarray) -> np.ndarray:
    """NSD's noise-ceiling signal-to-noise ratio per voxel (Allen et al. 2022).

    With betas z-scored per voxel (within each session, as ``load_betas`` does), total variance is 1, so:

    - noise variance = the mean over images of the variance of the image's repeats (ddof=1);
    - signal sd = sqrt(max(0, 1 - noise variance));  noise sd = sqrt(noise variance);
    - ncsnr = signal sd / noise sd.

    Only images with >= 2 repeats enter (a single trial has no variance across repeats); each such image
    weighs the same whatever its number of repeats. The input must be z-scored: the formula takes the total
    variance to be 1 rather than measuring it.

    Args:
        trial_responses: (n_trials, n_vox) z-scored single-trial betas.
        image_ids: (n_trials,) the image of each trial.

    Returns:
        (n_vox,) float64 >= 0. A voxel with no noise (identical repeats) gets inf, unless it is constant
        over all those trials (e.g. zeroed constant voxels), which gets 0.
    """
    x = _check(trial_responses, image_ids)
    ids, rows = repeated_images(image_ids, 2)
    if len(ids) == 0:
        raise ValueError("ncsnr needs images with >= 2 repeats; none found")
    noise_var = _mean_repeat_variance(x, rows)
    signal_sd = np.sqrt(np.maximum(0.0, 1.0 - noise_var))
    noise_sd = np.sqrt(noise_var)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = signal_sd / noise_sd
    silent = np.flatnonzero(noise_sd == 0)
    out[silent] = np.inf
    if silent.size:  # few columns: look at their values over the trials used
        used = np.concatenate(rows)
        out[silent[np.ptp(x[np.ix_(used, silent)], axis=0) == 0]] = 0.0
    return out


def _mean_repeat_variance(x: np.ndarray, rows: list[np.ndarray], chunk: int = 256) -> np.ndarray:
    """Mean over images of the variance (ddof=1) of each image's trials: (n_vox,) float64.

    Images are grouped by their number of repeats and processed ``chunk`` at a time, so memory stays at
    chunk x repeats x n_vox float64 whatever the number of images.
    """
    total = np.zeros(x.shape[1], dtype=np.float64)
    counts = np.array([len(r) for r in rows])
    for c in np.unique(counts):
        idx = np.stack([rows[i] for i in np.flatnonzero(counts == c)])  # (n_img_c, c) trial rows
        for start in range(0, len(idx), chunk):
            block = x[idx[start:start + chunk]]  # (k, c, n_vox)
            total += block.var(axis=1, ddof=1, dtype=np.float64).sum(axis=0)
    return total / len(rows)


def noise_ceiling(ncsnr_values: np.ndarray | float, n_trials_averaged: int | np.ndarray) -> np.ndarray:
    """NSD's noise ceiling in percent: 100 * ncsnr^2 / (ncsnr^2 + 1/n) (Allen et al. 2022).

    The share of a response's variance that a perfect model could explain when the response is the average
    of ``n`` trials. ``n_trials_averaged`` is either one number (3 for NSD's full repeats) or an array of the
    per-image numbers of trials averaged in a data set that mixes them (e.g. ``Betas.n_repeats``), in which
    case 1/n is replaced by its mean over images, as NSD does for such sets.

    Returns:
        The noise ceiling in percent (0..100), shaped like ``ncsnr_values``; 100 where ncsnr is inf.
    """
    snr2 = np.square(np.asarray(ncsnr_values, dtype=np.float64))
    n = np.asarray(n_trials_averaged, dtype=np.float64)
    if np.any(n < 1):
        raise ValueError(f"trials averaged must be >= 1, got {n_trials_averaged!r}")
    inv_n = float(np.mean(1.0 / n))
    with np.errstate(invalid="ignore"):
        ceiling = 100.0 * snr2 / (snr2 + inv_n)
    return np.where(np.isinf(snr2), 100.0, ceiling)


def volume_from_values(values: np.ndarray, mask: np.ndarray, affine: np.ndarray,
                       fill: float = np.nan) -> nib.Nifti1Image:
    """Put per-voxel values back on the (X, Y, Z) grid, as a float32 NIfTI image for nilearn.

    Args:
        values: (n_vox,) or (n_vox, k) values in mdlib's canonical voxel order (``rois.voxel_coords(mask)``).
        mask: (X, Y, Z) bool, the mask the values came from.
        affine: (4, 4), e.g. ``Betas.affine``.
        fill: the value outside the mask (NaN: nilearn leaves it transparent).

    Returns:
        A Nifti1Image of shape (X, Y, Z) (or (X, Y, Z, k)): ``image.get_fdata()[tuple(coords.T)] == values``.
    """
    mask = np.asarray(mask, dtype=bool)
    values = np.asarray(values)
    coords = voxel_coords(mask)
    if values.shape[0] != len(coords):
        raise ValueError(f"{values.shape[0]} values for a mask of {len(coords)} voxels")
    volume = np.full(mask.shape + values.shape[1:], fill, dtype=np.float32)
    volume[tuple(coords.T)] = values
    return nib.Nifti1Image(volume, np.asarray(affine, dtype=float))


# -- helpers ------------------------------------------------------------------------------------------------
def _check(trial_responses: np.ndarray, image_ids: np.ndarray) -> np.ndarray:
    x = np.asarray(trial_responses)
    if x.ndim != 2:
        raise ValueError(f"trial_responses must be (n_trials, n_vox), got shape {x.shape}")
    if np.asarray(image_ids).ravel().shape[0] != x.shape[0]:
        raise ValueError(f"{np.asarray(image_ids).size} image ids for {x.shape[0]} trials")
    return x
