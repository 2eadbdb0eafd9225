"""mini-NSD is decodable, and how well follows from the simulated brain's known signal-to-noise ratio.

Read through the project's loaders (the same path as the real NSD); decoded with scikit-learn's RidgeCV, an
independent reference, so these tests check the data, not the project's own ridge.
"""

import numpy as np
import pytest
from sklearn.linear_model import RidgeCV

from mdlib.nsd.betas import load_betas
from mdlib.synth.write import SCENES_TRUTH, load_truth, write_mini_nsd

SUBJECT = 1
ALPHAS = np.logspace(0, 5, 11)
#: Scene features a linear read-out of visual cortex should recover: object position and background colour.
FEATURES = ("mean_x", "mean_y", "background=sky blue", "background=navy", "background=beige")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Two mini-NSDs that differ only in their SNR (same scenes, same design, same noise draws)."""
    out = {}
    for snr in (1.0, 0.5):
        root = tmp_path_factory.mktemp(f"snr{snr}")
        write_mini_nsd(root, subjects=(SUBJECT,), snr_scale=snr, progress=False)
        out[snr] = root
    return out


def _scene_targets(root, nsd_ids):
    with np.load(root / SCENES_TRUTH, allow_pickle=False) as z:
        names = list(z["feature_names"])
        encoded = z["encoded"]
    return encoded[np.asarray(nsd_ids)][:, [names.index(f) for f in FEATURES]]


def _truth_rows(truth, nsd_ids) -> np.ndarray:
    """Rows of the truth's noiseless ``signal`` (in the subject's subjectim order) for the given nsdIds."""
    row = {int(n): k for k, n in enumerate(truth["signal_nsd_ids"])}
    return np.array([row[int(n)] for n in nsd_ids])


def _decode(x_train, y_train, x_test, y_test) -> np.ndarray:
    """Held-out Pearson r per feature of a ridge decoder (alpha per feature by LOO)."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-8
    model = RidgeCV(alphas=ALPHAS, alpha_per_target=True).fit((x_train - mu) / sd, y_train)
    pred = model.predict((x_test - mu) / sd)
    return np.array([np.corrcoef(pred[:, k], y_test[:, k])[0, 1] for k in range(y_test.shape[1])])


def test_averaged_responses_track_the_noiseless_signal_as_the_noise_ceiling_predicts(roots):
    root = roots[1.0]
    truth = load_truth(root, SUBJECT)
    betas = load_betas(root, SUBJECT, "nsdgeneral", progress=False, cache=False)
    # Noiseless responses of the same voxels, rows aligned by nsdId.
    ijk = [tuple(c) for c in truth["signal_voxels"]]
    col = {c: k for k, c in enumerate(ijk)}
    keep = [n for n, c in enumerate(map(tuple, betas.coords)) if c in col]
    signal = truth["signal"][_truth_rows(truth, betas.nsd_ids)][:, [col[tuple(betas.coords[n])] for n in keep]]
    measured = betas.responses[:, keep]
    r = np.array([np.corrcoef(measured[:, k], signal[:, k])[0, 1] for k in range(len(keep))])
    # Expected: corr(mean of n trials, signal) = sqrt(NC(n) / 100), with each image's own repeat count.
    snr2 = truth["ncsnr"][betas.mask][keep].astype(float) ** 2
    inv_n = np.mean(1.0 / betas.n_repeats)
    expected = np.sqrt(snr2 / (snr2 + inv_n))
    reliable = expected > 0.4
    assert reliable.sum() > 100
    assert np.corrcoef(r[reliable], expected[reliable])[0, 1] > 0.8
    assert np.median(np.abs(r - expected)[reliable]) < 0.07


def test_decoding_works_and_improves_with_snr(roots):
    scores = {}
    for snr, root in roots.items():
        betas = load_betas(root, SUBJECT, "nsdgeneral", progress=False, cache=False)
        train, test = betas.split()
        scores[snr] = _decode(train.responses, _scene_targets(root, train.nsd_ids),
                              test.responses, _scene_targets(root, test.nsd_ids))
    # Position and background are decoded well above chance from 360 training images ...
    assert np.all(scores[1.0] > 0.3), scores[1.0]
    assert scores[1.0][:2].mean() > 0.6
    # ... and better when the simulated brain is less noisy.
    assert scores[1.0].mean() > scores[0.5].mean() + 0.05


def test_the_noiseless_brain_is_the_ceiling(roots):
    root = roots[1.0]
    truth = load_truth(root, SUBJECT)
    betas = load_betas(root, SUBJECT, "nsdgeneral", progress=False, cache=False)
    clean = truth["signal"][_truth_rows(truth, betas.nsd_ids)]
    train, test = betas.train_rows, betas.test_rows
    y = _scene_targets(root, betas.nsd_ids)
    noisy = _decode(betas.responses[train], y[train], betas.responses[test], y[test])
    ceiling = _decode(clean[train], y[train], clean[test], y[test])
    assert ceiling.mean() > noisy.mean()
