"""Stage 5: frames stream into a writer per output format; JSON sidecars; PNG images.

Formats (`video.format`), one writer class each behind one interface
(`write(frames)`, `close()`, `abort()`, a context manager), chosen by `open_writer`:
mp4 (H.264, yuv420p, +faststart), webm (VP9 through libvpx-vp9), gif (ffmpeg's
palettegen/paletteuse filters), frames (a folder of PNGs).

Files are written under a temporary name in the target folder and renamed when
complete (a frames folder is filled under a temporary name and renamed as a whole),
so an interrupted run never leaves a half-written file under a final name.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soragen.errors import UserError

log = logging.getLogger(__name__)
GIF_MAX_FPS = 50  # a GIF frame lasts whole hundredths of a second; browsers show one under 20 ms for 100 ms


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Frames [B=1, 3, T, H, W] in [-1, 1] -> uint8 array [T, H, W, 3]."""
    x = ((frames[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, T, H, W)
    return x.permute(1, 2, 3, 0).contiguous().numpy()  # (T, H, W, 3)


def upscale(frames: np.ndarray, factor: int) -> np.ndarray:
    """Enlarge frames [T, H, W, 3] by an integer factor (nearest neighbour: content unchanged)."""
    if factor == 1:
        return frames
    return frames.repeat(factor, axis=1).repeat(factor, axis=2)  # (T, H*f, W*f, 3)


def fit_size(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """The largest (width, height) with the aspect ratio of `size` that fits inside `box`."""
    (w, h), (bw, bh) = size, box
    scale = min(bw / w, bh / h)
    return max(1, min(bw, round(w * scale))), max(1, min(bh, round(h * scale)))


def fit_frames(frames: np.ndarray, box: tuple[int, int] | None) -> np.ndarray:
    """Scale frames [T, H, W, 3] to fit inside box (width, height), keeping the aspect ratio; pad with black, centred.

    Integer enlargements use nearest neighbour (the pixels stay sharp, like --upscale);
    anything else uses Lanczos resampling (Pillow).
    """
    if box is None or (frames.shape[2], frames.shape[1]) == tuple(box):
        return frames
    from PIL import Image

    t, h, w, _ = frames.shape
    fw, fh = fit_size((w, h), box)
    if fw % w == 0 and fh % h == 0 and fw // w == fh // h:
        scaled = upscale(frames, fw // w)  # (T, fh, fw, 3)
    else:
        scaled = np.stack([np.asarray(Image.fromarray(f).resize((fw, fh), Image.Resampling.LANCZOS)) for f in frames])
    out = np.zeros((t, box[1], box[0], 3), dtype=np.uint8)  # (T, H_out, W_out, 3): black bars
    top, left = (box[1] - fh) // 2, (box[0] - fw) // 2
    out[:, top : top + fh, left : left + fw] = scaled
    return out


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends; they are acted on right after it.

    Creating a temporary file and recording its name happen in such a block, so an
    interruption cannot land between the two and leave a file nobody will delete.
    The signals are held at the Python level: a per-thread signal mask would not do,
    since the kernel hands a signal to any thread that does not block it (torch's
    and rich's threads). Python handlers can only be set in the main thread; elsewhere
    this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, lambda signum, frame: pending.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(pending):  # each held signal once, as the handlers in place before would have
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


def _umask() -> int:
    """The process's umask: read from /proc on Linux (setting it to read it would race with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: reading the mask means setting it, so set it back at once
    os.umask(mask)
    return mask


def follow_umask(path: Path, directory: bool = False) -> None:
    """Give a file or folder made by mkstemp/mkdtemp (private: 0600/0700) the mode a plain open or
    mkdir would, so outputs others may read (a gallery, a shared model folder) are readable."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def temporary_path(final: Path) -> Path:
    """A fresh hidden file name beside `final` (same folder, so the rename is atomic), with the umask's mode."""
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    follow_umask(Path(name))
    return Path(name)


def temporary_folder(final: Path) -> Path:
    """A fresh hidden folder beside `final` (for a folder renamed into place when complete), with the umask's mode."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    follow_umask(tmp, directory=True)
    return tmp


def temporaries(final: Path) -> set[Path]:
    """The temporary files and folders (.NAME.*.partial) that writers have made for `final`."""
    final = Path(final)
    name = re.sub(r"([*?\[])", r"[\1]", final.name)  # escape glob metacharacters
    return set(final.parent.glob(f".{name}.*.partial"))


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """(device, inode, mtime) of a file or folder, or None when it does not exist: whether a path was replaced."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


@contextmanager
def finished_or_removed(path: Path) -> Iterator[None]:
    """A block that puts `path` in place and then more (a video, then its sidecar): if it fails or is interrupted
    after `path` was replaced, `path` is removed, so no output stands without the rest."""
    before = file_identity(path)
    try:
        yield
    except BaseException:
        if file_identity(path) not in (None, before):
            remove_path(path)
        raise


def remove_path(path: Path) -> None:
    """Delete a file or a folder, if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_can_hold(folder: Path, output: Path, option: str) -> None:
    """Raise a UserError if `folder` (existing or to be made) cannot hold `output`: a file stands in its path."""
    for parent in (folder, *folder.parents):  # the nearest existing one must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{parent} is a file, so it cannot hold the output {output}; choose another {option}")
            return


TEMPORARY_EXTRA = len(".") + len(".12345678.partial")  # what temporary_path adds to a name (mkstemp: 8 characters)
FRAME_NAME = re.compile(r"frame_\d{6}\.png")  # the files of a frames output


def check_name_length(path: Path, what: str = "output") -> None:
    """Raise a UserError if `path`'s name, or the temporary name it is written under, is too long for its file system."""
    existing = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("/"))
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(path.name.encode())
    if size + TEMPORARY_EXTRA > limit:
        raise UserError(f"{what} name {path.name[:40]}... is {size} bytes; at most {limit - TEMPORARY_EXTRA} fit this file "
                        f"system (it allows {limit}, and the file is written under a temporary name "
                        f"{TEMPORARY_EXTRA} longer); choose a shorter --output")


def not_frames(folder: Path) -> list[str]:
    """The names in `folder` that a frames output does not write (sorted)."""
    return sorted(p.name for p in folder.iterdir() if not FRAME_NAME.fullmatch(p.name))


def refuse_other_files(folder: Path) -> None:
    """Raise a UserError if frames output `folder`, about to be replaced, holds files a frames output does not write."""
    others = not_frames(folder)
    if others:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        raise UserError(f"output folder {folder} holds {others[0]}{more}, which no frames output writes; --overwrite "
                        "replaces only a folder of frame_NNNNNN.png; choose another --output")


def check_writable(path: Path, overwrite: bool, folder_output: bool = False, sidecar_of: Path | None = None) -> None:
    """Raise a UserError if `path` exists (and overwrite is off), is a file where a folder goes or the
    other way round (`folder_output`: the frames format), or its folder cannot be written.
    `sidecar_of`: the video whose JSON sidecar `path` is (named in the message)."""
    kind = "folder" if folder_output else "file"
    if path.exists() and path.is_dir() != folder_output:  # --overwrite would not help: say so first
        other = "a file" if folder_output else "a folder"
        if sidecar_of is not None:
            raise UserError(f"the sidecar {path} of {sidecar_of.name} would go where a folder is; move the folder away "
                            "or choose another --output")
        raise UserError(f"output {path} is {other}, not the {kind} this format writes; choose another --output")
    if path.exists() and not overwrite:
        what, hint = f"output {kind} {path}", ""
        if sidecar_of is not None:  # a.mp4 and a.webm share a.json: name the video it belongs to
            what = f"the sidecar {path} of {sidecar_of.name}"
            owners = [p.name for p in map(sidecar_of.with_suffix, SUFFIXES.values()) if p != sidecar_of and p.exists()]
            hint = f" (written for {', '.join(owners)})" if owners else ""
        raise UserError(f"{what} already exists{hint}; pass --overwrite to replace it or choose another --output")
    if folder_output and overwrite and path.is_dir():  # --overwrite replaces a frames output, not any folder
        refuse_other_files(path)
    folder = path.parent
    check_can_hold(folder, path, "--output")
    check_name_length(path, "output" if sidecar_of is None else "sidecar")
    if sidecar_of is None:  # the sidecar's name is longer than the video's: both before any folder is made
        check_name_length(sidecar_path(path), "sidecar")
    if not folder.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            broken = broken_link(folder)
            if broken is not None:  # mkdir says only "File exists"
                raise UserError(f"cannot create output folder {folder}: {broken} is a broken symbolic link (to "
                                f"{os.readlink(broken)}); remove it or choose another --output") from None
            raise UserError(f"cannot create output folder {folder}: {e.strerror}") from None
    try:  # permission bits do not tell everything (read-only mounts, root): write and remove a file
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        raise UserError(f"output folder {folder} is not writable; choose another --output") from None


def missing_folders(path: Path) -> list[Path]:
    """The folders that making `path` would create, deepest first (for `remove_empty_folders` after a failure)."""
    return [d for d in (path, *path.parents) if not d.exists()]


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove the folders a failed command created (from `missing_folders`), deepest first, while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty, or never made
            break


def write_failure(tmp: Path, final: Path, what: str) -> OSError:
    """Why writing `tmp` (for `final`) failed: ENOSPC (disk full), EFBIG (file size limit), else a plain OSError."""
    import resource

    try:
        if os.statvfs(tmp.parent).f_bavail == 0:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final))
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and tmp.exists() and tmp.stat().st_size >= limit:
            return OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(final))
    except OSError:
        pass
    return OSError(f"could not write {final}: {what}")


FORMATS = ("mp4", "webm", "gif", "frames")
SUFFIXES = {"mp4": ".mp4", "webm": ".webm", "gif": ".gif", "frames": ""}  # a frames output is a folder
FILE_SUFFIXES = {s for s in SUFFIXES.values() if s}  # the formats written as one file


class VideoWriter:
    """Streams uint8 frames [T, H, W, 3] to `path` under a temporary name; `close()` moves it into place.

    Subclasses implement `_open` (start the encoder on `self.tmp`), `_send`, `_finish` and `_stop`.
    """

    def __init__(self, path: Path, width: int, height: int, fps: int, crf: int = 18):
        self.path = Path(path)
        self.size = (width, height)
        self.fps = fps
        self.crf = crf
        self.frames_written = 0
        self.tmp: Path | None = None
        try:
            with signals_held():
                self.tmp = temporary_path(self.path)
            self._open()
        except BaseException:
            self.abort()
            raise

    def write(self, frames: np.ndarray) -> None:
        """Append frames [T, H, W, 3] uint8."""
        assert frames.dtype == np.uint8 and frames.shape[1:] == (self.size[1], self.size[0], 3), frames.shape
        for frame in frames:
            self._send(np.ascontiguousarray(frame))
            self.frames_written += 1

    def close(self) -> None:
        """Finish the file and move it to its final name."""
        try:
            self._finish()
        except BaseException:
            self.abort()
            raise
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Stop the encoder and delete the partial output."""
        try:
            self._stop()
        except Exception:
            pass
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)

    def _open(self) -> None:
        """Start the encoder on self.tmp."""
        raise NotImplementedError

    def _send(self, frame: np.ndarray) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _stop(self) -> None:
        self._finish()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _FfmpegWriter(VideoWriter):
    """A VideoWriter that pipes raw RGB frames into ffmpeg (imageio-ffmpeg)."""

    _gen = None  # imageio-ffmpeg's frame generator
    _proc = None  # its ffmpeg process

    def _process(self):
        """ffmpeg's process: imageio-ffmpeg does not check its exit code, so we keep it to check it ourselves."""
        if self._proc is None and self._gen is not None and self._gen.gi_frame is not None:
            return self._gen.gi_frame.f_locals.get("p")
        return self._proc

    def _start(self, **kwargs: Any) -> None:
        import imageio_ffmpeg

        # Held signals: an interruption inside the generator while it starts ffmpeg would close it
        # and lose the process, which then writes an empty file at self.tmp after abort() removed it.
        with signals_held():
            self._gen = imageio_ffmpeg.write_frames(
                str(self.tmp), self.size, fps=self.fps, pix_fmt_in="rgb24", quality=None, macro_block_size=1,
                ffmpeg_log_level="error", **kwargs,
            )
            self._gen.send(None)  # start ffmpeg
            self._proc = self._process()

    def _send(self, frame: np.ndarray) -> None:
        try:
            self._gen.send(frame)
        except OSError:  # ffmpeg died (e.g. the disk is full): say why if we can tell
            self._gen.close()
            raise self._failure() from None

    def _finish(self) -> None:
        self._gen.close()  # closes ffmpeg's input and waits for it
        if self._proc is not None and self._proc.returncode not in (0, None):
            raise self._failure()

    def _stop(self) -> None:
        proc = self._process()
        if proc is not None and proc.poll() is None:
            proc.kill()  # aborting: do not wait for ffmpeg to encode the frames it already has
            proc.wait(timeout=10)  # gone before abort() removes its file
        if self._gen is not None:
            self._gen.close()

    def _failure(self) -> OSError:
        """An OSError for a failed ffmpeg: ENOSPC or EFBIG when the disk is full or the file hit the size limit."""
        return write_failure(self.tmp, self.path, f"ffmpeg exited with code {getattr(self._proc, 'returncode', None)}")


class Mp4Writer(_FfmpegWriter):
    """H.264 MP4 (yuv420p, +faststart): plays in every browser; byte-identical for the same frames."""

    def _open(self) -> None:
        self._start(
            codec="libx264",
            pix_fmt_out="yuv420p",
            output_params=[
                "-crf", str(self.crf),
                "-preset", "medium",
                "-movflags", "+faststart",
                "-map_metadata", "-1",
                "-fflags", "+bitexact",
                "-flags", "+bitexact",
                "-f", "mp4",
            ],
        )


class LosslessWriter(_FfmpegWriter):
    """Lossless RGB H.264 MP4 (libx264rgb, qp 0): the clips of a training dataset, decoded to the same pixels."""

    def _open(self) -> None:
        self._start(codec="libx264rgb", pix_fmt_out="rgb24", output_params=["-qp", "0", "-preset", "ultrafast", "-f", "mp4"])


class WebmWriter(_FfmpegWriter):
    """VP9 WebM (libvpx-vp9, constant quality `crf`, yuv420p): plays in Chromium and Firefox."""

    def _open(self) -> None:
        self._start(
            codec="libvpx-vp9",
            pix_fmt_out="yuv420p",
            output_params=[
                "-crf", str(self.crf), "-b:v", "0",  # constant quality
                "-deadline", "good", "-cpu-used", "4", "-row-mt", "0", "-threads", "1",
                "-map_metadata", "-1", "-fflags", "+bitexact", "-flags", "+bitexact",
                "-f", "webm",
            ],
        )


class GifWriter(_FfmpegWriter):
    """Looping GIF with a palette computed over the whole video (ffmpeg palettegen + paletteuse)."""

    def _open(self) -> None:
        if self.fps > GIF_MAX_FPS:
            log.warning("a GIF frame lasts whole hundredths of a second and browsers show one shorter than 20 ms for "
                        "100 ms: at %d fps this GIF plays slower than real time; use --fps %d or less, or mp4/webm",
                        self.fps, GIF_MAX_FPS)
        self._start(
            codec="gif",
            pix_fmt_out="pal8",
            output_params=[
                "-vf", "split[a][b];[a]palettegen=stats_mode=full[p];[b][p]paletteuse=dither=bayer:bayer_scale=3",
                "-loop", "0", "-map_metadata", "-1", "-fflags", "+bitexact", "-f", "gif",
            ],
        )


class FramesWriter(VideoWriter):
    """A folder of PNGs (frame_000000.png, ...), filled under a temporary name and renamed as a whole."""

    def _open(self) -> None:
        self.tmp.unlink()
        self.tmp.mkdir()  # the same fresh hidden name, now a folder

    def _send(self, frame: np.ndarray) -> None:
        from PIL import Image

        Image.fromarray(frame).save(self.tmp / f"frame_{self.frames_written:06d}.png", format="PNG")

    def _finish(self) -> None:
        pass

    def _stop(self) -> None:
        pass

    def close(self) -> None:
        """Move the finished folder to its final name (an existing frames folder is replaced; one that has gained
        other files since the output was checked is not)."""
        if self.path.is_dir():
            try:
                refuse_other_files(self.path)
            except UserError:
                self.abort()
                raise
            old = temporary_path(self.path)
            old.unlink()
            os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            remove_path(old)  # a symbolic link is removed, not followed
        else:
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Delete the partial folder (or the file it starts as)."""
        if self.tmp is not None:
            if self.tmp.is_dir():
                shutil.rmtree(self.tmp, ignore_errors=True)
            else:
                self.tmp.unlink(missing_ok=True)


def open_writer(path: Path, fmt: str, width: int, height: int, fps: int, crf: int = 18) -> VideoWriter:
    """The writer of format `fmt` (mp4, webm, gif, frames) for frames of width x height."""
    match fmt:
        case "mp4":
            return Mp4Writer(path, width, height, fps, crf)
        case "webm":
            return WebmWriter(path, width, height, fps, crf)
        case "gif":
            return GifWriter(path, width, height, fps, crf)
        case "frames":
            return FramesWriter(path, width, height, fps, crf)
    raise UserError(f"unknown video format {fmt!r}; valid: {', '.join(FORMATS)}")


def check_output_suffix(path: Path, fmt: str) -> None:
    """Raise a UserError if the output's name does not fit format `fmt` (a.mp4 for mp4, a folder name for frames)."""
    path = Path(path)
    want = SUFFIXES[fmt]
    if path.name in ("", ".", ".."):  # '/', '', '.', '..': a folder, not the name of an output in it
        example = path / ("video" + want)
        raise UserError(f"output '{path}' has no name of its own; give the {'folder' if fmt == 'frames' else 'file'}'s "
                        f"name, e.g. {example}")
    if path.name.lower() in FILE_SUFFIXES:  # '.mp4': an extension with no name before it
        raise UserError(f"output '{path}' is an extension with no name before it; give the "
                        f"{'folder' if fmt == 'frames' else 'file'} a name, e.g. {path.with_name('video' + want)}")
    if fmt == "frames":
        if path.suffix.lower() in FILE_SUFFIXES:
            raise UserError(f"output {path} looks like a {path.suffix} file; --format frames writes a folder, e.g. {path.with_suffix('')}")
    elif path.suffix.lower() != want:
        guess = next((f for f, s in SUFFIXES.items() if s and s == path.suffix.lower()), None)
        hint = f" or pass --format {guess}" if guess else ""
        raise UserError(f"output {path} does not end in {want} (--format {fmt}); name it {path.with_suffix(want).name}{hint}")


def write_png(path: Path, image: np.ndarray) -> None:
    """Write an image [H, W, 3] uint8 as PNG atomically (temporary file, then rename)."""
    from PIL import Image

    path = Path(path)
    tmp = None
    try:
        with signals_held():
            tmp = temporary_path(path)
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 text atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = None
    try:
        with signals_held():
            tmp = temporary_path(path)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def sidecar_path(video: Path) -> Path:
    """Where the JSON sidecar of a video goes: same name, `.json` (a.mp4 -> a.json; frames folder a -> a.json)."""
    video = Path(video)
    if video.suffix.lower() in FILE_SUFFIXES:
        return video.with_suffix(".json")
    return video.with_name(video.name + ".json")


def broken_link(path: Path) -> Path | None:
    """`path` or the nearest of its parents that is a symbolic link to nowhere, if any (mkdir under one
    fails with only "File exists")."""
    return next((f for f in (path, *path.parents) if f.is_symlink() and not f.exists()), None)


def read_sidecar(video: Path) -> dict[str, Any] | None:
    """The JSON sidecar of `video`, or None when it is missing, unreadable or not a JSON object."""
    try:
        data = json.loads(sidecar_path(video).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
