"""mdlib.transfer: the design counts, the common test set, and the methods' known answers on planted problems."""

import numpy as np
import pytest

from mdlib import ridge, transfer
from mdlib.nsd.design import Design
from mdlib.ridge import RidgeDecoder, pearson_per_target

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALPHAS = np.logspace(-3, 4, 15)


# -- a design small enough to count by hand ----------------------------------------------------------------
#: 3 shared images (1-based nsdIds 10, 20, 30 = subjectim columns 1-3) and 3 own images per subject (columns
#: 4-6); 3 sessions of 4 trials. The trials show these subjectim columns:
HAND_ORDER = [[1, 4, 2, 1],    # session 1: shared columns 1, 2 (column 1 twice), other column 4
              [5, 2, 3, 6],    # session 2: shared 2, 3 (3 is new), others 5, 6
              [3, 4, 5, 6]]    # session 3: shared 3 (not new), others 4, 5, 6


@pytest.fixture
def hand():
    sharedix = np.array([10, 20, 30])
    subjectim = np.array([[10, 20, 30, 100 + 10 * s + 1, 100 + 10 * s + 2, 100 + 10 * s + 3] for s in range(1, 9)])
    return Design(masterordering=np.array(HAND_ORDER).ravel(), subjectim=subjectim, sharedix=sharedix,
                  trials_per_session=np.array([4, 4, 4]))


def nsd(column: int, subject: int = 2) -> int:
    """The 0-based nsdId that subjectim column ``column`` (1-based) shows ``subject`` in the hand design."""
    return [9, 19, 29][column - 1] if column <= 3 else 100 + 10 * subject + column - 3 - 1


def test_shared_per_session_against_a_hand_count(hand):
    t = transfer.shared_per_session(hand, 2)
    assert t.index.tolist() == [1, 2, 3]
    assert t["trials"].tolist() == [4, 4, 4]
    assert t["shared_trials"].tolist() == [3, 2, 1]              # column 1 twice in session 1
    assert t["shared_images"].tolist() == [2, 2, 1]
    assert t["new_shared_images"].tolist() == [2, 1, 0]
    assert t["cumulative_shared_images"].tolist() == [2, 3, 3]
    assert t["test_images_left"].tolist() == [1, 0, 0]
    assert t["other_images"].tolist() == [1, 2, 3]
    assert "usable_shared_images" not in t
    # a reference that kept only session 1 saw shared columns 1 and 2: session 2's column 3 is not usable
    u = transfer.shared_per_session(hand, 2, references=[1], reference_sessions=[1])
    assert u["usable_shared_images"].tolist() == [2, 1, 0]
    # a session range: counts start from its first session
    v = transfer.shared_per_session(hand, 2, sessions=[2, 3])
    assert v["new_shared_images"].tolist() == [2, 0] and v["test_images_left"].tolist() == [0, 0]


def test_split_by_hand(hand):
    s = transfer.transfer_split(hand, 2, sessions=[1], references=[1, 5])
    assert s.hour_ids.tolist() == sorted([nsd(1), nsd(4), nsd(2)])
    assert s.excluded_ids.tolist() == [nsd(1), nsd(2)]
    assert s.align_ids.tolist() == [nsd(1), nsd(2)]
    assert s.test_ids.tolist() == [nsd(3)]
    assert s.sessions == (1,) and s.n_trials == 4 and s.test_sessions == (1, 2, 3)
    # the first 2 trials only: shared column 2 is no longer in the hour, so it becomes a test image
    s2 = transfer.transfer_split(hand, 2, sessions=[1], n_trials=2, references=[1])
    assert s2.excluded_ids.tolist() == [nsd(1)] and s2.test_ids.tolist() == [nsd(2), nsd(3)]
    # alignment pairs are the hour's shared images every reference saw in its own sessions
    s3 = transfer.transfer_split(hand, 2, sessions=[2], references=[1, 5], reference_sessions={1: [1], 5: [1, 2]})
    assert s3.align_ids.tolist() == [nsd(2)] and s3.excluded_ids.tolist() == [nsd(2), nsd(3)]
    assert "4 trials in sessions 2" in repr(s3) and "1 of them seen by references [1, 5]" in repr(s3)


