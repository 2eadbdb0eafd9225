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


# ------------------------------------------------------------------------------------ layouts (issue 27)

def _layout_scene(kind, position, tilt, objects=(), first="sky blue", second="dark green", texture="plain",
                  second_texture="plain"):
    objects = objects or (scenes.SceneObject("circle", "red", 0.12, 0.12, 0.08),)
    return scenes.Scene(tuple(objects), background=first, texture=texture, texture_angle=45.0,
                        texture_period=0.1, layout=scenes.Layout(kind, position, tilt, second, second_texture,
                                                                 texture_angle=90.0, texture_period=0.08))


def _true_line(layout):
    """The renderer's boundary as (angle in [0, 180), rho): rho = the signed distance of the line from the
    image centre along the normal (-sin, cos) in (right, up) coordinates."""
    x0, y0, angle = layout.line()
    a = np.deg2rad(angle)
    return angle, -np.sin(a) * (x0 - 0.5) + np.cos(a) * (0.5 - y0)


def _angle_apart(a, b):
    d = abs(a - b) % 180
    return min(d, 180 - d)


@pytest.mark.parametrize("kind, position, tilt", [("horizon", 0.4, 0.0), ("horizon", 0.62, 17.5),
                                                  ("horizon", 0.37, -24.0), ("wall", 0.45, 0.0),
                                                  ("wall", 0.6, 12.3), ("wall", 0.5, -21.0)])
def test_the_boundary_is_the_renderers_line(kind, position, tilt):
    lay = _layout_scene(kind, position, tilt, texture="stripes", second_texture="dots").layout
    b = placement.fit_boundary(scenes.render(_layout_scene(kind, position, tilt, texture="stripes",
                                                           second_texture="dots"), 128)[None])
    angle, rho = _true_line(lay)
    assert b.found[0] and b.misfit[0] < 0.02
    assert _angle_apart(b.angle[0], angle) <= 1.0
    assert abs(np.cos(np.deg2rad(b.angle[0] - angle)) * b.rho[0] - rho) < 0.01   # the same side of the normal
    crossing = b.height[0] if kind == "horizon" else b.across[0]
    assert crossing == pytest.approx(position, abs=0.01)


def test_objects_drawn_on_top_do_not_move_the_boundary():
    # Two large objects straddling the boundary, of colours far from both regions: the fit does not move.
    objs = (scenes.SceneObject("square", "yellow", 0.3, 0.5, 0.38), scenes.SceneObject("star", "red", 0.75, 0.45, 0.3))
    bare = placement.fit_boundary(scenes.render(_layout_scene("horizon", 0.5, 8.0), 128)[None])
    busy = placement.fit_boundary(scenes.render(_layout_scene("horizon", 0.5, 8.0, objs), 128)[None])
    assert busy.found[0]
    assert _angle_apart(busy.angle[0], bare.angle[0]) <= 1.0 and abs(busy.height[0] - bare.height[0]) < 0.01
    assert busy.height[0] == pytest.approx(0.5, abs=0.01) and _angle_apart(busy.angle[0], 8.0) <= 1.0


def test_identical_images_score_zero_and_mirrored_tilts_the_angle_geometry_predicts():
    t = 18.0
    img = scenes.render(_layout_scene("horizon", 0.45, t), 128)[None]
    same = placement.layout_errors(img, img)
    assert same.region[0] == 0 and same.angle[0] == 0 and same.position[0] == 0 and same.found[0]
    mirror = img[:, :, ::-1]
    e = placement.layout_errors(mirror, img)
    # Mirroring turns a tilt of t into -t about the same crossing of the centre line: the lines are 2t apart,
    # cross at x = 1/2, and between them lie two triangles of area tan(t) / 4 each.
    assert e.angle[0] == pytest.approx(2 * t, abs=1.0)
    assert e.position[0] == pytest.approx(0.0, abs=0.01)
    assert e.region[0] == pytest.approx(np.tan(np.deg2rad(t)) / 2, abs=0.01)


def test_a_shifted_horizon_scores_its_shift():
    a = scenes.render(_layout_scene("horizon", 0.4, 0.0), 128)[None]
    b = scenes.render(_layout_scene("horizon", 0.6, 0.0), 128)[None]
    e = placement.layout_errors(a, b)
    assert e.position[0] == pytest.approx(0.2, abs=0.01) and e.region[0] == pytest.approx(0.2, abs=0.01)
    assert e.angle[0] <= 1.0
    # The regions' colours swapped (sky below): the same line, so the same layout.
    c = scenes.render(_layout_scene("horizon", 0.4, 0.0, first="dark green", second="sky blue"), 128)[None]
    assert placement.layout_errors(c, a).region[0] == pytest.approx(0.0, abs=0.01)


def test_a_blurred_reconstruction_keeps_its_boundary():
    from scipy import ndimage

    img = scenes.render(_layout_scene("wall", 0.42, 14.0, texture="checks"), 128)
    blurred = np.stack([ndimage.gaussian_filter(img[..., c].astype(float), 4) for c in range(3)], -1)
    e = placement.layout_errors(np.clip(blurred, 0, 255).astype(np.uint8)[None], img[None])
    assert e.found[0] and e.region[0] < 0.01 and e.angle[0] <= 1.5 and e.position[0] < 0.01


def test_no_boundary_without_a_layout_and_what_a_missing_boundary_scores():
    # mini-NSD's own scenes (every background, texture and object size): none has a boundary.
    rng = np.random.default_rng(11)
    plain = np.stack([scenes.render(scenes.random_scene(rng), 128) for _ in range(24)])
    b = placement.fit_boundary(plain)
    assert not b.found.any() and np.isnan(b.angle).all() and np.isnan(b.height).all()
    # Scenes with layouts, drawn as mini-NSD draws them: all have one, where the renderer put it.
    drawn = [scenes.random_scene(rng, layout_share=1.0) for _ in range(12)]
    drawn = [s for s in drawn if s.layout is not None]
    fit = placement.fit_boundary(np.stack([scenes.render(s, 128) for s in drawn]))
    assert fit.found.all()
    assert max(_angle_apart(a, _true_line(s.layout)[0]) for a, s in zip(fit.angle, drawn)) <= 1.0
    # Against a stimulus without a boundary every error is NaN; a reconstruction without one scores the
    # stimulus's smaller side as its region error (as if its boundary lay outside the image).
    lay = scenes.render(_layout_scene("horizon", 0.37, 0.0), 128)[None]
    e = placement.layout_errors(lay, plain[:1])
    assert np.isnan([e.region[0], e.angle[0], e.position[0]]).all()
    e = placement.layout_errors(plain[:1], lay)
    assert not e.found[0] and np.isnan(e.angle[0]) and np.isnan(e.position[0])
    assert e.region[0] == pytest.approx(0.37, abs=0.01)
    with pytest.raises(ValueError, match="paired one to one"):
        placement.layout_errors(np.concatenate([lay, lay]), lay)
