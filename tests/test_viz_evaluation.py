"""mdlib.viz.evaluation: lesson 06's figures (legends clear of the data, every image row labelled, published bars
only beside real data, placement only on simulated scenes) and the sentences it prints from a run's numbers."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mdlib import evaluation, viz  # noqa: E402
from mdlib.viz import evaluation as ev  # noqa: E402

ROWS = ("true (z, c)", "without z", "without control", "full", "fast", "stimulus itself", "another test image")


def _reports(n=5, seed=0, labels=True):
    """Reports as mdlib.evaluation.evaluate makes them, with made-up numbers: PixCorr, SSIM, CLIP, CLIP-cos."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, name in enumerate(ROWS):
        per = {"PixCorr": rng.uniform(0, 1, n), "SSIM": rng.uniform(0, 1, n),
               "CLIP": 100 * rng.integers(0, n, n) / (n - 1), "CLIP-cos": rng.uniform(0, 1, n)}
        values = {m: float(v.mean()) for m, v in per.items()}
        values["PCC"] = values["PixCorr"]
        out[name] = evaluation.Report(values=values, per_image=per, n_images=n,
                                      labels={"CLIP": "CLIP (tiny CLIP)", "CLIP-cos": "CLIP-cos (tiny CLIP)"}
                                      if labels else {})
    return out