def test_errors_name_the_problem(hand):
    with pytest.raises(ValueError, match="no test image is left"):
        transfer.transfer_split(hand, 2, sessions=[1, 2])
    with pytest.raises(ValueError, match="cannot be its own reference"):
        transfer.transfer_split(hand, 2, sessions=[1], references=[1, 2])
    with pytest.raises(ValueError, match="must not repeat"):
        transfer.transfer_split(hand, 2, sessions=[1], references=[1, 1])
    with pytest.raises(TypeError, match=r"write \[1\]"):
        transfer.transfer_split(hand, 2, sessions=[1], references=1)
    with pytest.raises(ValueError, match="subjects 1..8"):
        transfer.transfer_split(hand, 9, sessions=[1])
    with pytest.raises(ValueError, match="subjects 1..8"):
        transfer.transfer_split(hand, 2, sessions=[1], references=[9])
    with pytest.raises(ValueError, match=r"sessions 1..3"):
        transfer.transfer_split(hand, 2, sessions=[4])
    with pytest.raises(ValueError, match="hold only 4 trials"):
        transfer.hour_trials(hand, 2, sessions=[1], n_trials=5)
    with pytest.raises(ValueError, match="positive integer"):
        transfer.hour_trials(hand, 2, sessions=[1], n_trials=0)
    with pytest.raises(ValueError, match="give the amount"):
        transfer.hour_trials(hand, 2)


def test_test_set_invariants_on_an_nsd_like_design():
    """Every method's test set: shared images of the subject, none shown in the hour, all the others."""
    from mdlib.synth.write import make_design

    d0 = make_design(n_shared=30, n_per_subject=120, trials_per_session=24, seed=3)
    d = Design(d0.masterordering, d0.subjectim, d0.sharedix, np.full(d0.n_sessions, d0.trials_per_session))
    everything = d.trials(2)
    all_shared = set(everything.loc[everything["shared"], "nsd_id"])
    for sessions, n_trials in (([1], None), ([1, 2], None), ([1, 2, 3, 4], None), ([1], 10), ([3, 5], 30)):
        s = transfer.transfer_split(d, 2, sessions, n_trials, references=[1, 5, 7])
        hour_trials = set(s.hour["trial"])
        shown_in_hour = set(everything.loc[everything["trial"].isin(hour_trials), "nsd_id"])
        test = set(s.test_ids.tolist())
        assert test and test <= all_shared
        assert test.isdisjoint(shown_in_hour)                           # no test image was seen in the hour
        assert test | set(s.excluded_ids.tolist()) == all_shared        # ... and every other shared image is one
        assert set(s.excluded_ids.tolist()) == all_shared & shown_in_hour
        assert set(s.align_ids.tolist()) <= set(s.excluded_ids.tolist())
        assert set(s.hour_ids.tolist()) == shown_in_hour
        # the test images' trials all lie outside the hour
        test_trials = set(everything.loc[everything["nsd_id"].isin(test), "trial"])
        assert test_trials.isdisjoint(hour_trials)
    t = transfer.shared_per_session(d, 2)
    assert t["shared_images"].sum() >= t["new_shared_images"].sum() == len(all_shared)


