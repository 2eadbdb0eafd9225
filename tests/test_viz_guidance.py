"""mdlib.viz.guidance: lesson 05's figures, tables and sentences, on small arrays."""

import matplotlib

matplotlib.use("Agg")

from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mdlib import method  # noqa: E402
from mdlib.stage2 import FeatureTargets  # noqa: E402
from mdlib.viz import guidance  # noqa: E402


def _legend_clear_of_axes(fig, ax):
    renderer = fig.canvas.get_renderer()
    legend = (ax.get_legend() or fig.legends[0]).get_window_extent(renderer)
    return legend.x0 >= ax.get_window_extent(renderer).x1 - 1e-6


def test_mirror_table_reads_blind_and_position_bound_features():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 4, 6))
    feats = {"block1": a, "embedding": torch.as_tensor(a.sum(1))}
    # block1 mirrored is the tokens in reverse order (position-bound); the embedding, pooled, does not change.
    mirrored = {"block1": a[:, ::-1], "embedding": torch.as_tensor(a.sum(1))}
    t = guidance.mirror_table(feats, mirrored)
    assert list(t.index) == ["block1", "embedding"] and list(t.columns) == ["mirrored", "another image",
                                                                            "position share"]
    assert t.loc["embedding", "mirrored"] == pytest.approx(1.0) and t.loc["embedding", "position share"] == 0
    assert t.loc["block1", "mirrored"] < 0.5 and t.loc["block1", "position share"] > 0.5
    r_other = np.mean([np.corrcoef(a[i].ravel(), a[(i + 1) % 5].ravel())[0, 1] for i in range(5)])
    assert t.loc["block1", "another image"] == pytest.approx(r_other)
    text = guidance.mirror_sentence(t)
    assert "sensitive to where things are" in text and "embedding: r = 1.00 mirrored" in text


def test_plot_mirror_table_has_two_bars_per_family_and_a_legend_beside_them():
    t = pd.DataFrame({"mirrored": [0.9, 0.95, 0.99], "another image": [0.3, 0.4, -0.1],
                      "position share": [0.1, 0.1, 0.0]}, index=["block1", "block2", "embedding"])
    fig = guidance.plot_mirror_table(t)
    ax = fig.axes[0]
    assert len(ax.patches) == 6 and [x.get_text() for x in ax.get_xticklabels()] == list(t.index)
    assert ax.get_ylabel() and ax.get_title() and ax.get_ylim()[0] < -0.1
    fig.canvas.draw()
    assert _legend_clear_of_axes(fig, ax)


def test_kept_table_and_selection_figure():
    score = np.linspace(0, 1, 20)
    r = np.linspace(0.2, 0.9, 20)
    mask = (score >= 0.75).reshape(4, 5)
    decoded = SimpleNamespace(score={"clip_block1": score}, r={"clip_block1": r})
    t = guidance.kept_table(decoded, {"block1": mask})
    row = t.loc["block1"]
    assert (row["features"], row["kept"]) == (20, 5)
    assert row["test r, kept (median)"] == pytest.approx(np.median(r[15:]))
    assert row["test r, dropped (median)"] == pytest.approx(np.median(r[:15]))
    fig = guidance.plot_selection(score, r, mask, "block1", "loo-r2", 0.25)
    assert len(fig.axes) == 2 and all(ax.get_xlabel() and ax.get_title() for ax in fig.axes)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["dropped", "kept (25%)"]
    assert "top 25% kept" in guidance.selection_sentence("loo-r2", 0.25, "mdlib")
    assert "75th percentile" in guidance.selection_sentence("cv5-r", 0.25, "released")


def test_regression_to_the_mean_helpers():
    # Decoded = half-way between the truth and the mean: the spread is half the truth's.
    rng = np.random.default_rng(1)
    true = rng.normal(size=(10, 3, 4))
    pred = 0.5 * true + 0.5 * true.mean(0)
    decoded = SimpleNamespace(nsd_ids=np.arange(10), pred={"clip_block1": pred}, true={"clip_block1": true,
                              "clip_embedding": rng.normal(size=(10, 5))})
    assert guidance.spread_ratio(decoded, {"block1": np.ones((3, 4), bool)}) == pytest.approx(0.5)
    own = guidance.shrunk_features(decoded.true, ["block1", "embedding"], 1.0, rows=slice(0, 4))
    half = guidance.shrunk_features(decoded.true, ["block1", "embedding"], 0.5, rows=slice(0, 4))
    assert half["block1"].shape == (4, 3, 4) and half["embedding"].shape == (4, 5)
    torch.testing.assert_close(own["block1"], torch.as_tensor(true[:4], dtype=torch.float32))
    torch.testing.assert_close(half["block1"], torch.as_tensor(pred[:4], dtype=torch.float32))
    # Against these shrunk targets, the stimuli shrunk as much score 0 and beat the stimuli's own features.
    targets = FeatureTargets(blocks={"block1": torch.as_tensor(pred[:4], dtype=torch.float32)}, cos_weight=0.0)
    l_own, l_half = targets.per_image_loss(own).numpy(), targets.per_image_loss(half).numpy()
    assert np.allclose(l_half, 0, atol=1e-10) and (l_own > 0).all()
    text = guidance.regression_sentence(l_own, l_own + 1, l_half, 0.5)
    assert "below the stimulus itself on 0 of 4" in text and "50% as much" in text
    assert "lower on 4 of 4 images" in text


