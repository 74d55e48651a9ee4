"""Looking instead of reading: poster frames, contact sheets and the batch gallery (index.html).

The gallery is one self-contained HTML file: relative links only, inline CSS and
script, no server and no external assets, every prompt and name HTML-escaped. Its
script writes each video's duration into the page when the metadata has loaded
(`data-duration` on the <video>), which is also what the browser test reads.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

SHEET_FRAMES = 12  # frames on a contact sheet (fewer for shorter videos)
SHEET_COLUMNS = 4
SHEET_TILE_WIDTH = 192  # pixels per tile on the sheet (frames are scaled to it, keeping the aspect ratio)
LABEL_HEIGHT = 18  # pixels of the time-stamp strip under each tile


# ---------------------------------------------------------------------------
# Poster frames and contact sheets
# ---------------------------------------------------------------------------


def sheet_indices(num_frames: int, count: int = SHEET_FRAMES) -> list[int]:
    """Indices of `count` frames spread evenly over a video of num_frames (first and last included)."""
    if num_frames <= count:
        return list(range(num_frames))
    return sorted({round(i * (num_frames - 1) / (count - 1)) for i in range(count)})


def poster_index(num_frames: int) -> int:
    """The frame shown before a video plays: the middle one."""
    return num_frames // 2


def timestamp(seconds: float) -> str:
    """m:ss.ss, e.g. 0:01.25."""
    minutes, rest = divmod(max(0.0, seconds), 60.0)
    return f"{int(minutes)}:{rest:05.2f}"


def contact_sheet(frames: Sequence[tuple[float, np.ndarray]], columns: int = SHEET_COLUMNS,
                  tile_width: int = SHEET_TILE_WIDTH) -> np.ndarray:
    """A grid of frames [H, W, 3] uint8, each with its time stamp underneath; returns the sheet [H', W', 3] uint8."""
    from PIL import Image, ImageDraw, ImageFont

    assert frames, "a contact sheet needs at least one frame"
    h, w = frames[0][1].shape[:2]
    tile_h = max(1, round(h * tile_width / w))
    nearest = tile_width % w == 0 and tile_h % h == 0  # integer enlargement: keep the pixels sharp
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.LANCZOS
    columns = min(columns, len(frames))
    rows = -(-len(frames) // columns)
    gap = 4
    sheet = Image.new("RGB", (columns * (tile_width + gap) + gap, rows * (tile_h + LABEL_HEIGHT + gap) + gap), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for n, (t, frame) in enumerate(frames):
        r, c = divmod(n, columns)
        x, y = gap + c * (tile_width + gap), gap + r * (tile_h + LABEL_HEIGHT + gap)
        sheet.paste(Image.fromarray(frame).resize((tile_width, tile_h), resample), (x, y))
        draw.text((x + 3, y + tile_h + 3), timestamp(t), fill=(235, 235, 235), font=font)
    return np.asarray(sheet)  # (H', W', 3)


class FrameSampler:
    """Keeps the frames a poster and a contact sheet need while a video streams past (`add` each chunk)."""

    def __init__(self, num_frames: int, fps: float):
        self.fps = fps
        self.on_sheet = sheet_indices(num_frames)
        self.poster_at = poster_index(num_frames)
        self.wanted = set(self.on_sheet) | {self.poster_at}
        self.kept: dict[int, np.ndarray] = {}
        self.seen = 0

    def add(self, frames: np.ndarray) -> None:
        """Look at the next chunk of frames [T_i, H, W, 3]."""
        for frame in frames:
            if self.seen in self.wanted:
                self.kept[self.seen] = frame.copy()
            self.seen += 1

    def poster(self) -> np.ndarray:
        """The poster frame [H, W, 3]."""
        return self.kept[self.poster_at]

    def sheet(self) -> np.ndarray:
        """The contact sheet [H', W', 3] of the kept frames, time-stamped."""
        return contact_sheet([(i / self.fps, self.kept[i]) for i in self.on_sheet if i in self.kept])


# ---------------------------------------------------------------------------
# index.html
# ---------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; background: #111; color: #ddd; }
h1 { font-size: 1.3em; margin: 0 0 .3em; } a { color: #8cf; }
.summary { color: #aaa; margin-bottom: 1em; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(280px, 1fr)); gap: 14px; }
.card { background: #1c1c1c; border-radius: 6px; padding: 8px; }
.card video, .card img.media { width: 100%; image-rendering: pixelated; background: #000; display: block; }
.prompt { margin: .4em 0; color: #fff; white-space: pre-wrap; word-break: break-word; }
.meta { color: #999; font-size: 12px; }
.failed { border-left: 3px solid #e55; } .pending { opacity: .6; }
.error { color: #f88; white-space: pre-wrap; word-break: break-word; }
"""

