"""Shapes World: the procedural world the built-in model learns (see WORLD.md).

The renderer draws 64 x 64 frames at 8 fps: up to two coloured shapes on black,
optionally behind a grey wall (columns 28..35, drawn over the objects). Positions
are analytic functions of time, so a frame at any time (t = 1000 s included) is
exact and windows can be cut anywhere in a long trajectory.

Coordinates: x grows to the right, y grows downwards; pixel (row i, column j)
covers the square [j, j + 1] x [i, i + 1], so the canvas spans [0, 64]. Objects
reflect off the canvas edges at their radius r and so never leave it.

English captions follow WORLD.md:

    caption := object (" and " object)? wall?
    object  := "a " (size " ")? colour " " shape " " motion
    size    := "small" | "large"
    shape   := "circle" | "ball" | "square" | "box" | "triangle"
    motion  := "moving " dir | "moving to the " dir | "bouncing"
    wall    := " behind a gray wall"

Chinese captions describe the same scenes with this grammar (no spaces):

    caption := object ("和" object)? wall?
    object  := "一个" colour "的" size? shape motion
    colour  := 红色 | 绿色 | 蓝色 | 黄色 | 青色 | 品红色
    size    := 大 | 小                       (omitted: either size)
    shape   := 圆 | 球 (circle) | 正方形 | 方块 (square) | 三角形
    motion  := 向左移动 | 向右移动 | 向上移动 | 向下移动 | 在弹跳
    wall    := "在灰色墙后面"

for example `一个红色的大圆向右移动和一个蓝色的正方形在弹跳在灰色墙后面`.

Lanes: two horizontal movers keep rows, and two vertical movers or bouncers keep
columns, that never overlap; a bouncer's lane runs from its apex down, so a
horizontal mover beside a bouncer keeps a row above that apex. A row and a vertical
mover's column always cross, and periodic motion meets there eventually: such pairs
start so that the objects do not meet for CLEAR_SECONDS (4 s), and in long videos
the later object is drawn over the earlier one when they cross.

Held-out combinations (green triangle; large cyan square; magenta moving down) are
judged on the captioned motion at time 0: after a reflection a magenta object
captioned `moving up` moves down, which is physics (WORLD.md, "Motion").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np

# ---------------------------------------------------------------- constants

SIZE = 64  # frame height and width, pixels
FPS = 8  # native frame rate
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
}
RADII = {"small": 5, "large": 8}  # object radius r, pixels
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "bouncing")
WALL_COLS = (28, 35)  # inclusive pixel columns of the wall
WALL_COLOUR = (128, 128, 128)
GRAVITY = 220.0  # px/s^2, downwards
SPEED_RANGE = (16.0, 24.0)  # px/s for movers
SQUARE_HALF_SIDE = 0.9  # square half-side in units of r
DIRECTION_SECONDS = 1.5  # the captioned direction holds at least this long
CLEAR_SECONDS = 4.0  # two objects of a scene never overlap before this time
SUPERSAMPLE = 4  # anti-aliasing: SUPERSAMPLE x SUPERSAMPLE samples per pixel

_HORIZONTAL = ("left", "right")
_VERTICAL = ("up", "down")
_MARGIN = 1.0  # px kept clear between lanes, the wall and start limits


# ---------------------------------------------------------------- scene types


@dataclass(frozen=True)
class ShapeObject:
    """One object: attributes plus its state at t = 0 (centre in px, speed in px/s)."""

    colour: str
    shape: str
    size: str
    motion: str
    x0: float
    y0: float
    speed: float  # 0 for bouncing

    @property
    def radius(self) -> int:
        """The object's radius r in pixels."""
        return RADII[self.size]


@dataclass(frozen=True)
class Scene:
    """A Shapes World scene: one or two objects and whether the wall is present."""

    objects: tuple[ShapeObject, ...]
    wall: bool


@dataclass(frozen=True)
class ObjectSpec:
    """One object as a caption names it (size None when the caption omits it)."""

    colour: str
    shape: str
    size: str | None
    motion: str


