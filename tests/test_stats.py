"""mdlib.stats against independent float64 references: numpy's corrcoef and scipy.stats.pearsonr, slice by slice."""

import warnings

import numpy as np
import pytest
import scipy.stats

from mdlib.stats import pearson, pearson_matrix


def _pair(rng, shape, dtype=np.float64):
    a = rng.standard_normal(shape)
    b = 0.5 * a + rng.standard_normal(shape)
    return a.astype(dtype), b.astype(dtype)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_matches_corrcoef_and_pearsonr(rng, axis):
    a, b = _pair(rng, (30, 40))
    r = pearson(a, b, axis=axis)
    slices = [(a[:, k], b[:, k]) for k in range(40)] if axis == 0 else [(a[k], b[k]) for k in range(30)]
    assert r.shape == (len(slices),) and r.dtype == np.float64
    np.testing.assert_allclose(r, [np.corrcoef(x, y)[0, 1] for x, y in slices], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(r, [scipy.stats.pearsonr(x, y).statistic for x, y in slices], rtol=1e-12,
                               atol=1e-14)


def test_one_d_and_higher_dimensional_inputs(rng):
    a, b = _pair(rng, (25,))
    r = pearson(a, b)
    assert r.shape == () and np.isclose(r, np.corrcoef(a, b)[0, 1], rtol=1e-12)
    a, b = _pair(rng, (4, 5, 6))
    r = pearson(a, b, axis=1)
    assert r.shape == (4, 6)
    np.testing.assert_allclose(r[2, 3], np.corrcoef(a[2, :, 3], b[2, :, 3])[0, 1], rtol=1e-12)


def test_computes_in_float64_whatever_the_input(rng):
    a, b = _pair(rng, (50, 7), np.float32)
    want = pearson(a.astype(np.float64), b.astype(np.float64))
    r = pearson(a, b)
    assert r.dtype == np.float64
    np.testing.assert_array_equal(r, want)
    assert pearson(np.arange(10), np.arange(10) ** 2).dtype == np.float64  # integers too


def test_constant_slices_are_undefined_without_a_warning(rng):
    a, b = _pair(rng, (20, 6))
    a[:, 1] = 3.0          # constant in a
    b[:, 4] = -1.0         # constant in b
    a[:, 5] = b[:, 5] = 0  # constant in both
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = pearson(a, b)
        zero = pearson(a, b, undefined=0.0)
    undefined = np.isin(np.arange(6), [1, 4, 5])
    assert np.isnan(r[undefined]).all() and np.isfinite(r[~undefined]).all()
    np.testing.assert_array_equal(zero[undefined], 0.0)
    np.testing.assert_array_equal(zero[~undefined], r[~undefined])
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the references warn about the constant columns
        ref = [np.corrcoef(a[:, k], b[:, k])[0, 1] for k in range(6)]
        ref_scipy = [scipy.stats.pearsonr(a[:, k], b[:, k]).statistic for k in range(6)]
    np.testing.assert_allclose(r, ref, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(r, ref_scipy, rtol=1e-12, equal_nan=True)


def test_clip_keeps_r_within_one(rng):
    a = rng.standard_normal((200, 50)) * 1e3 + 7.0
    b = 3.0 * a - 11.0  # perfectly correlated: |r| may round to a hair above 1
    r = pearson(a, b, clip=True)
    assert (np.abs(r) <= 1.0).all()
    np.testing.assert_allclose(r, 1.0, rtol=1e-12)
    np.testing.assert_allclose(pearson(a, -b, clip=True), -1.0, rtol=1e-12)


def test_shape_mismatch_raises(rng):
    with pytest.raises(ValueError, match="same shape"):
        pearson(np.zeros((3, 4)), np.zeros((4, 3)))


def test_pearson_matrix_is_every_pair(rng):
    a, b = _pair(rng, (8, 30))
    b = b[::-1].copy()
    a[3] = 2.0  # a constant row: NaN row
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C = pearson_matrix(a, b)
    assert C.shape == (8, 8) and C.dtype == np.float64
    assert np.isnan(C[3]).all()
    for i in (0, 5, 7):
        for j in range(8):
            assert np.isclose(C[i, j], scipy.stats.pearsonr(a[i], b[j]).statistic, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.diag(pearson_matrix(a, a))[[0, 5]], 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.diag(C), pearson(a, b, axis=1), rtol=1e-12, equal_nan=True)
    with pytest.raises(ValueError, match=r"\(n, d\) and \(m, d\)"):
        pearson_matrix(np.zeros((3, 4)), np.zeros((3, 5)))
