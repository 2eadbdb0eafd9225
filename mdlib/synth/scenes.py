"""Procedural scenes for mini-NSD: 1-2 coloured shapes on a textured background, and captions that state them.

A scene's content is fully known, so a caption can state it exactly and a simulated brain can respond to it:

- *semantics* (what): the shape category (circle, square, triangle, bar, cross, star) and its colour name;
- *structure* (where / how): position in a 3 x 3 grid (left/centre/right x top/middle/bottom), size, and
  orientation (bars at 0/45/90/135 degrees, triangles pointing up/down/left/right, tilted squares and crosses);
- context: background colour and texture (plain, striped, checkered, dotted; stripes and checks are oriented);
- layout (optional, off by default): a large-scale split of the background into two regions of different
  colour and texture along a straight boundary, a horizon or a wall's edge (:data:`LAYOUT_KINDS`,
  :class:`Layout`), drawn anti-aliased like the textures; captions state it first. Scenes get one only when
  :func:`random_scene` is asked for it (``layout_share`` > 0), so the default scenes, and with them the
  default mini-NSD, are exactly those drawn before layouts existed (docs/mini_world.md, "Scene layouts": an
  experiment in which stage 2 did not restore them, benchmarks/README.md).

Everything is deterministic given a :class:`numpy.random.Generator`. Images are rendered anti-aliased: drawn at
``supersample`` times the size, then box-filtered down (PIL ``Image.reduce``).

Conventions: positions ``x`` (left to right) and ``y`` (top to bottom) are fractions of the image side in
[0, 1], as in image (row, column) order; sizes are fractions of the image side; angles are in degrees,
counter-clockwise as seen on the screen. docs/mini_world.md, "The scenes", shows them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

#: Shape categories, in the order used by every numeric encoding (index = category id).
SHAPES = ("circle", "square", "triangle", "bar", "cross", "star")

#: The orientations (degrees, counter-clockwise on screen) each shape can take. For triangles the angle is the
#: direction the apex points (90 = up); a circle and a star have none that a caption would state.
SHAPE_ANGLES = {
    "circle": (0,),
    "square": (0, 45),
    "triangle": (0, 90, 180, 270),
    "bar": (0, 45, 90, 135),
    "cross": (0, 45),
    "star": (0,),
}

#: Object colours: caption word -> sRGB (0-255). Index = colour id in numeric encodings.
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 165, 60),
    "blue": (40, 75, 215),
    "yellow": (240, 215, 40),
    "orange": (245, 135, 20),
    "purple": (135, 50, 175),
    "pink": (240, 130, 185),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}

#: Background colours: caption word -> sRGB. Index = background id.
BACKGROUNDS = {
    "grey": (128, 128, 128),
    "light grey": (200, 200, 200),
    "beige": (222, 205, 170),
    "sky blue": (150, 195, 235),
    "dark green": (45, 85, 55),
    "navy": (35, 40, 85),
    "brown": (120, 85, 55),
}

#: Background textures: name -> adjective used in captions. Index = texture id.
TEXTURES = {"plain": "plain", "stripes": "striped", "checks": "checkered", "dots": "dotted"}

#: Most objects a scene holds (numeric encodings pad to this many).
MAX_OBJECTS = 2

#: Kinds of large-scale layout: ``"horizon"``, a near-horizontal boundary between an upper and a lower region
#: (sky and ground, a wall and a floor); ``"wall"``, a near-vertical one between a left and a right region
#: (two walls meeting, a building's edge). Index = kind id in numeric encodings.
LAYOUT_KINDS = ("horizon", "wall")
#: Where a layout's boundary crosses the image's central line across it (fraction of the side) is drawn in
#: this range, so each region covers at least 35% of the image; its tilt (degrees) within +-this.
LAYOUT_POSITION_RANGE = (0.35, 0.65)
LAYOUT_MAX_TILT = 25.0
# The two regions' colours differ by at least this (RGB Euclidean distance): more than a texture's own light
# and dark parts (at most 36 levels per channel apart, 62 in RGB distance), so the boundary, not the texture,
# is the image's largest edge.
_MIN_REGION_DISTANCE = 80.0

# Centres of the 3 x 3 position grid (fractions of the side) and the words for each cell. The jitter added to
# a centre stays inside the cell so that the caption's position word is never ambiguous.
_CELL_CENTRES = (0.22, 0.5, 0.78)
_CELL_JITTER = 0.05
_COL_WORDS = ("left", "centre", "right")
_ROW_WORDS = ("top", "middle", "bottom")
# An object colour must differ from the background by at least this (RGB Euclidean distance) to be visible.
_MIN_COLOUR_DISTANCE = 110.0


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene.

    Attributes: ``shape`` (one of :data:`SHAPES`), ``colour`` (a key of :data:`COLOURS`), ``x``, ``y``
    (centre, fractions of the image side from the left and from the top), ``size`` (extent, fraction of the
    side; roughly the diameter), ``angle`` (degrees counter-clockwise on screen, one of
    ``SHAPE_ANGLES[shape]``).
    """

    shape: str
    colour: str
    x: float
    y: float
    size: float
    angle: float = 0.0

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.colour not in COLOURS:
            raise ValueError(f"colour must be one of {tuple(COLOURS)}, got {self.colour!r}")
        if not (0.0 <= self.x <= 1.0 and 0.0 <= self.y <= 1.0):
            raise ValueError(f"x and y are fractions of the image side in [0, 1], got ({self.x}, {self.y})")
        if not 0.0 < self.size <= 1.0:
            raise ValueError(f"size is a fraction of the image side in (0, 1], got {self.size}")

    @property
    def position(self) -> str:
        """Position words: 'top left', 'top', 'left', 'centre', ..."""
        return position_words(self.x, self.y)