def test_loss_curves_and_run_joining():
    out = [SimpleNamespace(images=np.zeros((k, 4, 4, 3), np.uint8), loss=np.full((11, k), 1.0 / (j + 1)),
                           snapshots={0: np.zeros((k, 4, 4, 3), np.uint8), 10: np.ones((k, 4, 4, 3), np.uint8)},
                           cost={"unet_passes": 10 * k, "unet_backward": 5 * k, "wall_s": 1.0})
           for j, k in enumerate((2, 1))]
    run = guidance.join_runs(out)
    assert run.images.shape == (3, 4, 4, 3) and run.loss.shape == (11, 3) and list(run.snapshots) == [0, 10]
    assert run.cost == {"unet_passes": 30, "unet_backward": 15, "wall_s": 2.0}
    fig = guidance.plot_loss_curve(np.linspace(1, 0.5, 11)[:, None] * np.ones((1, 3)), "mdlib")
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 4 and "iteration" in ax.get_xlabel() and "(mdlib)" in ax.get_ylabel()
    fig.canvas.draw()
    assert _legend_clear_of_axes(fig, ax)
    fig = guidance.plot_fast_loss(np.linspace(1, 0.2, 36)[:, None] * np.ones((1, 2)), 0.8, 0.5, 10, "mdlib")
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 4 and "published, 10 iterations" in [t.get_text() for t in ax.get_legend().get_texts()]
    fig.canvas.draw()
    assert _legend_clear_of_axes(fig, ax)


def test_metrics_floors_and_sentences():
    rng = np.random.default_rng(2)
    stim = rng.integers(0, 255, size=(3, 16, 16, 3), dtype=np.uint8)
    modes = {"stage 1": (stim // 2, 0.5, 210, 0, np.nan), "published": (stim, 0.25, 4410, 2100, 3.0),
             "fast": (stim, 0.4, 210, 210, 1.0)}
    t = guidance.metrics_table(modes, stim, 0.5, 3)
    assert list(t.index) == list(modes) and t.loc["published", "loss reduction"] == pytest.approx(0.5)
    assert t.loc["published", "UNet passes per image (fwd + bwd)"] == pytest.approx(2170)
    assert t.loc["published", "PixCorr"] == pytest.approx(1.0) and t.loc["published", "SSIM"] == pytest.approx(1.0)
    text = guidance.cost_sentence(t, "mdlib", "mdlib", 10, 300, 70)
    assert "by 50.0% of stage 1's" in text and "0.4 times" in text and "1/16" in text and "63,000" in text
    floors = guidance.floor_table(stim, stim[::-1])
    assert list(floors.index) == ["another test image", "a flat grey image"]
    assert np.isnan(floors.loc["a flat grey image", "PixCorr"]) and 0 <= floors.loc["a flat grey image", "SSIM"] < 1
    text = guidance.floor_sentence(t, floors)
    assert text.count("\n") == 3 and "published: PixCorr 1.00" in text
    text = guidance.paper_sentence()
    assert text.startswith("The paper's numbers (its Table 2, subject 1, real NSD): ")
    assert "stage 1, PCC 0.183 and SSIM 0.253; stage 1 + stage 2, PCC 0.278 and SSIM 0.354." in text


def test_plot_change_shares_one_scale_with_a_colorbar():
    before = np.zeros((3, 8, 8, 3), np.uint8)
    after = before.copy()
    after[1, :4] = 90
    fig = guidance.plot_change(before, after, ["a", "b", "c"])
    images = [ax for ax in fig.axes if ax.get_images()]
    assert [ax.get_title() for ax in images] == ["a", "b", "c"]
    assert {ax.get_images()[0].get_clim() for ax in images} == {(0, 90.0)}
    colorbar = [ax for ax in fig.axes if ax not in images]
    assert len(colorbar) == 1 and "grey levels" in colorbar[0].get_ylabel()


def test_sentences_name_the_runs_settings():
    config = method.configure("released", "mini")
    assert "30 iterations" not in guidance.published_sentence(config)
    text = guidance.published_sentence(config)
    assert "10 iterations of Adam on z" in text and "before each step" in text and "new sampler noise" in text
    targets = SimpleNamespace(reduction="released", cos_weight=0.05, resize="bicubic", clamp=True)
    text = guidance.loss_sentence(config, targets)
    assert "MSE_CLIP_mask" in text and "(W = 0.5)" in text and "clamped to [0, 1]" in text
    assert set(guidance.METHOD_ROWS) <= set(method.describe(config)["rows"])
    assert guidance.loss_table([3, 5], {"x": np.array([1.0, 2.0])}).index.tolist() == ["nsdId 3", "nsdId 5"]