# -- the methods' known answers ------------------------------------------------------------------------------
def test_alignment_recovers_a_linear_map(rng):
    n, p_a, p_b = 160, 25, 18
    A = rng.standard_normal((n, p_a))
    M = rng.standard_normal((p_a, p_b))
    B = A @ M + 0.05 * rng.standard_normal((n, p_b))
    al = transfer.Alignment(ALPHAS, device="cpu").fit(A[:120], B[:120])
    got = al.transform(A[120:])
    want = A[120:] @ M
    assert al.n_pairs_ == 120
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.999
    np.testing.assert_allclose(al.ridge_.coef_, M, atol=0.05 * np.abs(M).max())
    with pytest.raises(ValueError, match="at least 2 are needed"):
        transfer.Alignment(ALPHAS, device="cpu").fit(A[:1], B[:1])
    with pytest.raises(ValueError, match="row i of both must be the same image"):
        transfer.Alignment(ALPHAS, device="cpu").fit(A[:10], B[:9])
    with pytest.raises(RuntimeError, match="not fitted"):
        transfer.Alignment().transform(A)


def loo(X, Y):
    """Leave-one-out predictions at the alphas a ridge decoder chooses: what fit_references gives SharedSpace."""
    dec = RidgeDecoder(alphas=ALPHAS, device="cpu", progress=False).fit(X, Y)
    return ridge.loo_predictions(X, Y, dec.alpha_, "cpu")


@pytest.mark.parametrize("shape", [(12, 30), (30, 6)])            # fewer images than voxels, and more
def test_loo_predictions_equal_refits_without_each_image(rng, shape):
    n, p = shape
    X = rng.standard_normal((n, p))
    Y = X[:, :3] @ rng.standard_normal((3, 4)) + rng.standard_normal((n, 4)) + 5.0   # an intercept to fit
    alpha = np.array([0.1, 1.0, 10.0, 1.0])
    got = ridge.loo_predictions(X, Y, alpha, "cpu")
    want = np.empty_like(got)
    for i in range(n):
        keep = np.arange(n) != i
        for j, a in enumerate(alpha):
            dec = RidgeDecoder(fixed_alpha=a, device="cpu", dtype="float64", progress=False).fit(X[keep], Y[keep, j])
            want[i, j] = dec.predict(X[i:i + 1])[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(12, 30), (30, 6)])
def test_loo_predictions_give_the_decoders_own_loo_errors(rng, shape):
    """The same leave-one-out maths as the decoder's choice of alpha: its cv_mse_ is their mean squared error,
    also with collinear voxels (a duplicated column: a direction with no variance)."""
    n, p = shape
    X = rng.standard_normal((n, p))
    X[:, -1] = X[:, 0]
    Y = X[:, :3] @ rng.standard_normal((3, 5)) + rng.standard_normal((n, 5))
    dec = RidgeDecoder(alphas=ALPHAS, device="cpu", dtype="float64", progress=False).fit(X, Y)
    got = ridge.loo_predictions(X, Y, dec.alpha_, "cpu")
    np.testing.assert_allclose(((got - Y) ** 2).mean(0), dec.cv_mse_, rtol=1e-5)


def planted(rng, n_subjects=4, n=200, k=3, t=60, p=40, feature_noise=1.0, voxel_noise=0.3, unseen=0.0):
    """Subjects whose voxels and features share a k-dim latent per image: X_s = L_s A_s + e, and features
    Y_s = 3 L_s W' + unseen G_s U' + f: W (t, k) and U (t, 2) orthonormal and orthogonal to each other, G_s
    two image factors no brain carries, f isotropic feature noise. Returns W, U and per subject (X, Y, L).
    """
    Q = np.linalg.qr(rng.standard_normal((t, k + 2)))[0]
    W, U = Q[:, :k], Q[:, k:]
    out = []
    for _ in range(n_subjects):
        L = rng.standard_normal((n, k))
        X = L @ rng.standard_normal((k, p)) + voxel_noise * rng.standard_normal((n, p))
        Y = 3 * L @ W.T + unseen * rng.standard_normal((n, 2)) @ U.T + feature_noise * rng.standard_normal((n, t))
        out.append((X.astype(np.float32), Y.astype(np.float32), L))
    return W, U, out