@dataclass(frozen=True)
class Layout:
    """A large-scale layout: the background split into two regions by a straight boundary.

    The first region is the scene's own background (:attr:`Scene.background`, :attr:`Scene.texture`): above
    a horizon, left of a wall's edge. The second, below or to the right, has this layout's ``colour`` (a key of
    :data:`BACKGROUNDS`), ``texture`` (a key of :data:`TEXTURES`), ``texture_angle`` (degrees) and
    ``texture_period`` (fraction of the side).

    Geometry: ``kind`` (one of :data:`LAYOUT_KINDS`); ``position``: where the boundary crosses the image's
    central line across it, a fraction of the side (horizon: the height on the vertical centre line x = 0.5,
    from the top; wall: the x on the horizontal centre line y = 0.5, from the left); ``tilt``: degrees,
    counter-clockwise on screen, from horizontal (horizon: positive rises to the right) or from vertical (wall:
    positive leans to the left at the top). :meth:`line` gives the boundary as a point and a direction.
    """

    kind: str
    position: float
    tilt: float
    colour: str
    texture: str = "plain"
    texture_angle: float = 0.0
    texture_period: float = 0.1

    def __post_init__(self):
        if self.kind not in LAYOUT_KINDS:
            raise ValueError(f"layout kind must be one of {LAYOUT_KINDS}, got {self.kind!r}")
        if not 0.0 <= self.position <= 1.0:
            raise ValueError(f"layout position is a fraction of the image side in [0, 1], got {self.position}")
        if not -45.0 <= self.tilt <= 45.0:
            raise ValueError(f"layout tilt is in [-45, 45] degrees (beyond, the other kind), got {self.tilt}")
        if self.colour not in BACKGROUNDS:
            raise ValueError(f"layout colour must be one of {tuple(BACKGROUNDS)}, got {self.colour!r}")
        if self.texture not in TEXTURES:
            raise ValueError(f"layout texture must be one of {tuple(TEXTURES)}, got {self.texture!r}")

    def line(self) -> tuple[float, float, float]:
        """The boundary as ``(x0, y0, angle)``: a point on it (fractions of the side, x from the left, y from
        the top) and its direction, degrees counter-clockwise on screen from horizontal, in [0, 180)."""
        if self.kind == "horizon":
            return 0.5, float(self.position), float(self.tilt) % 180.0
        return float(self.position), 0.5, (90.0 + float(self.tilt)) % 180.0

    def first_side(self, x, y) -> np.ndarray:
        """Signed distance (fractions of the side) of points (x from the left, y from the top) from the
        boundary: positive on the first region's side (above a horizon, left of a wall), negative on the
        second's."""
        x0, y0, _ = self.line()
        # The direction before it is folded into [0, 180): tilt from +x (horizon) or from +y, up (wall). In
        # (right, up) coordinates the normal (-sin a, cos a) then points up for a horizon, left for a wall.
        a = np.deg2rad(self.tilt + (0.0 if self.kind == "horizon" else 90.0))
        return -(np.asarray(x) - x0) * np.sin(a) - (np.asarray(y) - y0) * np.cos(a)

    def first_area(self) -> float:
        """Fraction of the image on the first region's side (a boundary inside the image: ``position``)."""
        t = (np.arange(4096) + 0.5) / 4096
        if self.kind == "horizon":  # the boundary's height at each x, clipped to the frame
            edge = self.position - (t - 0.5) * np.tan(np.deg2rad(self.tilt))
        else:                       # the boundary's x at each height y (from the top)
            edge = self.position + (0.5 - t) * np.tan(np.deg2rad(-self.tilt))
        return float(np.clip(edge, 0.0, 1.0).mean())