def is_held_out(obj: ShapeObject | ObjectSpec) -> bool:
    """True if the object is a combination never used in training data."""
    return (
        (obj.colour == "green" and obj.shape == "triangle")
        or (obj.colour == "cyan" and obj.shape == "square" and obj.size == "large")
        or (obj.colour == "magenta" and obj.motion == "down")
    )


def names_held_out(text: str) -> bool:
    """Whether a caption names a held-out combination (False for text that is no Shapes World caption)."""
    try:
        specs, _ = parse_caption(text)
    except ValueError:
        return False
    return any(is_held_out(s) for s in specs)


# ---------------------------------------------------------------- physics


def _reflect(u0: float, v: float, t: float, lo: float, hi: float) -> tuple[float, float]:
    """Position and velocity on [lo, hi] with elastic reflections, exactly at time t."""
    length = hi - lo
    m = (u0 - lo + v * t) % (2.0 * length)  # unfolded coordinate, one period
    if m <= length:
        return lo + m, v
    return lo + 2.0 * length - m, -v


def _bounce(y0: float, floor: float, t: float) -> tuple[float, float]:
    """Height and vertical velocity of a ball released at rest at y0, floor below."""
    t_fall = math.sqrt(2.0 * (floor - y0) / GRAVITY)
    tau = t % (2.0 * t_fall)  # one bounce period, starting at the apex
    d = tau if tau <= t_fall else 2.0 * t_fall - tau  # time from the apex
    vy = GRAVITY * d if tau <= t_fall else -GRAVITY * d
    return y0 + 0.5 * GRAVITY * d * d, vy


def _state(obj: ShapeObject, t: float) -> tuple[float, float, float, float]:
    r = obj.radius
    lo, hi = float(r), float(SIZE - r)
    if obj.motion == "bouncing":
        y, vy = _bounce(obj.y0, hi, t)
        return obj.x0, y, 0.0, vy
    sign = -1.0 if obj.motion in ("left", "up") else 1.0
    if obj.motion in _HORIZONTAL:
        x, vx = _reflect(obj.x0, sign * obj.speed, t, lo, hi)
        return x, obj.y0, vx, 0.0
    y, vy = _reflect(obj.y0, sign * obj.speed, t, lo, hi)
    return obj.x0, y, 0.0, vy


def position(obj: ShapeObject, t: float) -> tuple[float, float]:
    """Centre (x, y) in pixels of `obj` at time t seconds (exact, any t >= 0)."""
    x, y, _, _ = _state(obj, t)
    return x, y


def velocity(obj: ShapeObject, t: float) -> tuple[float, float]:
    """Velocity (vx, vy) in px/s of `obj` at time t seconds (y grows downwards)."""
    _, _, vx, vy = _state(obj, t)
    return vx, vy


# ---------------------------------------------------------------- rendering

_SUB = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # sample offsets inside a pixel


def _coverage(shape: str, r: float, x: float, y: float) -> tuple[np.ndarray, int, int]:
    """Fractional coverage of the pixels around (x, y): (patch [h, w], row0, col0)."""
    c0, c1 = max(int(math.floor(x - r)) - 1, 0), min(int(math.ceil(x + r)) + 1, SIZE)
    r0, r1 = max(int(math.floor(y - r)) - 1, 0), min(int(math.ceil(y + r)) + 1, SIZE)
    sx = (np.arange(c0, c1)[:, None] + _SUB).reshape(-1) - x  # (w*S,)
    sy = (np.arange(r0, r1)[:, None] + _SUB).reshape(-1) - y  # (h*S,)
    dx, dy = sx[None, :], sy[:, None]
    if shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif shape == "square":
        half = SQUARE_HALF_SIDE * r
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # triangle, apex up: height 2r, base 2r, centred in its bounding box
        inside = (dy <= r) & (np.abs(dx) <= (dy + r) / 2.0)
    h, w = r1 - r0, c1 - c0
    cov = inside.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3))  # (h, w)
    return cov, r0, c0