def test_shared_space_recovers_a_planted_latent(rng):
    """The space is what the brains carry (W), not where the features vary most (U, twice W's sd)."""
    W, U, subjects = planted(rng, n=1000, unseen=6.0)
    refs = subjects[:3]
    Yt = [Y for _, Y, _ in refs]
    Yp = [loo(X, Y) for X, Y, _ in refs]
    space = transfer.SharedSpace(standardize=False).fit(Yt, Yp)     # the planted geometry, in feature units

    def distance(V, basis):                                     # sine of the largest principal angle
        return np.linalg.norm(V.T @ V - basis @ basis.T, 2)

    assert space.k == 3                             # held-out references: exactly the planted directions
    top = space.components_.astype(np.float64)
    assert distance(top, W) < 0.15
    assert np.all(space.r2_ > 0.8) and np.all(np.abs(space.explained_ - 9) < 1)   # 3^2: each latent's variance
    assert space.n_candidates_ == 60
    # the features' own principal directions would have been U's first
    pca = transfer.SharedSpace(n_components=3, standardize=False).fit(Yt, Yt).components_.astype(np.float64)
    assert distance(pca, W) > 0.9 and distance(pca[:2], U) < 0.15
    np.testing.assert_allclose(space.components_ @ space.components_.T, np.eye(space.k), atol=1e-5)
    # project/reconstruct: a feature inside the space comes back unchanged
    y = space.mean_ + 2.0 * top[0] - 0.5 * top[2]
    np.testing.assert_allclose(space.project(y[None])[0], [2.0, 0.0, -0.5], atol=1e-5)
    np.testing.assert_allclose(space.reconstruct(space.project(y[None]))[0], y, atol=1e-5)
    # a fixed size keeps the leading components
    assert transfer.SharedSpace(n_components=5, standardize=False).fit(Yt, Yp).k == 5
    assert f"{space.k} of 60 components" in repr(space)


def test_shared_space_beats_scratch_with_little_data(rng):
    """With 30 images the new subject cannot tell signal from feature noise in 60 features; the space can."""
    W, _, subjects = planted(rng, feature_noise=2.0)
    refs, (X, Y, L) = subjects[:3], subjects[3]
    space = transfer.SharedSpace().fit([Yr for _, Yr, _ in refs],
                                       [loo(Xr, Yr) for Xr, Yr, _ in refs])
    fit, held = slice(0, 30), slice(30, None)
    pred = {"shared": transfer.SpaceDecoder(space, ALPHAS, "cpu").fit(X[fit], Y[fit]).predict(X[held]),
            "scratch": RidgeDecoder(alphas=ALPHAS, device="cpu", progress=False).fit_predict(X[fit], Y[fit], X[held])}
    signal = 3 * L[held] @ W.T                                   # what a brain carries of the features
    err = {k: float(np.mean((v - signal) ** 2)) for k, v in pred.items()}
    assert err["shared"] < 0.5 * err["scratch"], err
    r = {k: np.median(pearson_per_target(Y[held], v)) for k, v in pred.items()}
    assert r["shared"] > r["scratch"], r


def test_standardised_space_follows_a_feature_rescaled(rng):
    """In units of each feature's sd, rescaling a feature (a channel 100 times larger, as CLIP has) rescales
    its predictions and changes nothing else."""
    _, _, subjects = planted(rng, n=150)
    refs, (X, Y, _) = subjects[:3], subjects[3]
    scale = np.ones(Y.shape[1])
    scale[[0, 7]] = [100.0, 0.01]
    got = {}
    for name, c in (("as is", np.ones_like(scale)), ("rescaled", scale)):
        space = transfer.SharedSpace().fit([Yr * c for _, Yr, _ in refs], [loo(Xr, Yr) * c for Xr, Yr, _ in refs])
        got[name] = (space.k, transfer.SpaceDecoder(space, ALPHAS, "cpu").fit(X[:40], Y[:40] * c).predict(X[40:]))
    assert got["as is"][0] == got["rescaled"][0]
    np.testing.assert_allclose(got["rescaled"][1] / scale, got["as is"][1], rtol=2e-3, atol=2e-3)