@dataclass(frozen=True)
class Scene:
    """A scene: 1..:data:`MAX_OBJECTS` objects on a background, optionally split by a :class:`Layout`.

    Attributes: ``objects`` (tuple of :class:`SceneObject`, drawn in order), ``background`` (a key of
    :data:`BACKGROUNDS`), ``texture`` (a key of :data:`TEXTURES`), ``texture_angle`` (degrees: the
    orientation of stripes/checks), ``texture_period`` (fraction of the side: stripe/check/dot spacing),
    ``layout`` (:class:`Layout` or None: the background is one region).
    """

    objects: tuple[SceneObject, ...]
    background: str = "grey"
    texture: str = "plain"
    texture_angle: float = 0.0
    texture_period: float = 0.1
    layout: Layout | None = None

    def __post_init__(self):
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 1..{MAX_OBJECTS} objects, got {len(self.objects)}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {tuple(BACKGROUNDS)}, got {self.background!r}")
        if self.texture not in TEXTURES:
            raise ValueError(f"texture must be one of {tuple(TEXTURES)}, got {self.texture!r}")
        if self.layout is not None and not isinstance(self.layout, Layout):
            raise TypeError(f"layout must be a Layout or None, got {type(self.layout).__name__}")


def position_words(x: float, y: float) -> str:
    """Words for a position given as fractions of the side (x from the left, y from the top).

    The middle third of each axis is 'centre'/'middle'; e.g. (0.2, 0.2) -> 'top left', (0.5, 0.8) -> 'bottom',
    (0.5, 0.5) -> 'centre'.
    """
    col = 0 if x < 1 / 3 else (2 if x > 2 / 3 else 1)
    row = 0 if y < 1 / 3 else (2 if y > 2 / 3 else 1)
    if row == 1 and col == 1:
        return "centre"
    if row == 1:
        return _COL_WORDS[col]
    if col == 1:
        return _ROW_WORDS[row]
    return f"{_ROW_WORDS[row]} {_COL_WORDS[col]}"


def _colour_distance(a, b) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=float)))


def check_layout_options(layout_share: float, layout_kinds) -> tuple[float, tuple[str, ...]]:
    """Validate :func:`random_scene`'s layout options; returns them as ``(float, tuple of kinds)``."""
    try:
        share = float(layout_share)
    except (TypeError, ValueError):
        raise TypeError(f"layout_share must be a number in [0, 1], got {layout_share!r}") from None
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"layout_share is the share of scenes given a layout, in [0, 1] (0: none, the default "
                         f"mini-NSD), got {layout_share!r}")
    kinds = (layout_kinds,) if isinstance(layout_kinds, str) else tuple(layout_kinds)
    bad = [k for k in kinds if k not in LAYOUT_KINDS]
    if not kinds or bad or len(set(kinds)) != len(kinds):
        raise ValueError(f"layout_kinds must be distinct kinds among {LAYOUT_KINDS}, got {layout_kinds!r}")
    return share, kinds


def random_layout(rng: np.random.Generator, background: str, object_colours, kinds=LAYOUT_KINDS) -> Layout | None:
    """A random :class:`Layout` for a scene whose background is ``background`` and whose objects have the
    colours ``object_colours``; None when no background colour differs enough from the first region's and
    stands far enough from every object colour (the objects must stay visible on both regions).

    Draws, in order: the kind (uniform over ``kinds``), the position (uniform over
    :data:`LAYOUT_POSITION_RANGE`), the tilt (uniform within +-:data:`LAYOUT_MAX_TILT` degrees), the second
    region's texture (plain 40%, the others 20% each, as the first region's), its texture angle and period (as
    :func:`random_scene`'s), then its colour (uniform over the admissible ones).
    """
    kind = str(rng.choice(list(kinds)))
    position = round(float(rng.uniform(*LAYOUT_POSITION_RANGE)), 4)
    tilt = round(float(rng.uniform(-LAYOUT_MAX_TILT, LAYOUT_MAX_TILT)), 2)
    first = BACKGROUNDS[background]
    admissible = [b for b, rgb in BACKGROUNDS.items()
                  if _colour_distance(rgb, first) >= _MIN_REGION_DISTANCE
                  and all(_colour_distance(rgb, COLOURS[c]) >= _MIN_COLOUR_DISTANCE for c in object_colours)]
    texture = str(rng.choice(list(TEXTURES), p=[0.4, 0.2, 0.2, 0.2]))
    texture_angle = float(rng.choice((0, 45, 90, 135)))
    texture_period = round(float(rng.uniform(0.06, 0.14)), 4)
    if not admissible:
        return None
    colour = str(rng.choice(admissible))
    return Layout(kind, position, tilt, colour, texture, texture_angle, texture_period)


