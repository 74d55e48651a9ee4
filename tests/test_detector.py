"""The scorer reads ground-truth Shapes World clips right and catches wrong ones."""

from __future__ import annotations

import json

import numpy as np
import pytest

from soragen.data import shapes as S
from soragen.data.shapes import Scene, ShapeObject
from soragen.evaluation import detector as D


def _clip(text: str, frames: int = 13, seed: int = 0) -> np.ndarray:
    """Ground truth for a caption: (T, 64, 64, 3) uint8."""
    return S.render(S.scene_from_caption(text, np.random.default_rng(seed)), frames)


def _nearest(frames: np.ndarray, f: int = 4) -> np.ndarray:
    return frames.repeat(f, axis=1).repeat(f, axis=2)  # (T, 64f, 64f, 3)


def _bilinear(frames: np.ndarray, f: int = 4) -> np.ndarray:
    """Bilinear upscaling by f, as a separable interpolation matrix."""
    n = frames.shape[1]
    src = np.clip((np.arange(n * f) + 0.5) / f - 0.5, 0, n - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    a = np.zeros((n * f, n), np.float32)  # (64f, 64)
    np.add.at(a, (np.arange(n * f), lo), 1 - (src - lo))
    np.add.at(a, (np.arange(n * f), hi), src - lo)
    up = np.einsum("ij,tjkc,lk->tilc", a, frames.astype(np.float32), a, optimize=True)  # (T, 64f, 64f, 3)
    return np.clip(np.rint(up), 0, 255).astype(np.uint8)


def _noisy(frames: np.ndarray, rng, sigma: float = 8.0) -> np.ndarray:
    return np.clip(frames + rng.normal(0, sigma, frames.shape), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- single frames


@pytest.mark.parametrize("shape", S.SHAPES)
@pytest.mark.parametrize("size", ["small", "large"])
def test_detect_frame_reads_every_attribute(shape, size):
    rng = np.random.default_rng(hash((shape, size)) % 2**32)
    for colour in S.PALETTE:
        x, y = rng.uniform(12, 52, 2)
        frame = S.render(Scene((ShapeObject(colour, shape, size, "left", x, y, 20.0),), False), 1)[0]
        (blob,) = D.detect_frame(frame)
        assert (blob.colour, blob.shape, blob.size, blob.clipped) == (colour, shape, size, False)
        assert abs(blob.cx - x) < 0.3 and abs(blob.cy - y) < (S.RADII[size] / 3 + 0.3)  # triangle mass sits low


def test_detect_frame_ignores_wall_and_specks_and_checks_size():
    frame = S.render(Scene((), True), 1)[0]
    frame[5, 5] = (255, 0, 0)  # one-pixel speck
    assert D.detect_frame(frame) == []
    assert D.detect_frame(_nearest(frame[None], 3)[0]) == []
    with pytest.raises(ValueError, match="64x64 times an integer"):
        D.detect_frame(np.zeros((100, 100, 3), np.uint8))


# ---------------------------------------------------------------- score_video


def test_score_video_accuracy_on_ground_truth():
    rng = np.random.default_rng(0)
    variants = [lambda v: v, _nearest, _bilinear, lambda v: _noisy(v, rng)]
    results = []
    for i in range(120):
        scene = S.sample_scene(rng, held_out=i % 6 == 0)
        text = S.caption(scene, rng, language="zh" if i % 5 == 0 else "en")
        frames = variants[i % 4](S.render(scene, 13 if i % 3 else 17))
        res = D.score_video(frames, text)
        json.dumps(res)  # serialisable
        results.append(res["all_correct"])
    assert np.mean(results) >= 0.98


def test_score_video_two_objects_wall_upscaled():
    text = "a large red circle moving right and a small yellow triangle bouncing behind a gray wall"
    res = D.score_video(_bilinear(_clip(text, 17)), text)
    assert res["all_correct"] and res["count"] and res["wall"]
    assert [o["size"] for o in res["objects"]] == [True, True]
    res = D.score_video(_clip("a blue box moving up", 9), "a blue box moving up")
    assert res["all_correct"] and res["objects"][0]["size"] is None


def test_score_video_catches_wrong_colour_and_direction():
    frames = _clip("a large red circle moving right")
    obj = D.score_video(frames, "a large blue circle moving left")["objects"][0]
    assert (obj["colour"], obj["direction"], obj["shape"], obj["size"]) == (False, False, True, True)


@pytest.mark.parametrize(
    "rendered, scored, wrong",
    [
        ("a large red circle moving right", "a large red square moving right", "shape"),
        ("a large red circle moving right", "a large red triangle moving right", "shape"),
        ("a small green square moving up", "a small green circle moving up", "shape"),
        ("a small magenta triangle moving left", "a small magenta square moving left", "shape"),
        ("a large red circle moving right", "a small red circle moving right", "size"),
        ("a small blue box moving down", "a large blue box moving down", "size"),
        ("a small blue box moving down", "a small blue box moving up", "direction"),
        ("a small blue box moving down", "a small blue box bouncing", "direction"),
        ("a large cyan ball bouncing", "a large cyan ball moving down", "direction"),
        ("a large cyan ball bouncing", "a large yellow ball bouncing", "colour"),
    ],
)
def test_score_video_catches_each_wrong_attribute(rendered, scored, wrong):
    res = D.score_video(_clip(rendered, 17), scored)
    obj = res["objects"][0]
    assert obj[wrong] is False and not res["all_correct"]
    assert all(obj[k] is not False for k in ("colour", "shape", "size", "direction") if k != wrong)


def test_score_video_count_and_wall():
    two = "a red ball moving left and a blue box bouncing"
    res = D.score_video(_clip(two, 17), "a red ball moving left")
    assert res["count"] is False and not res["all_correct"] and res["objects"][0]["colour"]
    res = D.score_video(_clip("a red ball moving left", 17), two)
    assert res["count"] is False and res["objects"][1]["colour"] is False
    res = D.score_video(_clip("a red ball moving left"), "a red ball moving left behind a gray wall")
    assert res["wall"] is False and not res["all_correct"]


def test_score_video_rejects_bad_caption():
    with pytest.raises(ValueError, match="colour 'purple'"):
        D.score_video(_clip("a red ball moving left", 3), "a purple ball moving left")


# ---------------------------------------------------------------- long videos


def test_long_object_of_another_colour_never_keeps():
    """An object matched to a track of another colour keeps its colour in no window."""
    frames = _clip("a large red circle moving right", 12 * 8, seed=2)
    obj = D.score_long_video(frames, "a large green circle moving right")["objects"][0]
    assert obj["colour"] is False and obj["keeps"] == 0.0


def test_long_ground_truth_keeps_everything():
    text = "a small yellow box moving to the left and a large blue triangle bouncing behind a gray wall"
    frames = _clip(text, 60 * 8, seed=1)
    res = D.score_long_video(frames, text)
    json.dumps(res)
    box, ball = res["objects"]
    assert res["count"] == 1.0 and res["wall"]
    for obj in (box, ball):
        assert obj["keeps"] == 1.0 and obj["moves"] == 1.0 and obj["vanishes"] is False
    assert box["re_emerges"] and box["wall_passages"] >= 10 and box["wall_passages_through"] == box["wall_passages"]
    assert ball["keeps_bouncing"] and ball["bounces"] >= 40
    assert np.ptp(ball["apex_heights"]) <= D.APEX_TOLERANCE
    assert ball["apexes_in_band"] == ball["apexes"] == len(ball["apex_heights"])


def test_long_video_reports_a_vanished_object():
    text = "a large red circle moving up and a small cyan ball moving right behind a gray wall"
    scene = S.scene_from_caption(text, np.random.default_rng(2))
    frames = S.render(scene, 30 * 8)
    frames[80:104] = S.render(Scene(scene.objects[1:], True), 24, start_time=10.0)  # red gone for 3 s
    red, cyan = D.score_long_video(frames, text)["objects"]
    assert red["vanishes"] and red["vanish_frames"] == 24
    assert not cyan["vanishes"]


def test_long_video_catches_a_bouncer_that_loses_height():
    text = "a large green circle bouncing"
    high, low = (S.render(Scene((ShapeObject("green", "circle", "large", "bouncing", 30.0, y0, 0.0),), False), 80)
                 for y0 in (12.0, 24.0))
    assert D.score_long_video(high, text)["objects"][0]["keeps_bouncing"]
    res = D.score_long_video(np.concatenate([high, low]), text)
    assert res["objects"][0]["keeps_bouncing"] is False
    assert 0 < res["objects"][0]["apexes_in_band"] < len(res["objects"][0]["apex_heights"])


def test_long_video_counts_a_passage_that_turns_back_behind_the_wall():
    """A mover that enters the wall from the left and comes out on the left again does not re-emerge."""
    text = "a small red circle moving right behind a gray wall"
    scene = Scene((ShapeObject("red", "circle", "small", "right", 10.0, 32.0, 20.0),), True)
    there = S.render(scene, 20)  # 2.5 px a frame: left of the wall to frame 5, behind it 6-12, then right
    back = np.concatenate([there[:10], there[9::-1], there])  # turns back behind the wall, then goes across
    obj = D.score_long_video(back, text)["objects"][0]
    assert obj["re_emerges"] is False and obj["wall_passages"] == 2 and obj["wall_passages_through"] == 1
    assert D.score_long_video(there, text)["objects"][0]["wall_passages_through"] == 1


def test_frame_change_profile_and_boundary_jump():
    frames = _clip("a large red circle moving right", 16)
    profile = D.frame_change_profile(frames)
    assert profile.shape == (15,) and (profile > 0).all()
    assert (D.frame_change_profile(np.repeat(frames[:1], 4, axis=0)) == 0).all()
    cut = np.concatenate([frames[:8], _clip("a small blue box moving up", 8)])
    jumpy = D.frame_change_profile(cut)
    assert D.boundary_jump(jumpy, [7]) > 2.0 > D.boundary_jump(profile, [7])
    with pytest.raises(ValueError, match="boundaries"):
        D.boundary_jump(profile, [])


# ---------------------------------------------------------------- what must not pass (session 36's review)


def test_an_upside_down_triangle_is_no_triangle():
    text = "a large red triangle moving right"
    frames = _clip(text, 17)
    obj = D.score_video(frames, text)["objects"][0]
    assert obj["shape"] and obj["drawn_shape"] == "triangle"
    flipped = np.ascontiguousarray(frames[:, ::-1])
    obj = D.score_video(flipped, text)["objects"][0]
    assert obj["shape"] is False and obj["drawn_shape"] == "upside-down triangle"
    assert D.score_video(np.zeros_like(frames), text)["objects"][0]["drawn_shape"] is None  # nothing drawn


def test_a_ball_that_falls_and_stays_on_the_floor_is_not_bouncing():
    text = "a large cyan ball bouncing"
    scene = Scene((ShapeObject("cyan", "circle", "large", "bouncing", 20.0, 14.0, 0.0),), False)
    frames = S.render(scene, 33)  # 4 s: the first rebound near 0.6 s
    assert D.score_video(frames, text)["objects"][0]["direction"]
    ys = [D.detect_frame(f)[0].cy for f in frames]
    floor = int(np.argmax(ys))
    dead = frames.copy()
    dead[floor + 1:] = frames[floor]  # lies where it landed...
    dead[floor + 1] = np.roll(frames[floor], -4, axis=0)  # ...but for a 4-px twitch
    assert D.score_video(dead, text)["objects"][0]["direction"] is False


def test_an_object_gone_for_good_neither_re_emerges_nor_keeps_bouncing():
    text = "a small red circle moving right and a large blue circle bouncing behind a gray wall"
    scene = S.scene_from_caption(text, np.random.default_rng(0))
    frames = S.render(scene, 60 * 8)
    frames[100:] = S.render(Scene((), True), 380)  # both gone after 12.5 s
    red, blue = D.score_long_video(frames, text)["objects"]
    assert not red["found"] and red["re_emerges"] is False and red["vanishes"]
    assert not blue["found"] and blue["keeps_bouncing"] is False
    from soragen.evaluation.run import tabulate_long

    long = tabulate_long([{"long": {"objects": [red, blue], "count": 0.2}}])
    assert long["re_emerges"] == 0.0 and long["keeps_bouncing"] == 0.0


def test_a_mover_that_never_reaches_the_wall_does_not_re_emerge():
    text = "a small red circle moving right behind a gray wall"
    scene = Scene((ShapeObject("red", "circle", "small", "right", 6.0, 32.0, 16.0),), True)
    there = S.render(scene, 8)  # x 6 to 20: clear of the wall (columns 28-35)
    frames = np.concatenate([there, there[::-1]] * 30)  # back and forth for 60 s
    obj = D.score_long_video(frames, text)["objects"][0]
    assert obj["moves"] == 1.0 and not obj["vanishes"]
    assert obj["wall_passages"] == 0 and obj["wall_passages_needed"] == D.passages_needed(60.0) == 8
    assert obj["re_emerges"] is False


def test_only_a_horizontal_mover_is_excused_at_the_wall_and_briefly():
    text = "a small green circle bouncing behind a gray wall"
    scene = Scene((ShapeObject("green", "circle", "small", "bouncing", 42.0, 12.0, 0.0),), True)  # beside the wall
    frames = S.render(scene, 240)
    empty = S.render(Scene((), True), 1)[0]
    for start in range(20, 240, 60):
        frames[start:start + 15] = empty
    obj = D.score_long_video(frames, text)["objects"][0]
    assert obj["vanishes"] and obj["vanish_frames"] == 60

    text = "a small red circle moving right behind a gray wall"
    frames = S.render(S.scene_from_caption(text, np.random.default_rng(3)), 240)
    at_wall = [i for i, f in enumerate(frames) if any(b.clipped for b in D.detect_frame(f))]
    assert D.score_long_video(frames, text)["objects"][0]["vanishes"] is False
    cut = frames.copy()
    cut[at_wall[2:6]] = S.render(Scene((), True), 1)[0]  # 4 frames (0.5 s) of a passage: not behind the 8-px wall
    obj = D.score_long_video(cut, text)["objects"][0]
    assert obj["vanishes"] and obj["vanish_frames"] == 4


def test_a_frozen_video_does_not_swamp_the_boundary_jump():
    profile = np.array([0.0] * 7 + [2.5] + [0.0] * 7)
    assert D.boundary_jump(profile, [7]) == pytest.approx(2.5 / D.MIN_CHANGE)


@pytest.mark.parametrize("fps", [4, 12, 30])
def test_bouncing_is_judged_at_other_frame_rates(fps):
    """Rebounds and apexes are found in time, not frames: at 4 fps the frame nearest a bounce is far from the floor,
    at 30 fps the step after an apex is under 0.2 px."""
    text = "a large cyan ball bouncing"
    scene = S.scene_from_caption(text, np.random.default_rng(3))
    assert D.score_video(S.render(scene, 4 * fps + 1, fps), text, fps=fps)["objects"][0]["direction"]
    at_8 = D.score_long_video(S.render(scene, 30 * 8), text)["objects"][0]
    obj = D.score_long_video(S.render(scene, 30 * fps, fps), text, fps=fps)["objects"][0]
    assert obj["keeps_bouncing"] and abs(obj["apexes"] - at_8["apexes"]) <= 1