def _placed(scene: Scene, num_frames: int, fps: int, start_time: float):
    """(frame index, object, x, y) for every object of every frame; frame i shows time start_time + i / fps."""
    if int(num_frames) != num_frames or num_frames < 0:
        raise ValueError(f"num_frames must be an integer >= 0, got {num_frames!r}")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    if start_time < 0:
        raise ValueError(f"start_time must be >= 0 seconds, got {start_time!r}")
    placed = []
    for i in range(int(num_frames)):
        for obj in scene.objects:
            placed.append((i, obj, *position(obj, start_time + i / fps)))
    return placed


def render(scene: Scene, num_frames: int, fps: int = FPS, start_time: float = 0.0) -> np.ndarray:
    """Render frames [T, 64, 64, 3] uint8; frame i shows time start_time + i / fps."""
    placed = _placed(scene, num_frames, fps, start_time)
    video = np.zeros((int(num_frames), SIZE, SIZE, 3), dtype=np.float32)  # (T, H, W, 3)
    for i, obj, x, y in placed:
        cov, r0, c0 = _coverage(obj.shape, obj.radius, x, y)
        patch = video[i, r0 : r0 + cov.shape[0], c0 : c0 + cov.shape[1]]  # (h, w, 3)
        a = cov[..., None]
        patch[...] = patch * (1.0 - a) + np.asarray(PALETTE[obj.colour], np.float32) * a
    if scene.wall:
        video[:, :, WALL_COLS[0] : WALL_COLS[1] + 1] = WALL_COLOUR
    return np.rint(video).astype(np.uint8)


SHAPE_TWINS = {"circle": "square", "square": "circle", "triangle": "circle"}  # the shape each is taken for (swap_shapes too)


def shape_twin(scene: Scene) -> Scene:
    """The scene with every object's shape changed to its twin (SHAPE_TWINS) at the same place and
    motion; an object whose twin would be a held-out combination keeps its shape."""
    objects = []
    for obj in scene.objects:
        twin = replace(obj, shape=SHAPE_TWINS[obj.shape])
        objects.append(obj if is_held_out(twin) else twin)
    return Scene(tuple(objects), scene.wall)


def shape_cue(scene: Scene, num_frames: int, fps: int = FPS, start_time: float = 0.0) -> np.ndarray:
    """Where each object's shape shows: [T, 64, 64] float32 in [0, 1], the frames of `render`.

    A pixel's value is how much its coverage by the object differs from its coverage by its
    twin shape (SHAPE_TWINS) at the same place and size: for a square or a circle the few
    pixels that tell the two apart (14 px in all for a small object, 37 for a large one), for
    a triangle most of it; 0 behind the wall.
    """
    placed = _placed(scene, num_frames, fps, start_time)
    cue = np.zeros((int(num_frames), SIZE, SIZE), dtype=np.float32)  # (T, H, W)
    for i, obj, x, y in placed:
        own, r0, c0 = _coverage(obj.shape, obj.radius, x, y)
        diff = np.abs(own - _coverage(SHAPE_TWINS[obj.shape], obj.radius, x, y)[0])
        patch = cue[i, r0 : r0 + own.shape[0], c0 : c0 + own.shape[1]]
        np.maximum(patch, diff, out=patch)
    if scene.wall:
        cue[:, :, WALL_COLS[0] : WALL_COLS[1] + 1] = 0.0
    return cue


# ---------------------------------------------------------------- sampling


def _column(r: int, wall: bool, rng: np.random.Generator) -> float:
    """A column for a vertical mover or bouncer, clear of the wall when present."""
    lo, hi = r + _MARGIN, SIZE - r - _MARGIN
    if not wall:
        return float(rng.uniform(lo, hi))
    left_hi = WALL_COLS[0] - r - _MARGIN
    right_lo = WALL_COLS[1] + 1 + r + _MARGIN
    return float(rng.uniform(lo, left_hi) if rng.random() < 0.5 else rng.uniform(right_lo, hi))