def random_scene(rng: np.random.Generator, p_two: float = 0.4, layout_share: float = 0.0,
                 layout_kinds=LAYOUT_KINDS) -> Scene:
    """A random scene: 1 object, or 2 with probability ``p_two``, in distinct grid cells.

    Object colours are drawn among those visible on the chosen background; two objects have different colours
    or shapes so that a caption tells them apart.

    ``layout_share``: the probability that the scene also gets a large-scale :class:`Layout` of one of
    ``layout_kinds`` (:func:`random_layout`). Its draws come after all the others, and none is made when the
    share is 0 (the default), so a generator gives the very same scene, objects, background and all, with or
    without layouts; only the layout is added.
    """
    layout_share, layout_kinds = check_layout_options(layout_share, layout_kinds)
    background = str(rng.choice(list(BACKGROUNDS)))
    texture = str(rng.choice(list(TEXTURES), p=[0.4, 0.2, 0.2, 0.2]))
    bg_rgb = BACKGROUNDS[background]
    visible = [c for c, rgb in COLOURS.items() if _colour_distance(rgb, bg_rgb) >= _MIN_COLOUR_DISTANCE]
    n_obj = 2 if rng.random() < p_two else 1
    cells = rng.choice(9, size=n_obj, replace=False)
    objects = []
    for k, cell in enumerate(cells):
        row, col = divmod(int(cell), 3)
        while True:
            shape = str(rng.choice(SHAPES))
            colour = str(rng.choice(visible))
            if not objects or (shape, colour) != (objects[0].shape, objects[0].colour):
                break
        angle = float(rng.choice(SHAPE_ANGLES[shape]))
        # One object may be large; two share the image, so both stay small enough not to overlap.
        if n_obj == 1 and rng.random() < 0.5:
            size = rng.uniform(0.30, 0.40)
        else:
            size = rng.uniform(0.15, 0.24)
        x = _CELL_CENTRES[col] + rng.uniform(-_CELL_JITTER, _CELL_JITTER)
        y = _CELL_CENTRES[row] + rng.uniform(-_CELL_JITTER, _CELL_JITTER)
        # Keep a large object inside the frame; the margin stays below 1/3 so the position word is unchanged.
        margin = min(0.6 * size, 0.3)
        x, y = np.clip(x, margin, 1 - margin), np.clip(y, margin, 1 - margin)
        objects.append(SceneObject(shape, colour, round(float(x), 4), round(float(y), 4), round(float(size), 4),
                                   angle))
    texture_angle = float(rng.choice((0, 45, 90, 135)))
    texture_period = round(float(rng.uniform(0.06, 0.14)), 4)
    layout = None
    if layout_share > 0 and rng.random() < layout_share:
        layout = random_layout(rng, background, [o.colour for o in objects], layout_kinds)
    return Scene(
        objects=tuple(objects),
        background=background,
        texture=texture,
        texture_angle=texture_angle,
        texture_period=texture_period,
        layout=layout,
    )


# ----------------------------------------------------------------------------------------------- rendering

