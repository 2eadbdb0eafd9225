"""Which decoded structural features stage 2 trusts: a score per feature, and the best-scored share kept.

Stage 2 compares an image's CLIP features with the decoded ones only where decoding works: per CLIP block it
keeps the ``keep`` share (25%) of features whose decoders score best on the *training* images, so the test
images are never looked at. Two scores, one per method variant (docs/method.md, rows "feature selection"):

- ``"loo-r2"`` (the default variant): each feature's leave-one-out R^2, which the ridge decoder computes at no
  extra cost (:func:`mdlib.decoding.decode_features`); the ``keep`` share with the highest scores is kept
  (:func:`best_decoded_mask`, rule ``"top"``).
- ``"cv5-r"`` (the released variant): the released selection script splits the training images into 5
  consecutive folds (scikit-learn's ``KFold`` without shuffling), fits a decoder on four, correlates its
  predictions with the fifth's features, and averages ``|r|`` over the folds (:func:`kfold_abs_r`); it keeps
  every feature scored at or above the ``100 (1 - keep)``-th percentile (rule ``"percentile"``; with distinct
  scores exactly ``keep`` of them, e.g. 9,600 of 38,400).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: The released code's share of features kept per block.
RELEASED_KEEP = 0.25
#: The released selection's folds.
RELEASED_FOLDS = 5
SCORES = ("loo-r2", "cv5-r")
RULES = ("top", "percentile")


def kfold_abs_r(X: np.ndarray, Y: np.ndarray, fit_predict: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
                folds: int = RELEASED_FOLDS) -> np.ndarray:
    """(t,) float64: per feature, the mean over ``folds`` consecutive folds of ``|r|`` between held-out
    features and their predictions.

    Args:
        X: (n, p) training voxels (standardised as the decoder expects). Y: (n, t) training features.
        fit_predict: ``fit_predict(X_fit, Y_fit, X_held_out) -> (n_held_out, t)`` predictions, e.g.
            ``RidgeDecoder.fastl2lir(850).fit_predict``.
        folds: the number of folds (scikit-learn's ``KFold(folds, shuffle=False)``: consecutive blocks of rows).
    A feature that is constant in a held-out fold, or predicted as a constant, scores 0 there (the released
    ``cal_pccs`` divides by ``sd + 1e-30``).
    """
    from sklearn.model_selection import KFold

    from mdlib.ridge import pearson_per_target

    X, Y = np.asarray(X), np.asarray(Y)
    if len(X) != len(Y):
        raise ValueError(f"X has {len(X)} rows and Y {len(Y)}: one row per training image in both")
    if not 2 <= folds <= len(X):
        raise ValueError(f"folds must be in 2..{len(X)} (the training images), got {folds}")
    total = np.zeros(Y.shape[1], dtype=np.float64)
    for fit, held in KFold(n_splits=folds, shuffle=False).split(X):
        pred = np.asarray(fit_predict(X[fit], Y[fit], X[held]))
        total += np.nan_to_num(np.abs(pearson_per_target(Y[held], pred)), nan=0.0)
    return total / folds


def best_decoded_mask(score: np.ndarray, keep: float = RELEASED_KEEP, rule: str = "top") -> np.ndarray:
    """(t,) bool: the features kept, from one score per feature (higher: better decoded).

    Rules: ``"top"`` keeps the ``round(keep t)`` highest scores (ties broken by position); ``"percentile"``
    keeps every score ``>= np.percentile(score, 100 (1 - keep))``, as the released selection does. NaN scores
    count as the lowest. ``keep = 1`` keeps everything. A score that is NaN everywhere means the decoder gave
    none (FastL2LiR has no leave-one-out score): that raises, rather than keeping everything silently.
    """
    score = np.asarray(score, dtype=np.float64)
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if keep == 1:
        return np.ones(score.shape, dtype=bool)
    if score.size == 0 or np.isnan(score).all():
        raise ValueError("no feature has a selection score (a FastL2LiR decoder gives no leave-one-out R^2): "
                         "select by 'cv5-r' (the released criterion) or keep = 1")
    if rule == "percentile":
        filled = np.where(np.isnan(score), np.nanmin(score), score)
        return (filled >= np.percentile(filled, 100.0 * (1.0 - keep))) & ~np.isnan(score)
    filled = np.where(np.isnan(score), -np.inf, score)
    k = max(1, int(round(keep * score.size)))
    order = np.argsort(filled, kind="stable")[::-1]
    mask = np.zeros(score.shape, dtype=bool)
    mask[order[:k]] = True
    return mask