def _start_along(motion: str, r: int, speed: float, wall: bool, rng) -> float:
    """Start coordinate along the motion so the direction holds for DIRECTION_SECONDS."""
    travel = speed * DIRECTION_SECONDS + _MARGIN
    lo, hi = r + _MARGIN, min(SIZE - r - travel, SIZE / 2)  # for "right" / "down": left/top half
    if motion in _HORIZONTAL and wall:  # start fully visible, clear of the wall
        hi = min(hi, WALL_COLS[0] - r - _MARGIN)
    u = float(rng.uniform(lo, hi))
    return u if motion in ("right", "down") else SIZE - u


def _place(colour, shape, size, motion, wall, rng, *, row_max=None, apex_min=0.0) -> ShapeObject:
    """Random start state; row_max bounds a horizontal mover's row, apex_min a bouncer's."""
    r = RADII[size]
    if motion == "bouncing":
        y0 = float(rng.uniform(max(r + _MARGIN, apex_min), SIZE / 2 - 4))  # upper half
        return ShapeObject(colour, shape, size, motion, _column(r, wall, rng), y0, 0.0)
    speed = float(rng.uniform(*SPEED_RANGE))
    along = _start_along(motion, r, speed, wall, rng)
    if motion in _HORIZONTAL:
        hi = SIZE - r - _MARGIN if row_max is None else row_max
        y0 = float(rng.uniform(r + _MARGIN, hi))
        return ShapeObject(colour, shape, size, motion, along, y0, speed)
    return ShapeObject(colour, shape, size, motion, _column(r, wall, rng), along, speed)


def lanes_clear(a: ShapeObject, b: ShapeObject) -> bool:
    """True if two objects' lanes are disjoint, or (a row crossing a vertical mover's
    column, which no placement avoids forever) the objects do not meet before CLEAR_SECONDS."""
    gap = a.radius + b.radius + _MARGIN
    if a.motion in _HORIZONTAL and b.motion in _HORIZONTAL:
        return abs(a.y0 - b.y0) >= gap
    if a.motion not in _HORIZONTAL and b.motion not in _HORIZONTAL:
        return abs(a.x0 - b.x0) >= gap
    h, v = (a, b) if a.motion in _HORIZONTAL else (b, a)
    if v.motion == "bouncing":  # the bouncer's lane spans its column from the apex down
        return h.y0 + gap <= v.y0
    for t in np.arange(0.0, CLEAR_SECONDS, 1.0 / 32):
        (xa, ya), (xb, yb) = position(a, t), position(b, t)
        if abs(xa - xb) < gap and abs(ya - yb) < gap:
            return False
    return True


def _place_all(attrs: list[tuple[str, str, str, str]], wall: bool, rng) -> Scene:
    """Place objects with the given (colour, shape, size, motion) so lanes stay clear."""
    motions = [a[3] for a in attrs]
    for _ in range(1000):
        if len(attrs) == 2 and "bouncing" in motions and set(motions) & set(_HORIZONTAL):
            ib = motions.index("bouncing")
            rb, rh = RADII[attrs[ib][2]], RADII[attrs[1 - ib][2]]
            b = _place(*attrs[ib], wall, rng, apex_min=2 * rh + rb + 2 * _MARGIN)
            h = _place(*attrs[1 - ib], wall, rng, row_max=b.y0 - rb - rh - _MARGIN)
            objs = (b, h) if ib == 0 else (h, b)
        else:
            objs = tuple(_place(*a, wall, rng) for a in attrs)
        if len(objs) < 2 or lanes_clear(objs[0], objs[1]):
            return Scene(objs, wall)
    raise AssertionError(f"could not place {attrs} with clear lanes")  # internal invariant


def _random_attrs(rng, colours: list[str]) -> tuple[str, str, str, str]:
    colour = colours[rng.integers(len(colours))]
    return (colour, SHAPES[rng.integers(3)], ("small", "large")[rng.integers(2)], MOTIONS[rng.integers(5)])


