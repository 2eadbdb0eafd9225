"""mdlib.ridge: exact multi-target ridge (LOO / GCV / fixed alpha / FastL2LiR), chunked, saved as safetensors.

References are independent: scikit-learn's RidgeCV(alpha_per_target=True) and Ridge for the LOO and fixed
modes, an explicit hat-matrix computation for GCV, and a plain per-target loop (np.corrcoef + sklearn Ridge)
for FastL2LiR. Problems are small and seeded; the whole file runs in well under a minute on 2 cores.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from sklearn.linear_model import Ridge, RidgeCV
from sklearn.preprocessing import StandardScaler

from mdlib import ridge as R
from mdlib.ridge import ColumnStack, RidgeDecoder, pearson_per_target

ALPHAS = np.logspace(-3, 5, 17)


def make_problem(rng, n, p, t, *, ill=False, x_offset=3.0, y_offset=100.0, n_test=25):
    """X (n, p) with offsets (optionally a 1e-6 condition spread), Y with noise levels from 1e-2 to 1e2."""
    X = rng.standard_normal((n + n_test, p))
    if ill:
        X = X @ np.diag(np.logspace(0, -6, p))
    X += x_offset + rng.uniform(-1, 1, p)
    B = rng.standard_normal((p, t)) / np.sqrt(p)
    noise = np.logspace(-2, 2, t)  # very different noise levels: different alphas win
    Y = X @ B + noise * rng.standard_normal((n + n_test, t)) + y_offset * rng.uniform(0.5, 1.5, t)
    return X[:n], Y[:n], X[n:]


def rel_err(pred, ref):
    """Max over targets of max |pred - ref| / max |ref|."""
    return float((np.abs(pred - ref).max(0) / np.abs(ref).max(0)).max())


def sk_alphas(model, t):
    return np.broadcast_to(np.asarray(model.alpha_, dtype=float), (t,))


# -- LOO: identical to scikit-learn ------------------------------------------------------------------------
@pytest.mark.parametrize("n, p, ill", [(60, 150, False), (150, 60, False), (60, 150, True), (150, 60, True),
                                       (100, 100, False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loo_equals_sklearn_ridgecv(rng, n, p, ill, dtype):
    X, Y, Xt = make_problem(rng, n, p, 40, ill=ill)
    sk = RidgeCV(alphas=ALPHAS, alpha_per_target=True).fit(X, Y)
    m = RidgeDecoder(ALPHAS, dtype=dtype, progress=False)
    pred = m.fit_predict(X, Y, Xt)
    np.testing.assert_array_equal(m.alpha_, sk.alpha_)  # identical choices, in float32 too
    assert len(np.unique(m.alpha_)) > 3  # the noise levels make many different alphas win
    assert rel_err(pred, sk.predict(Xt)) < 1e-4
    # The LOO error at the chosen alpha is scikit-learn's best_score_ (negated).
    np.testing.assert_allclose(m.cv_mse_, -sk.best_score_, rtol=1e-4 if dtype == torch.float32 else 1e-8)
    if dtype == torch.float64:
        assert rel_err(pred, sk.predict(Xt)) < 1e-9


def test_ties_pick_the_first_alpha_of_the_grid_as_sklearn(rng):
    X, Y, Xt = make_problem(rng, 50, 80, 6)
    Y[:, 0] = 7.0  # a constant target: every alpha has LOO error 0
    grid = np.array([10.0, 0.1, 1000.0, 0.1, 10.0, 1.0])  # unsorted, with duplicates
    sk = RidgeCV(alphas=grid, alpha_per_target=True).fit(X, Y)
    for dtype in (torch.float64, torch.float32):
        m = RidgeDecoder(grid, dtype=dtype, progress=False)
        pred = m.fit_predict(X, Y, Xt)
        np.testing.assert_array_equal(m.alpha_, sk.alpha_)
        assert m.alpha_[0] == 10.0  # the first of the tied grid
        np.testing.assert_allclose(pred[:, 0], 7.0)
        assert rel_err(pred, sk.predict(Xt)) < 1e-4


def test_intercepts_with_large_offsets(rng):
    X, Y, Xt = make_problem(rng, 80, 40, 10, x_offset=1e3, y_offset=1e4)
    sk = RidgeCV(alphas=ALPHAS, alpha_per_target=True).fit(X, Y)
    for dtype in (torch.float64, torch.float32):
        m = RidgeDecoder(ALPHAS, dtype=dtype, progress=False).fit(X, Y)
        np.testing.assert_array_equal(m.alpha_, sk.alpha_)
        pred = m.predict(Xt)
        assert rel_err(pred, sk.predict(Xt)) < 1e-4
        np.testing.assert_allclose(m.y_mean_, Y.mean(0))
        np.testing.assert_allclose(m.x_mean_, X.mean(0))
        # The intercept on X's own scale reproduces the predictions.
        np.testing.assert_allclose(Xt @ (m.coef_ / m.x_scale_[:, None]) + m.intercept_, pred, rtol=1e-4)
    np.testing.assert_allclose(m.intercept_, sk.intercept_, rtol=1e-4)


def test_standardized_loo_equals_ridgecv_on_standardized_x(rng):
    X, Y, Xt = make_problem(rng, 70, 30, 12)
    X = X * rng.uniform(0.1, 10, X.shape[1])
    sc = StandardScaler().fit(X)
    sk = RidgeCV(alphas=ALPHAS, alpha_per_target=True).fit(sc.transform(X), Y)
    m = RidgeDecoder(ALPHAS, standardize_x=True, dtype=torch.float64, progress=False)
    pred = m.fit_predict(X, Y, Xt)
    np.testing.assert_array_equal(m.alpha_, sk.alpha_)
    assert rel_err(pred, sk.predict(sc.transform(Xt))) < 1e-9
    np.testing.assert_allclose(m.x_scale_, sc.scale_)


def test_fixed_alpha_equals_sklearn_ridge(rng):
    for n, p in [(40, 90), (90, 40)]:
        X, Y, Xt = make_problem(rng, n, p, 5)
        m = RidgeDecoder(fixed_alpha=3.0, dtype=torch.float64, progress=False).fit(X, Y)
        assert m.cv_mse_ is None and np.all(m.alpha_ == 3.0)
        assert rel_err(m.predict(Xt), Ridge(alpha=3.0).fit(X, Y).predict(Xt)) < 1e-9


def test_gcv_equals_explicit_hat_matrix(rng):
    for n, p in [(40, 70), (70, 40)]:
        X, Y, Xt = make_problem(rng, n, p, 8)
        Xc, Yc = X - X.mean(0), Y - Y.mean(0)
        scores = []
        for a in ALPHAS:
            H = Xc @ np.linalg.solve(Xc.T @ Xc + a * np.eye(p), Xc.T) + 1.0 / n  # intercept included
            scores.append(((Yc - H @ Yc) ** 2).mean(0) / (1 - np.trace(H) / n) ** 2)
        expect = ALPHAS[np.argmin(np.array(scores), axis=0)]
        m = RidgeDecoder(ALPHAS, cv="gcv", dtype=torch.float64, progress=False)
        pred = m.fit_predict(X, Y, Xt)
        np.testing.assert_array_equal(m.alpha_, expect)
        np.testing.assert_allclose(m.cv_mse_, np.min(scores, axis=0), rtol=1e-8)
        ref = np.column_stack([Ridge(alpha=a).fit(X, Y[:, j]).predict(Xt) for j, a in enumerate(expect)])
        assert rel_err(pred, ref) < 1e-9


# -- chunks, fit vs fit_predict, inputs ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunk_size_does_not_change_results(rng, dtype):
    X, Y, Xt = make_problem(rng, 60, 90, 30)
    runs = [RidgeDecoder(ALPHAS, dtype=dtype, chunk_size=cs, progress=False) for cs in (None, 1, 7)]
    preds = [m.fit_predict(X, Y, Xt) for m in runs]
    for m, pred in zip(runs[1:], preds[1:]):
        np.testing.assert_array_equal(m.alpha_, runs[0].alpha_)
        assert rel_err(pred, preds[0]) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_fit_predict_equals_fit_then_predict(rng):
    X, Y, Xt = make_problem(rng, 50, 80, 20)
    for dtype in (torch.float64, torch.float32):
        a = RidgeDecoder(ALPHAS, dtype=dtype, progress=False)
        b = RidgeDecoder(ALPHAS, dtype=dtype, progress=False)
        pa = a.fit_predict(X, Y, Xt)
        pb = b.fit(X, Y).predict(Xt)
        np.testing.assert_array_equal(a.alpha_, b.alpha_)
        assert pa.dtype == pb.dtype == (np.float32 if dtype == torch.float32 else np.float64)
        assert rel_err(pa, pb) < (1e-12 if dtype == torch.float64 else 1e-5)
        assert a.coef_ is None and b.coef_.shape == (80, 20)
        with pytest.raises(RuntimeError, match="keeps no coefficients"):
            a.predict(Xt)


def test_column_stack_and_lazy_targets(rng):
    X, Y, Xt = make_problem(rng, 50, 30, 12)
    parts = [Y[:, :5], Y[:, 5:6], Y[:, 6:]]
    m1 = RidgeDecoder(ALPHAS, dtype=torch.float64, progress=False)
    m2 = RidgeDecoder(ALPHAS, dtype=torch.float64, chunk_size=4, progress=False)
    stack = ColumnStack(parts)
    assert stack.shape == Y.shape
    np.testing.assert_array_equal(stack[:, 3:8], Y[:, 3:8])
    p1, p2 = m1.fit_predict(X, Y, Xt), m2.fit_predict(X, stack, Xt)
    np.testing.assert_array_equal(m1.alpha_, m2.alpha_)
    assert rel_err(p2, p1) < 1e-12
    for piece, part in zip(stack.split(p2), parts):
        assert piece.shape == (Xt.shape[0], part.shape[1])


def test_one_dimensional_y_and_torch_inputs(rng):
    X, Y, Xt = make_problem(rng, 40, 20, 1)
    sk = RidgeCV(alphas=ALPHAS).fit(X, Y[:, 0])
    m = RidgeDecoder(ALPHAS, dtype=torch.float64, progress=False).fit(torch.from_numpy(X), torch.from_numpy(Y[:, 0]))
    pred = m.predict(Xt)
    assert pred.shape == (Xt.shape[0],)
    assert m.alpha_[0] == sk.alpha_
    np.testing.assert_allclose(pred, sk.predict(Xt), rtol=1e-9)
    assert np.isscalar(m.score(Xt, sk.predict(Xt))) or m.score(Xt, sk.predict(Xt)).shape == ()


def test_y_is_not_modified(rng):
    X, Y, Xt = make_problem(rng, 40, 20, 3)
    Y0 = Y.copy()
    RidgeDecoder(ALPHAS, dtype=torch.float64, progress=False).fit_predict(X, Y, Xt)
    np.testing.assert_array_equal(Y, Y0)


def test_progress_bar_reports_targets(rng, capsys):
    X, Y, Xt = make_problem(rng, 30, 20, 10)
    RidgeDecoder(ALPHAS, chunk_size=4, progress=True).fit_predict(X, Y, Xt)
    assert "10/10" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a machine without CUDA")
def test_missing_cuda_falls_back_to_cpu_with_a_warning(rng):
    X, Y, Xt = make_problem(rng, 30, 20, 3)
    with pytest.warns(RuntimeWarning, match="CUDA is not available"):
        RidgeDecoder(ALPHAS, device="cuda", progress=False).fit_predict(X, Y, Xt)


# -- FastL2LiR ------------------------------------------------------------------------------------------------
def fastl2lir_by_definition(X, Y, Xt, n_select, alpha, select="abs"):
    """Per target: the n_select voxels of largest |Pearson r| on the training set, then sklearn Ridge(alpha)
    with an intercept on voxels standardised with the training mean and sd."""
    sc = StandardScaler().fit(X)
    Xs, Xts = sc.transform(X), sc.transform(Xt)
    out = np.empty((Xt.shape[0], Y.shape[1]))
    for j in range(Y.shape[1]):
        r = np.array([np.corrcoef(X[:, v], Y[:, j])[0, 1] for v in range(X.shape[1])])
        key = np.abs(r) if select == "abs" else r
        keep = np.argsort(-key, kind="stable")[:n_select]
        out[:, j] = Ridge(alpha=alpha).fit(Xs[:, keep], Y[:, j]).predict(Xts[:, keep])
    return out


@pytest.mark.parametrize("n, p, n_select", [(60, 120, 25), (120, 40, 30), (50, 30, 30)])
@pytest.mark.parametrize("select", ["abs", "signed"])
def test_fastl2lir_equals_its_definition(rng, n, p, n_select, select):
    X = rng.standard_normal((n + 15, p)) * rng.uniform(0.5, 3, p) + rng.uniform(-5, 5, p)
    Y = X[:, :8] @ rng.standard_normal((8, 12)) + 3 * rng.standard_normal((n + 15, 12)) + 50
    X, Xt, Y = X[:n], X[n:], Y[:n]
    ref = fastl2lir_by_definition(X, Y, Xt, n_select, 0.15, select)
    m = RidgeDecoder.fastl2lir(n_select, dtype=torch.float64, select=select, chunk_size=5, progress=False)
    assert rel_err(m.fit_predict(X, Y, Xt), ref) < 1e-6
    m32 = RidgeDecoder.fastl2lir(n_select, select=select, progress=False).fit(X, Y)
    assert rel_err(m32.predict(Xt), ref) < 1e-4
    assert m32.selected_.shape == (12, n_select) and np.all(np.diff(m32.selected_, axis=1) > 0)
    assert np.all(m32.alpha_ == 0.15)
    # coef_ is the dense (p, t) form of the selection: n_select non-zeros per target.
    assert np.all((m32.coef_ != 0).sum(0) <= n_select)


# -- saving ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: RidgeDecoder(ALPHAS, progress=False),
                                  lambda: RidgeDecoder(ALPHAS, dtype=torch.float64, cv="gcv", progress=False),
                                  lambda: RidgeDecoder.fastl2lir(10, progress=False)])
def test_save_load_roundtrip(rng, tmp_path, make):
    X, Y, Xt = make_problem(rng, 40, 30, 6)
    m = make().fit(X, Y)
    path = m.save(tmp_path / "decoder.safetensors")
    back = RidgeDecoder.load(path)
    np.testing.assert_array_equal(back.predict(Xt), m.predict(Xt))
    np.testing.assert_array_equal(back.alpha_, m.alpha_)
    assert back.mode == m.mode and back.dtype == m.dtype
    np.testing.assert_array_equal(back.alphas, m.alphas)
    from safetensors import safe_open
    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()["mdlib.ridge"])
    assert meta["format_version"] == R.FORMAT_VERSION and meta["mdlib_version"]
    assert meta["params"]["alphas"] == list(m.alphas)


def test_save_after_fit_predict_keeps_alphas_only(rng, tmp_path):
    X, Y, Xt = make_problem(rng, 40, 30, 6)
    m = RidgeDecoder(ALPHAS, progress=False)
    m.fit_predict(X, Y, Xt)
    back = RidgeDecoder.load(m.save(tmp_path / "d.safetensors"))
    np.testing.assert_array_equal(back.alpha_, m.alpha_)
    with pytest.raises(RuntimeError, match="keeps no coefficients"):
        back.predict(Xt)


def test_load_rejects_other_versions_and_files(rng, tmp_path):
    X, Y, _ = make_problem(rng, 30, 20, 2)
    path = RidgeDecoder(ALPHAS, progress=False).fit(X, Y).save(tmp_path / "d.safetensors")
    from safetensors import safe_open
    from safetensors.numpy import load_file
    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()["mdlib.ridge"])
    meta["format_version"] = 999
    save_file(load_file(str(path)), str(tmp_path / "future.safetensors"), metadata={"mdlib.ridge": json.dumps(meta)})
    with pytest.raises(ValueError, match="format version 999"):
        RidgeDecoder.load(tmp_path / "future.safetensors")
    save_file({"w": np.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a RidgeDecoder file"):
        RidgeDecoder.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        RidgeDecoder.load(tmp_path / "junk.safetensors")


# -- errors -------------------------------------------------------------------------------------------------
def test_clear_errors(rng):
    X, Y, Xt = make_problem(rng, 30, 20, 4)
    m = RidgeDecoder(ALPHAS, progress=False)
    with pytest.raises(ValueError, match="same number of rows.*X has 30, Y has 29"):
        m.fit(X, Y[:29])
    Xbad = X.copy()
    Xbad[3, 5] = np.nan
    Xbad[7, 5] = np.inf
    with pytest.raises(ValueError, match=r"X has 2 NaN/inf values in 1 voxels \(columns\) \(first: \[5\]\) "
                                         r"and rows \[3, 7\]"):
        m.fit(Xbad, Y)
    Ybad = Y.copy()
    Ybad[0, 2] = np.nan
    with pytest.raises(ValueError, match=r"Y has 1 NaN/inf values in 1 targets \(columns\) \(first: \[2\]\)"):
        m.fit(X, Ybad)
    with pytest.raises(ValueError, match=r"Y has 1 NaN/inf values .*\(first: \[2\]\)"):  # lazy Y: chunk by chunk
        RidgeDecoder(ALPHAS, chunk_size=1, progress=False).fit(X, ColumnStack([Ybad]))
    with pytest.raises(ValueError, match="X_test has 19 voxels, X has 20"):
        m.fit_predict(X, Y, Xt[:, :19])
    with pytest.raises(ValueError, match="alphas must be finite and positive"):
        RidgeDecoder([1.0, 0.0])
    with pytest.raises(ValueError, match="alphas must be finite and positive"):
        RidgeDecoder([-1.0])
    with pytest.raises(ValueError, match="fixed_alpha must be finite and positive"):
        RidgeDecoder(fixed_alpha=-2)
    with pytest.raises(ValueError, match="n_select=21 is more than the 20 voxels"):
        RidgeDecoder.fastl2lir(21, progress=False).fit(X, Y)
    with pytest.raises(ValueError, match="needs fixed_alpha"):
        RidgeDecoder(n_select=5)
    with pytest.raises(ValueError, match="cv must be one of"):
        RidgeDecoder(cv="kfold")
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        RidgeDecoder(dtype=torch.float16)
    with pytest.raises(RuntimeError, match="not fitted"):
        RidgeDecoder().predict(X)
    with pytest.raises(MemoryError, match="use fit_predict"):
        RidgeDecoder(ALPHAS, memory_gb=1e-9, progress=False).fit(X, Y)


def test_pearson_per_target(rng):
    Y = rng.standard_normal((50, 4))
    H = Y + rng.standard_normal((50, 4))
    H[:, 3] = 1.0  # constant prediction: r undefined
    r = pearson_per_target(Y, H)
    np.testing.assert_allclose(r[:3], [np.corrcoef(Y[:, j], H[:, j])[0, 1] for j in range(3)])
    assert np.isnan(r[3])
    assert pearson_per_target(Y[:, 0], H[:, 0]).shape == ()
    with pytest.raises(ValueError, match="same shape"):
        pearson_per_target(Y, H[:, :2])