def test_space_decoder_and_shared_space_errors(rng):
    with pytest.raises(ValueError, match="n_components must be a positive integer"):
        transfer.SharedSpace(n_components=0)
    with pytest.raises(ValueError, match="one \\(true, predicted\\) pair per reference"):
        transfer.SharedSpace().fit([np.zeros((4, 3))], [])
    with pytest.raises(ValueError, match="equal shapes"):
        transfer.SharedSpace().fit([np.zeros((4, 3))], [np.zeros((4, 2))])
    with pytest.raises(RuntimeError, match="not fitted"):
        transfer.SharedSpace().project(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="at least 2 images"):
        ridge.loo_predictions(np.zeros((1, 2)), np.zeros((1, 1)), 1.0, "cpu")
    with pytest.raises(ValueError, match="finite and positive"):
        ridge.loo_predictions(np.ones((3, 2)), np.ones((3, 1)), 0.0, "cpu")


def test_principal_axes_randomised_equals_exact(rng):
    """The randomised SVD (large problems) finds the same leading axes and variances as the exact one."""
    P = rng.standard_normal((300, 8)) @ (np.diag([10, 8, 6, 5, 4, 3, 2, 1.0]) @ rng.standard_normal((8, 500)))
    P += 0.01 * rng.standard_normal(P.shape)
    V_exact, var_exact = transfer._principal_axes(P, 4, 0)
    V_rand, var_rand = transfer._principal_axes(P, 4, 0, exact_limit=0)
    assert V_exact.shape == V_rand.shape == (500, 4)
    np.testing.assert_allclose(np.abs(np.sum(V_rand * V_exact, 0)), 1.0, atol=1e-4)
    np.testing.assert_allclose(var_rand, var_exact, rtol=1e-4)
    np.testing.assert_allclose(var_exact, np.linalg.svd(P, compute_uv=False)[:4] ** 2 / 300, rtol=1e-8)
    # n > t takes the other branch of the exact route
    V_tall, _ = transfer._principal_axes(P[:, :40].T.copy(), 3, 0)
    U = np.linalg.svd(P[:, :40].T, full_matrices=False)[2][:3].T
    np.testing.assert_allclose(np.abs(np.sum(V_tall * U, 0)), 1.0, atol=1e-6)


# -- compare: all methods on one planted world ----------------------------------------------------------------
@pytest.fixture
def world():
    """A design like NSD's and subjects whose responses are linear in a per-image latent (known answers)."""
    from mdlib.synth.write import make_design

    d0 = make_design(n_shared=40, n_per_subject=200, trials_per_session=50, seed=1)
    design = Design(d0.masterordering, d0.subjectim, d0.sharedix, np.full(d0.n_sessions, d0.trials_per_session))
    rng = np.random.default_rng(5)
    ids = np.unique(d0.subjectim) - 1
    k, t = 4, 30
    latent = dict(zip(ids.tolist(), rng.standard_normal((ids.size, k))))
    W = rng.standard_normal((k, t))
    Y = np.stack([latent[i] @ W for i in ids.tolist()]) + 0.5 * rng.standard_normal((ids.size, t))
    targets = transfer.TargetTable(ids, {"f": Y.reshape(-1, 5, 6).astype(np.float32)})
    maps = {s: rng.standard_normal((k, 25 + s)) for s in (1, 2, 5, 7)}

    def responses(s, trial_ids):
        """Mean over trials of latent @ A_s + trial noise, per image."""
        uniq, inv = np.unique(trial_ids, return_inverse=True)
        X = np.stack([latent[i] @ maps[s] for i in trial_ids]) + 0.5 * rng.standard_normal((len(trial_ids),
                                                                                           maps[s].shape[1]))
        out = np.zeros((uniq.size, X.shape[1]))
        np.add.at(out, inv, X)
        return transfer.Responses((out / np.bincount(inv)[:, None]).astype(np.float32), uniq)

    return design, targets, responses


