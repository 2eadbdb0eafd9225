"""mdlib.viz.decoding (lesson 03): its tables hold what they say, and its figures draw what they should (titles,
row labels, colorbar labels, one artist per family, area outlines), on small arrays."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mdlib.viz import decoding as figs  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ------------------------------------------------------------------------------------------------- tables

def test_targets_table_lists_the_shape_per_image_and_the_targets():
    fams = {"z": np.zeros((5, 64)), "c": np.zeros((5, 28))}
    t = figs.targets_table({"z": (4, 4, 4), "c": (14, 2)}, fams)
    assert list(t.index) == ["z", "c"]
    assert t.loc["z", "shape per image"] == "(4, 4, 4)" and t.loc["c", "targets decoded"] == 28


def test_summary_table_medians_and_the_share_of_the_ceiling():
    scores = {"z": np.array([0.2, 0.4, 0.6]), "c": np.array([0.1, 0.3])}
    t = figs.summary_table(scores, {"z": np.array([0.0, 0.1, -0.1])}, {"z": np.array([0.8]), "c": np.array([0.4])})
    assert t.loc["z", "median r (fMRI)"] == pytest.approx(0.4)
    assert t.loc["z", "median r (shuffled targets)"] == pytest.approx(0.0)
    assert np.isnan(t.loc["c", "median r (shuffled targets)"])          # no control for c: NaN, not 0
    assert t.loc["c", "fMRI / ceiling"] == pytest.approx(0.5)
    # Without a ceiling (real data) its columns are left out, not filled with NaN.
    assert list(figs.summary_table(scores, {}, {}).columns) == ["median r (fMRI)"]


def test_means_only_keeps_each_channels_mean_over_places():
    x = np.arange(2 * 3 * 2 * 2, dtype=float).reshape(2, 3, 2, 2)        # (images, channels, h, w)
    m = figs.means_only(x, (2, 3))
    assert m.shape == (2, 12)
    np.testing.assert_allclose(m.reshape(x.shape)[1, 2], np.full((2, 2), x[1, 2].mean()))


def test_means_only_table_scores_a_colour_only_decoder():
    rng = np.random.default_rng(0)
    colour = rng.normal(size=(30, 3, 1, 1))                              # one colour per image and channel
    true = colour + 0.1 * rng.normal(size=(30, 3, 4, 4))                 # small objects on top
    pred = colour + 0.3 * rng.normal(size=(30, 3, 4, 4))
    t = figs.means_only_table({"z": true}, {"z": pred}, {"z": (2, 3)})
    assert list(t.columns) == ["decoded", "decoded means only", "true means only"]
    assert t.loc["z", "true means only"] > 0.95                          # the colour is nearly all of each target
    assert t.loc["z", "decoded means only"] > t.loc["z", "decoded"]      # averaging removes the noise


def test_noiseless_responses_follow_the_betas_rows_and_voxels():
    truth = {"signal": np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], np.float32),
             "signal_voxels": np.array([[0, 0, 1], [2, 1, 0]], np.int16),
             "signal_nsd_ids": np.array([7, 3, 9])}
    coords = np.array([[2, 1, 0], [1, 1, 1], [0, 0, 1]])                 # the middle voxel has no signal
    out = figs.noiseless_responses(truth, np.array([9, 7]), coords)
    np.testing.assert_array_equal(out, [[6.0, 0.0, 5.0], [2.0, 0.0, 1.0]])
    assert out.dtype == np.float32


def test_visual_areas_join_the_ventral_and_dorsal_parts():
    labels = np.array([[-1, 0, 1, 2], [3, 4, 7, 0]])
    names = {0: "Unknown", 1: "V1v", 2: "V1d", 3: "V2v", 4: "V2d", 5: "V3v", 6: "V3d", 7: "hV4"}
    areas = figs.visual_areas(labels, names)
    assert list(areas) == ["V1", "V2", "hV4"]                            # V3 has no voxel here: left out
    np.testing.assert_array_equal(areas["V1"], [[False, False, True, True], [False] * 4])
    assert areas["hV4"].sum() == 1


def test_weight_by_area_gives_shares_that_sum_to_one():
    areas = {"V1": np.array([1, 1, 0, 0, 0], bool), "V2": np.array([0, 0, 1, 0, 0], bool)}
    t = figs.weight_by_area({"z": np.array([3.0, 1.0, 0.0, 0.0, 4.0])}, areas)
    assert list(t.index) == ["voxels", "z"] and list(t.columns) == ["V1", "V2", "rest of ROI"]
    np.testing.assert_allclose(t.loc["voxels"], [0.4, 0.2, 0.4])
    np.testing.assert_allclose(t.loc["z"], [0.5, 0.0, 0.5])
    np.testing.assert_allclose(t.sum(axis=1), 1.0)
    # Decoding from the areas alone: no "rest" column (no voxel in it), not a column of NaN.
    only = figs.weight_by_area({"z": np.ones(3)}, {"V1": np.array([1, 1, 0], bool), "V2": np.array([0, 0, 1], bool)})
    assert list(only.columns) == ["V1", "V2"]


# ------------------------------------------------------------------------------------------------ figures

def test_alpha_and_accuracy_has_one_curve_and_one_box_per_family():
    alphas = np.logspace(-1, 5, 13)
    chosen = {"z": alphas[[3, 3, 4]], "c": alphas[[6, 6, 6]]}
    scores = {"z": np.array([0.1, 0.5, np.nan]), "c": np.array([0.2, 0.3]), "clip_block1": np.array([0.7])}
    fig = figs.alpha_and_accuracy(alphas, chosen, scores)
    left, right = fig.axes
    assert left.get_title() == "alpha chosen by leave-one-out" and "test images" in right.get_title()
    assert [line.get_label() for line in left.get_lines()] == ["z", "c"]
    np.testing.assert_allclose(left.get_lines()[1].get_ydata()[6], 1.0)  # all of c's targets at alpha 10**2
    assert [t.get_text() for t in right.get_xticklabels()] == ["z", "c", "clip_block1"]
    assert right.get_xlabel() == "feature family" and "Pearson r" in right.get_ylabel()


def _small_brain():
    shape = (8, 9, 7)
    mask = np.zeros(shape, bool)
    mask[1:7, 1:8, 1:6] = True
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-8, -9, -7]
    anat = nib.Nifti1Image(np.random.default_rng(0).uniform(0, 100, shape).astype(np.float32), affine)
    v1, v2 = np.zeros(shape, bool), np.zeros(shape, bool)
    v1[1:3, 1:4, 1:6], v1[5:7, 1:4, 1:6] = True, True
    v2[1:3, 4:6, 1:6] = True
    return mask, affine, anat, {"V1": v1, "V2": v2}


def test_weight_maps_label_each_row_outline_the_areas_and_label_the_colorbar():
    mask, affine, anat, areas = _small_brain()
    n = int(mask.sum())
    rng = np.random.default_rng(1)
    weights = {"z": rng.uniform(0.5, 2, n), "c": rng.uniform(0.5, 2, n)}
    fig = figs.weight_maps(weights, mask, affine, anat, areas)
    assert [t.get_text() for t in fig.texts] == ["z", "c"]              # a label on every row
    cbar = [ax for ax in fig.axes if "mean weight" in ax.get_ylabel()]
    assert len(cbar) == 1 and "|w|" in cbar[0].get_ylabel()
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["V1", "V2"]
    assert "prf-visualrois" in legend.get_title().get_text()
    # The outlines: contour sets on the brain's axes, in the areas' colours.
    contours = [c for ax in fig.axes for c in ax.collections if c.__class__.__name__ == "QuadContourSet"]
    assert contours, "no area outlines drawn"
    colours = {matplotlib.colors.to_hex(c.get_edgecolor()[0]) for c in contours}
    assert colours <= {c.lower() for c in figs.AREA_COLORS[:2]} and len(colours) == 2


def test_weight_by_area_figure_draws_one_bar_per_family_and_area():
    areas = {"V1": np.array([1, 1, 0, 0, 0], bool), "V2": np.array([0, 0, 1, 0, 0], bool)}
    t = figs.weight_by_area({"z": np.array([3.0, 1.0, 0.0, 1.0, 4.0]), "c": np.ones(5)}, areas)
    fig = figs.weight_by_area_figure(t)
    ax = fig.axes[0]
    assert len(ax.patches) == 2 * 3
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights[3:], 1.0)                         # c's weight is spread like its voxels
    assert any(np.allclose(line.get_ydata(), 1.0) for line in ax.get_lines())
    assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == ["V1", "V2", "rest of ROI"]
    assert "(40% of voxels)" in ax.get_xticklabels()[0].get_text()


def test_latent_grid_labels_every_row_and_shares_the_latents_colour_scale():
    rng = np.random.default_rng(2)
    n = 3
    stim = rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8)
    z_true, z_pred = rng.normal(size=(n, 4, 4, 4)), 0.5 * rng.normal(size=(n, 4, 4, 4))
    img = rng.uniform(-0.2, 1.2, (n, 3, 8, 8))
    fig = figs.latent_grid(stim, z_true, z_pred, img, img)
    grid, bar = fig.axes[:-1], fig.axes[-1]
    assert len(grid) == 5 * n
    labels = [grid[i * n].get_ylabel() for i in range(5)]
    assert labels == ["stimulus", "true z\n(channel 0)", "decoded z\n(channel 0)", "VAE(true z)", "VAE(decoded z)"]
    assert bar.get_ylabel() == "latent value (channel 0)"
    limits = {grid[i * n + j].get_images()[0].get_clim() for i in (1, 2) for j in range(n)}
    assert len(limits) == 1                                              # one scale for true and decoded
    shown = grid[3 * n].get_images()[0].get_array()
    assert shown.min() >= 0 and shown.max() <= 1                         # VAE images clipped to [0, 1]
