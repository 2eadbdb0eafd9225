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

Scenes with a large-scale layout (an experiment, off in the default mini-NSD: docs/mini_world.md, "Scene
layouts") have a boundary between two large regions, a horizon or a wall's edge, which the object measures
above do not see (their median colour is one region's):

- :func:`fit_boundary`: the straight line that splits an image into two colours, from the image alone, robust
  to the objects drawn on top, and a rule for "no boundary";
- :func:`layout_errors`: a reconstruction's boundary against its stimulus's: the region error (the share of
  the image on the wrong side, in [0, 1/2]), the angle between the lines (degrees, [0, 90]) and how far apart
  they cross the stimulus's central axis (image sides: a horizon's height error).
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


# ----------------------------------------------------------------------------------------- scene layout

#: Side (pixels) at which :func:`fit_boundary` compares images (bilinear, as :func:`mdlib.metrics.prepare`
#: resizes): the tiny models' output size, where a pixel is 1/64 of the side.
LAYOUT_SIZE = 64
#: Candidate boundary directions: every this many degrees over [0, 180).
LAYOUT_ANGLE_STEP = 1.0
#: RGB distance (channels in [0, 1]) from a side's colour within which a pixel counts as that side's: above
#: mini-NSD's textures' spread about their colour (the light and dark parts are at most 0.25 from each other),
#: below its objects' distance from every background colour (at least 0.43).
LAYOUT_INLIER = 0.3
#: A boundary is found only if each side's colour covers at least this share of the image (mini-NSD's regions
#: cover at least 0.35 minus its objects, at most 0.13: at least 0.22; one object alone covers at most 0.13),
LAYOUT_MIN_REGION = 0.18
#: at most this share of the pixels of the two colours lie on the wrong side of the line,
LAYOUT_MAX_MISFIT = 0.1
#: and the two sides' colours are at least this far apart (RGB distance, channels in [0, 1]).
LAYOUT_MIN_CONTRAST = 0.1
_LAYOUT_REFINEMENTS = 3


@dataclass(frozen=True)
class Boundary:
    """Per image, (n,) arrays: the straight boundary between two large regions that :func:`fit_boundary`
    found, NaN where it found none (``found`` False).

    Attributes:
        angle: the line's direction, degrees counter-clockwise from horizontal on screen, in [0, 180) (a
            horizon rising to the right: a few degrees; falling: just under 180; a vertical edge: 90).
        rho: the line's signed distance from the image centre along its normal (-sin angle, cos angle) in
            (right, up) screen coordinates, in image sides: the line is ``{p : (p - centre) . normal = rho}``.
        height: where the line crosses the vertical centre line x = 1/2, fraction of the image height from
            the top, clipped to [0, 1] (a line that meets it outside the image leaves the whole centre line on
            one side: its nearest end).
        across: where it crosses the horizontal centre line y = 1/2, fraction of the width from the left,
            clipped to [0, 1] likewise.
        contrast: RGB distance (channels in [0, 1]) between the two sides' colours.
        misfit: share of the pixels of the two sides' colours that lie on the wrong side of the line.
        region: the smaller share of the image that either side's colour covers.
        found: bool, the rule of :func:`fit_boundary` held.
    """

    angle: np.ndarray
    rho: np.ndarray
    height: np.ndarray
    across: np.ndarray
    contrast: np.ndarray
    misfit: np.ndarray
    region: np.ndarray
    found: np.ndarray

    def positive_side(self, i: int, size: int = 256) -> np.ndarray:
        """(size, size) bool: the pixels of image ``i`` (pixel centres) on the side the normal points to
        (above a horizon, left of a vertical edge); all True where no boundary was found."""
        if not self.found[i]:
            return np.ones((size, size), bool)
        c = (np.arange(size) + 0.5) / size - 0.5
        a = np.deg2rad(self.angle[i])
        return (-np.sin(a) * c[None, :] + np.cos(a) * -c[:, None]) > self.rho[i]


def _side_colour(pixels: np.ndarray) -> np.ndarray:
    """A side's colour: the mean of its pixels within :data:`LAYOUT_INLIER` of their median colour (its
    texture averaged out, the objects on it left out)."""
    med = np.median(pixels, axis=0)
    near = np.linalg.norm(pixels - med, axis=1) <= LAYOUT_INLIER
    return pixels[near].mean(axis=0) if near.any() else med


def _middle_of_run(indices: np.ndarray, period: int, circular: bool) -> int:
    """The middle of the longest run of consecutive ``indices`` (sorted, non-empty) among 0..period-1; with
    ``circular``, a run may wrap from period - 1 to 0 (directions: 179 degrees is next to 0)."""
    idx = np.asarray(indices)
    breaks = np.flatnonzero(np.diff(idx) > 1)
    starts, ends = np.append(idx[0], idx[breaks + 1]), np.append(idx[breaks], idx[-1])
    if circular and len(starts) > 1 and starts[0] == 0 and ends[-1] == period - 1:
        starts, ends = np.append(starts[1:-1], starts[-1]), np.append(ends[1:-1], ends[0] + period)
    r = int(np.argmax(ends - starts))
    return int((starts[r] + ends[r]) // 2) % period


def _fit_one(img: np.ndarray, proj: np.ndarray, order: np.ndarray) -> tuple[int, float, float, float, float]:
    """Fit one image, (S, S, 3) float in [0, 1], given every candidate line's projections ``proj`` (A, N:
    each pixel centre's coordinate along the direction's normal) and their ascending ``order``.

    Returns (direction index, rho, contrast, misfit, region) as :class:`Boundary` defines them.
    """
    pix = img.reshape(-1, 3)
    n = len(pix)
    sp = np.take_along_axis(proj, order, axis=1)
    # 1. Least squares: the split of each direction with the largest between-side colour variance, both sides
    # at least LAYOUT_MIN_REGION of the image (prefix sums over the pixels sorted along the normal).
    # With S the colour sum of the first i pixels and T the image's, the between-side sum of squares is
    # i (n - i) / n |S / i - (T - S) / (n - i)|^2 = n |S - i T / n|^2 / (i (n - i)).
    i = np.arange(1, n)
    dev = np.zeros((len(proj), n - 1))
    for channel in np.ascontiguousarray(pix.T):
        s = np.cumsum(channel[order], axis=1)[:, :-1]
        dev += (s - i * (channel.sum() / n)) ** 2
    between = dev * n / (i * (n - i))                                   # (A, N - 1): split after i pixels
    m = int(np.ceil(LAYOUT_MIN_REGION * n))
    between[:, : m - 1] = -1.0
    between[:, n - m:] = -1.0
    k, j = np.unravel_index(int(np.argmax(between)), between.shape)
    rho = 0.5 * (sp[k, j] + sp[k, j + 1])
    side = proj[k] > rho          # the pixels on one side (which one does not matter: a line has two)
    # 2. Robust refinement: label the pixels by the nearer of the two sides' colours (objects, far from both,
    # unlabelled), then move the line to where the fewest labelled pixels lie on the wrong side; again with
    # the new sides' colours, until the line stays put (the first step does nearly all).
    misfit, region, previous = 1.0, 0.0, None
    edges_pad = np.stack([sp[:, 0] - 1.0, sp[:, -1] + 1.0], axis=1)
    for _ in range(_LAYOUT_REFINEMENTS):
        col_1, col_2 = _side_colour(pix[side]), _side_colour(pix[~side])
        d_1 = np.linalg.norm(pix - col_1, axis=1)
        d_2 = np.linalg.norm(pix - col_2, axis=1)
        inlier = np.minimum(d_1, d_2) <= LAYOUT_INLIER
        a = (inlier & (d_1 < d_2)).astype(np.int64)                    # pixels of side 1's colour
        b = (inlier & (d_1 >= d_2)).astype(np.int64)                   # of side 2's
        zero = np.zeros((len(proj), 1), np.int64)
        ca = np.concatenate([zero, np.cumsum(a[order], axis=1)], axis=1)   # (A, N + 1): among the first t
        cb = np.concatenate([zero, np.cumsum(b[order], axis=1)], axis=1)
        # a split after t pixels (t = 0..N); colour 1 may be on either side of it
        above = ca + (cb[:, -1:] - cb)         # colour 1 above the split: a's below it and b's above are wrong
        below = cb + (ca[:, -1:] - ca)         # colour 1 below it
        cost = np.minimum(above, below)
        best = int(cost.min())
        # Several neighbouring directions and splits can be equally good (a clean edge fits a degree or a
        # pixel either way): take the middle of the longest run of them, so that ties do not bias the fit.
        k = _middle_of_run(np.flatnonzero(cost.min(axis=1) == best), len(proj), circular=True)
        t = _middle_of_run(np.flatnonzero(cost[k] == best), n + 1, circular=False)
        edges = np.concatenate([edges_pad[k, :1], sp[k], edges_pad[k, 1:]])
        rho = 0.5 * (edges[t] + edges[t + 1])
        side = (proj[k] > rho) if above[k, t] <= below[k, t] else (proj[k] < rho)   # side 1: colour 1's
        misfit = best / max(int(a.sum() + b.sum()), 1)
        region = min(int(a.sum()), int(b.sum())) / n
        if side.all() or not side.any():
            return k, rho, 0.0, 1.0, 0.0
        if (k, t) == previous:     # the same line again: the labels, and so the line, stay as they are
            break
        previous = (k, t)
    contrast = float(np.linalg.norm(_side_colour(pix[side]) - _side_colour(pix[~side])))
    return k, float(rho), contrast, float(misfit), float(region)


def fit_boundary(images, size: int = LAYOUT_SIZE) -> Boundary:
    """The straight boundary between two large regions of each image, from the image alone.

    Every direction (:data:`LAYOUT_ANGLE_STEP` apart) and every split along it is a candidate line. First the
    one that best splits the image into two colours in the least-squares sense (largest between-side
    colour variance); then, three times: each pixel is labelled with the nearer of the two sides' colours,
    or none if it is more than :data:`LAYOUT_INLIER` from both (the objects drawn on top), and the line is
    moved to where the fewest labelled pixels lie on the wrong side (stopping early once the line stays put).
    An object therefore does not pull the line, however large its contrast.

    The rule for "a boundary": each side's colour covers at least :data:`LAYOUT_MIN_REGION` of the image,
    at most :data:`LAYOUT_MAX_MISFIT` of those pixels lie on the wrong side, and the two colours are at
    least :data:`LAYOUT_MIN_CONTRAST` apart. A plain or textured background with objects fails the first
    (an object covers too little, a texture's light and dark parts fail the second); where the rule fails
    every field but ``found`` is NaN.

    ``images``: (n, H, W, 3) uint8 or (n, 3, H, W) float in [0, 1]; compared at ``size`` x ``size``
    (bilinear). Units: :class:`Boundary`. docs/mini_world.md, "Scene layouts (an experiment, off by
    default)", describes the measure.
    """
    from mdlib.metrics import prepare

    x = prepare(images, size)                                           # (n, size, size, 3) in [0, 1]
    c = (np.arange(size) + 0.5) / size - 0.5
    right = np.broadcast_to(c[None, :], (size, size)).ravel()
    up = np.broadcast_to(-c[:, None], (size, size)).ravel()
    angles = np.arange(0.0, 180.0, float(LAYOUT_ANGLE_STEP))
    th = np.deg2rad(angles)[:, None]
    proj = -np.sin(th) * right[None, :] + np.cos(th) * up[None, :]     # (A, N) along each normal
    order = np.argsort(proj, axis=1, kind="stable")
    out = np.full((8, len(x)), np.nan)
    for n_, img in enumerate(x):
        k, rho, contrast, misfit, region = _fit_one(img, proj, order)
        found = (region >= LAYOUT_MIN_REGION and misfit <= LAYOUT_MAX_MISFIT and contrast >= LAYOUT_MIN_CONTRAST)
        if not found:
            out[7, n_] = 0.0
            continue
        a = np.deg2rad(angles[k])
        with np.errstate(divide="ignore", invalid="ignore"):
            up_at_centre = rho / np.cos(a)                                 # where x = 1/2 meets the line
            right_at_centre = -rho / np.sin(a) if np.sin(a) != 0 else np.copysign(np.inf, -rho)
        height = np.clip(0.5 - np.nan_to_num(up_at_centre, nan=0.0), 0.0, 1.0)
        across = np.clip(0.5 + np.nan_to_num(right_at_centre, nan=0.0), 0.0, 1.0)
        out[:, n_] = (angles[k], rho, height, across, contrast, misfit, region, 1.0)
    return Boundary(*out[:7], found=out[7] == 1.0)


@dataclass(frozen=True)
class LayoutErrors:
    """Per image pair, (n,) arrays (NaN where the stimulus has no boundary).

    Attributes:
        region: the share of the image on the wrong side: the area between the reconstruction's boundary and
            the stimulus's, min over which side is which (a line's two sides have no names), in [0, 1/2]. A
            reconstruction without a boundary scores the stimulus's smaller side. The layout error.
        angle: the angle between the two lines, degrees in [0, 90] (NaN if the reconstruction has none).
        position: where the two lines cross the stimulus's central axis across its boundary, fraction of the
            side apart: the vertical centre line for a stimulus boundary within 45 degrees of horizontal (the
            horizon's height error, in image heights), else the horizontal one (NaN if the reconstruction has
            none).
        found: bool, the reconstruction has a boundary.
    """

    region: np.ndarray
    angle: np.ndarray
    position: np.ndarray
    found: np.ndarray


def layout_errors(recons, stims, size: int = LAYOUT_SIZE, grid: int = 256) -> LayoutErrors:
    """:class:`LayoutErrors` of each reconstruction's :func:`fit_boundary` against its stimulus's, both fitted
    at ``size``; ``region`` counted on a ``grid`` x ``grid`` raster of pixel centres."""
    a, b = fit_boundary(recons, size), fit_boundary(stims, size)
    if len(a.angle) != len(b.angle):
        raise ValueError(f"{len(a.angle)} reconstructions for {len(b.angle)} stimuli: they must be paired one to one")
    n = len(b.angle)
    region = np.full(n, np.nan)
    for i in np.flatnonzero(b.found):
        wrong = np.mean(a.positive_side(i, grid) != b.positive_side(i, grid))
        region[i] = min(wrong, 1.0 - wrong)
    diff = np.abs(a.angle - b.angle) % 180.0
    angle = np.minimum(diff, 180.0 - diff)
    flat = np.minimum(b.angle, 180.0 - b.angle) <= 45.0
    position = np.where(flat, np.abs(a.height - b.height), np.abs(a.across - b.across))
    return LayoutErrors(region=region, angle=angle, position=position, found=a.found)
