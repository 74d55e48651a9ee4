"""soragen.data.redraw: a generated window redrawn as the world draws it, where the DiT put each object."""

from __future__ import annotations

import numpy as np
import pytest

from soragen.data import shapes as S
from soragen.data.redraw import redraw
from soragen.evaluation import detector as D


def _clip(text: str, frames: int = 9, seed: int = 0) -> np.ndarray:
    return S.render(S.scene_from_caption(text, np.random.default_rng(seed)), frames)  # (T, 64, 64, 3)


def _cut_corners(frames: np.ndarray, leg: int = 4) -> np.ndarray:
    """Frames with each object's corners cut off (pixels within `leg` steps of a corner of its box, diagonally):
    a square drawn, not rendered, filling 0.84-0.89 of its box."""
    out = frames.copy()
    for frame in out:
        ys, xs = np.nonzero(frame.max(axis=-1) > 0)
        y, x = np.mgrid[0:64, 0:64]
        for cy, cx in [(ys.min(), xs.min()), (ys.min(), xs.max()), (ys.max(), xs.min()), (ys.max(), xs.max())]:
            frame[np.abs(y - cy) + np.abs(x - cx) < leg] = 0
    return out


@pytest.mark.parametrize("text", ["a large red square moving right", "a small blue triangle moving up",
                                  "a green circle bouncing and a yellow box moving left behind a gray wall"])
def test_rendered_frames_come_back_as_they_are(text):
    """Ground truth redrawn from its own caption is itself: every object found, placed to a fraction of a pixel."""
    frames = _clip(text)
    drawn, has_target = redraw(frames, text)
    assert drawn.shape == frames.shape and drawn.dtype == np.uint8 and has_target.all()
    assert np.abs(drawn.astype(int) - frames).mean() < 1.0  # grey levels, over all pixels


def test_a_wavy_square_is_redrawn_square_where_it_was_drawn():
    """Redrawing makes the world's square of a blob that leans square, at the blob's place."""
    text = "a large magenta square moving left"
    frames = _clip(text)
    wavy = _cut_corners(frames)
    fills = [b.fill_ratio for f in wavy for b in D.detect_frame(f)]
    assert 0.84 <= np.median(fills) < 0.89  # a square by the redraw's line, not by the detector's
    drawn, has_target = redraw(wavy, text)
    assert has_target.all()
    assert all(b.shape == "square" and b.fill_ratio > 0.97 for f in drawn for b in D.detect_frame(f))
    for a, b in zip(D.detect_frame(drawn[4]), D.detect_frame(frames[4])):
        assert abs(a.cx - b.cx) <= 1.0 and abs(a.cy - b.cy) <= 1.0


@pytest.mark.parametrize("asked, rendered", [("square", "circle"), ("circle", "square"), ("triangle", "circle")])
def test_a_shape_that_leans_the_other_way_is_not_redrawn(asked, rendered):
    """A square drawn round, a circle drawn square or a triangle drawn round teaches nothing: no target."""
    frames = _clip(f"a large cyan {rendered} moving down")
    assert redraw(frames, f"a large cyan {asked} moving down") is None


@pytest.mark.parametrize("asked, rendered", [("square", "circle"), ("circle", "square"), ("triangle", "circle")])
def test_without_lean_every_found_object_is_redrawn_as_its_captions_shape(asked, rendered):
    """lean=False (targets for the DiT, which reads the caption): a circle drawn for a square becomes a square where
    the circle was."""
    frames = _clip(f"a large cyan {rendered} moving down")
    drawn, has_target = redraw(frames, f"a large cyan {asked} moving down", lean=False)
    assert has_target.all()
    assert all(b.shape == asked for f in drawn for b in D.detect_frame(f))
    for a, b in zip(D.detect_frame(drawn[4]), D.detect_frame(frames[4])):
        assert abs(a.cx - b.cx) <= 1.0


def test_an_upside_down_triangle_is_redrawn_as_nothing():
    """The detector's upside-down triangle is no shape of the world: not a circle to redraw, nor a triangle."""
    frames = _clip("a large red triangle moving left")[:, ::-1].copy()  # flipped top to bottom
    assert {b.shape for f in frames for b in D.detect_frame(f)} == {"upside-down triangle"}
    for asked in ("circle", "triangle", "square"):
        assert redraw(frames, f"a large red {asked} moving left") is None


def test_an_object_missing_from_a_frame_leaves_that_frame_without_target():
    """A frame where the object is not found has no target; too many such frames and the window is not redrawn."""
    text = "a small red circle moving right"
    frames = _clip(text)
    frames[3] = 0
    drawn, has_target = redraw(frames, text)
    assert not has_target[3] and has_target.sum() == len(frames) - 1
    frames[4:6] = 0
    assert redraw(frames, text) is None  # found in 6 of 9 frames: under MIN_FOUND
    assert redraw(_clip(text), "a small red circle moving right and a blue box moving up") is None  # never found


def test_colour_coverage_reads_pixels_as_the_detector_does():
    frames = _clip("a large green square moving up and a small red circle moving left")
    green, red = D.colour_coverage(frames, "green")[0], D.colour_coverage(frames, "red")[0]
    blobs = {b.colour: b for b in D.detect_frame(frames[0])}
    assert green.sum() == pytest.approx(blobs["green"].area, rel=1e-4)
    assert red.sum() == pytest.approx(blobs["red"].area, rel=1e-4)
    assert not (green * red).any()
    assert D.colour_coverage(frames, "blue").sum() == 0


@pytest.mark.parametrize("objects, text", [
    ((S.ShapeObject("red", "triangle", "large", "left", 8.0, 30.0, 20.0),
      S.ShapeObject("blue", "square", "large", "right", 20.0, 12.0, 16.0)),
     "a large red triangle moving left and a large blue square moving right behind a gray wall"),
    ((S.ShapeObject("green", "triangle", "small", "bouncing", 12.0, 40.0, 0.0),),
     "a small green triangle bouncing behind a gray wall"),
])
def test_objects_clipped_by_the_canvas_edge_and_the_wall_come_back_in_place(objects, text):
    """A triangle half off the canvas, a box at the wall's edge and a bouncer on the floor are fitted to the pixels
    that show, not placed from a clipped box."""
    frames = S.render(S.Scene(objects, wall=True), 17)
    assert any(b.clipped for f in frames for b in D.detect_frame(f))
    drawn, has_target = redraw(frames, text)
    assert has_target.all()
    assert np.abs(drawn.astype(int) - frames).mean() < 0.25  # 0.49 for the first scene placed from the boxes