_SCRIPT = """
for (const v of document.querySelectorAll('video')) {
  const show = () => {
    v.dataset.duration = v.duration.toFixed(3);
    const out = v.closest('.card').querySelector('.duration');
    if (out) out.textContent = v.duration.toFixed(2) + ' s';
  };
  if (v.readyState >= 1) show(); else v.addEventListener('loadedmetadata', show);
  v.addEventListener('error', () => { v.dataset.error = String(v.error && v.error.code); });
}
"""


def _href(path: str) -> str:
    """A relative URL for a file path inside the gallery's folder (each part percent-encoded, then HTML-escaped)."""
    return html.escape("/".join(quote(part) for part in path.split("/")), quote=True)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _card(rec: dict[str, Any]) -> str:
    status = rec.get("status")
    head = f'<div class="prompt">{_e(rec.get("prompt", ""))}</div>'
    seed = rec.get("seed")
    where = _e(rec.get("where", ""))
    if status != "ok":
        if status == "failed":
            body = f'<div class="error">failed: {_e(rec.get("error") or "unknown error")}</div>'
        else:
            body = '<div class="meta">not rendered yet</div>'
        meta = where if seed is None else f"{where} · seed {_e(seed)}"  # an unreadable item has no seed
        return f'<div class="card {_e(status)}">{head}<div class="meta">{meta}</div>{body}</div>'
    files = rec["files"]
    video, fmt = files["video"]["path"], rec.get("format", "mp4")
    poster = files.get("poster", {}).get("path")
    sheet = files.get("contact_sheet", {}).get("path")
    if fmt in ("mp4", "webm"):
        attrs = f' poster="{_href(poster)}"' if poster else ""
        media = (f'<video controls loop muted playsinline preload="metadata"{attrs} '
                 f'src="{_href(video)}" data-name="{_e(rec.get("name", ""))}"></video>')
    elif fmt == "gif":
        media = f'<img class="media" src="{_href(video)}" alt="{_e(rec.get("prompt", ""))}">'
    else:  # frames: a folder of PNGs; show the poster, link the folder
        shown = f'<img class="media" src="{_href(poster)}" alt="frames">' if poster else "frames"
        media = f'<a href="{_href(video)}/">{shown}</a>'
    v = rec.get("video", {})
    t = rec.get("timings_seconds", {})
    timings = ", ".join(f"{k.replace('_', ' ')} {val:.2f} s" for k, val in t.items() if isinstance(val, (int, float)))
    links = [f'<a href="{_href(video)}">{_e(fmt)}</a>']
    if sheet:
        links.append(f'<a href="{_href(sheet)}">contact sheet</a>')
    if "sidecar" in files:
        links.append(f'<a href="{_href(files["sidecar"]["path"])}">json</a>')
    duration = f'{v["seconds"]:.2f} s' if isinstance(v.get("seconds"), (int, float)) else ""
    return (
        f'<div class="card ok">{media}{head}'
        f'<div class="meta">seed {_e(seed)} · <span class="duration">{_e(duration)}</span> · '
        f'{_e(v.get("width"))}x{_e(v.get("height"))} at {_e(v.get("fps"))} fps · {where}</div>'
        f'<div class="meta">{_e(timings)}</div>'
        f'<div class="meta">{" · ".join(links)}</div></div>'
    )


def render_index(records: Sequence[dict[str, Any]], title: str) -> str:
    """The gallery page of a batch's manifest records (one card per item; failed and pending ones too)."""
    counts = {s: sum(r.get("status") == s for r in records) for s in ("ok", "failed", "pending")}
    summary = f'{counts["ok"]} rendered, {counts["failed"]} failed, {counts["pending"]} pending'
    cards = "\n".join(_card(r) for r in records)
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_e(title)}</h1>\n<div class=\"summary\">{_e(summary)} · "
        f"<a href=\"manifest.jsonl\">manifest.jsonl</a></div>\n"
        f"<div class=\"grid\">\n{cards}\n</div>\n"
        f"<script>{_SCRIPT}</script>\n"
        "</body>\n</html>\n"
    )


def write_index(folder: Path, records: Sequence[dict[str, Any]], title: str) -> Path:
    """Write folder/index.html atomically; returns its path."""
    from soragen.video_io import write_text

    path = Path(folder) / "index.html"
    write_text(path, render_index(records, title))
    return path
