"""mdlib.viz.brain (lesson 02's maps and plots) on a small made-up volume: cuts through the ROIs, colourbars
that name them, a marker in every view of its voxel, and labelled axes."""

import matplotlib

matplotlib.use("Agg")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mdlib.nsd.layout import nsd_affine  # noqa: E402
from mdlib.viz import brain  # noqa: E402

SHAPE = (20, 24, 18)
AFFINE = nsd_affine(SHAPE)


def _cuts(fig):
    """nilearn's cut axes: those that show an image, less the full-width frame behind each display."""
    return [ax for ax in fig.axes if ax.get_images() and ax.get_position().width < 0.5]


@pytest.fixture
def anat(rng):
    return nib.Nifti1Image(rng.uniform(100, 200, SHAPE).astype(np.float32), AFFINE)


@pytest.fixture
def labels():
    """Two ROIs, one per hemisphere, symmetric about x = 0 (their centre of mass is on the midline)."""
    lab = np.full(SHAPE, -1, np.int32)
    lab[2:6, 3:8, 4:9] = 3
    lab[14:18, 3:8, 4:9] = 5
    return lab


def test_roi_cuts_go_through_the_roi_even_when_it_straddles_the_midline(labels):
    x, y, z = brain.roi_cuts(labels, AFFINE)
    i, j, k = np.round(np.linalg.solve(AFFINE, [x, y, z, 1])[:3]).astype(int)
    assert labels[i].max() > 0 and labels[:, j].max() > 0 and labels[:, :, k].max() > 0
    assert (j, k) == (5, 6)                                   # the middle of equally full slices
    centre_of_mass_x = (AFFINE @ np.r_[np.argwhere(labels > 0).mean(0), 1])[0]
    assert abs(centre_of_mass_x) < 1e-9 and abs(x) > 5        # the centre of mass would be an empty cut
    assert brain.roi_cuts(np.zeros(SHAPE), AFFINE) == pytest.approx((0, 0, 0), abs=1e-9)


def test_voxel_mm_follows_the_affine():
    np.testing.assert_allclose(brain.voxel_mm([[0, 0, 0], [1, 2, 3]], AFFINE),
                               [AFFINE[:3, 3], AFFINE[:3, 3] + [1.8, 3.6, 5.4]])


def test_roi_size_table_counts_each_roi_per_atlas(labels):
    other = np.where(labels == 3, 1, 0)
    table = brain.roi_size_table({"a": labels, "b": other},
                                 {"a": {0: "Unknown", 3: "V1", 5: "V2"}, "b": {1: "V1", 2: "LO"}})
    assert table.loc["V1"].tolist() == [100, 100]
    assert table.loc["V2"].tolist() == [100, 0] and table.loc["LO"].tolist() == [0, 0]
    assert "Unknown" not in table.index and list(table.columns) == ["a", "b"]


def test_roi_atlas_map_names_the_rois_on_its_colourbar(labels, anat):
    fig = brain.roi_atlas_map(nib.Nifti1Image(labels, AFFINE), {0: "Unknown", 3: "V1v", 5: "hV4", 7: "LO1"}, anat,
                              title="subject 1: an atlas")
    bar = fig.axes[-1]
    assert [t.get_text() for t in bar.get_yticklabels()] == ["V1v", "hV4"]   # the ROIs present, by name
    assert [t.get_text() for t in fig.texts] == ["subject 1: an atlas"]
    fig.canvas.draw()
    title = fig.texts[0].get_window_extent()
    cuts = _cuts(fig)
    assert len(cuts) == 3 and all(title.y0 >= ax.get_window_extent().y1 - 1 for ax in cuts)   # above the cuts


def test_voxel_locations_marks_each_voxel_in_all_three_of_its_views(anat):
    points = {"V1 voxel": brain.voxel_mm([4, 5, 6], AFFINE), "LO voxel": brain.voxel_mm([15, 6, 7], AFFINE)}
    outline = np.zeros(SHAPE, np.float32)
    outline[3:6, 4:7, 5:8] = 1
    fig = brain.voxel_locations(anat, points, outlines={"V1 voxel": nib.Nifti1Image(outline, AFFINE)})
    cuts = _cuts(fig)
    assert len(cuts) == 6                                      # 2 rows x 3 views, no colourbar
    for row, colour in ((cuts[:3], (1, 1, 0)), (cuts[3:], (0, 1, 1))):
        for ax in row:
            markers = [c for c in ax.collections if type(c).__name__ == "PathCollection"]   # scatter points
            assert len(markers) == 1 and tuple(markers[0].get_facecolor()[0][:3]) == colour
    assert sum(len(ax.collections) for ax in cuts[:3]) > sum(len(ax.collections) for ax in cuts[3:])  # outline
    assert [t.get_text() for t in fig.texts] == ["V1 voxel: (-9.9, -11.7, -4.5) mm", "LO voxel: (9.9, -9.9, -2.7) mm"]


def test_value_map_labels_its_colourbar(anat, rng):
    values = rng.uniform(0, 100, SHAPE).astype(np.float32)
    fig = brain.value_map(nib.Nifti1Image(values, AFFINE), anat, title="NC(3)", label="NC(3), % of variance",
                          threshold=5)
    assert "NC(3), % of variance" in [ax.get_ylabel() for ax in fig.axes]
    assert [t.get_text() for t in fig.texts] == ["NC(3)"]


def test_noise_ceiling_histogram_shows_both_groups_and_their_medians():
    nc = np.r_[np.full(30, 1.0), np.full(10, 50.0), [np.nan]]
    inside = np.r_[np.zeros(30, bool), np.ones(10, bool), [True]]
    fig = brain.noise_ceiling_histogram(nc, inside)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["outside nsdgeneral (30 voxels)", "median outside nsdgeneral",
                      "inside nsdgeneral (10 voxels)", "median inside nsdgeneral"]
    assert [line.get_xdata()[0] for line in ax.get_lines()] == [1.0, 50.0]
    assert "%" in ax.get_xlabel() and ax.get_ylabel().startswith("density")


def test_agreement_gives_r_over_the_finite_voxels(rng):
    x = rng.normal(size=200)
    y = x + rng.normal(scale=0.5, size=200)
    y[0] = np.nan
    fig = brain.agreement(x, y, "truth", "estimate")
    ax = fig.axes[0]
    r = np.corrcoef(x[1:], y[1:])[0, 1]
    assert ax.get_title() == f"r = {r:.2f} over 199 voxels"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("truth", "estimate")
    assert ax.collections[0].get_offsets().shape == (199, 2)