def _rot(points: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate (n, 2) points given as (right, up) offsets counter-clockwise by ``angle_deg``."""
    a = np.deg2rad(angle_deg)
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return points @ r.T


def _outline(obj: SceneObject, side: float) -> np.ndarray | None:
    """Polygon vertices (n, 2) as (right, up) offsets in pixels from the centre; None for a circle."""
    s = obj.size * side
    if obj.shape == "circle":
        return None
    if obj.shape == "square":
        h = 0.42 * s
        pts = np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    elif obj.shape == "triangle":
        # Equilateral, apex along +x before rotation (angle 0 = pointing right); centred on its centroid.
        r = 0.55 * s
        pts = np.array([[r * np.cos(t), r * np.sin(t)] for t in np.deg2rad((0, 120, 240))])
    elif obj.shape == "bar":
        hl, hw = 0.55 * s, 0.11 * s
        pts = np.array([[-hl, -hw], [hl, -hw], [hl, hw], [-hl, hw]])
    elif obj.shape == "cross":
        a, w = 0.5 * s, 0.13 * s
        pts = np.array([[w, w], [w, a], [-w, a], [-w, w], [-a, w], [-a, -w], [-w, -w], [-w, -a], [w, -a],
                        [w, -w], [a, -w], [a, w]])
    else:  # star: five points, one pointing up
        ro, ri = 0.52 * s, 0.21 * s
        t = np.deg2rad(90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, ro, ri)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    return _rot(pts, obj.angle)


def _background(scene: Scene, side: int) -> np.ndarray:
    """The textured background, (side, side, 3) float32 in 0..255; textures are low-contrast (+-18 levels).

    Drawn directly at the output size with soft (about 1-pixel) edges instead of supersampling: the pattern is
    an analytic function of position, so clipping a scaled sine gives the anti-aliased edge at a fraction of
    the cost. A scene with a :class:`Layout` gets its second region the same way, blended in along the
    boundary by the share of each pixel on its side (:func:`_layout_coverage`).
    """
    img = _textured(scene.background, scene.texture, scene.texture_angle, scene.texture_period, side)
    if scene.layout is None:
        return img
    lay = scene.layout
    second = _textured(lay.colour, lay.texture, lay.texture_angle, lay.texture_period, side)
    alpha = _layout_coverage(lay, side)[..., None]
    return img * (1.0 - alpha) + second * alpha


def _layout_coverage(layout: Layout, side: int) -> np.ndarray:
    """(side, side) float32 in [0, 1]: the share of each pixel on the layout's second region's side.

    The boundary is straight, so a pixel's share is close to 1/2 minus its centre's signed distance in pixels
    (exact for an axis-aligned edge, within a few hundredths for a tilted one): the anti-aliased edge without
    supersampling, as the textures are drawn.
    """
    yy, xx = (np.mgrid[0:side, 0:side].astype(np.float64) + 0.5) / side
    return np.clip(0.5 - layout.first_side(xx, yy) * side, 0.0, 1.0).astype(np.float32)


def _textured(colour: str, texture: str, texture_angle: float, texture_period: float, side: int) -> np.ndarray:
    """A background colour (a key of :data:`BACKGROUNDS`) with its texture over the whole image, (side, side,
    3) float32 in 0..255."""
    base = np.asarray(BACKGROUNDS[colour], dtype=np.float32)
    if texture == "plain":
        return np.broadcast_to(base, (side, side, 3)).copy()
    yy, xx = (np.mgrid[0:side, 0:side].astype(np.float32) + 0.5) / side
    a = np.deg2rad(texture_angle)
    # u runs across the stripes, v along them (screen y points down, so angles are counter-clockwise).
    u = xx * np.cos(a) - yy * np.sin(a)
    v = xx * np.sin(a) + yy * np.cos(a)
    p = texture_period
    ramp = p * side / (2 * np.pi)  # near a zero crossing sin(2 pi u / p) ~ (distance in pixels) / ramp

    def soft(t):
        return np.clip(t * ramp, -1.0, 1.0)

    if texture == "stripes":
        pattern = soft(np.sin(2 * np.pi * u / p))
    elif texture == "checks":
        pattern = soft(np.sin(2 * np.pi * u / p)) * soft(np.sin(2 * np.pi * v / p))
    else:  # dots on a lattice: a soft disc of radius 0.18 period in each cell
        du = (u / p) % 1.0 - 0.5
        dv = (v / p) % 1.0 - 0.5
        pattern = np.clip((0.18 - np.sqrt(du ** 2 + dv ** 2)) * p * side, -1.0, 1.0)
    # Lighter/darker variants of the background colour: same hue, so the caption's colour word stays true.
    amp = 18.0 if base.mean() > 60 else 12.0
    return np.clip(base[None, None, :] + amp * pattern[..., None], 0, 255)


def _object_coverage(obj: SceneObject, size: int, supersample: int) -> np.ndarray:
    """Anti-aliased coverage of one object, (size, size) float32 in [0, 1]: drawn at ``size * supersample``
    in a greyscale mask, then box-filtered down."""
    side = size * supersample
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = obj.x * side, obj.y * side
    pts = _outline(obj, side)
    if pts is None:
        r = 0.5 * obj.size * side
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        # (right, up) offsets -> pixel (column, row): rows grow downwards.
        draw.polygon([(cx + px, cy - py) for px, py in pts], fill=255)
    if supersample > 1:
        mask = mask.reduce(supersample)  # box filter: the anti-aliasing step
    return np.asarray(mask, dtype=np.float32) / 255.0


def render(scene: Scene, size: int = 128, supersample: int = 4) -> np.ndarray:
    """Render a scene: (size, size, 3) uint8 sRGB, objects anti-aliased by drawing at ``size * supersample``.

    Each object's coverage (fraction of the pixel it fills) blends its colour over the background, objects
    in order (the second over the first).
    """
    size, supersample = int(size), int(supersample)
    if size < 8:
        raise ValueError(f"image size must be at least 8 pixels, got {size}")
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    img = _background(scene, size)
    for obj in scene.objects:
        alpha = _object_coverage(obj, size, supersample)[..., None]
        img = img * (1.0 - alpha) + np.asarray(COLOURS[obj.colour], np.float32) * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ captions

_ORIENTATION = {
    # (shape, angle) -> (adjectives usable before the colour, clauses usable after the noun)
    ("square", 0): ((), ()),
    ("square", 45): (("tilted", "rotated"), ("standing on one corner", "turned 45 degrees")),
    ("triangle", 0): ((), ("pointing right", "pointing to the right")),
    ("triangle", 90): ((), ("pointing up", "pointing upwards")),
    ("triangle", 180): ((), ("pointing left", "pointing to the left")),
    ("triangle", 270): ((), ("pointing down", "pointing downwards")),
    ("bar", 0): (("horizontal",), ("lying flat",)),
    ("bar", 90): (("vertical",), ("standing upright",)),
    ("bar", 45): (("diagonal",), ("rising to the right", "tilted up to the right")),
    ("bar", 135): (("diagonal",), ("rising to the left", "tilted up to the left")),
    ("cross", 0): (("upright",), ("shaped like a plus sign",)),
    ("cross", 45): (("diagonal",), ("shaped like an x", "turned 45 degrees")),
}

_POSITION_PHRASES = {
    "centre": ("in the centre", "in the middle", "at the centre"),
    "top": ("at the top", "near the top", "in the upper middle"),
    "bottom": ("at the bottom", "near the bottom", "in the lower middle"),
    "left": ("on the left", "at the left side", "to the left"),
    "right": ("on the right", "at the right side", "to the right"),
}


def _position_phrase(obj: SceneObject, rng: np.random.Generator) -> str:
    words = obj.position
    if words in _POSITION_PHRASES:
        return str(rng.choice(_POSITION_PHRASES[words]))
    return str(rng.choice((f"in the {words} corner", f"at the {words}", f"in the {words}")))


def _size_word(obj: SceneObject, rng: np.random.Generator) -> str:
    if obj.size >= 0.28:
        return str(rng.choice(("large", "big")))
    if obj.size <= 0.2:
        return str(rng.choice(("small", "little")))
    return ""


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _object_phrase(obj: SceneObject, rng: np.random.Generator, with_size: bool) -> str:
    """'a small vertical red bar', 'a yellow triangle pointing left', ...: always the colour and shape words,
    and the orientation when the shape has one."""
    adjs, clauses = _ORIENTATION.get((obj.shape, int(obj.angle) % 360), ((), ()))
    words = []
    if with_size:
        sw = _size_word(obj, rng)
        if sw:
            words.append(sw)
    clause = ""
    if adjs and (not clauses or rng.random() < 0.5):
        words.append(str(rng.choice(adjs)))
    elif clauses:
        clause = " " + str(rng.choice(clauses))
    words += [obj.colour, obj.shape]
    return f"{_article(words[0])} {' '.join(words)}{clause}"


def _background_phrase(scene: Scene, rng: np.random.Generator) -> str:
    texture = TEXTURES[scene.texture]
    if scene.texture == "plain" and rng.random() < 0.5:
        return scene.background
    return f"{texture} {scene.background}"


_TEMPLATES = (
    "{Objs} on a {bg} background.",
    "There is {objs}, against a {bg} backdrop.",
    "A simple picture of {objs}.",
    "An image showing {objs} on a {bg} background.",
    "A {bg} background with {objs}.",
    "Drawing of {objs}, on {bg_a} {bg} background.",
    "{Objs}, drawn over a {bg} background.",
)


# Captions of scenes with a layout: the layout first in most, since the text encoders read only the first
# tokens (15 in the released settings) and the layout is the largest thing in the image.
_LAYOUT_TEMPLATES = (
    "{Layout}, with {objs}.",
    "{Objs} in front of {layout}.",
    "A picture of {layout}, and {objs}.",
    "{Layout}; in front, {objs}.",
    "There is {objs}, against {layout}.",
    "An image of {layout}, with {objs}.",
    "{Objs}, drawn over {layout}.",
)


def _region_phrase(colour: str, texture: str, rng: np.random.Generator) -> str:
    """'striped sky blue', 'plain navy' or 'navy': a region's colour with its texture's adjective."""
    if texture == "plain" and rng.random() < 0.5:
        return colour
    return f"{TEXTURES[texture]} {colour}"


def _layout_phrase(scene: Scene, rng: np.random.Generator) -> str:
    """The layout in words: both regions (colour, texture), then where the boundary is and how it tilts, e.g.
    'a sky blue upper half over a striped dark green lower half, the horizon low and rising to the right'.

    Position words split the drawn range in thirds (:data:`LAYOUT_POSITION_RANGE`: below 0.45, above 0.55);
    a tilt under 8 degrees either way is 'level' (horizon) or 'upright' (wall).
    """
    lay = scene.layout
    one = _region_phrase(scene.background, scene.texture, rng)
    two = _region_phrase(lay.colour, lay.texture, rng)
    a1, a2 = _article(one), _article(two)
    if lay.kind == "horizon":
        form = int(rng.integers(3))
        regions = (f"{a1} {one} upper half over {a2} {two} lower half", f"{a1} {one} sky over {two} ground",
                   f"{a1} {one} top above {a2} {two} bottom")[form]
        where = "high" if lay.position < 0.45 else ("low" if lay.position > 0.55 else "in the middle")
        tilt = ("rising to the right" if lay.tilt >= 8 else ("rising to the left" if lay.tilt <= -8 else "level"))
        return f"{regions}, the horizon {where} and {tilt}"
    form = int(rng.integers(3))
    regions = (f"{a1} {one} left side beside {a2} {two} right side",
               f"{a1} {one} wall on the left and {a2} {two} wall on the right",
               f"{one} on the left and {two} on the right")[form]
    where = ("left of centre" if lay.position < 0.45 else ("right of centre" if lay.position > 0.55
                                                              else "in the centre"))
    tilt = ("leaning to the left" if lay.tilt >= 8 else ("leaning to the right" if lay.tilt <= -8 else "upright"))
    return f"{regions}, the edge between them {where} and {tilt}"


def captions(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """``n`` (<= 7) different paraphrases describing the scene, as COCO has 5 captions per image.

    Every caption names each object's colour and shape (the words in :data:`COLOURS` and :data:`SHAPES`), its
    position and, where the shape has one, its orientation; most also name the background. A scene with a
    :class:`Layout` has captions of their own (:data:`_LAYOUT_TEMPLATES`): each states both regions' colours
    (and textures), the boundary's kind, where it lies and which way it tilts (:func:`_layout_phrase`), then
    the objects as above.
    """
    templates = _TEMPLATES if scene.layout is None else _LAYOUT_TEMPLATES
    if not 1 <= n <= len(templates):
        raise ValueError(f"n must be in 1..{len(templates)}, got {n}")
    order = rng.permutation(len(templates))[:n]
    out = []
    for t in order:
        parts = [f"{_object_phrase(o, rng, with_size=rng.random() < 0.6)} {_position_phrase(o, rng)}"
                 for o in scene.objects]
        objs = " and ".join(parts)
        if scene.layout is None:
            bg = _background_phrase(scene, rng)
            text = _TEMPLATES[t].format(objs=objs, Objs=objs[:1].upper() + objs[1:], bg=bg, bg_a=_article(bg))
        else:
            lay = _layout_phrase(scene, rng)
            text = _LAYOUT_TEMPLATES[t].format(objs=objs, Objs=objs[:1].upper() + objs[1:], layout=lay,
                                               Layout=lay[:1].upper() + lay[1:])
        out.append(text)
    if len(set(out)) < len(out):  # a clash is possible but rare; make the captions distinct paraphrases
        out = [c if c not in out[:i] else c[:-1] + ", as described." for i, c in enumerate(out)]
    return out


# ------------------------------------------------------------------------------------- numeric descriptions

#: Names of the entries of :func:`encode`'s vector, in order.
FEATURE_NAMES = (
    tuple(f"shape={s}" for s in SHAPES)
    + tuple(f"colour={c}" for c in COLOURS)
    + tuple(f"background={b}" for b in BACKGROUNDS)
    + tuple(f"texture={t}" for t in TEXTURES)
    + ("n_objects", "mean_x", "mean_y", "total_size")
)


def encode(scene: Scene) -> np.ndarray:
    """A fixed-length numeric description of a scene, (len(FEATURE_NAMES),) float32.

    Counts of each shape and colour (0..2), one-hot background and texture, number of objects, mean object
    position (fractions) and summed object size (fraction of the side).
    """
    v = np.zeros(len(FEATURE_NAMES), np.float32)
    ns, nc = len(SHAPES), len(COLOURS)
    nb = len(BACKGROUNDS)
    for o in scene.objects:
        v[SHAPES.index(o.shape)] += 1
        v[ns + list(COLOURS).index(o.colour)] += 1
    v[ns + nc + list(BACKGROUNDS).index(scene.background)] = 1
    v[ns + nc + nb + list(TEXTURES).index(scene.texture)] = 1
    v[-4] = len(scene.objects)
    v[-3] = np.mean([o.x for o in scene.objects])
    v[-2] = np.mean([o.y for o in scene.objects])
    v[-1] = sum(o.size for o in scene.objects)
    return v


def scene_arrays(scenes: list[Scene]) -> dict[str, np.ndarray]:
    """Per-object and per-scene arrays for ``n`` scenes (objects padded to :data:`MAX_OBJECTS` with -1/NaN).

    Keys: ``n_objects`` (n,) int; ``shape``, ``colour`` (n, MAX_OBJECTS) int ids into :data:`SHAPES` /
    :data:`COLOURS` (-1 = no object); ``x``, ``y``, ``size``, ``angle`` (n, MAX_OBJECTS) float64 (NaN = no
    object); ``background``, ``texture`` (n,) int ids; ``texture_angle``, ``texture_period`` (n,) float64.
    Floats stay float64 so that :func:`scenes_from_arrays` gives back the very same scenes.

    Only when some scene has a :class:`Layout` (so that the arrays of scenes without layouts are exactly
    those written before layouts existed), also, per scene: ``layout_kind`` (n,) int id into
    :data:`LAYOUT_KINDS` (-1 = no layout); ``layout_colour``, ``layout_texture`` (n,) int ids (-1 = none);
    ``layout_position``, ``layout_tilt``, ``layout_texture_angle``, ``layout_texture_period`` (n,) float64
    (NaN = none), as :class:`Layout` defines them.
    """
    n = len(scenes)
    out = {
        "n_objects": np.zeros(n, np.int16),
        "shape": np.full((n, MAX_OBJECTS), -1, np.int16),
        "colour": np.full((n, MAX_OBJECTS), -1, np.int16),
        "background": np.zeros(n, np.int16),
        "texture": np.zeros(n, np.int16),
        "texture_angle": np.zeros(n, np.float64),
        "texture_period": np.zeros(n, np.float64),
    }
    for key in ("x", "y", "size", "angle"):
        out[key] = np.full((n, MAX_OBJECTS), np.nan, np.float64)
    colours, backgrounds, textures = list(COLOURS), list(BACKGROUNDS), list(TEXTURES)
    for i, sc in enumerate(scenes):
        out["n_objects"][i] = len(sc.objects)
        out["background"][i] = backgrounds.index(sc.background)
        out["texture"][i] = textures.index(sc.texture)
        out["texture_angle"][i] = sc.texture_angle
        out["texture_period"][i] = sc.texture_period
        for k, o in enumerate(sc.objects):
            out["shape"][i, k] = SHAPES.index(o.shape)
            out["colour"][i, k] = colours.index(o.colour)
            out["x"][i, k], out["y"][i, k], out["size"][i, k], out["angle"][i, k] = o.x, o.y, o.size, o.angle
    if any(sc.layout is not None for sc in scenes):
        out.update(layout_arrays(scenes))
    return out


def layout_arrays(scenes: list[Scene]) -> dict[str, np.ndarray]:
    """The ``layout_*`` arrays of :func:`scene_arrays` (whether or not any scene has a layout)."""
    n = len(scenes)
    out = {"layout_kind": np.full(n, -1, np.int16), "layout_colour": np.full(n, -1, np.int16),
           "layout_texture": np.full(n, -1, np.int16)}
    for key in ("position", "tilt", "texture_angle", "texture_period"):
        out[f"layout_{key}"] = np.full(n, np.nan, np.float64)
    backgrounds, textures = list(BACKGROUNDS), list(TEXTURES)
    for i, sc in enumerate(scenes):
        lay = sc.layout
        if lay is None:
            continue
        out["layout_kind"][i] = LAYOUT_KINDS.index(lay.kind)
        out["layout_colour"][i] = backgrounds.index(lay.colour)
        out["layout_texture"][i] = textures.index(lay.texture)
        for key in ("position", "tilt", "texture_angle", "texture_period"):
            out[f"layout_{key}"][i] = getattr(lay, key)
    return out


def layout_from_arrays(arrays, i: int) -> Layout | None:
    """Scene ``i``'s :class:`Layout` from :func:`scene_arrays`' arrays; None if it has none (or the arrays
    record no layouts at all)."""
    if "layout_kind" not in arrays or int(arrays["layout_kind"][i]) < 0:
        return None
    return Layout(LAYOUT_KINDS[int(arrays["layout_kind"][i])], float(arrays["layout_position"][i]),
                  float(arrays["layout_tilt"][i]), list(BACKGROUNDS)[int(arrays["layout_colour"][i])],
                  list(TEXTURES)[int(arrays["layout_texture"][i])], float(arrays["layout_texture_angle"][i]),
                  float(arrays["layout_texture_period"][i]))


def scenes_from_arrays(arrays) -> list[Scene]:
    """The inverse of :func:`scene_arrays`: a list of :class:`Scene` from its arrays (e.g. mini-NSD's
    ``mini_truth/scenes.npz``, row = nsdId), so ``render(scenes_from_arrays(a)[i], S)`` is the brick's row i."""
    colours, backgrounds, textures = list(COLOURS), list(BACKGROUNDS), list(TEXTURES)
    arrays = {k: np.asarray(arrays[k]) for k in arrays.keys()}   # an .npz decompresses on every access
    out = []
    for i in range(len(arrays["n_objects"])):
        objs = tuple(
            SceneObject(SHAPES[int(arrays["shape"][i, k])], colours[int(arrays["colour"][i, k])],
                        float(arrays["x"][i, k]), float(arrays["y"][i, k]), float(arrays["size"][i, k]),
                        float(arrays["angle"][i, k]))
            for k in range(int(arrays["n_objects"][i])))
        out.append(Scene(objs, backgrounds[int(arrays["background"][i])], textures[int(arrays["texture"][i])],
                         float(arrays["texture_angle"][i]), float(arrays["texture_period"][i]),
                         layout_from_arrays(arrays, i)))
    return out
