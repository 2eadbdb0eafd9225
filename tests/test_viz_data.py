"""mdlib.viz.data (lesson 01's figures and tables) on small made-up inputs: what each figure shows, its labels,
and that legends and titles stay off the data."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from mdlib.nsd.design import Design  # noqa: E402
from mdlib.viz import data as figs  # noqa: E402

# A design small enough to work out by hand (as in tests/test_design.py): 4 images per subject, 2 of them
# shared (columns 1 and 2), each shown 3 times, in 3 sessions of 5, 4 and 3 trials.
ORDER = [3, 1, 4, 2, 1, 3, 2, 4, 1, 4, 2, 3]


def small_design():
    subjectim = np.array([[11, 21, 100 * s + 1, 100 * s + 2] for s in range(1, 9)])
    return Design(masterordering=ORDER, subjectim=subjectim, sharedix=[11, 21], trials_per_session=[5, 4, 3])


def test_file_table_gives_sizes_and_marks_missing_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"\0" * 1_500_000)
    table = figs.file_table(tmp_path, {"x": "a/x.bin", "missing": "b/y.bin"})
    assert list(table.index) == ["x", "missing"]
    assert table.loc["x", "MB"] == 1.5 and np.isnan(table.loc["missing", "MB"])
    assert table.loc["x", "path under the data root"] == "a/x.bin"


def test_split_table_applies_the_rule_to_every_session_range():
    table = figs.split_table(small_design(), subject=1)
    # Worked out by hand: shared images are columns 1 and 2 of subjectim.
    assert table.index.tolist() == [1, 2, 3] and table.index.name == "last session"
    assert table["train images"].tolist() == [2, 2, 2]
    assert table["test images"].tolist() == [2, 2, 2]
    assert table["test trials"].tolist() == [3, 5, 6]
    assert table["test images with 3 repeats"].tolist() == [0, 1, 2]


def test_trials_per_session_stacks_both_kinds_and_keeps_the_legend_off_the_bars():
    trials = small_design().trials(1)
    fig = figs.trials_per_session(trials, title="subject 1")
    ax = fig.axes[0]
    bars = ax.patches
    assert len(bars) == 6                                            # 3 sessions x (train, shared)
    heights = np.array([b.get_height() for b in bars]).reshape(2, 3)
    assert heights.sum(axis=0).tolist() == [5, 4, 3]                  # every trial counted once
    assert heights[1].tolist() == [3, 2, 1]                           # shared trials per session
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert legend.y0 >= ax.get_window_extent().y1 - 1                # above the axes, not on the bars
    assert ax.get_ylabel() == "trials" and ax.get_xlabel() == "session"


def test_split_growth_marks_the_run_and_puts_one_legend_below_the_panels():
    table = figs.split_table(small_design(), subject=1)
    fig = figs.split_growth(table, last_session=2, title="split")
    left, right = fig.axes
    assert [line.get_ydata().tolist() for line in right.get_lines()[:2]] == [[2, 2, 2], [0, 1, 2]]
    assert any(list(line.get_xdata()) == [2, 2] for line in left.get_lines())      # the run's range
    assert left.get_legend() is None and right.get_legend() is None
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[0] == "training images" and "this run's range" in labels
    fig.canvas.draw()
    assert fig.legends[0].get_window_extent().y1 <= min(ax.get_window_extent().y0 for ax in fig.axes) + 1


def test_betas_matrix_takes_its_colour_limits_from_the_data(rng):
    x = rng.normal(3.0, 4.0, size=(50, 400))
    fig = figs.betas_matrix(x, session=2, n_voxels=300)
    ax = fig.axes[0]
    image = ax.get_images()[0]
    assert image.get_array().shape == (300, 50)                      # voxels x trials
    limit = np.percentile(np.abs(x[:, :300]), 99)
    assert image.get_clim() == pytest.approx((-limit, limit))
    assert (np.abs(x[:, :300]) > limit).mean() == pytest.approx(0.01, abs=0.002)  # only 1% saturate
    assert fig.axes[1].get_ylabel() == "beta (% signal change)"
    assert "session 2" in ax.get_xlabel()


def test_session_drift_draws_each_sessions_mean_before_and_after():
    session = np.repeat([1, 2, 3], 20)
    raw = np.r_[np.full(20, 1.0), np.full(20, 5.0), np.full(20, -2.0)] + np.tile([-1.0, 1.0], 30)
    z = np.tile([-1.0, 1.0], 30)
    fig = figs.session_drift(raw, z, session, title="a voxel")
    left, right = fig.axes
    means = [c.get_segments()[0][0][1] for c in left.collections]    # one segment per session
    assert means == pytest.approx([1.0, 5.0, -2.0])
    assert [c.get_segments()[0][0][1] for c in right.collections] == pytest.approx([0, 0, 0])
    assert left.get_title() != right.get_title()
    assert "% signal change" in left.get_ylabel() and "z-score" in right.get_ylabel()
    fig.canvas.draw()                                                # titles do not overlap
    a, b = left.title.get_window_extent(), right.title.get_window_extent()
    assert a.x1 < b.x0
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["one trial", "session mean"]


def test_reliability_change_counts_the_voxels_that_gained():
    before = np.array([0.1, 0.2, 0.3, 0.4])
    after = np.array([0.2, 0.1, 0.35, 0.5])
    fig = figs.reliability_change(before, after)
    ax = fig.axes[0]
    assert ax.get_title() == "3 of 4 voxels above the diagonal"
    np.testing.assert_allclose(ax.collections[0].get_offsets(), np.c_[before, after])
    assert ax.get_xlim() == ax.get_ylim()


def test_split_table_is_a_dataframe_of_ints():
    table = figs.split_table(small_design(), subject=2)
    assert isinstance(table, pd.DataFrame) and all(np.issubdtype(t, np.integer) for t in table.dtypes)
