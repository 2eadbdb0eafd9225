"""mdlib.viz.sampler: lesson 04's figures, tables and sentences, built on small arrays and checked on content."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mdlib.viz import sampler as plots  # noqa: E402

#: SD v1-4's DDIM levels for 50 steps (steps_offset 1, "leading" spacing), ascending as CompVis writes them.
LEVELS = list(range(1, 1000, 20))


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _abar():
    """A schedule shaped like SD's: scaled-linear betas, 1000 steps."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    return np.cumprod(1 - betas)


def test_schedule_sentence_names_the_levels_the_published_sampler_skips():
    text = plots.schedule_sentence(LEVELS, 37, 35)
    assert "The 50 DDIM levels: t = 1, 21, 41, ..., 981 (every 20 timesteps)." in text
    assert "DDIM index 37: t = 741." in text
    assert "The 35 denoising steps run t = 681, 661, 641, ..., 1." in text
    assert "3 DDIM levels (60 timesteps) below" in text and "the levels 721 and 701 are never visited" in text
    # diffusers' strength 0.70: noised to the first step's level, nothing skipped
    same = plots.schedule_sentence(LEVELS, 34, 35)
    assert "starts at t = 681, the level z was noised to" in same and "never visited" not in same
    one = plots.schedule_sentence(LEVELS, 35, 35)
    assert one.endswith("1 DDIM level (20 timesteps) below the noise z was given.")     # no level in between
    two = plots.schedule_sentence(LEVELS, 36, 35)
    assert "2 DDIM levels (40 timesteps) below" in two and "the level 701 is never visited" in two
    above = plots.schedule_sentence(LEVELS, 30, 35)
    assert "4 DDIM levels above" in above


def test_signal_sentence_gives_the_mix_and_the_strength():
    abar = _abar()
    text = plots.signal_sentence(abar, 741, None, 70)
    a = abar[741]
    assert f"x = {a ** 0.5:.3f} z + {(1 - a) ** 0.5:.3f} noise" in text
    assert "cannot do exactly this at any strength" in text and "70 UNet passes" in text
    assert "strength = 0.7." in plots.signal_sentence(abar, 681, 0.7, 70)


def test_schedule_figure_zooms_on_the_start_and_marks_the_skipped_levels():
    abar = _abar()
    fig = plots.schedule_figure(abar, LEVELS, 741, LEVELS[:35][::-1])
    full, zoom = fig.axes
    assert (full.get_title(), zoom.get_title()) == ("the whole schedule", "zoom: where sampling starts")
    assert all(ax.get_xlabel() == "timestep t (noise level)" for ax in (full, zoom))
    assert zoom.get_xlim()[0] < 681 and zoom.get_xlim()[1] > 741
    crosses = [line for line in zoom.get_lines() if line.get_marker() == "x"]
    assert len(crosses) == 1 and sorted(crosses[0].get_xdata()) == [701, 721]
    star = [line for line in zoom.get_lines() if line.get_marker() == "*"]
    assert list(star[0].get_xdata()) == [741]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "levels no step visits" in labels and "z noised to t = 741" in labels
    assert "denoised, t = 681 ... 1 (35 steps)" in labels
    assert {t.get_text() for t in zoom.texts} == {"first step\nt = 681", "z noised\nt = 741"}
    # nothing skipped: no crosses
    fig = plots.schedule_figure(abar, LEVELS, 681, LEVELS[:35][::-1])
    assert not [line for ax in fig.axes for line in ax.get_lines() if line.get_marker() == "x"]


def test_sizes_table_in_millions():
    t = plots.sizes_table({"unet": 2e6, "vae": 1e6}, {"unet": 5e5, "vae": 2.5e5}, "tiny")
    assert list(t.columns) == ["SD v1-4 (real path)", "this run (tiny)"] and t.index.name == "parameters (millions)"
    assert t.loc["unet"].tolist() == [2.0, 0.5]