def _inside(inner, outer) -> bool:
    return inner.x0 >= outer.x0 - 1 and inner.x1 <= outer.x1 + 1 and inner.y0 >= outer.y0 - 1 and inner.y1 <= outer.y1 + 1


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_image_grid_labels_every_row_left_of_its_first_image():
    imgs = np.zeros((6, 8, 8, 3), np.uint8)
    fig = viz.image_grid(imgs, titles=["a", "b", "c", "", "", ""], ncols=3, size=1.0,
                         row_labels=["stimulus", "without control"])
    assert len(fig.axes) == 6                                      # the images only, in order
    texts = [t for ax in fig.axes for t in ax.texts]
    assert [t.get_text() for t in texts] == ["stimulus", "without\ncontrol"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for row, text in enumerate(texts):
        box, first = text.get_window_extent(renderer), fig.axes[3 * row].get_window_extent(renderer)
        assert box.x1 <= first.x0 and box.x0 >= 0                  # left of the row, inside the figure
        assert first.y0 <= (box.y0 + box.y1) / 2 <= first.y1       # level with its row
    assert fig.get_figwidth() > 3.0                                # widened for the labels
    with pytest.raises(ValueError, match="3 row labels for 2 rows"):
        viz.image_grid(imgs, ncols=3, row_labels=["a", "b", "c"])
    plain = viz.image_grid(imgs, ncols=3, size=1.0)                # without labels: as before
    assert plain.get_figwidth() == pytest.approx(3.0) and not [t for ax in plain.axes for t in ax.texts]
    plt.close("all")


def test_image_rows_titles_the_columns_by_nsdid_and_labels_each_row():
    rows = {"stimulus": np.zeros((10, 8, 8, 3), np.uint8), "subject 2": np.ones((10, 8, 8, 3))}
    fig = ev.image_rows(rows, ids=np.arange(100, 110), n_show=4)
    assert len(fig.axes) == 8
    assert [ax.get_title() for ax in fig.axes[:4]] == [f"nsdId {i}" for i in range(100, 104)]
    assert all(ax.get_title() == "" for ax in fig.axes[4:])
    assert [t.get_text() for ax in fig.axes for t in ax.texts] == ["stimulus", "subject 2"]
    plt.close("all")


def test_minddiffuser_bars_keep_the_legend_off_the_bars_and_published_bars_off_simulated_data():
    table = evaluation.table(_reports(), "minddiffuser")
    fig = ev.minddiffuser_bars(table, synthetic=True)
    assert [ax.get_title() for ax in fig.axes] == ["CLIP-cos (tiny CLIP)", "SSIM", "PCC"]
    for ax in fig.axes:
        assert len(ax.patches) == len(ev.ABLATION_ORDER)          # this run's bars only
        assert ax.get_ylabel()
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["this run", "another test image (no information)"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    assert _inside(box, fig.bbox)
    assert not any(_overlaps(box, ax.get_window_extent(renderer)) for ax in fig.axes)
    real = ev.minddiffuser_bars(table, synthetic=False)           # the real path: the paper's bars beside ours
    ax = real.axes[2]
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == 2 * len(ev.ABLATION_ORDER)
    published = dict(zip(ev.ABLATION_ORDER, heights[len(ev.ABLATION_ORDER):]))
    assert published["full"] == pytest.approx(.278) and np.isnan(published["fast"])
    plt.close("all")


def test_minddiffuser_bars_drop_left_out_metrics():
    reports = _reports()
    for r in reports.values():
        del r.values["CLIP-cos"]
        r.left_out.append("CLIP-cos")
    fig = ev.minddiffuser_bars(evaluation.table(reports, "minddiffuser"), synthetic=True)
    assert [ax.get_title() for ax in fig.axes] == ["SSIM", "PCC"]
    plt.close("all")


def test_identification_boxes_one_box_per_report_and_a_legend_outside():
    reports = _reports()
    fig = ev.identification_boxes(reports, {"CLIP": "CLIP (tiny CLIP)"})
    ax = fig.axes[0]
    assert len([p for p in ax.patches if p.get_label() != ""]) >= 0
    assert [t.get_text() for t in ax.get_xticklabels()] == list(reports)
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["CLIP (tiny CLIP)"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert not _overlaps(legend.get_window_extent(renderer), ax.get_window_extent(renderer))
    for r in reports.values():
        del r.per_image["CLIP"]
    assert ev.identification_boxes(reports) is None               # every identification network left out
    plt.close("all")


def test_stage1_bars_panels_and_chance_line():
    reports = {c: r for c, r in _reports(n=40).items() if c in ev.STAGE1_CONDITIONS}
    table = evaluation.table(reports, "eight")
    fig = ev.stage1_bars(table)
    ident, pixels = fig.axes
    assert len(ident.patches) == 3 and len(pixels.patches) == 6
    assert ident.lines[0].get_ydata()[0] == 50 and ident.get_ylim() == (0, 100)
    assert fig._suptitle.get_text() == "stage 1 on 40 common test images"
    assert [t.get_text() for t in ident.get_legend().get_texts()] == ["CLIP (tiny CLIP)"]
    plt.close("all")


def test_placement_adds_the_region_error_on_stimuli_with_a_layout():
    from mdlib import placement
    from mdlib.synth import scenes

    def render(height, tilt, x):
        layout = scenes.Layout("horizon", height, tilt, "dark green", "plain")
        circle = scenes.SceneObject("circle", "red", x, 0.25, 0.15, 0)
        return scenes.render(scenes.Scene((circle,), background="sky blue", layout=layout), size=128)

    plain = scenes.render(scenes.Scene((scenes.SceneObject("bar", "red", 0.5, 0.5, 0.36, 0),)), size=128)
    stims = np.stack([render(0.40, 0.0, 0.3), render(0.60, 10.0, 0.7), plain])
    same = stims.copy()
    swapped = stims[[1, 0, 2]]
    table = ev.placement_table({"true (z, c)": same, "full": swapped}, stims, synthetic=True)
    assert table.attrs["n_layouts"] == 2
    assert table.loc["true (z, c)", "region error"] == pytest.approx(0.0, abs=0.01)
    want = float(np.mean(placement.layout_errors(swapped[:2], stims[:2]).region))   # the plain stimulus left out
    assert table.loc["full", "region error"] == pytest.approx(want) and want > 0.1
    text = ev.placement_sentences(table)
    assert "2 of the stimuli have a scene-wide layout" in text and "unreliable" in text
    assert "full (published stage 2): position error" in text and f"region error {want:.3f}" in text


def test_placement_only_on_simulated_scenes():
    from mdlib.synth import scenes

    def render(x, y, angle):
        return scenes.render(scenes.Scene((scenes.SceneObject("bar", "red", x, y, 0.36, angle),)), size=64)

    stims = np.stack([render(0.3, 0.3, 45), render(0.7, 0.6, 0)])
    same, moved = stims.copy(), np.stack([render(0.7, 0.6, 0), render(0.3, 0.3, 45)])
    layout = ev.placement_table({"same": same, "moved": moved}, stims, synthetic=True)
    assert list(layout.index) == ["same", "moved"]
    assert layout.loc["same", "position error (image sides)"] == pytest.approx(0, abs=0.02)
    assert layout.loc["moved", "position error (image sides)"] > 0.3
    assert layout.loc["same", "axis error (degrees)"] == pytest.approx(0, abs=3)
    assert layout.attrs == {"n_images": 2, "n_axes": 2, "n_layouts": 0}
    assert "region error" not in layout.columns                        # no scene-wide layout here
    text = ev.placement_sentences(layout)
    assert text.startswith("2 images; 2 of the stimuli have objects with an axis")
    assert "  moved (" not in text                                     # rows of the ablation only
    ablation = layout.rename(index={"same": "true (z, c)", "moved": "another test image"})
    lines = ev.placement_sentences(ablation).splitlines()
    assert lines[1].startswith("  true (z, c) (the stimulus' own (z, c), the img2img ceiling): position error 0.0")
    assert lines[2].startswith("  another test image (chance): position error") and "degrees" in lines[2]
    assert ev.placement_table({"same": same}, stims, synthetic=False) is None
    assert "skipped" in ev.placement_sentences(None)
    assert ev.placement_grid({"stimulus": stims}, [1, 2], synthetic=False) is None
    fig = ev.placement_grid({"stimulus": stims, "moved": moved}, [1, 2], synthetic=True)
    assert len(fig.axes) == 4 and all(len(ax.lines) == 2 for ax in fig.axes)   # a cross and an axis on each
    plt.close("all")


def test_sentences_are_printed_from_the_table_they_are_given():
    table = evaluation.table(_reports(), "all")
    text = ev.ablation_sentences(table)
    a, b = table.loc["without control", "PCC"], table.loc["full", "PCC"]
    assert text.splitlines()[0] == "In this run (5 images), against stage 1 alone (without control):"
    assert f"full (published stage 2): PCC {a:.3f} -> {b:.3f}" in text
    assert f"CLIP (tiny CLIP) {table.loc['without control', 'CLIP']:.1f}% -> " in text
    assert "another test image (no information): PCC" in text
    stage1 = evaluation.table({c: r for c, r in _reports(n=37).items() if c in ev.STAGE1_CONDITIONS}, "eight")
    s1 = ev.stage1_sentences(stage1)
    assert f"give or take {ev.CHANCE_SD / np.sqrt(37):.1f}" in s1 and "over 37 images" in s1
    assert "Dropping z (without z) changes PixCorr from" in s1


def test_cross_subject_sentences_rank_both_ways():
    import pandas as pd

    cross = pd.DataFrame({"PCC": [0.2, 0.4, 0.3], "SSIM": [0.5, 0.4, 0.6], "median r, z": [0.1, 0.3, 0.2]},
                         index=["subject 1", "subject 2", "subject 5"])
    text = ev.cross_subject_sentences(cross)
    lines = text.splitlines()
    assert lines[0] == "Best decoded z first (median r): subject 2 (0.300), subject 5 (0.200), subject 1 (0.100)"
    assert lines[1].endswith(": the same order.") and lines[2].endswith(": a different order.")
    assert ev.cross_subject_sentences(cross.iloc[:1]).startswith("Only subject 1")


def test_decoding_quality_one_row_per_subject():
    from types import SimpleNamespace

    decoded = {1: SimpleNamespace(r={"z": np.array([0.1, 0.3, np.nan]), "c": np.array([0.5])}),
               2: SimpleNamespace(r={"z": np.array([0.2]), "c": np.array([0.4, 0.6])})}
    q = ev.decoding_quality(decoded, families=("z", "c"))
    assert list(q.index) == ["subject 1", "subject 2"] and list(q.columns) == ["median r, z", "median r, c"]
    assert q.loc["subject 1", "median r, z"] == pytest.approx(0.2)


def test_cross_subject_table_keeps_the_header_and_labels_after_the_join():
    import pandas as pd

    reports = {f"subject {s}": r for s, r in zip((1, 2), _reports().values())}
    quality = pd.DataFrame({"median r, z": [0.3, 0.2]}, index=["subject 1", "subject 2"])
    cross = ev.cross_subject_table(reports, quality)
    assert list(cross.columns)[-1] == "median r, z" and cross.loc["subject 2", "median r, z"] == 0.2
    assert cross.attrs["labels"]["CLIP"] == "CLIP (tiny CLIP)" and cross.attrs["header"]
    assert cross.loc["subject 1", "PCC"] == pytest.approx(reports["subject 1"].values["PCC"])