def make_inputs(split, design, responses):
    hour = responses(split.subject, split.hour["nsd_id"].to_numpy())
    rest = design.trials(split.subject)
    rest = rest[~rest["trial"].isin(split.hour["trial"])]
    whole = responses(split.subject, rest["nsd_id"].to_numpy())
    shared = set(design.trials(split.subject).loc[lambda t: t["shared"], "nsd_id"])
    train_ids = np.array([i for i in whole.nsd_ids if i not in shared])
    refs = {}
    for r in split.references:
        rt = design.trials(r)
        rr = responses(r, rt["nsd_id"].to_numpy())
        tr = np.array([i for i in rr.nsd_ids if i not in shared])
        sh = np.array(sorted(i for i in rr.nsd_ids if i in shared))
        refs[r] = (transfer.Responses(rr.take(tr), tr), transfer.Responses(rr.take(sh), sh))
    return transfer.TransferInputs(hour=hour, test=whole,
                                   full=transfer.Responses(whole.take(train_ids), train_ids), references=refs)


def test_compare_runs_every_method_on_the_same_test_images(world):
    design, targets, responses = world
    split = transfer.transfer_split(design, 2, sessions=[1, 2], references=[1, 5, 7])
    inputs = make_inputs(split, design, responses)
    res = transfer.compare(split, inputs, targets, alphas=ALPHAS, device="cpu", progress=False)
    n = split.test_ids.size
    assert res.methods == list(transfer.METHODS) and res.families == ["f"]
    for m in res.methods:
        assert res.pred[m]["f"].shape == (n, 30) and res.r[m]["f"].shape == (30,)
    np.testing.assert_array_equal(res.true["f"], targets.get("f", split.test_ids))
    # scratch is a plain ridge fit on the hour, voxels standardised with the hour's statistics
    Xh = inputs.hour.take(split.hour_ids)
    want = RidgeDecoder(alphas=ALPHAS, device="cpu", progress=False).fit_predict(
        transfer.standardize(Xh, Xh), targets.get("f", split.hour_ids),
        transfer.standardize(inputs.test.take(split.test_ids), Xh))
    np.testing.assert_allclose(res.pred["scratch"]["f"], want, rtol=1e-5, atol=1e-5)
    # the world is linear in a 4-dim latent: every method decodes well above chance; the space's 4
    # leading dims are the latent's, and what else passes held-out R^2 > 0 adds almost nothing
    table = res.table()
    assert (table["f"] > 0.5).all(), table
    space = res.spaces["f"]
    assert 4 <= space.k <= 6 and np.all(space.r2_[:4] > 0.5) and np.all(space.r2_[4:] < 0.1), space.r2_
    assert res.n_align == split.align_ids.size > 0
    dec = res.decoded("shared")
    assert dec.pred["f"].shape == (n, 5, 6) and dec.params["method"] == "shared"
    np.testing.assert_array_equal(dec.nsd_ids, split.test_ids)
    assert "test images" in repr(res)