def _held_out_attrs(rng) -> tuple[str, str, str, str]:
    kind = rng.integers(3)
    if kind == 0:
        return ("green", "triangle", ("small", "large")[rng.integers(2)], MOTIONS[rng.integers(5)])
    if kind == 1:
        return ("cyan", "square", "large", MOTIONS[rng.integers(5)])
    return ("magenta", SHAPES[rng.integers(3)], ("small", "large")[rng.integers(2)], "down")


def sample_scene(rng: np.random.Generator, *, held_out: bool = False, two_objects: float = 0.5) -> Scene:
    """A random scene; held_out=True makes at least one object a held-out combination, and
    `two_objects` is the chance of a second object (at 0.5 the draw of every earlier version,
    so a seed gives the scenes it always gave)."""
    if not 0 <= two_objects <= 1:
        raise ValueError(f"two_objects is a probability between 0 and 1, got {two_objects!r}")
    n = 1 + int(rng.integers(2)) if two_objects == 0.5 else 1 + int(rng.random() < two_objects)
    wall = bool(rng.random() < 0.5)
    attrs: list[tuple[str, str, str, str]] = []
    if held_out:
        attrs.append(_held_out_attrs(rng))
    while len(attrs) < n:
        free = [c for c in PALETTE if c not in {a[0] for a in attrs}]
        a = _random_attrs(rng, free)
        if held_out or not is_held_out(ObjectSpec(*a)):
            attrs.append(a)
    order = rng.permutation(len(attrs))
    return _place_all([attrs[i] for i in order], wall, rng)


# ---------------------------------------------------------------- captions

_ZH_COLOURS = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "cyan": "青色", "magenta": "品红色"}
_ZH_SIZES = {"large": "大", "small": "小"}
_ZH_SHAPES = {"circle": ("圆", "球"), "square": ("正方形", "方块"), "triangle": ("三角形",)}
_ZH_MOTIONS = {"left": "向左移动", "right": "向右移动", "up": "向上移动", "down": "向下移动", "bouncing": "在弹跳"}
_ZH_WALL = "在灰色墙后面"
_EN_SHAPES = {"circle": ("circle", "ball"), "square": ("square", "box"), "triangle": ("triangle",)}
_EN_WALL = " behind a gray wall"
_EN_WALLS = (_EN_WALL, " behind a grey wall")  # what the parser reads as the wall
_HAN = re.compile(r"[\u4e00-\u9fff]")  # a Chinese caption holds Han characters
LANGUAGES = ("en", "zh")


def _names_size(obj: ShapeObject, rng) -> bool:
    """Whether a caption names the size (always for a large cyan square: held out)."""
    if obj.colour == "cyan" and obj.shape == "square" and obj.size == "large":
        return True
    return bool(rng.random() < 0.7)


def _object_en(obj: ShapeObject, rng) -> str:
    words = ["a"]
    if _names_size(obj, rng):
        words.append(obj.size)
    names = _EN_SHAPES[obj.shape]
    words += [obj.colour, names[rng.integers(len(names))]]
    if obj.motion == "bouncing":
        words.append("bouncing")
    else:
        words.append(("moving ", "moving to the ")[rng.integers(2)] + obj.motion)
    return " ".join(words)


def _object_zh(obj: ShapeObject, rng) -> str:
    size = _ZH_SIZES[obj.size] if _names_size(obj, rng) else ""
    names = _ZH_SHAPES[obj.shape]
    return f"一个{_ZH_COLOURS[obj.colour]}的{size}{names[rng.integers(len(names))]}{_ZH_MOTIONS[obj.motion]}"


def caption(scene: Scene, rng: np.random.Generator, *, language: str = "en") -> str:
    """A random caption of `scene` (its state at t = 0) in English or Chinese."""
    if language == "en":
        text = " and ".join(_object_en(o, rng) for o in scene.objects)
        return text + (_EN_WALL if scene.wall else "")
    if language == "zh":
        text = "和".join(_object_zh(o, rng) for o in scene.objects)
        return text + (_ZH_WALL if scene.wall else "")
    raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")