def test_reconstruction_grid_labels_every_row_and_titles_the_columns():
    imgs = np.zeros((3, 8, 8, 3), np.uint8)
    rows = {"stimulus": np.zeros((3, 16, 16, 3), np.uint8), "decoded (z, c), seed 0": imgs,
            "without z,\nseed 1": imgs}
    fig = plots.reconstruction_grid(rows, ["nsdId 1", "nsdId 2", "nsdId 3"])
    axes = np.array(fig.axes).reshape(3, 3)
    assert [ax.get_title() for ax in axes[0]] == ["nsdId 1", "nsdId 2", "nsdId 3"]
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["stimulus", "decoded (z, c),\nseed 0", "without z,\nseed 1"]
    assert all(len(ax.images) == 1 for ax in fig.axes)
    with pytest.raises(ValueError, match="every row needs 3 images"):
        plots.reconstruction_grid({"a": imgs, "b": imgs[:2]})


def test_mean_colour_images_are_flat_at_each_image_mean():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (2, 5, 6, 3)).astype(np.uint8)
    flat = plots.mean_colour_images(imgs)
    assert flat.shape == imgs.shape and flat.dtype == np.uint8
    np.testing.assert_array_equal(flat[:, 0, 0], np.round(imgs.reshape(2, -1, 3).mean(1)))
    assert (flat == flat[:, :1, :1]).all()


def _per_image():
    return {"true (z, c)": {"PixCorr": np.array([0.8, 0.6]), "SSIM": np.array([0.9, 0.7])},
            "decoded (z, c)": {"PixCorr": np.array([0.2, np.nan, 0.4]), "SSIM": np.array([0.5, 0.6, 0.7])},
            "another test image": {"PixCorr": np.array([0.0, 0.1]), "SSIM": np.array([0.6, 0.6])},
            "flat, mean colour": {"PixCorr": np.array([0.5, 0.5]), "SSIM": np.array([0.9, 0.9])}}


def test_metrics_table_means_and_standard_errors_skip_nan():
    t = plots.metrics_table(_per_image())
    assert list(t.columns) == ["PixCorr mean", "PixCorr sem", "SSIM mean", "SSIM sem"]
    assert t.loc["decoded (z, c)", "PixCorr mean"] == pytest.approx(0.3)            # the NaN image left out
    assert t.loc["decoded (z, c)", "PixCorr sem"] == pytest.approx(0.1 / np.sqrt(2))
    assert t.loc["another test image", "SSIM sem"] == 0


def test_metrics_figure_draws_bars_for_conditions_and_lines_for_references():
    t = plots.metrics_table(_per_image())
    refs = ["another test image", "flat, mean colour"]
    fig = plots.metrics_figure(t, references=refs)
    left, right = fig.axes
    assert (left.get_title(), right.get_title()) == ("PixCorr", "SSIM")
    assert left.get_ylabel() == "PixCorr (Pearson r, mean)" and right.get_ylabel() == "SSIM (mean)"
    assert [tick.get_text() for tick in left.get_xticklabels()] == ["true (z, c)", "decoded (z, c)"]
    assert len(left.patches) == 2                                                  # one bar per condition
    bars = [p.get_height() for p in right.patches]
    assert bars == pytest.approx([0.8, 0.6])
    floor = [line for line in right.get_lines() if line.get_label() == "another test image"]
    assert floor[0].get_ydata()[0] == pytest.approx(0.6)
    assert [x.get_text() for x in fig.legends[0].get_texts()] == refs


def test_ssim_and_published_sentences():
    t = plots.metrics_table(_per_image())
    text = plots.ssim_sentence(t, flat="flat, mean colour", floor_native=0.38, native_size=128, eval_size=425)
    assert "decoded (z, c) 0.60; another test image 0.60 (the floor" in text
    assert "flat, mean colour 0.90" in text and "own 128 px instead of 425 px" in text and "0.38" in text
    same = plots.ssim_sentence(t, floor_native=0.6, native_size=425, eval_size=425)
    assert "instead of" not in same and "flat" not in same
    from mdlib import evaluation

    pub = plots.published_sentence(evaluation.PUBLISHED)
    assert pub.startswith("The paper's stage 1 (real NSD, subject 1, its Table 2): ")
    assert "without control, SSIM 0.253 and PCC 0.183" in pub and "without z, SSIM 0.292 and PCC 0.066" in pub


