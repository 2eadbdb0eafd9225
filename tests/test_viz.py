"""mdlib.viz: image_grid keeps the caller's line breaks and long titles clear of the row above; mark_placement
draws each image's centroid and axis where they are."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mdlib import viz  # noqa: E402


def test_image_grid_keeps_line_breaks_and_keeps_long_titles_clear_of_the_row_above():
    long = "a caption long enough to wrap over several lines of the title " * 2
    imgs = np.zeros((5, 8, 8, 3), np.uint8)
    fig = viz.image_grid(imgs, titles=["stimulus\nnsdId 3", long, "c", long, "e"], ncols=2, size=1.5,
                         title="a grid")
    axes = fig.axes
    assert len(axes) == 5
    assert axes[0].get_title() == "stimulus\nnsdId 3"              # the caller's line break, not a space
    assert axes[1].get_title().count("\n") >= 3                     # wrapped at 28 characters
    renderer = fig.canvas.get_renderer()
    for upper, lower in ((0, 2), (1, 3), (2, 4)):
        title = axes[lower].title.get_window_extent(renderer)
        image = axes[upper].get_window_extent(renderer)
        assert title.y1 <= image.y0 + 1e-6, (upper, lower)          # below the image of the row above
    fig_box = fig.bbox
    sup = fig._suptitle.get_window_extent(renderer)
    assert sup.y1 <= fig_box.y1 and all(sup.y0 >= axes[k].title.get_window_extent(renderer).y1 for k in (0, 1))
    # images are square and as wide as `size` inches (less a small gap)
    w, h = axes[0].get_position().width * fig.get_figwidth(), axes[0].get_position().height * fig.get_figheight()
    assert abs(w - h) < 1e-9 and 1.4 < w <= 1.5


def test_mark_placement_draws_the_centroid_and_the_axis_of_each_image():
    from mdlib.synth import scenes

    bar = scenes.render(scenes.Scene((scenes.SceneObject("bar", "red", 0.25, 0.75, 0.36, 45),)), size=64)
    circle = scenes.render(scenes.Scene((scenes.SceneObject("circle", "blue", 0.7, 0.3, 0.3),)), size=96)
    flat = np.full((64, 64, 3), 128, np.uint8)
    fig = viz.image_grid([bar, circle, flat], ncols=3)
    got = viz.mark_placement(fig, [bar, circle, flat])
    np.testing.assert_allclose(got[:2, :2], [[0.25, 0.75], [0.7, 0.3]], atol=0.01)
    lines = [ax.get_lines() for ax in fig.axes]
    assert [len(x) for x in lines] == [2, 1, 0]                    # the circle has no axis, the flat image nothing
    np.testing.assert_allclose(lines[1][0].get_xydata()[0], [0.7 * 96 - 0.5, 0.3 * 96 - 0.5], atol=1)  # its size
    cross = lines[0][0].get_xydata()[0]
    np.testing.assert_allclose(cross, [0.25 * 64 - 0.5, 0.75 * 64 - 0.5], atol=0.7)
    (x0, y0), (x1, y1) = lines[0][1].get_xydata()
    assert np.degrees(np.arctan2(-(y1 - y0), x1 - x0)) % 180 == pytest.approx(45, abs=2)   # rising to the right
