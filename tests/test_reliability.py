"""mdlib.nsd.reliability: split-half reliability, NSD's ncsnr and noise ceiling, values back to volumes.

Simulated voxels with known signal and noise variances give the true ncsnr; the split-half correlation is
checked against numpy's corrcoef on halves assembled here by a plain loop.
"""

import nibabel as nib
import numpy as np
import pytest

from mdlib.nsd import reliability as R
from mdlib.nsd.rois import voxel_coords


def simulate(rng, signal_var, noise_var, n_images=3000, n_repeats=3, shuffle=True):
    """Trials = signal[image] + noise, one voxel per (signal_var, noise_var) pair; rows shuffled."""
    signal_var, noise_var = np.asarray(signal_var), np.asarray(noise_var)
    signal = rng.normal(size=(n_images, signal_var.size)) * np.sqrt(signal_var)
    ids = np.repeat(np.arange(n_images), n_repeats)
    x = signal[ids] + rng.normal(size=(ids.size, signal_var.size)) * np.sqrt(noise_var)
    order = rng.permutation(ids.size) if shuffle else np.arange(ids.size)
    return x[order], ids[order] + 1000  # ids need not start at 0


def test_ncsnr_converges_to_the_truth(rng):
    signal_var = np.array([0.0, 0.1, 0.3, 0.5, 0.8])
    noise_var = 1.0 - signal_var  # unit total variance, as z-scored betas have
    truth = np.sqrt(signal_var / noise_var)
    errors = {}
    for n_images in (300, 20000):
        x, ids = simulate(rng, signal_var, noise_var, n_images=n_images)
        x = (x - x.mean(0)) / x.std(0)  # z-score each voxel, as load_betas does
        estimate = R.ncsnr(x, ids)
        assert np.all(estimate >= 0)  # rectified: never negative
        errors[n_images] = np.abs(estimate - truth)
    # Sampling error at 20,000 images x 3 repeats is about 0.01 (delta method): 0.04 is a 3-4 sigma bound.
    assert errors[20000][1:].max() < 0.04
    # Without signal, sqrt(max(0, 1 - noise var)) turns a tiny variance error into a larger sd: about 0.1.
    assert errors[20000][0] < 0.15
    assert errors[20000].mean() < errors[300].mean()


def test_ncsnr_uses_only_images_with_two_or_more_repeats(rng):
    x, ids = simulate(rng, [0.4, 0.6], [0.6, 0.4], n_images=200)
    singles = rng.normal(size=(50, 2)) * 10  # wild single trials must not matter
    with_singles = np.concatenate([x, singles]), np.concatenate([ids, np.arange(50) + 10**6])
    np.testing.assert_array_equal(R.ncsnr(*with_singles), R.ncsnr(x, ids))


def test_ncsnr_matches_the_formula_by_hand():
    # Two images, repeats (1, 3) and (0, 0, 3): variances (ddof=1) 2 and 3 -> noise var 2.5 > 1 -> signal 0.
    x = np.array([[1.0], [3.0], [0.0], [0.0], [3.0]])
    ids = np.array([7, 7, 9, 9, 9])
    assert R.ncsnr(x, ids)[0] == 0.0
    # Repeats (0.1, -0.1) and (0.5, 0.3, 0.4): variances 0.02 and 0.01 -> noise var 0.015.
    x = np.array([[0.1], [-0.1], [0.5], [0.3], [0.4]])
    expected = np.sqrt(1 - 0.015) / np.sqrt(0.015)
    np.testing.assert_allclose(R.ncsnr(x, ids), [expected])


def test_ncsnr_constant_voxel_is_zero_not_nan():
    x = np.zeros((6, 2))
    x[:, 1] = [1, 1, 2, 2, 3, 3]  # identical repeats: no noise at all
    out = R.ncsnr(x, np.array([0, 0, 1, 1, 2, 2]))
    assert out[0] == 0.0 and np.isinf(out[1])


def test_noise_ceiling_values_by_hand():
    np.testing.assert_allclose(R.noise_ceiling(1.0, 3), 75.0)  # 100 * 1 / (1 + 1/3)
    np.testing.assert_allclose(R.noise_ceiling(0.5, 1), 20.0)  # 100 * 0.25 / (0.25 + 1)
    np.testing.assert_allclose(R.noise_ceiling(np.array([0.0, 2.0, np.inf]), 1), [0.0, 80.0, 100.0])
    # Mixed repeats (3, 3, 1 trials averaged): 1/n -> mean(1/3, 1/3, 1) = 5/9.
    np.testing.assert_allclose(R.noise_ceiling(1.0, np.array([3, 3, 1])), 100 / (1 + 5 / 9))
    with pytest.raises(ValueError):
        R.noise_ceiling(1.0, 0)


def halves_by_loop(x, ids, split):
    """For each image with >= 2 trials (in row order), the two halves of its repeats."""
    first, second = [], []
    for image in sorted(set(ids.tolist())):
        trials = [row for row in range(len(ids)) if ids[row] == image]
        if len(trials) < 2:
            continue
        if split == "first_two":
            first.append(x[trials[0]])
            second.append(x[trials[1]])
        else:
            first.append(np.mean([x[t] for t in trials[0::2]], axis=0))
            second.append(np.mean([x[t] for t in trials[1::2]], axis=0))
    return np.array(first), np.array(second)


@pytest.mark.parametrize("split", ["first_two", "odd_even"])
def test_split_half_equals_numpy_corrcoef(rng, split):
    x, ids = simulate(rng, [0.2, 0.5, 0.9], [0.8, 0.5, 0.1], n_images=60)
    x = np.concatenate([x, rng.normal(size=(7, 3))])  # single-trial images are ignored
    ids = np.concatenate([ids, np.arange(7) + 10**6])
    first, second = halves_by_loop(x, ids, split)
    expected = [np.corrcoef(first[:, v], second[:, v])[0, 1] for v in range(x.shape[1])]
    np.testing.assert_allclose(R.split_half_reliability(x, ids, split=split), expected, atol=1e-12)


def test_split_half_tracks_signal_and_handles_flat_voxels(rng):
    x, ids = simulate(rng, [0.0, 0.9], [1.0, 0.1], n_images=2000)
    x = np.concatenate([x, np.zeros((x.shape[0], 1))], axis=1)
    r = R.split_half_reliability(x, ids)
    assert abs(r[0]) < 0.1 and r[1] > 0.8 and r[2] == 0.0  # r = signal / (signal + noise) = 0.9
    with pytest.raises(ValueError, match="split must be"):
        R.split_half_reliability(x, ids, split="random")


def test_volume_from_values_inverts_voxel_coords(rng):
    mask = rng.random((5, 6, 4)) < 0.4
    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    coords = voxel_coords(mask)
    values = rng.normal(size=len(coords))
    img = R.volume_from_values(values, mask, affine)
    assert isinstance(img, nib.Nifti1Image) and img.shape == mask.shape
    volume = img.get_fdata()
    np.testing.assert_allclose(volume[coords[:, 0], coords[:, 1], coords[:, 2]], values, rtol=1e-6)
    np.testing.assert_allclose(volume[mask], values, rtol=1e-6)
    assert np.isnan(volume[~mask]).all()
    np.testing.assert_array_equal(img.affine, affine)
    several = R.volume_from_values(np.stack([values, -values], axis=1), mask, affine, fill=0.0)
    assert several.shape == mask.shape + (2,) and several.get_fdata()[~mask].sum() == 0
    with pytest.raises(ValueError, match="values for a mask"):
        R.volume_from_values(values[:-1], mask, affine)