def test_seed_and_latent_sentences():
    text = plots.seed_sentence(0.2, 0.4, 0.3, n=8)
    assert "mean over the 8 images" in text
    lines = text.splitlines()
    assert [line.split()[-1] for line in lines[1:4]] == ["0.20", "0.40", "0.30"]
    assert len({line.rindex(" ") for line in lines[1:4]}) == 1                  # the numbers in one column
    assert lines[4].startswith("Sharing the seed brings without z closer")
    assert "does not bring" in plots.seed_sentence(0.4, 0.2, 0.3, n=8).splitlines()[-1]
    assert len(plots.seed_sentence(float("nan"), 0.2, 0.3, n=8).splitlines()) == 4    # no objects: no verdict
    assert plots.latent_sentence({"a": 0.5, "b": 0.25}) == "Mean r with the stimulus' true z: a 0.500; b 0.250."


def test_rms_distance_in_grey_levels_and_broadcast():
    a = np.zeros((2, 3, 4, 4, 3), np.uint8)
    b = np.full((2, 1, 4, 4, 3), 10, np.uint8)
    np.testing.assert_allclose(plots.rms_distance(a, b), np.full((2, 3), 10.0))   # uint8 never wraps around
    assert plots.rms_distance(a[0, 0], b[0, 0]) == pytest.approx(10.0)


def test_trajectory_frames_pick_the_first_halfway_and_final_estimates():
    final = np.full((4, 4, 3), 100, np.uint8)
    offsets = [40, 30, 21, 19, 5, 0]                       # distance from the final image per step
    est = np.stack([final + o for o in offsets]).astype(np.uint8)
    ts = [681, 661, 641, 621, 601, 581]
    stim = np.zeros((8, 8, 3), np.uint8)
    images, titles = plots.trajectory_frames(stim, final, final, est, final, ts, 741, gain=2)
    assert len(images) == len(titles) == 7
    assert titles[2] == "UNet input\nz noised to t = 741"
    assert titles[3] == "x̂₀ at step 1\n(t = 681)" and titles[4] == "x̂₀ at step 4\n(t = 621)"   # 19 <= 40 / 2
    np.testing.assert_array_equal(images[4], est[3])
    assert titles[5] == "final image\n(after step 6)" and (images[6] == 80).all()          # |100 - 140| x 2


def test_trajectory_figure_runs_from_the_input_to_the_last_step():
    dist = np.array([[10.0, 5.0, 0.0], [12.0, 4.0, 0.0]])
    fig = plots.trajectory_figure(dist, [681, 341, 1], np.array([50.0, 60.0]), 741, vae=np.array([30.0, 34.0]))
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert lo > 741 and hi < 1                                        # inverted: sampling runs left to right
    mean = [line for line in ax.get_lines() if line.get_label() == "mean over 2 images"][0]
    np.testing.assert_allclose(mean.get_xdata(), [741, 681, 341, 1])
    np.testing.assert_allclose(mean.get_ydata(), [55, 11, 4.5, 0])
    vae = [line for line in ax.get_lines() if line.get_label().startswith("VAE(decoded z)")][0]
    assert vae.get_ydata()[0] == pytest.approx(32)
    assert "grey levels" in ax.get_ylabel() and ax.get_xlabel().startswith("timestep t")
    text = plots.trajectory_sentence(dist, np.array([50.0, 60.0]), np.array([30.0, 34.0]))
    assert "the UNet's input 55.0; VAE(decoded z) 32.0; x̂₀ after step 1 11.0, after step 2 of 3 4.5." in text
    assert text.splitlines()[1] == "The first step covers 80% of the way from the UNet's input to the final image."
