"""mdlib.decoding: the decoded test-set features equal a direct fit, are cached by content, and resume."""

import numpy as np
import pytest

from mdlib import decoding, features
from mdlib.nsd.betas import load_betas
from mdlib.ridge import RidgeDecoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mini_root(mini_nsd):
    return mini_nsd(subjects=(1,), n_shared=8, n_per_subject=40, trials_per_session=24, stim_size=32)


def test_equals_a_direct_fit(mini_root, sd):
    alphas = np.logspace(-1, 4, 6)
    got = decoding.decode_features(mini_root, 1, sd, families=["z", "c"], alphas=alphas, posterior="mean",
                                   device="cpu", progress=False)
    betas = load_betas(mini_root, 1, progress=False)
    tr, te = betas.train_rows, betas.test_rows
    X = betas.responses
    mu, sd_x = X[tr].mean(0), X[tr].std(0)
    sd_x[sd_x == 0] = 1
    t = features.extract_targets(mini_root, betas.nsd_ids, sd, targets=["z", "c"], posterior="mean", progress=False)
    np.testing.assert_array_equal(got.nsd_ids, betas.nsd_ids[te])
    for fam, Y in (("z", np.asarray(t["z"])), ("c", np.asarray(t["c"])[:, 1:])):
        Y2 = Y.reshape(len(Y), -1)
        dec = RidgeDecoder(alphas=alphas, device="cpu", progress=False).fit((X[tr] - mu) / sd_x, Y2[tr])
        want = dec.predict((X[te] - mu) / sd_x).reshape(len(te), *Y.shape[1:])
        assert got.pred[fam].shape == want.shape == got.true[fam].shape
        np.testing.assert_allclose(got.pred[fam], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
        np.testing.assert_array_equal(got.true[fam], Y[te])
        np.testing.assert_array_equal(got.alpha[fam], dec.alpha_)
        # leave-one-out R^2 on the training images, against a brute-force refit without each image in turn
        j = int(np.nanargmax(got.cv_r2[fam]))
        Xs = (X[tr] - mu) / sd_x
        loo = []
        for i in range(len(tr)):
            keep = np.arange(len(tr)) != i
            one = RidgeDecoder(fixed_alpha=float(dec.alpha_[j]), device="cpu", dtype="float64", progress=False)
            loo.append(one.fit(Xs[keep], Y2[tr][keep, j]).predict(Xs[i:i + 1])[0])
        want_r2 = 1 - np.mean((np.array(loo) - Y2[tr, j]) ** 2) / Y2[tr, j].var()
        assert got.cv_r2[fam][j] == pytest.approx(want_r2, rel=1e-3)
        assert got.r[fam].shape == (Y2.shape[1],)
    assert got.pred["c"].shape[1] == 14                          # tokens 1..14: BOS is not decoded
    assert "median r" in repr(got)


def test_cached_by_content(mini_root, sd, monkeypatch):
    kw = dict(families=["z"], alphas=[1.0, 100.0], posterior="mean", device="cpu", progress=False)
    first = decoding.decode_features(mini_root, 1, sd, **kw)

    def refuse(*a, **k):
        raise AssertionError("refitted although cached")

    monkeypatch.setattr(RidgeDecoder, "fit_predict", refuse)
    again = decoding.decode_features(mini_root, 1, sd, **kw)
    np.testing.assert_array_equal(again.pred["z"], first.pred["z"])
    # other parameters, other voxels or other targets are other cache entries: they refit
    with pytest.raises(AssertionError, match="refitted"):
        decoding.decode_features(mini_root, 1, sd, **{**kw, "alphas": [1.0, 10.0]})
    with pytest.raises(AssertionError, match="refitted"):
        decoding.decode_features(mini_root, 1, sd, **{**kw, "posterior": "sample"})
    with pytest.raises(AssertionError, match="refitted"):
        decoding.decode_features(mini_root, 1, sd, **{**kw, "sessions": [1]})
    assert not list((mini_root / "mdlib_cache" / "decoded").glob("*.part*"))


def test_fastl2lir_and_clip_families(mini_root, clip):
    kw = dict(clip=clip, families=["clip_block1", "clip_embedding"], method="fastl2lir",
              n_select={"z": 5, "c": 5, "clip": 7}, device="cpu", progress=False)
    with pytest.raises(ValueError, match="cv5-r"):               # no leave-one-out score: never skipped silently
        decoding.decode_features(mini_root, 1, **kw)
    got = decoding.decode_features(mini_root, 1, select_by="cv5-r", **kw)
    assert set(got.pred) == {"clip_block1", "clip_embedding"}
    assert got.pred["clip_block1"].shape[1:] == got.true["clip_block1"].shape[1:] == (50, clip.width)
    assert np.all(got.alpha["clip_embedding"] == 0.15)
    assert np.isnan(got.cv_r2["clip_embedding"]).all()          # FastL2LiR cross-validates nothing
    assert np.nanmedian(got.r["clip_embedding"]) > 0.2           # the simulated brain carries the signal
    # the released criterion: 5 consecutive folds of the training images, FastL2LiR inside, mean |r|
    betas = load_betas(mini_root, 1, progress=False)
    X = betas.responses[betas.train_rows]
    Xs = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1)
    block1 = np.asarray(features.extract_targets(mini_root, betas.nsd_ids, clip=clip, progress=False)["clip_block1"])
    Y = block1.reshape(len(block1), -1)[betas.train_rows]
    ref = np.zeros(Y.shape[1])
    for held in np.array_split(np.arange(len(X)), 5):
        fit = np.setdiff1d(np.arange(len(X)), held)
        pred = RidgeDecoder.fastl2lir(7, device="cpu", progress=False).fit_predict(Xs[fit], Y[fit], Xs[held])
        with np.errstate(invalid="ignore", divide="ignore"):
            r = [np.corrcoef(Y[held, j], pred[:, j])[0, 1] for j in range(Y.shape[1])]
        ref += np.abs(np.nan_to_num(r))
    np.testing.assert_allclose(got.score["clip_block1"], ref / 5, atol=1e-4)
    assert got.params["select_by"] == "cv5-r"


