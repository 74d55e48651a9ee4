"""Score videos of the Shapes World against their captions (WORLD.md, "What a scorer reads").

Frames are averaged down to 64 x 64 (any integer upscale is accepted). A pixel is
coloured when it is bright (max channel >= 0.3) and saturated ((max - min) / max >=
0.5); it takes the nearest palette colour by chroma (rgb / max). Same-colour pixels
form 4-connected blobs; blobs lighter than MIN_MASS pixels are specks and ignored.
Coverage (the max channel) weights every measure, so anti-aliased edges count in part.

A blob's shape comes from how it fills its extent (circle ~0.79, square ~1.0,
triangle ~0.5; a triangle's mass also sits low), its size from its extent (2r is 10
or 16 px). Blobs touching the canvas edge or the wall are clipped: they still give a
position (from the unclipped side) but no shape or size. Colours are unique within a
scene, so an object is tracked as the largest blob of its colour, its two halves
joined while it straddles the wall.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from soragen.data.shapes import PALETTE, SIZE, WALL_COLS, WALL_COLOUR, ObjectSpec, parse_caption

MIN_VALUE = 0.3  # a coloured pixel's max channel, in [0, 1]
MIN_SATURATION = 0.5  # a coloured pixel's (max - min) / max
MIN_MASS = 3.0  # blobs with less coverage (pixels) are specks
MIN_SPEED = 5.0  # px/s; slower tracks count as not moving (true movers: 16..24)
DIRECTION_SECONDS = 1.5  # the window in which the captioned direction is judged
SIZE_SPLIT = 6.2  # px; extent / 2 above this is large (r = 8), below small (r = 5)
APEX_TOLERANCE = 3.0  # px; a bouncer's apexes agree within this
REBOUND_SHARE = 0.5  # a bouncer's first rebound rises at least this share of its fall (elastic: all of it)
WALL_GAP_SECONDS = 0.25  # the longest a horizontal mover may go unseen at the wall (never wholly behind it: 9-16 px
# wide against the wall's 8; a partly hidden small object can drop below MIN_MASS for a frame)
PASSAGE_SECONDS = (2.5, 2 * 54 / 16)  # a horizontal mover is clear of the wall within 2.5 s and crosses it on every
# traverse (at most 54 px at 16 px/s, 3.4 s). Half that rate is asked for: (T - 2.5) / 6.75 passages in T s, rounded
# down (8 in 60 s; ground truth makes 18-29); the measure is that it comes out, its speed is the physics' business
MIN_CHANGE = 0.5  # grey levels; the change inside windows boundary_jump divides by is at least this (a frozen video)

_NAMES = tuple(PALETTE)
_UNIT = np.array([PALETTE[c] for c in _NAMES], np.float32) / 255.0  # (6, 3)
_WALL_LO, _WALL_HI = WALL_COLS


@dataclass(frozen=True)
class Blob:
    """A coloured blob in one 64 x 64 frame (pixel units; bbox inclusive x0, y0, x1, y1)."""

    colour: str
    cx: float
    cy: float
    area: float
    bbox: tuple[int, int, int, int]
    fill_ratio: float
    shape: str
    size: str
    clipped: bool = False
    edges: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # left, top, right, bottom
    clip: tuple[bool, bool, bool, bool] = (False, False, False, False)  # same sides


# ---------------------------------------------------------------- pixels to blobs


def _downsample(frames: np.ndarray) -> np.ndarray:
    """[T, H, W, 3] uint8 -> [T, 64, 64, 3] float32 in [0, 1] by block averaging."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape [T, H, W, 3], got {frames.shape}")
    t, h, w, _ = frames.shape
    if t == 0:
        raise ValueError("frames must hold at least one frame, got T = 0")
    if h != w or h % SIZE != 0:
        raise ValueError(f"frames must be {SIZE}x{SIZE} times an integer factor, got {h}x{w}")
    f = h // SIZE
    blocks = frames.reshape(t, SIZE, f, SIZE, f, 3)  # (T, 64, f, 64, f, 3)
    return blocks.mean(axis=(2, 4), dtype=np.float32) / 255.0  # (T, 64, 64, 3)