def vocabulary_corpus(n: int = 3000) -> list[str]:
    """Captions that hold every word of the grammar in both languages, held-out words too (a fixed sample,
    2n captions): what a word-level tokenizer of the Shapes World is built from beside the training captions."""
    rng = np.random.default_rng(0)
    return [caption(sample_scene(rng, held_out=bool(i % 2)), rng, language=lang) for i in range(n) for lang in ("en", "zh")]


_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
_ZH_OPPOSITE = {"向左": "向右", "向右": "向左", "向上": "向下", "向下": "向上"}
_DIRECTION_WORD = re.compile(r"\b(left|right|up|down)\b|(向左|向右|向上|向下)")


def swap_directions(text: str) -> str | None:
    """The caption with each direction word replaced by its opposite (left <-> right,
    up <-> down, in English and Chinese); None if the caption names no direction."""
    swapped, n = _DIRECTION_WORD.subn(lambda m: _OPPOSITE.get(m.group(1)) or _ZH_OPPOSITE[m.group(2)], text)
    return swapped if n else None


_OTHER_SHAPE = {"circle": "square", "ball": "box", "square": "circle", "box": "ball", "triangle": "circle",
                "圆": "正方形", "球": "方块", "正方形": "圆", "方块": "球", "三角形": "圆"}
_SHAPE_WORD = re.compile(r"\b(circle|ball|square|box|triangle)\b|(正方形|三角形|方块|圆|球)")


def swap_shapes(text: str) -> str | None:
    """The caption with each shape word replaced by the shape the model confuses it with (circle <->
    square, ball <-> box, triangle -> circle, in English and Chinese); None if it names no shape."""
    swapped, n = _SHAPE_WORD.subn(lambda m: _OTHER_SHAPE[m.group(1) or m.group(2)], text)
    return swapped if n else None


# ---------------------------------------------------------------- parsing

_EN_SHAPE_WORDS = {"circle": "circle", "ball": "circle", "square": "square", "box": "square", "triangle": "triangle"}
_DIRS = ("left", "right", "up", "down")


def _bad(part: str, what: str, got: str, valid) -> ValueError:
    return ValueError(f"cannot parse {part!r}: {what} {got!r} is not one of {', '.join(valid)}")


def _parse_object_en(part: str) -> ObjectSpec:
    words = part.split()
    if not words or words[0] != "a":
        example = "'a large red circle moving right'"
        raise ValueError(f"cannot parse {part!r}: an object must start with 'a ', e.g. {example}")
    i, size = 1, None
    if i < len(words) and words[i] in RADII:
        size, i = words[i], i + 1
    if i >= len(words) or words[i] not in PALETTE:
        raise _bad(part, "colour", words[i] if i < len(words) else "", PALETTE)
    colour = words[i]
    if i + 1 >= len(words) or words[i + 1] not in _EN_SHAPE_WORDS:
        raise _bad(part, "shape", words[i + 1] if i + 1 < len(words) else "", _EN_SHAPE_WORDS)
    shape, rest = _EN_SHAPE_WORDS[words[i + 1]], " ".join(words[i + 2 :])
    m = re.fullmatch(r"moving (?:to the )?(left|right|up|down)|(bouncing)", rest)
    if m is None:
        valid = ("'moving <dir>'", "'moving to the <dir>'", "'bouncing'", "with <dir> one of " + "/".join(_DIRS))
        raise _bad(part, "motion", rest, valid)
    return ObjectSpec(colour, shape, size, m.group(1) or "bouncing")


_ZH_OBJECT = re.compile(
    "一个(" + "|".join(_ZH_COLOURS.values()) + ")的(大|小)?("
    + "|".join(n for ns in _ZH_SHAPES.values() for n in ns) + ")("
    + "|".join(_ZH_MOTIONS.values()) + ")"
)