def test_released_standardisation_and_training_subset(mini_root, sd):
    """standardize='test' z-scores the test images with their own statistics, n_train fits on the first n
    training images: both equal a direct fit."""
    betas = load_betas(mini_root, 1, progress=False)
    tr, te = betas.train_rows[:20], betas.test_rows
    got = decoding.decode_features(mini_root, 1, sd, families=["z"], alphas=[10.0], posterior="mean",
                                   standardize="test", n_train=20, device="cpu", progress=False)
    X = betas.responses
    z = lambda a: (a - a.mean(0)) / np.where(a.std(0) > 0, a.std(0), 1)  # noqa: E731
    Y = np.asarray(features.extract_targets(mini_root, betas.nsd_ids, sd, targets=["z"], posterior="mean",
                                            progress=False)["z"])
    Y2 = Y.reshape(len(Y), -1)
    want = RidgeDecoder(alphas=[10.0], device="cpu", progress=False).fit(z(X[tr]), Y2[tr]).predict(z(X[te]))
    np.testing.assert_allclose(got.pred["z"].reshape(len(te), -1), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert got.params["standardize"] == "test" and got.params["n_train"] == 20
    with pytest.raises(ValueError, match="standardize"):
        decoding.decode_features(mini_root, 1, sd, families=["z"], standardize="all", progress=False)


def test_scaled_n_select_and_errors(mini_root, sd):
    assert decoding.scaled_n_select(100) == {"z": 100, "c": 100, "clip": 100}
    assert decoding.scaled_n_select(11694, scale_to_roi=True) == decoding.RELEASED_N_SELECT
    assert decoding.scaled_n_select(1169, scale_to_roi=True) == {"z": 400, "c": 12, "clip": 85}
    with pytest.raises(ValueError, match="need clip"):
        decoding.decode_features(mini_root, 1, sd, families=["clip_block1"], progress=False)
    with pytest.raises(ValueError, match="method"):
        decoding.decode_features(mini_root, 1, sd, method="lasso", progress=False)
