"""mdlib.selection: the features stage 2 keeps, by the default criterion (leave-one-out R^2, top share) and the
released one (5 consecutive folds, mean |r|, percentile cut), on problems whose answer is known."""

import numpy as np
import pytest

from mdlib.ridge import RidgeDecoder
from mdlib.selection import best_decoded_mask, kfold_abs_r


def test_top_rule_keeps_the_highest_share():
    score = np.array([0.1, 0.9, np.nan, 0.5, 0.3, 0.7, -0.2, 0.8])
    assert best_decoded_mask(score, keep=0.25).tolist() == [False, True, False, False, False, False, False, True]
    assert best_decoded_mask(score, keep=1.0).all()
    with pytest.raises(ValueError):
        best_decoded_mask(score, keep=0)
    with pytest.raises(ValueError, match="cv5-r"):       # no score at all is never "keep everything" silently
        best_decoded_mask(np.full(8, np.nan))


def test_percentile_rule_is_the_released_cut():
    score = np.random.default_rng(0).random(38400)
    m = best_decoded_mask(score, keep=0.25, rule="percentile")
    assert m.sum() == 9600                                 # as the released masks: 9,600 of 38,400 per block
    np.testing.assert_array_equal(m, score >= np.percentile(score, 75))


def test_kfold_abs_r_is_the_mean_over_consecutive_folds():
    """Against a loop written from the released selection: sklearn KFold(5) unshuffled, |Pearson r| per
    feature of the held-out fold, averaged over folds (float64)."""
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(50, 6)), rng.normal(size=(50, 3))
    fit_predict = lambda a, b, c: c @ np.linalg.lstsq(a, b, rcond=None)[0]  # noqa: E731
    got = kfold_abs_r(X, Y, fit_predict)
    ref = np.zeros(3)
    for k in range(5):
        held = np.arange(10 * k, 10 * k + 10)
        fit = np.setdiff1d(np.arange(50), held)
        pred = fit_predict(X[fit], Y[fit], X[held])
        ref += [abs(np.corrcoef(Y[held, j], pred[:, j])[0, 1]) for j in range(3)]
    np.testing.assert_allclose(got, ref / 5, rtol=1e-10)
    with pytest.raises(ValueError, match="folds"):
        kfold_abs_r(X, Y, fit_predict, folds=1)


def test_fastl2lir_with_the_released_criterion_keeps_exactly_the_decodable_quarter():
    """40 features of which 10 are the voxels' signal plus little noise and 30 are pure noise: FastL2LiR
    (alpha 0.15, 20 voxels per feature) scored by 5-fold |r| keeps exactly those 10, exactly 25%."""
    rng = np.random.default_rng(2)
    n, p = 400, 60
    X = rng.normal(size=(n, p))
    W = rng.normal(size=(p, 10)) * (rng.random((p, 10)) < 0.2)
    Y = np.concatenate([X @ W + 0.3 * rng.normal(size=(n, 10)), rng.normal(size=(n, 30))], axis=1)
    order = rng.permutation(40)                  # the decodable ten end up at the positions argsort(order)[:10]
    Y = Y[:, order]

    def dec(a, b, c):
        return RidgeDecoder.fastl2lir(20, device="cpu", progress=False, dtype=np.float64).fit_predict(a, b, c)

    mask = best_decoded_mask(kfold_abs_r(X, Y, dec), keep=0.25, rule="percentile")
    assert mask.sum() == 10
    np.testing.assert_array_equal(np.flatnonzero(mask), np.sort(np.argsort(order)[:10]))
