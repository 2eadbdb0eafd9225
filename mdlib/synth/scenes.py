"""Procedural scenes for mini-NSD: 1-2 coloured shapes on a textured background, and captions that state them.

A scene's content is fully known, so a caption can state it exactly and a simulated brain can respond to it:

- *semantics* (what): the shape category (circle, square, triangle, bar, cross, star) and its colour name;
- *structure* (where / how): position in a 3 x 3 grid (left/centre/right x top/middle/bottom), size, and
  orientation (bars at 0/45/90/135 degrees, triangles pointing up/down/left/right, tilted squares and crosses);
- context: background colour and texture (plain, striped, checkered, dotted; stripes and checks are oriented).

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
class Scene:
    """A scene: 1..:data:`MAX_OBJECTS` objects on a background.

    Attributes: ``objects`` (tuple of :class:`SceneObject`, drawn in order), ``background`` (a key of
    :data:`BACKGROUNDS`), ``texture`` (a key of :data:`TEXTURES`), ``texture_angle`` (degrees: the
    orientation of stripes/checks), ``texture_period`` (fraction of the side: stripe/check/dot spacing).
    """

    objects: tuple[SceneObject, ...]
    background: str = "grey"
    texture: str = "plain"
    texture_angle: float = 0.0
    texture_period: float = 0.1

    def __post_init__(self):
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 1..{MAX_OBJECTS} objects, got {len(self.objects)}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {tuple(BACKGROUNDS)}, got {self.background!r}")
        if self.texture not in TEXTURES:
            raise ValueError(f"texture must be one of {tuple(TEXTURES)}, got {self.texture!r}")


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


def random_scene(rng: np.random.Generator, p_two: float = 0.4) -> Scene:
    """A random scene: 1 object, or 2 with probability ``p_two``, in distinct grid cells.

    Object colours are drawn among those visible on the chosen background; two objects have different colours
    or shapes so that a caption tells them apart.
    """
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
    return Scene(
        objects=tuple(objects),
        background=background,
        texture=texture,
        texture_angle=float(rng.choice((0, 45, 90, 135))),
        texture_period=round(float(rng.uniform(0.06, 0.14)), 4),
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
    the cost.
    """
    base = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    if scene.texture == "plain":
        return np.broadcast_to(base, (side, side, 3)).copy()
    yy, xx = (np.mgrid[0:side, 0:side].astype(np.float32) + 0.5) / side
    a = np.deg2rad(scene.texture_angle)
    # u runs across the stripes, v along them (screen y points down, so angles are counter-clockwise).
    u = xx * np.cos(a) - yy * np.sin(a)
    v = xx * np.sin(a) + yy * np.cos(a)
    p = scene.texture_period
    ramp = p * side / (2 * np.pi)  # near a zero crossing sin(2 pi u / p) ~ (distance in pixels) / ramp

    def soft(t):
        return np.clip(t * ramp, -1.0, 1.0)

    if scene.texture == "stripes":
        pattern = soft(np.sin(2 * np.pi * u / p))
    elif scene.texture == "checks":
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


def captions(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """``n`` (<= 7) different paraphrases describing the scene, as COCO has 5 captions per image.

    Every caption names each object's colour and shape (the words in :data:`COLOURS` and :data:`SHAPES`), its
    position and, where the shape has one, its orientation; most also name the background.
    """
    if not 1 <= n <= len(_TEMPLATES):
        raise ValueError(f"n must be in 1..{len(_TEMPLATES)}, got {n}")
    order = rng.permutation(len(_TEMPLATES))[:n]
    out = []
    for t in order:
        parts = [f"{_object_phrase(o, rng, with_size=rng.random() < 0.6)} {_position_phrase(o, rng)}"
                 for o in scene.objects]
        objs = " and ".join(parts)
        bg = _background_phrase(scene, rng)
        text = _TEMPLATES[t].format(objs=objs, Objs=objs[:1].upper() + objs[1:], bg=bg, bg_a=_article(bg))
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
    return out


def scenes_from_arrays(arrays) -> list[Scene]:
    """The inverse of :func:`scene_arrays`: a list of :class:`Scene` from its arrays (e.g. mini-NSD's
    ``mini_truth/scenes.npz``, row = nsdId), so ``render(scenes_from_arrays(a)[i], S)`` is the brick's row i."""
    colours, backgrounds, textures = list(COLOURS), list(BACKGROUNDS), list(TEXTURES)
    out = []
    for i in range(len(arrays["n_objects"])):
        objs = tuple(
            SceneObject(SHAPES[int(arrays["shape"][i, k])], colours[int(arrays["colour"][i, k])],
                        float(arrays["x"][i, k]), float(arrays["y"][i, k]), float(arrays["size"][i, k]),
                        float(arrays["angle"][i, k]))
            for k in range(int(arrays["n_objects"][i])))
        out.append(Scene(objs, backgrounds[int(arrays["background"][i])], textures[int(arrays["texture"][i])],
                         float(arrays["texture_angle"][i]), float(arrays["texture_period"][i])))
    return out
