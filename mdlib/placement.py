"""Where a reconstruction puts its objects and which way they point, against its stimulus (lesson 06).

MindDiffuser's claim for stage 2 is structural: the decoded CLIP block features restore the *layout* that
stage 1's semantic reconstruction loses, the position and the orientation of what is in the scene (docs/method.md,
stage 2). PixCorr and SSIM measure that only indirectly; these two measures name it. They are made for the
mini path's scenes (1-2 flat-coloured shapes on a near-uniform background, :mod:`mdlib.synth.scenes`), where
"the objects" is well defined:

- :func:`object_masks`: the pixels whose colour is more than ``threshold`` (RGB distance, channels in [0, 1])
  from the image's median colour, which is the background's as long as the objects cover under half of the
  image (mini-NSD's cover at most a sixth). The default, 0.28, sits between mini-NSD's textures (their light
  and dark parts are up to 0.25 apart) and its objects (at least 0.43 from the background colour, so at
  least 0.31 from either part of its texture);
- :func:`placement`: the mask's centroid and principal axis (second moments, scikit-image's ``regionprops``);
- :func:`position_error`: the distance between a reconstruction's centroid and its stimulus's (fractions of
  the image side; 0 is perfect; two points drawn at random in the image are 0.52 apart on average);
- :func:`axis_error`: the angle between their principal axes, in [0, 90] degrees, for stimuli whose objects
  are elongated (a bar, or two objects side by side); a random axis scores 45 on average.

Both images are compared at ``size`` x ``size`` (bilinear, as :func:`mdlib.metrics.prepare` resizes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: RGB distance (channels in [0, 1]) from the background colour above which a pixel belongs to an object.
OBJECT_THRESHOLD = 0.28
#: Stimuli whose mask has at least this elongation (1 - minor / major axis) count for :func:`axis_error`
#: (a 2:1 ellipse has 0.5; mini-NSD's bars about 0.8; circles, squares and stars about 0).
MIN_ELONGATION = 0.5


@dataclass(frozen=True)
class Placement:
    """Per image, (n,) arrays, NaN where the image has no object pixel.

    Attributes:
        x, y: the objects' centroid, fractions of the side from the left and from the top.
        angle: their principal axis, degrees counter-clockwise from horizontal on screen, in [0, 180)
            (mini-NSD's convention: a bar "rising to the right" is at 45).
        elongation: 1 - minor / major axis of the mask's second moments, in [0, 1] (0: no preferred axis).
        area: fraction of the image the mask covers.
    """

    x: np.ndarray
    y: np.ndarray
    angle: np.ndarray
    elongation: np.ndarray
    area: np.ndarray


def object_masks(images, threshold: float = OBJECT_THRESHOLD, size: int = 128) -> np.ndarray:
    """(n, size, size) bool: the pixels more than ``threshold`` from each image's median colour (RGB, [0, 1]).

    ``images``: (n, H, W, 3) uint8 or (n, 3, H, W) float in [0, 1], as :func:`mdlib.metrics.prepare` takes.
    """
    from mdlib.metrics import prepare

    x = prepare(images, size)                                   # (n, size, size, 3) in [0, 1]
    background = np.median(x.reshape(len(x), -1, 3), axis=1)    # (n, 3)
    return np.linalg.norm(x - background[:, None, None, :], axis=-1) > float(threshold)


def placement(images, threshold: float = OBJECT_THRESHOLD, size: int = 128) -> Placement:
    """The centroid, principal axis, elongation and area of each image's :func:`object_masks`."""
    from skimage import measure

    masks = object_masks(images, threshold, size)
    out = np.full((5, len(masks)), np.nan)
    for i, mask in enumerate(masks):
        if not mask.any():
            continue
        region = measure.regionprops(mask.astype(np.uint8))[0]
        row, col = region.centroid
        minor, major = np.sqrt(np.clip(np.sort(region.inertia_tensor_eigvals), 0, None))
        # regionprops' orientation is the major axis's angle from the row axis (downwards), counter-clockwise
        # in (row, col) coordinates; on screen that is 90 degrees more, counter-clockwise from horizontal.
        angle = (90.0 + np.rad2deg(region.orientation)) % 180.0
        out[:, i] = ((col + 0.5) / size, (row + 0.5) / size, angle,
                     1.0 - minor / major if major > 0 else 0.0, mask.mean())
    return Placement(*out)


def _paired(recons, stims, threshold: float, size: int) -> tuple[Placement, Placement]:
    a, b = placement(recons, threshold, size), placement(stims, threshold, size)
    if len(a.x) != len(b.x):
        raise ValueError(f"{len(a.x)} reconstructions for {len(b.x)} stimuli: they must be paired one to one")
    return a, b


def position_error(recons, stims, threshold: float = OBJECT_THRESHOLD, size: int = 128) -> np.ndarray:
    """(n,) distance between each reconstruction's object centroid and its stimulus's, in fractions of the
    image side (NaN where either has no object pixel)."""
    a, b = _paired(recons, stims, threshold, size)
    return np.hypot(a.x - b.x, a.y - b.y)


def axis_error(recons, stims, min_elongation: float = MIN_ELONGATION, threshold: float = OBJECT_THRESHOLD,
               size: int = 128) -> np.ndarray:
    """(n,) angle in [0, 90] degrees between each reconstruction's principal axis and its stimulus's, for
    stimuli whose objects have an axis (elongation >= ``min_elongation``); NaN for the others and where
    either image has no object pixel. Axes have no direction, so 170 and 10 degrees are 20 apart."""
    a, b = _paired(recons, stims, threshold, size)
    diff = np.abs(a.angle - b.angle) % 180.0
    diff = np.minimum(diff, 180.0 - diff)
    return np.where(b.elongation >= float(min_elongation), diff, np.nan)


def patch_coverage(masks: np.ndarray, grid: int) -> np.ndarray:
    """(n, grid, grid) float in [0, 1]: the fraction of each of a ViT's ``grid`` x ``grid`` patches that
    ``masks`` ((n, H, W) bool, e.g. :func:`object_masks`) cover, H and W multiples of ``grid`` (the patch
    order of :meth:`mdlib.stage2.FeatureTargets.per_token_loss`'s tokens 1..grid^2, row by row)."""
    masks = np.asarray(masks, dtype=bool)
    n, h, w = masks.shape
    if h % grid or w % grid:
        raise ValueError(f"mask sides {h}x{w} must be multiples of the patch grid {grid}")
    return masks.reshape(n, grid, h // grid, grid, w // grid).mean(axis=(2, 4))