def test_each_method_scores_its_features_on_its_own_training_data_only(world):
    """Stage 2's selection score: each method's leave-one-out R^2 where it learned, never on the test images,
    checked against refits without each image (sklearn's Ridge at the fitted alphas)."""
    from sklearn.linear_model import Ridge

    design, targets, responses = world
    split = transfer.transfer_split(design, 2, sessions=[1, 2], references=[1, 5])
    inputs = make_inputs(split, design, responses)
    res = transfer.compare(split, inputs, targets, alphas=ALPHAS, device="cpu", progress=False)
    Xh_raw = inputs.hour.take(split.hour_ids)
    Xh, Yh = transfer.standardize(Xh_raw, Xh_raw).astype(np.float64), targets.get("f", split.hour_ids)

    def loo_r2(X, Y, alpha, after=lambda P: P):
        """Refit without each image (alpha per target), map back with ``after``, R^2 per feature."""
        P = np.empty((len(X), np.shape(Y)[1]))
        for i in range(len(X)):
            keep = np.arange(len(X)) != i
            P[i] = Ridge(alpha=alpha, solver="svd").fit(X[keep], Y[keep]).predict(X[i:i + 1])[0]
        P = after(P)
        return 1 - ((Yh - P) ** 2).sum(0) / ((Yh - Yh.mean(0)) ** 2).sum(0)

    dec = RidgeDecoder(alphas=ALPHAS, device="cpu", progress=False).fit(Xh, Yh)
    np.testing.assert_allclose(res.score["scratch"]["f"], loo_r2(Xh, Yh, dec.alpha_), rtol=1e-4, atol=1e-4)
    space = res.spaces["f"]
    sdec = transfer.SpaceDecoder(space, ALPHAS, "cpu").fit(Xh, Yh)
    want = loo_r2(Xh, space.project(Yh).astype(np.float64), sdec.ridge_.alpha_, space.reconstruct)
    np.testing.assert_allclose(res.score["shared"]["f"], want, rtol=1e-4, atol=1e-4)
    refs = res.reference_models["f"]
    np.testing.assert_allclose(res.score["align"]["f"], (refs.loo_r2[1] + refs.loo_r2[5]) / 2)
    assert res.score["full"]["f"].shape == (30,) and np.all(res.score["full"]["f"] > 0)
    # nothing of the test images goes into a score: other test responses, the same scores
    other = transfer.TransferInputs(hour=inputs.hour, full=inputs.full, references=inputs.references,
                                    test=transfer.Responses(inputs.test.X[::-1].copy(), inputs.test.nsd_ids))
    res2 = transfer.compare(split, other, targets, alphas=ALPHAS, device="cpu", progress=False,
                            references=res.reference_models)
    for m in res.methods:
        np.testing.assert_array_equal(res2.score[m]["f"], res.score[m]["f"])
    # the decoded features carry the score and the rule, as lesson 03's do: stage 2 can select by them
    d = res.decoded("shared")
    np.testing.assert_array_equal(d.score["f"], res.score["shared"]["f"])
    assert d.params["select_by"] == "loo-r2"


def test_compare_errors(world):
    design, targets, responses = world
    split = transfer.transfer_split(design, 2, sessions=[1], references=[1])
    inputs = make_inputs(split, design, responses)
    one = transfer.transfer_split(design, 2, sessions=[1], n_trials=1, references=[1])
    with pytest.raises(ValueError, match="at least 2 are needed"):
        transfer.compare(one, make_inputs(one, design, responses), targets, methods=["scratch"], alphas=ALPHAS,
                         device="cpu", progress=False)
    with pytest.raises(ValueError, match="methods must be a non-empty subset"):
        transfer.compare(split, inputs, targets, methods=["magic"])
    with pytest.raises(ValueError, match="not in the targets"):
        transfer.compare(split, inputs, targets, families=["z"])
    no_refs = transfer.transfer_split(design, 2, sessions=[1])
    with pytest.raises(ValueError, match="need reference subjects"):
        transfer.compare(no_refs, inputs, targets, methods=["shared"])
    with pytest.raises(ValueError, match="needs the new subject's responses"):
        transfer.compare(split, transfer.TransferInputs(inputs.hour, inputs.test, None, {}), targets,
                         methods=["full"])
    with pytest.raises(KeyError, match="no row for nsdId"):
        inputs.hour.take([10 ** 6])


def test_alignment_with_too_few_pairs_is_refused(hand):
    """The hand design's first 2 trials hold one shared image: one pair cannot fit an alignment."""
    split = transfer.transfer_split(hand, 2, sessions=[1], n_trials=2, references=[1])
    assert split.align_ids.size == 1
    ids = np.unique(hand.subjectim[[0, 1]]) - 1
    targets = transfer.TargetTable(ids, {"f": np.zeros((ids.size, 2), np.float32)})
    empty = transfer.Responses(np.zeros((0, 3), np.float32), [])
    with pytest.raises(ValueError, match=r"alignment needs at least 2 images .* hold 1: give more sessions"):
        transfer.compare(split, transfer.TransferInputs(empty, empty, None, {}), targets, methods=["align"])


