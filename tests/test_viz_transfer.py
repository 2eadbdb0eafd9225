"""mdlib.viz.transfer: lesson 07's tables, figures and sentences, on small made-up results whose answers are known."""

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from mdlib import evaluation  # noqa: E402
from mdlib.viz import transfer as vt  # noqa: E402

FAMILIES = ["z", "c", "clip_block1", "clip_embedding"]
METHODS = ["align", "shared", "scratch", "full"]


def _table(offset=0.0):
    """methods x families median r: align < scratch < shared < full on every family, plus ``offset``."""
    base = {"align": 0.1, "scratch": 0.4, "shared": 0.5, "full": 0.7}
    return pd.DataFrame({f: {m: base[m] + 0.01 * j + offset for m in METHODS} for j, f in enumerate(FAMILIES)})


def _result(n_test, n_hour, n_align, offset=0.0):
    """What accuracy_long reads of a TransferResult: table() and the split's ids."""
    split = SimpleNamespace(test_ids=np.arange(n_test), hour_ids=np.arange(n_hour), align_ids=np.arange(n_align))
    return SimpleNamespace(table=lambda: _table(offset), split=split)


def _per_session():
    """A shared_per_session table for 4 sessions of 10 shared images in all."""
    return pd.DataFrame({"trials": [20] * 4, "shared_trials": [4, 3, 3, 2], "shared_images": [3, 3, 2, 2],
                         "new_shared_images": [3, 2, 2, 1], "cumulative_shared_images": [3, 5, 7, 8],
                         "test_images_left": [5, 3, 1, 0], "other_images": [16, 17, 17, 18],
                         "usable_shared_images": [3, 2, 2, 1]}, index=pd.Index([1, 2, 3, 4], name="session"))


# ------------------------------------------------------------------------------------------------ tables

def test_summary_table_averages_the_clip_families():
    s = vt.summary_table(_table())
    assert list(s.columns) == ["z", "c", "CLIP"] and list(s.index) == METHODS
    np.testing.assert_allclose(s["CLIP"], (_table()["clip_block1"] + _table()["clip_embedding"]) / 2)
    assert (s["z"] == _table()["z"]).all()
    assert list(vt.summary_table(_table()[["z"]]).columns) == ["z"]          # absent families: no column


def test_accuracy_long_has_one_row_per_amount_method_and_family():
    long = vt.accuracy_long({1: _result(31, 93, 9), 4: _result(7, 289, 33, offset=0.2)})
    assert len(long) == 2 * len(METHODS) * (len(FAMILIES) + 1)
    row = long[(long["sessions"] == 4) & (long["method"] == "shared") & (long["family"] == "CLIP")].iloc[0]
    assert row["median_r"] == pytest.approx((0.5 + 0.02 + 0.2 + 0.5 + 0.03 + 0.2) / 2)
    assert (row["n_test"], row["n_hour_images"], row["n_align"]) == (7, 289, 33)
    assert set(long.loc[long["sessions"] == 1, "n_test"]) == {31}


def test_verdicts_and_their_sentences():
    summary = vt.summary_table(_table())
    v = vt.verdicts(summary)
    assert v["shared beats scratch on z"] and not v["align beats scratch on CLIP"]
    assert v["full beats every hour method on c"]
    summary.loc["scratch", "c"] = 0.9                   # now scratch beats everything on c, full included
    v = vt.verdicts(summary)
    assert not v["shared beats scratch on c"] and not v["full beats every hour method on c"]
    text = vt.verdict_sentences(vt.summary_table(_table()), n_test=31, sessions=1)
    assert text.startswith("With 1 session, on the same 31 test images")
    # z: scratch 0.40, shared 0.50, full 0.70: shared closes a third of the gap
    z_line = next(line for line in text.splitlines() if line.strip().startswith("z:"))
    assert "best of the small-data methods is shared (0.500)" in z_line and "closes 33%" in z_line
    assert "align does not beat scratch (0.100 vs 0.400)" in z_line


def test_curve_sentence_counts_images_and_the_full_lines_spread():
    long = vt.accuracy_long({1: _result(31, 93, 9), 2: _result(22, 171, 18, 0.05), 4: _result(7, 289, 33, -0.1)})
    text = vt.curve_sentence(long)
    assert "31 with 1 session, 22 with 2 sessions, 7 with 4 sessions" in text
    assert "runs from 0.600 to 0.750" in text                          # full's z: 0.7 - 0.1 .. 0.7 + 0.05
    assert "rests on 7 test images" in text and f"{1 / np.sqrt(4):.2f}" in text


def test_design_sentence_reads_the_first_session_and_the_amounts():
    text = vt.design_sentence(_per_session(), [1, 2, 4], subject=2, references=[1, 5])
    assert "Session 1 of subject 2 holds 16 images of its own and 3 shared images, 3 of which" in text
    assert "(1, 5)" in text and "17.0 images of its own and 2.5 shared images" in text
    assert "5 after 1 session, 3 after 2 sessions, 0 after 4 sessions (of 8" in text
    no_refs = vt.design_sentence(_per_session().drop(columns="usable_shared_images"), [1], 2)
    assert "alignment" not in no_refs


