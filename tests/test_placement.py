"""mdlib.placement: centroids and axes of rendered mini-NSD shapes at known positions and angles, against the
scene's own numbers and a float64 second-moment reference."""

import numpy as np
import pytest

from mdlib import placement
from mdlib.synth import scenes


def _render(*objects, background="grey", texture="plain", size=64):
    return scenes.render(scenes.Scene(objects=tuple(objects), background=background, texture=texture,
                                      texture_angle=45.0, texture_period=0.1), size=size)


@pytest.mark.parametrize("texture", ["plain", "stripes", "dots"])
@pytest.mark.parametrize("angle", [0, 45, 90, 135])
def test_a_bar_is_found_where_the_scene_put_it_and_along_its_angle(angle, texture):
    bar = scenes.SceneObject("bar", "red", x=0.35, y=0.7, size=0.36, angle=angle)
    p = placement.placement(_render(bar, background="sky blue", texture=texture)[None])
    assert p.x[0] == pytest.approx(0.35, abs=0.01) and p.y[0] == pytest.approx(0.7, abs=0.01)
    err = abs(p.angle[0] - angle) % 180
    assert min(err, 180 - err) < 2.0
    assert p.elongation[0] > 0.7


def test_the_axis_and_centroid_agree_with_a_float64_second_moment_reference():
    img = _render(scenes.SceneObject("bar", "yellow", 0.6, 0.3, 0.3, 45),
                  scenes.SceneObject("circle", "blue", 0.25, 0.75, 0.2), background="navy")
    mask = placement.object_masks(img[None])[0]
    rows, cols = np.nonzero(mask)
    # Screen coordinates: x to the right, y upwards; the principal axis is the covariance's top eigenvector.
    x, y = (cols + 0.5) / mask.shape[1], -(rows + 0.5) / mask.shape[0]
    vals, vecs = np.linalg.eigh(np.cov(np.stack([x, y]), bias=True))
    ref_angle = np.rad2deg(np.arctan2(vecs[1, 1], vecs[0, 1])) % 180
    p = placement.placement(img[None])
    assert p.x[0] == pytest.approx(x.mean(), abs=1e-9) and p.y[0] == pytest.approx(-y.mean(), abs=1e-9)
    assert p.angle[0] == pytest.approx(ref_angle, abs=1e-6)
    assert p.elongation[0] == pytest.approx(1 - np.sqrt(vals[0] / vals[1]), abs=1e-9)
    assert p.area[0] == pytest.approx(mask.mean())


def test_round_shapes_have_no_axis_and_are_left_out_of_the_axis_error():
    circle = _render(scenes.SceneObject("circle", "red", 0.5, 0.5, 0.35))[None]
    bar = _render(scenes.SceneObject("bar", "red", 0.5, 0.5, 0.35, 0))[None]
    assert placement.placement(circle).elongation[0] < 0.05
    assert np.isnan(placement.axis_error(bar, circle)[0])          # the stimulus (second) has no axis
    assert placement.axis_error(circle, bar)[0] <= 90


def test_position_and_axis_errors_are_the_shift_and_the_turn():
    here = scenes.SceneObject("bar", "green", 0.3, 0.3, 0.3, 0)
    there = scenes.SceneObject("bar", "green", 0.62, 0.71, 0.3, 135)
    a, b = _render(here)[None], _render(there)[None]
    assert placement.position_error(a, b)[0] == pytest.approx(np.hypot(0.32, 0.41), abs=0.01)
    assert placement.axis_error(a, b)[0] == pytest.approx(45.0, abs=2.0)   # 0 and 135: 45 apart, not 135
    near_flat = scenes.SceneObject("bar", "green", 0.5, 0.5, 0.3, 135)
    assert placement.axis_error(_render(near_flat)[None], a)[0] == pytest.approx(45.0, abs=2.0)
    assert placement.position_error(a, a)[0] == pytest.approx(0.0, abs=1e-12)


def test_an_image_without_objects_gives_nan_and_unpaired_inputs_an_error():
    flat = np.full((1, 32, 32, 3), 128, np.uint8)
    p = placement.placement(flat)
    assert np.isnan([p.x[0], p.y[0], p.angle[0], p.elongation[0], p.area[0]]).all()
    bar = _render(scenes.SceneObject("bar", "red", 0.5, 0.5, 0.3, 90))[None]
    assert np.isnan(placement.position_error(flat, bar)[0])
    with pytest.raises(ValueError, match="paired one to one"):
        placement.position_error(np.concatenate([bar, bar]), bar)


def test_on_mini_nsd_scenes_the_mask_is_the_objects_not_the_texture():
    # 200 scenes of mini-NSD's distribution, every background and texture: no mask pixel where no object is
    # (the texture never leaks in), and every pixel an object covers wholly is in it. Pixels an object covers
    # partly (its anti-aliased edge) may go either way.
    rng = np.random.default_rng(5)
    for _ in range(200):
        scene = scenes.random_scene(rng)
        mask = placement.object_masks(scenes.render(scene, size=128)[None], size=128)[0]
        cover = np.max([scenes._object_coverage(o, 128, 4) for o in scene.objects], axis=0)
        assert not (mask & (cover == 0)).any(), scene
        assert mask[cover == 1].all(), scene


def test_patch_coverage_is_the_covered_fraction_of_each_patch_row_by_row():
    masks = np.zeros((2, 14, 14), bool)
    masks[0, :2, :2] = True          # a quarter of the top-left patch (patches are 7 px at grid 2 on 14 px)
    masks[1, 7:, :] = True           # the bottom row of patches
    masks[1, 0, 13] = True           # one pixel of the top-right patch
    cov = placement.patch_coverage(masks, grid=2)
    ref = np.array([[[sum(masks[i, 7 * r + a, 7 * c + b] for a in range(7) for b in range(7)) / 49
                      for c in range(2)] for r in range(2)] for i in range(2)])
    np.testing.assert_allclose(cov, ref)
    assert cov[0, 0, 0] == pytest.approx(4 / 49) and cov[1, 1].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="multiples of the patch grid 7"):
        placement.patch_coverage(np.zeros((1, 128, 128), bool), grid=7)
