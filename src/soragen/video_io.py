"""Stage 5: frames stream into ffmpeg (H.264, yuv420p, +faststart); JSON sidecars.

Files are written under a temporary name in the target folder and renamed when
complete, so an interrupted run never leaves a half-written file under a final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soragen.errors import UserError


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Frames [B=1, 3, T, H, W] in [-1, 1] -> uint8 array [T, H, W, 3]."""
    x = ((frames[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, T, H, W)
    return x.permute(1, 2, 3, 0).contiguous().numpy()  # (T, H, W, 3)


def upscale(frames: np.ndarray, factor: int) -> np.ndarray:
    """Enlarge frames [T, H, W, 3] by an integer factor (nearest neighbour: content unchanged)."""
    if factor == 1:
        return frames
    return frames.repeat(factor, axis=1).repeat(factor, axis=2)  # (T, H*f, W*f, 3)


def temporary_path(final: Path) -> Path:
    """A fresh hidden file name beside `final` (same folder, so the rename is atomic)."""
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    return Path(name)


def check_writable(path: Path, overwrite: bool) -> None:
    """Raise a UserError if `path` exists (and overwrite is off) or its folder cannot be written."""
    if path.exists() and not overwrite:
        raise UserError(f"output file {path} already exists; pass --overwrite to replace it or choose another --output")
    folder = path.parent
    if not folder.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create output folder {folder}: {e.strerror}") from None
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"output folder {folder} is not writable; choose another --output")


class Mp4Writer:
    """Streams uint8 frames [T, H, W, 3] into an H.264 MP4; renamed into place on `close()`."""

    def __init__(self, path: Path, width: int, height: int, fps: int, crf: int = 18):
        import imageio_ffmpeg

        self.path = Path(path)
        self.tmp = temporary_path(self.path)
        self.size = (width, height)
        self.frames_written = 0
        self._gen = imageio_ffmpeg.write_frames(
            str(self.tmp),
            self.size,
            fps=fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            quality=None,
            macro_block_size=1,
            ffmpeg_log_level="error",
            output_params=[
                "-crf", str(crf),
                "-preset", "medium",
                "-movflags", "+faststart",
                "-map_metadata", "-1",
                "-fflags", "+bitexact",
                "-flags", "+bitexact",
                "-f", "mp4",
            ],
        )
        self._gen.send(None)  # start ffmpeg

    def write(self, frames: np.ndarray) -> None:
        """Append frames [T, H, W, 3] uint8."""
        assert frames.dtype == np.uint8 and frames.shape[1:] == (self.size[1], self.size[0], 3), frames.shape
        for frame in frames:
            self._gen.send(np.ascontiguousarray(frame))
        self.frames_written += len(frames)

    def close(self) -> None:
        """Finish the file and move it to its final name."""
        try:
            self._gen.close()
        except Exception:
            self.abort()
            raise
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Stop ffmpeg and delete the partial file."""
        try:
            self._gen.close()
        except Exception:
            pass
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sidecar_path(video: Path) -> Path:
    """Where the JSON sidecar of a video goes: same name, `.json`."""
    return video.with_suffix(".json")