# ----------------------------------------------------------------------------------------------- figures

def test_design_figure_draws_three_bars_per_session_and_marks_the_amounts():
    fig = vt.design_figure(_per_session(), amounts=[1, 4], subject=2)
    left, right = fig.axes
    assert len(left.patches) == 3 * 4
    heights = sorted(p.get_height() for p in left.patches)
    assert heights[-1] == 18 and heights[0] == 1
    assert [t.get_text() for t in left.get_legend().get_texts()][:2] == ["images of its own", "shared images"]
    assert [t.get_text() for t in right.texts] == ["5", "0"]                 # the amounts' test images
    assert "subject 2" in left.get_title() and right.get_ylim()[0] == 0
    fig2 = vt.design_figure(_per_session().drop(columns="usable_shared_images"))
    assert len(fig2.axes[0].patches) == 2 * 4


def test_accuracy_figure_has_a_bar_per_method_and_family():
    fig = vt.accuracy_figure(_table(), n_test=31, sessions=1)
    ax = fig.axes[0]
    assert len(ax.patches) == len(METHODS) * len(FAMILIES)
    assert "1 session" in ax.get_title() and "31 test images" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["z", "c", "CLIP block 1", "CLIP embedding"]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(labels) == 4 and labels[0].startswith("align: ") and labels[-1].startswith("full: ")
    full = [p for p in ax.patches if p.get_hatch()]
    assert len(full) == len(FAMILIES)
    np.testing.assert_allclose(sorted(p.get_height() for p in full), _table().loc["full"].sort_values())


def test_curve_figure_one_panel_per_family_with_the_test_counts_on_the_ticks():
    long = vt.accuracy_long({1: _result(31, 93, 9), 2: _result(22, 171, 18), 4: _result(7, 289, 33)})
    fig = vt.curve_figure(long)
    assert [ax.get_title() for ax in fig.axes] == ["z", "c", "CLIP (mean of its families)"]
    for ax in fig.axes:
        lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 3]
        assert len(lines) == 4
        assert [ln.get_linestyle() for ln in lines].count("--") == 1     # full, dashed
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1\n(31 test)", "2\n(22 test)", "4\n(7 test)"]
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    for ax in fig.axes:                               # the legend sits below the panels, over no data
        assert legend.y1 <= ax.get_window_extent().y0 + 1


def test_reconstruction_figure_labels_every_row():
    n = 3
    images = {m: np.full((n, 8, 8, 3), 40 * k, np.uint8) for k, m in enumerate(METHODS)}
    stimuli = np.zeros((n, 16, 16, 3), np.uint8)
    fig = vt.reconstruction_figure(stimuli, images, [5, 6, 7], n_show=n)
    assert len(fig.axes) == (1 + len(METHODS)) * n
    labels = {t.get_text().replace("\n", " ") for ax in fig.axes for t in ax.texts}
    assert labels == {"stimulus", *(vt.ROW_LABELS[m] for m in METHODS)}
    assert [fig.axes[j].get_title() for j in range(n)] == ["nsdId 5", "nsdId 6", "nsdId 7"]
    assert "1 session of the new subject" in fig._suptitle.get_text()


# ---------------------------------------------------------------------------------------- the scores

def _reports():
    per = {"align": (0.1, 40.0, 0.9), "shared": (0.3, 60.0, 0.7), "scratch": (0.2, 70.0, 0.8),
           "full": (0.5, 80.0, 0.6), "another test image": (0.15, 50.0, 0.85)}
    return {name: evaluation.Report(values={"PixCorr": p, "SSIM": p + 0.5, "CLIP": c, "EffNet-B": e},
                                    per_image={}, n_images=4, labels={"CLIP": "CLIP (tiny CLIP)"})
            for name, (p, c, e) in per.items()}


def test_metric_sentences_rank_the_methods_against_the_floor():
    table = evaluation.table(_reports(), "eight")
    lines = vt.metric_sentences(table).splitlines()
    assert [line.split(",")[0] for line in lines] == ["PixCorr", "SSIM", "CLIP (tiny CLIP)",
                                                      "EffNet-B (lower is better)"]
    assert lines[0] == ("PixCorr, best first: full 0.500, shared 0.300, scratch 0.200, align 0.100; another test "
                        "image: 0.150, not beaten by align.")
    assert "best first: full 80.0%, scratch 70.0%, shared 60.0%, align 40.0%" in lines[2]
    assert "best first: full 0.600, shared 0.700, scratch 0.800, align 0.900" in lines[3]   # a distance
    assert lines[3].endswith("not beaten by align.")
    table.loc["align", ["PixCorr", "SSIM"]] = 0.9
    assert "beaten by every method" in vt.metric_sentences(table).splitlines()[0]
