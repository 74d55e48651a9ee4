"""Generated videos redrawn as the Shapes World draws them: targets for the decoder stage (train.py).

The DiT places the objects a caption asks for and moves them, but draws their edges as the world never
does: a square with wavy sides, a triangle with a soft tip (docs/training-log.md, session 30). Given a
window it generated, `redraw` renders each caption object, with the renderer, where the detector finds the
drawn one, so that the decoder can learn to draw the DiT's own latents as the world would.

A window is redrawn only when the detector finds every caption object in most of its frames and the drawn
shape leans the caption's way: a triangle read as a triangle; a square (a circle) read as a square or a
circle and filling at least (less than) SQUARE_LEAN of its extent (a circle fills 0.79, a square 1.0;
the detector's line is 0.89). Frames in which an object is not found get no target.

With `lean=False` (targets for the DiT, which reads the caption) every object the detector finds is redrawn as
the caption's shape, however it was drawn: a square drawn round becomes a square where it was.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from soragen.data.shapes import PALETTE, RADII, SIZE, SQUARE_HALF_SIDE, WALL_COLOUR, WALL_COLS, _coverage, parse_caption
from soragen.evaluation.detector import Blob, centre, colour_coverage, detect_frame

SQUARE_LEAN = 0.84  # median fill from which a blob asked to be a square is redrawn as one
MIN_FOUND = 0.8  # share of frames in which every caption object must be found
NUDGE = np.arange(-1.0, 1.01, 0.25)  # px: offsets tried around the detected centre


def _half_extent(shape: str, r: int) -> float:
    return SQUARE_HALF_SIDE * r if shape == "square" else float(r)


def _fit(shape: str, r: int, x: float, y: float, cover: np.ndarray, wall: bool) -> tuple[float, float]:
    """The centre near (x, y) at which the rendered shape best covers `cover` [64, 64] (least squares over one
    box around (x, y) that holds every candidate; the wall's columns, which hide the object, left out)."""
    y0, y1 = max(int(np.floor(y - r)) - 3, 0), min(int(np.ceil(y + r)) + 3, SIZE)
    x0, x1 = max(int(np.floor(x - r)) - 3, 0), min(int(np.ceil(x + r)) + 3, SIZE)
    seen = np.ones((SIZE, SIZE), bool)
    if wall:
        seen[:, WALL_COLS[0] : WALL_COLS[1] + 1] = False
    best, where = np.inf, (x, y)
    for dx in NUDGE:
        for dy in NUDGE:
            cov, r0, c0 = _coverage(shape, r, x + dx, y + dy)
            drawn = np.zeros((SIZE, SIZE), np.float32)
            drawn[r0 : r0 + cov.shape[0], c0 : c0 + cov.shape[1]] = cov
            err = float(np.square((drawn - cover)[y0:y1, x0:x1][seen[y0:y1, x0:x1]]).sum())
            if err < best:
                best, where = err, (x + dx, y + dy)
    return where


def _most_common(values: list[str]) -> str:
    return Counter(values).most_common(1)[0][0]  # ties: the first seen


def redraw(frames: np.ndarray, caption: str, lean: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
    """A generated window [T, 64, 64, 3] uint8 redrawn for `caption`: (frames [T, 64, 64, 3] uint8, which frames
    have a target [T] bool), or None when the window is not redrawn (see the module's docstring; `lean=False`
    redraws each found object as the caption's shape whatever shape it was drawn)."""
    specs, wall = parse_caption(caption)
    t_len = len(frames)
    found = [detect_frame(f) for f in frames]  # per frame: its blobs
    video = np.zeros((t_len, SIZE, SIZE, 3), np.float32)
    has_target = np.ones(t_len, bool)
    for spec in specs:
        blobs: list[Blob | None] = []
        for frame_blobs in found:
            mine = [b for b in frame_blobs if b.colour == spec.colour]
            blobs.append(max(mine, key=lambda b: b.area) if mine else None)
        whole = [b for b in blobs if b is not None and not b.clipped]
        if sum(b is not None for b in blobs) < MIN_FOUND * t_len or not whole:
            return None
        drawn = _most_common([b.shape for b in whole])
        fill = float(np.median([b.fill_ratio for b in whole]))
        if not lean:
            leans = True
        elif spec.shape == "triangle":
            leans = drawn == "triangle"
        else:  # a circle and a square are told apart by one line, SQUARE_LEAN, so their targets never disagree
            leans = drawn in ("circle", "square") and (fill >= SQUARE_LEAN) == (spec.shape == "square")
        if not leans:
            return None
        r = RADII[spec.size or _most_common([b.size for b in whole])]
        half = _half_extent(spec.shape, r)
        colour = np.asarray(PALETTE[spec.colour], np.float32)
        cover = colour_coverage(frames, spec.colour)  # (T, 64, 64)
        for i, b in enumerate(blobs):
            if b is None or (b.clip[0] and b.clip[2]) or (b.clip[1] and b.clip[3]):
                has_target[i] = False
                continue
            x = centre(b.edges[0], b.edges[2], b.clip[0], b.clip[2], 2 * half)
            y = centre(b.edges[1], b.edges[3], b.clip[1], b.clip[3], 2 * half)
            # Fitted to the blob's pixels: the box of a wavy blob, or of a clipped one's thin edge, is off by a pixel.
            x, y = _fit(spec.shape, r, x, y, cover[i], wall)
            cov, r0, c0 = _coverage(spec.shape, r, x, y)
            patch = video[i, r0 : r0 + cov.shape[0], c0 : c0 + cov.shape[1]]
            a = cov[..., None]
            patch[...] = patch * (1.0 - a) + colour * a
    if wall:
        video[:, :, WALL_COLS[0] : WALL_COLS[1] + 1] = WALL_COLOUR
    return np.rint(video).astype(np.uint8), has_target