# -- reading a mini-NSD ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mini_root(mini_nsd):
    return mini_nsd(subjects=(1, 2), n_shared=8, n_per_subject=40, trials_per_session=24, stim_size=32)


def test_hour_responses_average_the_hour_trials_only(mini_root):
    from mdlib.nsd.betas import load_betas
    from mdlib.nsd.design import load_design
    from mdlib.transfer_data import hour_responses, load_inputs

    design = load_design(mini_root)
    split = transfer.transfer_split(design, 2, sessions=[1, 2], n_trials=30, references=[1])
    got = hour_responses(mini_root, split, progress=False)
    per_trial = load_betas(mini_root, 2, sessions=[1, 2], average_repeats=False, progress=False)
    keep = per_trial.trials < 30                                     # sessions 1-2 are trials 0..47: the first 30
    np.testing.assert_array_equal(got.nsd_ids, np.unique(per_trial.nsd_ids[keep]))
    for i, nid in enumerate(got.nsd_ids):
        rows = keep & (per_trial.nsd_ids == nid)
        np.testing.assert_allclose(got.X[i], per_trial.responses[rows].mean(0), rtol=1e-5, atol=1e-6)
    inputs = load_inputs(mini_root, split, progress=False)
    assert not np.isin(inputs.full.nsd_ids, split.test_ids).any()
    train, align = inputs.references[1]
    assert set(split.align_ids) <= set(align.nsd_ids) and not np.isin(train.nsd_ids, align.nsd_ids).any()
    with pytest.raises(FileNotFoundError, match="NSD file missing"):
        load_inputs(mini_root, transfer.transfer_split(design, 2, sessions=[1], references=[5]), progress=False)


def test_run_on_mini_nsd(mini_root, sd):
    from mdlib import method
    from mdlib.transfer_data import run

    config = method.configure("mdlib", "mini")
    res = run(mini_root, 2, sessions=[1], references=[1], sd=sd, config=config, families=["z"],
              alphas=ALPHAS, device="cpu", progress=False)
    assert res.split.test_ids.size > 0 and res.table().shape == (4, 1)
    assert res.pred["full"]["z"].shape == (res.split.test_ids.size, int(np.prod(res.shapes["z"])))
    assert res.params["roi"] == config.roi and res.params["n_test"] == res.split.test_ids.size


def test_shared_alone_keeps_no_reference_coefficients_and_gives_the_same_answers(world):
    """Without "align" the references' coefficients (references x voxels x targets: gigabytes per family on
    NSD) are not kept; the shared space, its predictions and the scores are the same."""
    design, targets, responses = world
    split = transfer.transfer_split(design, 2, sessions=[1, 2], references=[1, 5, 7])
    inputs = make_inputs(split, design, responses)
    both = transfer.compare(split, inputs, targets, alphas=ALPHAS, device="cpu", progress=False)
    lean = transfer.compare(split, inputs, targets, methods=["shared", "scratch"], alphas=ALPHAS, device="cpu",
                            progress=False)
    assert all(d.coef_ is None for d in lean.reference_models["f"].decoders.values())
    assert all(d.coef_ is not None for d in both.reference_models["f"].decoders.values())
    np.testing.assert_allclose(lean.pred["shared"]["f"], both.pred["shared"]["f"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lean.score["shared"]["f"], both.score["shared"]["f"], rtol=1e-6)
    for r in (1, 5, 7):
        np.testing.assert_allclose(lean.reference_models["f"].loo_r2[r], both.reference_models["f"].loo_r2[r],
                                   rtol=1e-6)
    with pytest.raises(ValueError, match="coefficients .fitted for 'align'.: refit them"):
        transfer.compare(split, inputs, targets, methods=["align"], references=lean.reference_models,
                         alphas=ALPHAS, device="cpu", progress=False)
