"""Image metrics of reconstructions against their stimuli (docs/evaluation.md; lessons 04-06).

- :func:`pixcorr`: both images resized to 425 x 425 (NSD's stimulus size), RGB in [0, 1], flattened,
  Pearson r per image (the eight-metric table's PixCorr; MindDiffuser's "PCC").
- :func:`ssim`: both at 425 x 425, converted to grey with ``skimage.color.rgb2gray``, then
  ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1.0)``: true 2-D SSIM (scikit-image >= 0.20; older releases with ``multichannel=True`` on a
  grey image averaged 1-D column SSIMs instead, which some published numbers used).
- :func:`two_way_identification`: percent of the other images whose features correlate less with a
  reconstruction than its own stimulus's do (chance 0.5).

Resizing follows an evaluation protocol (:mod:`mdlib.protocols`, docs/evaluation.md): ``"mdlib"`` by default
(one bilinear resize with antialiasing, clipped to [0, 1]), or ``"mindeye"`` / ``"braindiffuser"`` as the
published tables were made (Brain-Diffuser's SSIM is also the old column-wise one). Inputs may be uint8
(n, H, W, 3) arrays (stimuli as :meth:`mdlib.nsd.stimuli.StimulusReader.read` returns them, reconstructions as
:mod:`mdlib.stage1` saves them) or float (n, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import numpy as np

from mdlib import protocols as P
from mdlib.stats import pearson, pearson_matrix

#: Both images are compared at NSD's stimulus size (docs/evaluation.md).
EVAL_SIZE = 425


def prepare(images, size: int = EVAL_SIZE, protocol: str = "mdlib") -> np.ndarray:
    """(n, H, W, 3) uint8 or (n, 3, H, W) float in [0, 1] -> (n, size, size, 3) float64 in [0, 1], resized as
    ``protocol`` resizes for PixCorr and SSIM (:func:`mdlib.protocols.pixel_images`)."""
    return P.pixel_images(images, protocol, size)


def _pair(recons, stims, size: int, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    if len(recons) != len(stims):
        raise ValueError(f"{len(recons)} reconstructions for {len(stims)} stimuli: they must be paired one to one")
    return prepare(recons, size, protocol), prepare(stims, size, protocol)


def pixcorr_per_image(recons, stims, size: int = EVAL_SIZE, protocol: str = "mdlib") -> np.ndarray:
    """(n,) Pearson r between each reconstruction's and its stimulus's pixels (RGB, at size x size)."""
    a, b = _pair(recons, stims, size, protocol)
    return pearson(a.reshape(len(a), -1), b.reshape(len(b), -1), axis=1)  # NaN for a constant image


def ssim_per_image(recons, stims, size: int = EVAL_SIZE, protocol: str = "mdlib") -> np.ndarray:
    """(n,) SSIM of each reconstruction with its stimulus, grey (``rgb2gray``), at size x size: true 2-D SSIM,
    or the mean of column SSIMs under ``"braindiffuser"`` (:func:`mdlib.protocols.ssim_grey`)."""
    a, b = _pair(recons, stims, size, protocol)
    variant = P.get(protocol).ssim
    return np.array([P.ssim_grey(x, y, variant) for x, y in zip(P.grey(a), P.grey(b))])


def pixcorr(recons, stims, size: int = EVAL_SIZE, protocol: str = "mdlib") -> float:
    """Mean PixCorr over images (NaN images, i.e. constant ones, are ignored)."""
    return float(np.nanmean(pixcorr_per_image(recons, stims, size, protocol)))


def ssim(recons, stims, size: int = EVAL_SIZE, protocol: str = "mdlib") -> float:
    """Mean SSIM over images."""
    return float(np.mean(ssim_per_image(recons, stims, size, protocol)))


def two_way_identification(recon_features, stim_features) -> np.ndarray:
    """(n,) for each reconstruction i, the fraction of stimuli j != i with corr(recon_i, stim_j) <
    corr(recon_i, stim_i); features (n, d) (flattened if more dims). Chance is 0.5 (docs/evaluation.md)."""
    a, b = _matched(recon_features, stim_features)
    if len(a) < 2:
        raise ValueError("two-way identification needs at least 2 images")
    C = pearson_matrix(a, b)                        # C[i, j] = corr(recon i, stimulus j)
    own = np.diag(C)[:, None]
    wins = (C < own).sum(1)                         # j == i never counts (C[i, i] < C[i, i] is False)
    return wins / (len(a) - 1)


def _rows(features) -> np.ndarray:
    return np.asarray(features, dtype=np.float64).reshape(len(features), -1)


def _matched(recon_features, stim_features) -> tuple[np.ndarray, np.ndarray]:
    a, b = _rows(recon_features), _rows(stim_features)
    if a.shape != b.shape:
        raise ValueError(f"features must be paired: {a.shape} vs {b.shape}")
    return a, b


def correlation_distance(recon_features, stim_features) -> np.ndarray:
    """(n,) 1 - Pearson r between each reconstruction's features and its own stimulus's (EffNet-B and SwAV
    columns of the eight-metric table; lower is better, 0 for identical features)."""
    a, b = _matched(recon_features, stim_features)
    return 1.0 - pearson(a, b, axis=1)  # NaN where either row is constant


def cosine_similarity(recon_features, stim_features) -> np.ndarray:
    """(n,) cosine of each reconstruction's features with its own stimulus's (MindDiffuser's CLIP metric on
    the final image embeddings; 1 for identical features)."""
    a, b = _matched(recon_features, stim_features)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