def _parse_object_zh(part: str) -> ObjectSpec:
    m = _ZH_OBJECT.fullmatch(part)
    if m is None:
        raise ValueError(
            f"cannot parse {part!r}: a Chinese object must read 一个<颜色>的[大|小]<形状><运动>, colour one of "
            f"{'/'.join(_ZH_COLOURS.values())}, shape one of 圆/球/正方形/方块/三角形, motion one of "
            f"{'/'.join(_ZH_MOTIONS.values())}"
        )
    colour = next(k for k, v in _ZH_COLOURS.items() if v == m.group(1))
    size = {"大": "large", "小": "small", None: None}[m.group(2)]
    shape = next(k for k, v in _ZH_SHAPES.items() if m.group(3) in v)
    motion = next(k for k, v in _ZH_MOTIONS.items() if v == m.group(4))
    return ObjectSpec(colour, shape, size, motion)


def parse_caption(text: str) -> tuple[list[ObjectSpec], bool]:
    """Parse an English or Chinese caption into (object specs, wall present)."""
    if not isinstance(text, str):
        raise ValueError(f"caption must be a string, got {type(text).__name__}")
    s = " ".join(text.strip().lower().split())
    if _HAN.search(s):
        s = s.replace(" ", "")
        wall = s.endswith(_ZH_WALL)
        body = s[: -len(_ZH_WALL)] if wall else s
        parts, parse = body.split("和"), _parse_object_zh
    else:
        wall = False
        for suffix in _EN_WALLS:
            if s.endswith(suffix):
                wall, s = True, s[: -len(suffix)]
        parts, parse = s.split(" and "), _parse_object_en
    if len(parts) > 2:
        raise ValueError(f"caption {text!r} names {len(parts)} objects; a caption names 1 or 2")
    specs = [parse(p) for p in parts]
    if len(specs) == 2 and specs[0].colour == specs[1].colour:
        raise ValueError(f"caption {text!r}: two objects must have different colours, both are {specs[0].colour}")
    return specs, wall


def object_spans(text: str) -> list[tuple[int, int, ObjectSpec]]:
    """Where each object of a caption is written: (start, end, spec) character spans of `text`
    (the words of the wall phrase and of " and " / 和 belong to no object)."""
    specs, wall = parse_caption(text)
    body = text.rstrip()
    if wall:
        for suffix in (_ZH_WALL, *_EN_WALLS):
            if body.lower().endswith(suffix):
                body = body[: -len(suffix)]
                break
    if len(specs) == 1:
        return [(0, len(body), specs[0])]
    cut = body.find("和") if _HAN.search(body) else body.lower().find(" and ")
    gap = 1 if body[cut] == "和" else len(" and ")
    return [(0, cut, specs[0]), (cut + gap, len(body), specs[1])]


def scene_from_caption(text: str, rng: np.random.Generator) -> Scene:
    """A random scene matching `text` (omitted size: either, but a cyan square is small)."""
    specs, wall = parse_caption(text)
    attrs = []
    for s in specs:
        size = s.size
        if size is None:
            size = "small" if (s.colour, s.shape) == ("cyan", "square") else ("small", "large")[rng.integers(2)]
        attrs.append((s.colour, s.shape, size, s.motion))
    return _place_all(attrs, wall, rng)


def sample_clip(
    rng: np.random.Generator,
    num_frames: int,
    fps: int = FPS,
    *,
    max_start: float = 0.0,
    held_out: bool = False,
    language: str = "en",
) -> tuple[np.ndarray, str]:
    """A random clip [T, 64, 64, 3] uint8 and its caption, starting in [0, max_start] s."""
    if max_start < 0:
        raise ValueError(f"max_start must be >= 0 seconds, got {max_start!r}")
    scene = sample_scene(rng, held_out=held_out)
    text = caption(scene, rng, language=language)
    start = float(rng.uniform(0.0, max_start)) if max_start > 0 else 0.0
    return render(scene, num_frames, fps, start_time=start), text
