"""Shapes World renderer, physics, sampling and captions follow WORLD.md."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from soragen.data import shapes as S
from soragen.data.shapes import ObjectSpec, Scene, ShapeObject


def _obj(colour="red", shape="circle", size="large", motion="right", x0=32.0, y0=32.0, speed=20.0):
    return ShapeObject(colour, shape, size, motion, x0, y0, speed)


def _still(shape, size, x=32.0, y=32.0, colour="red", wall=False) -> np.ndarray:
    """One frame (64, 64, 3) of a single object at (x, y)."""
    return S.render(Scene((_obj(colour, shape, size, "right", x, y),), wall), 1)[0]


# ---------------------------------------------------------------- frames


def test_constants_follow_world():
    assert (S.SIZE, S.FPS, S.WALL_COLS, S.WALL_COLOUR, S.GRAVITY) == (64, 8, (28, 35), (128, 128, 128), 220.0)
    assert S.RADII == {"small": 5, "large": 8}
    assert S.PALETTE == {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
                         "yellow": (255, 255, 0), "cyan": (0, 255, 255), "magenta": (255, 0, 255)}


@pytest.mark.parametrize("colour", list(S.PALETTE))
def test_pure_colour_at_centre_black_elsewhere(colour):
    frame = _still("square", "small", 20.3, 40.7, colour)
    assert frame.dtype == np.uint8 and frame.shape == (64, 64, 3)
    assert tuple(frame[40, 20]) == S.PALETTE[colour]
    assert frame[:30].max() == 0 and frame[:, 30:].max() == 0


@pytest.mark.parametrize("size", ["small", "large"])
def test_shape_extents(size):
    r = S.RADII[size]
    cover = lambda f: f[..., 0] / 255.0  # red channel = coverage  # noqa: E731
    circle, square, tri = (cover(_still(s, size)) for s in S.SHAPES)
    assert circle[32].sum() == pytest.approx(2 * r, abs=0.3)  # diameter through the centre
    assert circle.sum() == pytest.approx(math.pi * r * r, rel=0.03)
    assert square[32].sum() == pytest.approx(1.8 * r, abs=0.15)  # 4x4 samples: coverage in quarters
    assert square.sum() == pytest.approx((1.8 * r) ** 2, rel=0.02)
    assert tri.sum() == pytest.approx(2 * r * r, rel=0.03)  # base 2r, height 2r
    rows = np.flatnonzero(tri.sum(1) > 0.05)
    assert rows[0] == 32 - r and rows[-1] == 32 + r - 1  # centred in its bounding box
    assert tri[32 + r - 1].sum() > 1.8 * r and tri[32 - r].sum() < 0.6  # base wide, apex up


def test_anti_aliased_edges_blend():
    frame = _still("circle", "large", 32.5, 32.5)
    assert len(np.unique(frame[..., 0])) > 5  # partial coverage gives intermediate values


def test_wall_is_drawn_over_objects():
    frame = _still("square", "large", 32.0, 32.0, "blue", wall=True)
    assert (frame[:, 28:36] == 128).all()  # exactly grey over the object
    assert tuple(frame[32, 26]) == (0, 0, 255) and tuple(frame[32, 37]) == (0, 0, 255)
    assert frame[:, :28].sum() > 0 and (frame[0, :28] == 0).all()


def test_shape_cue_marks_the_pixels_that_tell_shapes_apart():
    """A square's cue is where it and a circle at its place differ (its corners), the circle's the same pixels."""
    def cue(shape, wall=False, x=20.0):
        return S.shape_cue(Scene((_obj("red", shape, "large", "right", x, 32.0),), wall), 1)[0]  # (64, 64)

    square, circle, triangle = cue("square"), cue("circle"), cue("triangle")
    assert square.shape == (64, 64) and np.array_equal(square, circle)  # circle and square are each other's nearest
    assert square[32, 20] == 0 and square[25, 13] > 0.5  # not the middle; the corner (half-side 7.2 px)
    assert square[32, 12] > 0  # and the circle's rim beyond the square's side
    assert triangle.sum() > 2 * square.sum() and triangle.max() <= 1.0
    bbox = np.zeros((64, 64), bool)
    bbox[32 - 9 : 32 + 9, 20 - 9 : 20 + 9] = True
    assert not square[~bbox].any()
    assert not cue("square", wall=True, x=32.0)[:, 28:36].any() and cue("square", wall=True, x=32.0).any()


def test_shape_twin_swaps_circles_and_squares_in_place_and_never_holds_out():
    scene = Scene((_obj("red", "circle", x0=12.0), _obj("blue", "triangle", "small", "up", 50.0, 40.0)), True)
    twin = S.shape_twin(scene)
    assert [o.shape for o in twin.objects] == ["square", "circle"] and twin.wall
    assert [(o.x0, o.y0, o.motion, o.colour, o.size) for o in twin.objects] == [
        (o.x0, o.y0, o.motion, o.colour, o.size) for o in scene.objects]
    assert S.shape_twin(twin).objects[0].shape == "circle"
    cyan = Scene((_obj("cyan", "circle", "large"),), False)
    assert S.shape_twin(cyan) == cyan  # a large cyan square is held out: the circle stays a circle
    assert S.shape_twin(Scene((_obj("cyan", "circle", "small"),), False)).objects[0].shape == "square"


def test_frame_i_shows_start_plus_i_over_fps():
    scene = Scene((_obj(motion="left", x0=50.0), _obj("blue", "triangle", "small", "bouncing", 10.0, 12.0, 0.0)), True)
    clip = S.render(scene, 4, fps=8, start_time=7.0)
    assert np.array_equal(clip[3], S.render(scene, 1, start_time=7.0 + 3 / 8)[0])


def test_render_time_for_a_4_second_clip():
    scene = Scene((_obj(motion="right", x0=12.0), _obj("blue", "triangle", "large", "bouncing", 50.0, 20.0, 0.0)), True)
    best = min(_timed(lambda: S.render(scene, 32)) for _ in range(5))
    assert best < 0.05


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def test_render_rejects_bad_arguments():
    scene = Scene((_obj(),), False)
    with pytest.raises(ValueError, match="num_frames"):
        S.render(scene, -1)
    with pytest.raises(ValueError, match="fps"):
        S.render(scene, 2, fps=0)


# ---------------------------------------------------------------- physics


@pytest.mark.parametrize("motion", ["left", "right", "up", "down"])
def test_reflection_keeps_speed_and_canvas(motion):
    obj = _obj(size="small", motion=motion, x0=20.0, y0=44.0, speed=23.0)
    for t in np.linspace(0, 30, 301):
        x, y = S.position(obj, t)
        vx, vy = S.velocity(obj, t)
        assert math.hypot(vx, vy) == pytest.approx(23.0)
        assert 5 <= x <= 59 and 5 <= y <= 59
    # the velocity is the derivative of the position, away from the reflection instants
    t, dt = 7.3, 1e-4
    (x0, y0), (x1, y1) = S.position(obj, t), S.position(obj, t + dt)
    assert ((x1 - x0) / dt, (y1 - y0) / dt) == pytest.approx(S.velocity(obj, t), abs=1e-3)


def test_position_exact_at_long_times():
    obj = _obj(size="large", motion="right", x0=11.0, y0=30.0, speed=20.0)
    period = 2 * (64 - 16) / 20.0
    for k in (1, 1000, 10**5):
        assert S.position(obj, k * period + 0.4) == pytest.approx(S.position(obj, 0.4), abs=1e-6)
    for motion in S.MOTIONS:
        x, y = S.position(_obj(motion=motion, y0=20.0, speed=0.0 if motion == "bouncing" else 17.0), 1000.0)
        assert 8 <= x <= 56 and 8 <= y <= 56


def test_bouncer_falls_under_gravity_and_returns_to_its_apex():
    obj = _obj("cyan", "circle", "small", "bouncing", 40.0, 15.0, 0.0)
    assert S.velocity(obj, 0.0) == (0.0, 0.0)
    t_fall = math.sqrt(2 * (59 - 15) / 220.0)
    assert S.position(obj, t_fall)[1] == pytest.approx(59.0)  # touches the floor at y = 64 - r
    for k in (1, 2, 50, 7000):
        assert S.position(obj, 2 * k * t_fall) == pytest.approx((40.0, 15.0), abs=1e-6)
    (_, y0), (_, y1), (_, y2) = (S.position(obj, 0.2 + d) for d in (0.0, 0.01, 0.02))
    assert (y2 - 2 * y1 + y0) / 1e-4 == pytest.approx(220.0, rel=1e-4)
    ys = [S.position(obj, t)[1] for t in np.linspace(0, 20, 2001)]
    assert min(ys) >= 15.0 - 1e-9 and max(ys) <= 59.0 + 1e-9


# ---------------------------------------------------------------- sampling


def test_captioned_direction_holds_for_1_5_seconds():
    rng = np.random.default_rng(1)
    sign = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    for _ in range(300):
        for obj in S.sample_scene(rng, held_out=bool(rng.random() < 0.3)).objects:
            if obj.motion == "bouncing":
                assert obj.speed == 0 and obj.y0 < 32 and S.velocity(obj, 0.0) == (0.0, 0.0)
                continue
            assert 16 <= obj.speed <= 24
            for t in np.linspace(0, 1.5, 13):
                vx, vy = S.velocity(obj, t)
                assert (np.sign(vx), np.sign(vy)) == sign[obj.motion]
            x, y = obj.x0, obj.y0
            along = x if obj.motion in ("left", "right") else y
            assert (along < 32) == (obj.motion in ("right", "down"))  # starts in the opposite half


def test_lanes_never_overlap():
    rng = np.random.default_rng(2)
    pairs = 0
    for _ in range(500):
        scene = S.sample_scene(rng)
        for obj in scene.objects:
            if scene.wall and obj.motion not in ("left", "right"):  # columns clear of the wall
                assert obj.x0 + obj.radius < 28 or obj.x0 - obj.radius > 36
        if len(scene.objects) < 2:
            continue
        a, b = scene.objects
        pairs += 1
        assert a.colour != b.colour and S.lanes_clear(a, b)
        gap = a.radius + b.radius
        rows = (a.motion in ("left", "right"), b.motion in ("left", "right"))
        if rows == (True, True):
            assert abs(a.y0 - b.y0) >= gap
        elif rows == (False, False):
            assert abs(a.x0 - b.x0) >= gap
        for t in np.linspace(0, S.CLEAR_SECONDS, 33):  # crossing lanes: apart during the clip
            (xa, ya), (xb, yb) = S.position(a, t), S.position(b, t)
            assert abs(xa - xb) >= gap or abs(ya - yb) >= gap
    assert pairs > 150


def test_training_scenes_never_hold_out():
    rng = np.random.default_rng(3)
    for _ in range(2000):
        scene = S.sample_scene(rng)
        assert not any(S.is_held_out(o) for o in scene.objects)
        for o in scene.objects:
            assert not (o.colour == "green" and o.shape == "triangle")
            assert not (o.colour == "cyan" and o.shape == "square" and o.size == "large")
            assert not (o.colour == "magenta" and o.motion == "down")
        text = S.caption(scene, rng)
        for spec in S.parse_caption(text)[0]:  # no training caption names a held-out combination
            assert not S.is_held_out(spec)


def test_cyan_square_with_size_left_open_is_small():
    rng = np.random.default_rng(4)
    for text in ("a cyan square moving left", "a cyan box bouncing", "一个青色的正方形向上移动"):
        for _ in range(30):
            assert S.scene_from_caption(text, rng).objects[0].size == "small"
    big = Scene((_obj("cyan", "square", "large", "left", 40.0, 30.0, 20.0),), False)
    assert all(" large cyan " in S.caption(big, rng) for _ in range(30))  # size always named


def test_held_out_scenes_hold_out():
    rng = np.random.default_rng(5)
    kinds = set()
    for _ in range(300):
        scene = S.sample_scene(rng, held_out=True)
        held = [o for o in scene.objects if S.is_held_out(o)]
        assert held
        kinds.update((o.colour, o.motion == "down") for o in held)
        assert any(S.is_held_out(s) for s in S.parse_caption(S.caption(scene, rng))[0])
    assert {k[0] for k in kinds} == {"green", "cyan", "magenta"}


def test_sample_clip():
    rng = np.random.default_rng(6)
    frames, text = S.sample_clip(rng, 17, max_start=60.0, language="zh")
    assert frames.shape == (17, 64, 64, 3) and frames.dtype == np.uint8
    specs, _ = S.parse_caption(text)
    assert 1 <= len(specs) <= 2 and "一个" in text
    with pytest.raises(ValueError, match="max_start"):
        S.sample_clip(rng, 2, max_start=-1.0)


# ---------------------------------------------------------------- captions


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), language=st.sampled_from(["en", "zh"]), held_out=st.booleans())
def test_captions_parse_back_to_the_scene(seed, language, held_out):
    rng = np.random.default_rng(seed)
    scene = S.sample_scene(rng, held_out=held_out)
    specs, wall = S.parse_caption(S.caption(scene, rng, language=language))
    assert wall == scene.wall and len(specs) == len(scene.objects)
    for spec, obj in zip(specs, scene.objects):
        assert (spec.colour, spec.shape, spec.motion) == (obj.colour, obj.shape, obj.motion)
        assert spec.size in (None, obj.size)
    again = S.scene_from_caption(S.caption(scene, rng, language=language), rng)
    assert [(o.colour, o.shape, o.motion) for o in again.objects] == [(o.colour, o.shape, o.motion) for o in scene.objects]


def test_caption_synonyms_all_appear():
    rng = np.random.default_rng(7)
    scene = Scene((_obj(shape="circle", motion="left"), _obj("blue", "square", "small", "up", 10.0, 40.0)), True)
    texts = " | ".join(S.caption(scene, rng) for _ in range(200))
    for phrase in ("ball", "circle", "box", "square", "moving left", "moving to the left", "a red circle",
                   "a large red", "behind a gray wall"):
        assert phrase in texts


def test_parse_synonyms_case_and_whitespace():
    specs, wall = S.parse_caption("  A Large RED Ball moving to the Left and a blue box bouncing behind a gray wall \n")
    assert wall and specs == [ObjectSpec("red", "circle", "large", "left"), ObjectSpec("blue", "square", None, "bouncing")]
    specs, wall = S.parse_caption("一个红色的大圆向右移动和一个品红色的小三角形在弹跳在灰色墙后面")
    assert wall and specs == [ObjectSpec("red", "circle", "large", "right"),
                              ObjectSpec("magenta", "triangle", "small", "bouncing")]
    assert S.parse_caption("一个青色的正方形向下移动") == ([ObjectSpec("cyan", "square", None, "down")], False)


def test_object_spans_cover_each_objects_words():
    rng = np.random.default_rng(7)
    for i in range(300):
        text = S.caption(S.sample_scene(rng), rng, language=("en", "zh")[i % 2])
        specs, _ = S.parse_caption(text)
        spans = S.object_spans(text)
        assert [spec for _, _, spec in spans] == specs
        for lo, hi, spec in spans:  # each span is one whole object, as the parser reads it alone
            assert S.parse_caption(text[lo:hi])[0] == [spec]
    text = "a small blue box bouncing and a yellow triangle moving to the left behind a gray wall"
    assert [text[lo:hi] for lo, hi, _ in S.object_spans(text)] == ["a small blue box bouncing",
                                                                    "a yellow triangle moving to the left"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("a purple circle moving right", "colour 'purple'"),
        ("a red blob moving right", "shape 'blob'"),
        ("a red circle moving sideways", "motion 'moving sideways'"),
        ("the red circle moving right", "must start with 'a '"),
        ("a red ball bouncing and a blue ball bouncing and a cyan box bouncing", "1 or 2"),
        ("a red ball bouncing and a red box moving up", "different colours"),
        ("一个紫色的圆向右移动", "一个<颜色>"),
        ("", "must start with 'a '"),
    ],
)
def test_parse_errors_are_clear(text, message):
    with pytest.raises(ValueError, match=message):
        S.parse_caption(text)


def test_caption_language_must_be_known():
    with pytest.raises(ValueError, match="language"):
        S.caption(Scene((_obj(),), False), np.random.default_rng(0), language="fr")


def test_swap_directions_swaps_every_direction_word_in_both_languages():
    rng = np.random.default_rng(3)
    for _ in range(200):
        scene = S.sample_scene(rng)
        for language in S.LANGUAGES:
            text = S.caption(scene, rng, language=language)
            swapped = S.swap_directions(text)
            movers = [o for o in scene.objects if o.motion != "bouncing"]
            if not movers:
                assert swapped is None
                continue
            objects, wall = S.parse_caption(swapped)
            assert wall == scene.wall
            opposite = {"left": "right", "right": "left", "up": "down", "down": "up", "bouncing": "bouncing"}
            assert [o.motion for o in objects] == [opposite[o.motion] for o in scene.objects]
            assert S.swap_directions(swapped) == text
    assert S.swap_directions("a red ball moving upward") is None  # whole words only


def test_swap_shapes_swaps_every_shape_word_in_both_languages():
    assert S.swap_shapes("a large red circle moving right and a small blue box bouncing behind a gray wall") == (
        "a large red square moving right and a small blue ball bouncing behind a gray wall")
    assert S.swap_shapes("a green triangle moving up") == "a green circle moving up"
    assert S.swap_shapes("一个红色的大圆向右移动和一个蓝色的方块在弹跳") == "一个红色的大正方形向右移动和一个蓝色的球在弹跳"
    assert S.swap_shapes("一个绿色的三角形向上移动") == "一个绿色的圆向上移动"
    assert S.swap_shapes("") is None and S.swap_shapes("a red boxer") is None
    rng = np.random.default_rng(0)
    for _ in range(50):  # every swapped caption still parses, with the other shapes
        for language in ("en", "zh"):
            scene = S.sample_scene(rng)
            objects, _ = S.parse_caption(S.swap_shapes(S.caption(scene, rng, language=language)))
            assert [o.shape for o in objects] == [{"circle": "square", "square": "circle", "triangle": "circle"}[o.shape]
                                                  for o in scene.objects]
