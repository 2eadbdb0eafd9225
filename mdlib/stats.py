"""Pearson correlation, written once for every part of mdlib that needs it.

- :func:`pearson`: r between matching slices of two arrays of the same shape, along one axis: per column
  (``axis=0``: decoding accuracy per feature, :func:`mdlib.ridge.pearson_per_target`; split-half reliability
  per voxel, :mod:`mdlib.nsd.reliability`) or per row (``axis=1``: PixCorr and correlation distance per image,
  :mod:`mdlib.metrics`).
- :func:`pearson_matrix`: r between every row of one array and every row of another (two-way
  identification, :func:`mdlib.metrics.two_way_identification`).

Both compute in float64, whatever the input dtype. r is undefined where a slice has no variance (a constant
row or column): :func:`pearson` returns ``undefined`` there (NaN unless the caller says otherwise, e.g. 0 for
reliability), :func:`pearson_matrix` NaN. The definitions are in docs/evaluation.md and docs/method.md.
"""

from __future__ import annotations

import numpy as np


def _centred(a, axis: int) -> np.ndarray:
    """A float64 copy of ``a`` minus its mean along ``axis``."""
    a = np.array(a, dtype=np.float64)  # a copy: centred in place below
    a -= a.mean(axis=axis, keepdims=True)
    return a


def pearson(a, b, axis: int = 0, *, undefined: float = np.nan, clip: bool = False) -> np.ndarray:
    """Pearson r between each slice of ``a`` along ``axis`` and the same slice of ``b``, in float64.

    Args:
        a, b: arrays of the same shape (any dtype; computed in float64). ``axis`` runs over the observations:
            ``axis=0`` correlates columns, (n, t) -> (t,); ``axis=1`` (or -1) correlates rows, (n, d) -> (n,).
            A 1-D input gives a 0-d array.
        undefined: r where it is undefined, i.e. where the slice of ``a`` or of ``b`` is constant (zero sum of
            squares once centred): NaN by default (NumPy's ``corrcoef`` gives NaN there too).
        clip: clip r to [-1, 1] (rounding can take |r| of nearly collinear slices an ulp or so beyond 1, which
            ``np.corrcoef`` also clips).

    Returns:
        float64 array of ``a.shape`` without ``axis``: sum(a_c b_c) / sqrt(sum(a_c^2) sum(b_c^2)), with a_c and
        b_c centred along ``axis``; ``undefined`` for constant slices. Never warns.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"the arrays must have the same shape, got {a.shape} and {b.shape}")
    a, b = _centred(a, axis), _centred(b, axis)
    den = np.sqrt((a * a).sum(axis) * (b * b).sum(axis))
    defined = den > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis) / np.where(defined, den, 1.0)
    if clip:
        r = np.clip(r, -1.0, 1.0)
    return np.where(defined, r, undefined)


def pearson_matrix(a, b) -> np.ndarray:
    """``C[i, j]``: Pearson r between row i of ``a`` (n, d) and row j of ``b`` (m, d), in float64: (n, m).

    Rows are centred and scaled to unit length, then multiplied (``C = a_unit @ b_unit.T``). A constant row
    gives NaN in its row (or column) of ``C``. Never warns.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need (n, d) and (m, d) arrays, got {a.shape} and {b.shape}")
    a, b = _centred(a, 1), _centred(b, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T
