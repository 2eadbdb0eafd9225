"""mdlib.metrics against independent float64 references: numpy's corrcoef, a hand-written Gaussian SSIM
(scipy.ndimage), brute-force two-way identification."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from mdlib import metrics


def _images(rng, n=3, size=40):
    """Smooth random images, uint8 (n, size, size, 3)."""
    x = rng.random((n, size // 4, size // 4, 3))
    x = np.kron(x, np.ones((1, 4, 4, 1)))
    return (gaussian_filter(x, (0, 1.5, 1.5, 0)) * 255).round().astype(np.uint8)


def _ssim_reference(a, b, sigma=1.5):
    """Wang et al. 2004 with Gaussian weights, population covariances, data range 1, borders cropped as
    scikit-image crops them (win 11 for sigma 1.5, truncate 3.5)."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    f = lambda v: gaussian_filter(v, sigma, truncate=3.5, mode="reflect")  # noqa: E731
    ux, uy = f(a), f(b)
    vx, vy, vxy = f(a * a) - ux * ux, f(b * b) - uy * uy, f(a * b) - ux * uy
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    pad = (2 * int(3.5 * sigma + 0.5) + 1 - 1) // 2
    return s[pad:-pad, pad:-pad].mean()


def test_prepare_accepts_both_layouts_and_resizes(rng):
    u8 = _images(rng)
    fl = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255
    a, b = metrics.prepare(u8, 64), metrics.prepare(fl, 64)
    assert a.shape == (3, 64, 64, 3) and a.dtype == np.float64
    np.testing.assert_allclose(a, b, atol=1e-7)
    ref = F.interpolate(fl, size=(64, 64), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    np.testing.assert_allclose(a, ref.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    np.testing.assert_allclose(metrics.prepare(u8, 40), u8 / 255.0, atol=1e-7)   # right size: untouched
    assert metrics.prepare(u8).shape[1:3] == (425, 425)


def test_pixcorr_matches_corrcoef(rng):
    rec, stim = _images(rng), _images(np.random.default_rng(1))
    got = metrics.pixcorr_per_image(rec, stim, size=40)
    want = [np.corrcoef(r.ravel() / 255.0, s.ravel() / 255.0)[0, 1] for r, s in zip(rec, stim)]
    np.testing.assert_allclose(got, want, atol=1e-7)   # float32 pixels: 255 levels exact to ~1e-8
    assert metrics.pixcorr(rec, stim, size=40) == pytest.approx(np.mean(want))
    np.testing.assert_allclose(metrics.pixcorr_per_image(rec, rec), 1.0)
    np.testing.assert_allclose(metrics.pixcorr_per_image(rec, 255 - rec), -1.0)


def test_ssim_matches_reference(rng):
    rec, stim = _images(rng), _images(np.random.default_rng(2))
    got = metrics.ssim_per_image(rec, stim, size=40)
    grey = lambda x: x @ np.array([0.2125, 0.7154, 0.0721])  # noqa: E731  skimage.color.rgb2gray's weights
    want = [_ssim_reference(grey(r / 255.0), grey(s / 255.0)) for r, s in zip(rec, stim)]
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(metrics.ssim_per_image(rec, rec, size=40), 1.0)
    assert metrics.ssim(rec, stim, size=40) == pytest.approx(np.mean(want))
    assert -1 < got.min() and got.max() < 1      # unrelated images: near 0


def test_two_way_identification_matches_brute_force(rng):
    a = rng.normal(size=(7, 30))
    b = a + rng.normal(scale=2.0, size=(7, 30))
    got = metrics.two_way_identification(a, b)
    want = []
    for i in range(7):
        own = np.corrcoef(a[i], b[i])[0, 1]
        want.append(np.mean([np.corrcoef(a[i], b[j])[0, 1] < own for j in range(7) if j != i]))
    np.testing.assert_allclose(got, want)
    np.testing.assert_allclose(metrics.two_way_identification(b, b), 1.0)
    null = metrics.two_way_identification(rng.normal(size=(200, 20)), rng.normal(size=(200, 20)))
    assert abs(null.mean() - 0.5) < 0.03                                   # chance is one half


def test_errors(rng):
    with pytest.raises(ValueError, match="paired"):
        metrics.pixcorr(_images(rng, 3), _images(rng, 2))
    with pytest.raises(ValueError, match="paired"):
        metrics.two_way_identification(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="uint8 images"):
        metrics.ssim(np.zeros((2, 8, 8), np.uint8), np.zeros((2, 8, 8), np.uint8))