def _palette_pixels(small: np.ndarray, wall: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Downsampled frames [..., 64, 64, 3] -> (each pixel's value, the max channel; its palette index, -1 where the
    pixel is not coloured or, with `wall`, lies on the wall's columns), both [..., 64, 64]."""
    value = small.max(axis=-1)
    sat = (value - small.min(axis=-1)) / np.maximum(value, 1e-6)
    mask = (value >= MIN_VALUE) & (sat >= MIN_SATURATION)
    if wall:
        mask[..., _WALL_LO : _WALL_HI + 1] = False
    pix = np.flatnonzero(mask)  # (P,) coloured pixels
    chroma = small.reshape(-1, 3)[pix] / value.reshape(-1)[pix, None]  # (P, 3)
    colour = np.full(mask.shape, -1)
    colour.reshape(-1)[pix] = np.argmin(((chroma[:, None] - _UNIT) ** 2).sum(-1), axis=1)
    return value, colour


def colour_coverage(frames: np.ndarray, colour: str) -> np.ndarray:
    """How much each pixel of frames [T, H, W, 3] uint8 (64 x 64 times an integer) is of palette `colour`, as the
    detector reads pixels (coloured, nearest by chroma; weighted by coverage): [T, 64, 64] float32 in [0, 1]."""
    value, index = _palette_pixels(_downsample(np.asarray(frames)))
    return np.where(index == _NAMES.index(colour), np.minimum(value, 1.0), 0.0).astype(np.float32)


def _has_wall(small: np.ndarray) -> bool:
    """True if most frames show a grey bar over the wall columns."""
    band = small[:, :, _WALL_LO : _WALL_HI + 1]  # (T, 64, 8, 3)
    grey = np.all(np.abs(band - WALL_COLOUR[0] / 255.0) < 0.15, axis=-1)  # (T, 64, 8)
    return bool(np.mean(grey.mean(axis=(1, 2)) > 0.8) > 0.5)


def _label(mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """4-connected same-colour components: each mask pixel gets its component's min index."""
    big = mask.size
    lab = np.where(mask, np.arange(big).reshape(mask.shape), big)  # (T, H, W)
    link_x = mask[:, :, 1:] & mask[:, :, :-1] & (colour[:, :, 1:] == colour[:, :, :-1])
    link_y = mask[:, 1:] & mask[:, :-1] & (colour[:, 1:] == colour[:, :-1])
    while True:
        new = lab.copy()
        np.minimum(new[:, :, :-1], np.where(link_x, lab[:, :, 1:], big), out=new[:, :, :-1])
        np.minimum(new[:, :, 1:], np.where(link_x, lab[:, :, :-1], big), out=new[:, :, 1:])
        np.minimum(new[:, :-1], np.where(link_y, lab[:, 1:], big), out=new[:, :-1])
        np.minimum(new[:, 1:], np.where(link_y, lab[:, :-1], big), out=new[:, 1:])
        flat = new.reshape(-1)
        inside = flat < big
        flat[inside] = flat[flat[inside]]  # pointer jumping: follow labels to their roots
        if np.array_equal(new, lab):
            return lab
        lab = new


def _classify(fill: float, drop: float, extent: float) -> tuple[str, str]:
    """Shape from the fill ratio and how low the mass sits (a triangle's apex is up: its mass a sixth of its
    height below the middle); size from the extent."""
    if fill < 0.62 and drop < -0.08:
        shape = "upside-down triangle"  # no shape of the world
    elif fill < 0.62 or (fill < 0.72 and drop > 0.08):
        shape = "triangle"
    elif fill > 0.89:
        shape = "square"
    else:
        shape = "circle"
    return shape, ("large" if extent / 2.0 > SIZE_SPLIT else "small")


def _blobs(small: np.ndarray, wall: bool) -> list[list[Blob]]:
    """Blobs of every frame of a downsampled video [T, 64, 64, 3]."""
    t_len = small.shape[0]
    value, colour = _palette_pixels(small, wall)  # (T, 64, 64) each
    mask = colour >= 0
    pix = np.flatnonzero(mask)  # (P,) coloured pixels
    lab = _label(mask, colour)
    roots, comp = np.unique(lab.reshape(-1)[pix], return_inverse=True)  # (N,), (P,)
    n = len(roots)
    _, y, x = np.unravel_index(pix, mask.shape)
    w = np.minimum(value.reshape(-1)[pix], 1.0).astype(np.float64)  # coverage, (P,)
    mass = np.bincount(comp, w, n)
    cx = np.bincount(comp, w * (x + 0.5), n) / mass
    cy = np.bincount(comp, w * (y + 0.5), n) / mass
    colmax = np.zeros((n, SIZE))
    rowmax = np.zeros((n, SIZE))
    np.maximum.at(colmax, (comp, x), w)
    np.maximum.at(rowmax, (comp, y), w)
    out: list[list[Blob]] = [[] for _ in range(t_len)]
    for k in np.flatnonzero(mass >= MIN_MASS):
        cols, rows = np.flatnonzero(colmax[k]), np.flatnonzero(rowmax[k])
        c0, c1, r0, r1 = cols[0], cols[-1], rows[0], rows[-1]
        width, height = colmax[k].sum(), rowmax[k].sum()
        edges = (c0 + 1 - colmax[k, c0], r0 + 1 - rowmax[k, r0], c1 + colmax[k, c1], r1 + rowmax[k, r1])
        clip = (
            c0 == 0 or (wall and c0 == _WALL_HI + 1),
            r0 == 0,
            c1 == SIZE - 1 or (wall and c1 == _WALL_LO - 1),
            r1 == SIZE - 1,
        )
        fill = mass[k] / max(width * height, 1e-6)
        drop = (cy[k] - (edges[1] + edges[3]) / 2.0) / max(height, 1e-6)
        shape, size = _classify(fill, drop, max(width, height))
        colour_name = _NAMES[colour.reshape(-1)[roots[k]]]
        bbox = (int(c0), int(r0), int(c1), int(r1))
        blob = Blob(colour_name, float(cx[k]), float(cy[k]), float(mass[k]), bbox, float(fill), shape,
                    size, bool(any(clip)), tuple(float(e) for e in edges), tuple(bool(c) for c in clip))
        out[int(roots[k] // (SIZE * SIZE))].append(blob)
    return out


def detect_frame(frame: np.ndarray) -> list[Blob]:
    """Coloured blobs of one frame [H, W, 3] uint8 (H = W = 64 times an integer)."""
    frame = np.asarray(frame)
    if frame.ndim != 3:
        raise ValueError(f"frame must have shape [H, W, 3], got {frame.shape}")
    small = _downsample(frame[None])
    return _blobs(small, _has_wall(small))[0]


# ---------------------------------------------------------------- blobs to tracks


def _merge_across_wall(blobs: list[Blob]) -> list[Blob]:
    """Join the two visible halves of one object that straddles the wall."""
    lefts = [b for b in blobs if b.bbox[2] == _WALL_LO - 1]
    rights = [b for b in blobs if b.bbox[0] == _WALL_HI + 1]
    for a in lefts:
        for b in rights:
            if a.colour == b.colour and a.bbox[1] <= b.bbox[3] and b.bbox[1] <= a.bbox[3]:
                area = a.area + b.area
                big = a if a.area >= b.area else b
                joined = Blob(
                    a.colour, (a.cx * a.area + b.cx * b.area) / area, (a.cy * a.area + b.cy * b.area) / area,
                    area, (a.bbox[0], min(a.bbox[1], b.bbox[1]), b.bbox[2], max(a.bbox[3], b.bbox[3])),
                    big.fill_ratio, big.shape, big.size, True,
                    (a.edges[0], min(a.edges[1], b.edges[1]), b.edges[2], max(a.edges[3], b.edges[3])),
                    (a.clip[0], a.clip[1] or b.clip[1], b.clip[2], a.clip[3] or b.clip[3]),
                )
                rest = [c for c in blobs if c is not a and c is not b]
                return _merge_across_wall(rest) + [joined]
    return blobs


def _mark_touching(blobs: list[Blob]) -> list[Blob]:
    """Flag blobs that touch another blob as clipped: one may hide part of the other."""

    def touch(a: Blob, b: Blob) -> bool:
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.bbox, b.bbox
        return ax0 <= bx1 + 1 and bx0 <= ax1 + 1 and ay0 <= by1 + 1 and by0 <= ay1 + 1

    return [replace(a, clipped=True) if any(touch(a, b) for b in blobs if b is not a) else a for a in blobs]


@dataclass
class _Track:
    """One colour over time: its largest blob per frame (None where absent)."""

    colour: str
    blobs: list[Blob | None]
    count: np.ndarray  # (T,) number of blobs of this colour per frame
    x: np.ndarray  # (T,) reconstructed centre, nan where absent
    y: np.ndarray  # (T,)
    width: float  # nominal (unclipped) extent, px
    height: float

    @property
    def present(self) -> np.ndarray:
        """(T,) bool: the colour is seen in the frame."""
        return ~np.isnan(self.x)

    def vote(self, attr: str, frames: slice = slice(None)) -> str | None:
        """Majority of a blob attribute over unclipped frames (all frames if none is)."""
        seen = [b for b in self.blobs[frames] if b is not None]
        pool = [b for b in seen if not b.clipped] or seen
        if not pool:
            return None
        names, counts = np.unique([getattr(b, attr) for b in pool], return_counts=True)
        return str(names[np.argmax(counts)])


def centre(lo: float, hi: float, clip_lo: bool, clip_hi: bool, extent: float) -> float:
    """Centre along one axis, measured from the unclipped side when one side is clipped."""
    if clip_lo and not clip_hi:
        return hi - extent / 2.0
    if clip_hi and not clip_lo:
        return lo + extent / 2.0
    return (lo + hi) / 2.0


def _tracks(per_frame: list[list[Blob]], wall: bool) -> dict[str, _Track]:
    """One track per colour seen anywhere in the video."""
    per_frame = [_mark_touching(_merge_across_wall(b) if wall else b) for b in per_frame]
    t_len = len(per_frame)
    tracks = {}
    for name in _NAMES:
        mine = [[b for b in bs if b.colour == name] for bs in per_frame]
        if not any(mine):
            continue
        main = [max(bs, key=lambda b: b.area) if bs else None for bs in mine]
        seen = [b for b in main if b is not None]
        pool = [b for b in seen if not b.clipped] or seen
        width = float(np.median([b.edges[2] - b.edges[0] for b in pool]))
        height = float(np.median([b.edges[3] - b.edges[1] for b in pool]))
        x, y = np.full(t_len, np.nan), np.full(t_len, np.nan)
        for i, b in enumerate(main):
            if b is not None:
                x[i] = centre(b.edges[0], b.edges[2], b.clip[0], b.clip[2], width)
                y[i] = centre(b.edges[1], b.edges[3], b.clip[1], b.clip[3], height)
        count = np.array([len(bs) for bs in mine])
        tracks[name] = _Track(name, main, count, x, y, width, height)
    return tracks


def _analyse(frames: np.ndarray) -> tuple[dict[str, _Track], np.ndarray, bool]:
    """Tracks, objects per frame (T,) and wall presence of a video [T, H, W, 3]."""
    small = _downsample(np.asarray(frames))  # (T, 64, 64, 3)
    wall = _has_wall(small)
    per_frame = _blobs(small, wall)
    tracks = _tracks(per_frame, wall)
    counts = np.zeros(len(per_frame), int)
    for tr in tracks.values():
        counts += tr.count
    return tracks, counts, wall


def _match(specs: list[ObjectSpec], tracks: dict[str, _Track], min_presence: float) -> list[_Track | None]:
    """Each caption object gets the track of its colour, else a leftover track (best agreement)."""
    persistent = {c: t for c, t in tracks.items() if t.present.mean() >= min_presence}
    matched: list[_Track | None] = [persistent.get(s.colour) for s in specs]
    leftover = sorted((t for c, t in persistent.items() if c not in {s.colour for s in specs}),
                      key=lambda t: -t.present.mean())
    open_idx = [i for i, m in enumerate(matched) if m is None]
    if open_idx and leftover:
        if len(open_idx) == 2 and len(leftover) >= 2:
            a, b = leftover[:2]

            def agree(i: int, t: _Track) -> int:
                return (t.vote("shape") == specs[i].shape) + (t.vote("size") == specs[i].size)

            if agree(open_idx[0], b) + agree(open_idx[1], a) > agree(open_idx[0], a) + agree(open_idx[1], b):
                leftover = [b, a]
        for i, t in zip(open_idx, leftover):
            matched[i] = t
    return matched


# ---------------------------------------------------------------- motion judgements


def _direction(track: _Track, fps: int) -> str:
    """Dominant direction over the first DIRECTION_SECONDS: left/right/up/down or static."""
    t = np.arange(len(track.x)) / fps
    keep = (t <= DIRECTION_SECONDS + 1e-9) & track.present
    if keep.sum() < 2:
        return "static"
    vx = np.polyfit(t[keep], track.x[keep], 1)[0]
    vy = np.polyfit(t[keep], track.y[keep], 1)[0]
    if max(abs(vx), abs(vy)) < MIN_SPEED:
        return "static"
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def _reach(fps: int) -> int:
    """Frames that span what 1 frame spans at the world's 8 fps (at least 1)."""
    return max(1, round(fps / 8))


def _rebounds(track: _Track, fps: int) -> list[int]:
    """Frames where the object turns from falling to rising near the floor. The floor band is 14 px at 8 fps and
    wider at lower rates (the frame nearest the bounce is up to a frame's fall from it); the rise is looked for
    over 2 frames' time at 8 fps."""
    idx = np.flatnonzero(track.present)
    y = track.y[idx]
    band = 14.0 * max(1.0, 8.0 / fps)
    ahead = 2 * _reach(fps)
    out = []
    for k in range(1, len(y) - 1):
        near_floor = y[k] + track.height / 2.0 >= SIZE - band
        fell = y[k] - y[: k + 1].min() > 4.0
        rises = y[k] > y[k + 1] and y[k] - y[k + 1 : k + 1 + ahead].min() > 2.0
        if y[k] >= y[k - 1] and rises and near_floor and fell:
            out.append(int(idx[k]))
    return out


def _apexes(track: _Track, fps: int) -> list[float]:
    """Heights (y of the centre) where the object turns from rising to falling: the highest point of the frames
    within a frame's time at 8 fps either side, at least 0.2 px above the frame that much later (at a higher rate
    the step after an apex is smaller than 0.2 px)."""
    idx = np.flatnonzero(track.present)
    y = track.y[idx]
    m = _reach(fps)
    return [float(y[k]) for k in range(1, len(y) - 1)
            if y[k] <= y[max(0, k - m) : k].min() and y[k] < y[k + 1 : k + 1 + m].min()
            and y[k] < y[min(k + m, len(y) - 1)] - 0.2]


def _bounces_ok(track: _Track, fps: int) -> bool:
    """Falls with downward acceleration and, if the video lasts 1 s or more, rebounds: rising, within as long as
    it fell, at least REBOUND_SHARE of the height it fell (if the video lasts half that long after the rebound)."""
    idx = np.flatnonzero(track.present)
    if len(idx) < 3:
        return False
    t, y, x = idx / fps, track.y[idx], track.x[idx]
    if np.ptp(x) > 6.0:  # a bouncer keeps its column
        return False
    rebounds = _rebounds(track, fps)
    fall_end = rebounds[0] if rebounds else idx[-1]
    # The fall: to the rebound's frame, or to the frame before it (that frame may show the bounce already, up to
    # a frame late: at 4 fps the fit through it can turn the fall's acceleration upwards).
    falls = False
    for fall in (idx <= fall_end, idx < fall_end):
        if fall.sum() >= 3 and not falls:
            accel = 2.0 * np.polyfit(t[fall], y[fall], 2)[0]  # px/s^2, downwards positive
            falls = y[fall][-1] - y[0] > 4.0 and accel > 30.0
    long_enough = (len(track.x) - 1) / fps >= 1.0
    if not rebounds:
        return bool(falls and not long_enough)
    k = int(np.flatnonzero(idx == fall_end)[0])
    top = int(np.argmin(y[: k + 1]))  # where the fall began
    fell, fall_frames = y[k] - y[top], idx[k] - idx[top]
    after = (idx > fall_end) & (idx <= fall_end + fall_frames)
    if len(track.x) - 1 - fall_end >= fall_frames / 2 and after.any():
        rises = y[k] - y[after].min() >= REBOUND_SHARE * fell  # a twitch on the floor is no rebound
    else:
        rises = True  # the video ends too soon after it to tell
    return bool(falls and rises)


# ---------------------------------------------------------------- scoring


def score_video(frames: np.ndarray, caption: str, fps: int = 8) -> dict:
    """Judge a video [T, H, W, 3] uint8 against its caption; JSON-serialisable dict."""
    specs, wall = parse_caption(caption)
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    tracks, counts, wall_seen = _analyse(frames)
    matched = _match(specs, tracks, min_presence=0.5)
    objects = []
    for spec, tr in zip(specs, matched):
        res = {"caption_colour": spec.colour, "colour": False, "shape": False,
               "size": None if spec.size is None else False, "direction": False, "count": False,
               "drawn_shape": None}  # the shape the detector sees most (None: no blob matched this object)
        if tr is not None:
            res["colour"] = tr.colour == spec.colour
            res["drawn_shape"] = tr.vote("shape")
            res["shape"] = res["drawn_shape"] == spec.shape
            if spec.size is not None:
                res["size"] = tr.vote("size") == spec.size
            if spec.motion == "bouncing":
                res["direction"] = _bounces_ok(tr, fps)
            else:
                res["direction"] = _direction(tr, fps) == spec.motion
            res["count"] = bool(np.median(tr.count) == 1)
        objects.append(res)
    count_ok = bool(len(counts) > 0 and np.median(counts) == len(specs))
    keys = ("colour", "shape", "size", "direction", "count")
    all_correct = count_ok and wall_seen == wall and all(o[k] is not False for o in objects for k in keys)
    return {"objects": objects, "count": count_ok, "wall": wall_seen == wall, "all_correct": bool(all_correct)}


def frame_change_profile(frames: np.ndarray) -> np.ndarray:
    """Mean absolute difference of each frame to the next, (T - 1,) float64 in 0..255."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or len(frames) < 1:
        raise ValueError(f"frames must have shape [T, H, W, C] with T >= 1, got {frames.shape}")
    return np.array([np.abs(frames[i + 1].astype(np.int16) - frames[i]).mean() for i in range(len(frames) - 1)])


def boundary_jump(profile: np.ndarray, boundaries: list[int]) -> float:
    """Mean change at the given transitions over the median change elsewhere (1 = seamless)."""
    profile = np.asarray(profile, float)
    at = np.zeros(len(profile), bool)
    at[list(boundaries)] = True
    if not at.any() or at.all():
        raise ValueError(f"boundaries must name some, not all, of the {len(profile)} transitions, got {boundaries}")
    return float(profile[at].mean() / max(np.median(profile[~at]), MIN_CHANGE))


def _windows(t_len: int, size: int) -> list[slice]:
    """Consecutive whole windows of `size` frames."""
    return [slice(s, s + size) for s in range(0, t_len - size + 1, size)]


def _wall_side(track: _Track, i: int) -> str:
    """'L' or 'R' when the object is fully clear of the wall, else 'W'."""
    half = track.width / 2.0
    if track.x[i] + half <= _WALL_LO + 0.5:
        return "L"
    if track.x[i] - half >= _WALL_HI + 1 - 0.5:
        return "R"
    return "W"


def _near_wall(track: _Track, j: int) -> bool:
    """Whether the object seen in frame j is at the wall (partly behind it)."""
    return abs(track.x[j] - (_WALL_LO + _WALL_HI + 1) / 2.0) <= 4.0 + track.width / 2.0 + 3.0


def _near_other(track: _Track, j: int, i: int, others: list[_Track]) -> bool:
    """Whether another object in frame i is where `track` was seen in frame j (occlusion)."""
    return any(
        o.present[i]
        and abs(track.x[j] - o.x[i]) <= (track.width + o.width) / 2.0 + 2.0
        and abs(track.y[j] - o.y[i]) <= (track.height + o.height) / 2.0 + 2.0
        for o in others
    )


def _lost_frames(track: _Track, others: list[_Track], at_wall: bool, fps: int) -> list[int]:
    """Frames where the object is missing, except gaps of at most 2 s behind another object and, for a horizontal
    mover in a wall scene (`at_wall`), of at most WALL_GAP_SECONDS at the wall."""
    lost = []
    missing = ~track.present
    seen = np.flatnonzero(track.present)
    start = 0
    while start < len(missing):
        if not missing[start]:
            start += 1
            continue
        stop = start
        while stop < len(missing) and missing[stop]:
            stop += 1
        ends = [j for j in (start - 1, stop) if 0 <= j < len(missing)]
        wall_gap = at_wall and stop - start <= max(1, round(WALL_GAP_SECONDS * fps))
        hidden = len(seen) > 0 and stop - start <= 2 * fps and all(
            (wall_gap and _near_wall(track, j)) or _near_other(track, j, min(max(j, start), stop - 1), others)
            for j in ends
        )
        if not hidden:
            lost += range(start, stop)
        start = stop
    return lost


def passages_needed(seconds: float) -> int:
    """The fewest passages behind the wall a horizontal mover makes in a video of `seconds` (PASSAGE_SECONDS)."""
    first, every = PASSAGE_SECONDS
    return max(0, int((seconds - first) // every))


def _re_emerges(track: _Track, fps: int) -> tuple[bool, int, int]:
    """The object passes behind the wall as often as the physics has it, and every passage ends on the other
    side: (ok, passages, passages that did)."""
    seen = np.flatnonzero(track.present)
    runs: list[str] = []  # sides in order, repeats collapsed: L, W, R
    for i in seen:
        side = _wall_side(track, i)
        if not runs or runs[-1] != side:
            runs.append(side)
    passages = [k for k in range(1, len(runs) - 1) if runs[k] == "W"]
    through = sum(runs[k - 1] != runs[k + 1] for k in passages)
    ok = through == len(passages) >= passages_needed(len(track.x) / fps)
    if len(seen) and runs[-1] == "W" and len(track.x) - 1 - seen[-1] > 2 * fps:
        ok = False  # went behind the wall and never came out
    return bool(ok), len(passages), int(through)


def score_long_video(frames: np.ndarray, caption: str, fps: int = 8) -> dict:
    """Judge consistency over a long video [T, H, W, 3]: keeps, motion, vanishing, bouncing."""
    specs, wall = parse_caption(caption)
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    tracks, counts, wall_seen = _analyse(frames)
    t_len = len(counts)
    matched = _match(specs, tracks, min_presence=0.25)
    win2, win1 = _windows(t_len, 2 * fps), _windows(t_len, fps)
    objects = []
    for spec, tr in zip(specs, matched):
        res: dict = {"caption_colour": spec.colour, "found": tr is not None}
        horizontal_at_wall = wall and spec.motion in ("left", "right")
        if tr is None:  # gone (or seen under a quarter of the time): it re-emerges and bounces no more either
            res |= {"keeps": 0.0, "moves": 0.0, "vanishes": True}
            if horizontal_at_wall:
                res["re_emerges"] = False
            if spec.motion == "bouncing":
                res["keeps_bouncing"] = False
            objects.append(res)
            continue
        present = tr.present

        colour_ok = tr.colour == spec.colour  # a track is one colour; another colour's track never keeps

        def keeps(w: slice) -> bool:
            shape = tr.vote("shape", w)
            return bool(colour_ok and present[w].mean() >= 0.5 and shape in (None, spec.shape))

        def moves(w: slice) -> bool:
            xs, ys = tr.x[w][present[w]], tr.y[w][present[w]]
            return len(xs) >= 2 and max(np.ptp(xs), np.ptp(ys)) >= 3.0

        others = [t for t in tracks.values() if t is not tr and t.present.mean() >= 0.25]
        lost = _lost_frames(tr, others, wall_seen and horizontal_at_wall, fps)
        res |= {
            "colour": colour_ok,
            "keeps": float(np.mean([keeps(w) for w in win2])) if win2 else None,
            "moves": float(np.mean([moves(w) for w in win1])) if win1 else None,
            "vanishes": bool(lost),
            "vanish_frames": len(lost),
        }
        if horizontal_at_wall:
            ok, passages, through = _re_emerges(tr, fps)
            res |= {"re_emerges": bool(ok), "wall_passages": passages, "wall_passages_through": through,
                    "wall_passages_needed": passages_needed(t_len / fps)}
        if spec.motion == "bouncing":
            apex = _apexes(tr, fps)
            rebounds = _rebounds(tr, fps)
            steady = bool(win2) and all(any(w.start <= r < w.stop for r in rebounds) for w in win2)
            consistent = len(apex) >= 2 and np.ptp(apex) <= APEX_TOLERANCE
            in_band = int(np.sum(np.abs(np.asarray(apex) - np.median(apex)) <= APEX_TOLERANCE / 2)) if apex else 0
            res |= {"bounces": len(rebounds), "apex_heights": [round(a, 2) for a in apex], "apexes": len(apex),
                    "apexes_in_band": in_band,
                    "keeps_bouncing": bool(steady and consistent)}
        objects.append(res)
    count_ok = [bool(np.median(counts[w]) == len(specs)) for w in win2]
    return {
        "objects": objects,
        "count": float(np.mean(count_ok)) if count_ok else None,
        "wall": bool(wall_seen == wall),
        "seconds": t_len / fps,
    }
