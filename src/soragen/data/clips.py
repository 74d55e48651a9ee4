"""Training clips: a manifest of (video, caption) records, or the Shapes World rendered on the fly.

A dataset folder holds `manifest.jsonl`, one record per line:

    {"path": "videos/000000.mp4", "caption": "a red circle moving left", "fps": 8, "frames": 32}

`path` is relative to the folder. `soragen dataset shapes` writes this format, and
`soragen train` reads it (`data.kind: manifest`, `data.path: DIR`) for any data.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from soragen.config import DataConfig, frame_count, read_text
from soragen.errors import UserError, first_line

MANIFEST = "manifest.jsonl"
CAPTION_VARIANTS = 4  # shapes: captions drawn per clip (synonyms, sizes named or not, languages)


@dataclass(frozen=True)
class Clip:
    """Frames [T, H, W, 3] uint8 and captions describing time 0 of its scene (synonymous variants)."""

    frames: np.ndarray
    captions: tuple[str, ...]
    continues: bool  # True when the clip starts after time 0 (the caption no longer describes its first frame)
    shape_cue: np.ndarray | None = None  # [T, H, W] float32: where its objects' shapes show (shapes.shape_cue)
    twin: np.ndarray | None = None  # [T, H, W, 3] uint8: its scene's shape twin (shapes.shape_twin), same times


class ShapesSource:
    """The Shapes World (WORLD.md), rendered on the fly; never produces a held-out combination."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    def _scene(self, rng: np.random.Generator):
        """A random scene and the time its clip starts at (after 0 for clips cut from long trajectories)."""
        from soragen.data import shapes

        long = rng.random() < self.cfg.long_fraction
        scene = shapes.sample_scene(rng, two_objects=self.cfg.two_object_fraction)
        return scene, float(rng.uniform(0.0, self.cfg.max_start_seconds)) if long else 0.0

    def sample(self, rng: np.random.Generator, num_frames: int, *, shape_cue: bool = False, twin: bool = False) -> Clip:
        """A random clip; with `shape_cue` also its shape cue, with `twin` also its shape twin's frames
        (the same clip either way: neither draws anything from rng)."""
        from soragen.data import shapes

        scene, start = self._scene(rng)
        frames = shapes.render(scene, num_frames, start_time=start)
        languages = ["zh" if rng.random() < self.cfg.chinese_fraction else "en" for _ in range(CAPTION_VARIANTS)]
        cue = shapes.shape_cue(scene, num_frames, start_time=start) if shape_cue else None
        twin_frames = shapes.render(shapes.shape_twin(scene), num_frames, start_time=start) if twin else None
        return Clip(frames, tuple(shapes.caption(scene, rng, language=lang) for lang in languages), continues=start > 0,
                    shape_cue=cue, twin=twin_frames)

    def sample_twins(self, rng: np.random.Generator, num_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Frames [T, H, W, 3] of a random scene, of its shape twin (shapes.shape_twin) and of its
        background alone (black, or the wall), all at the same times."""
        from soragen.data import shapes

        scene, start = self._scene(rng)
        empty = shapes.Scene((), scene.wall)
        return tuple(shapes.render(s, num_frames, start_time=start) for s in (scene, shapes.shape_twin(scene), empty))


def read_manifest(folder: Path) -> list[dict]:
    """Records of a dataset folder's manifest.jsonl, checked; errors name the line."""
    path = Path(folder) / MANIFEST
    if Path(folder).is_file():
        raise UserError(f"dataset folder {folder} is a file; give the folder that holds {MANIFEST}"
                        + (f" (here {Path(folder).parent})" if Path(folder).name == MANIFEST else ""))
    if not path.is_file():
        raise UserError(f"dataset folder {folder} has no {MANIFEST}; write one with `soragen dataset shapes --out {folder}`")
    records = []
    for n, line in enumerate(read_text(path, "manifest").split("\n"), 1):  # JSON text may hold U+2028
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("path"), str) or not isinstance(rec.get("caption"), str):
            raise UserError(f"{path} line {n}: a record needs string fields 'path' and 'caption'")
        records.append(rec)
    if not records:
        raise UserError(f"{path} holds no records")
    return records


def data_fps(cfg: DataConfig) -> int | None:
    """The frame rate of the clips a run trains on: the Shapes World's, or the one rate a manifest's records
    give (None when they give none, or several)."""
    from soragen.data import shapes

    if cfg.kind == "shapes":
        return shapes.FPS
    if cfg.path is None:
        raise UserError("data.kind is 'manifest' but data.path is not set; give the dataset folder (--set data.path=DIR)")
    rates = {whole_number(rec.get("fps")) for rec in read_manifest(Path(cfg.path))}
    rate = rates.pop() if len(rates) == 1 else None
    return rate if rate is not None and rate >= 1 else None


def whole_number(value) -> int | None:
    """A record's count or rate as an int: 8 and 8.0 are 8; 29.97, "8", true and a missing field are None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def read_frames(path: Path) -> np.ndarray:
    """All frames of a video file as uint8 [T, H, W, 3]."""
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path), "ffmpeg")
    try:
        return np.stack([np.asarray(f) for f in reader])
    finally:
        reader.close()


class ManifestSource:
    """Clips cut at random from the videos of a manifest (frames resized to the model's size)."""

    def __init__(self, cfg: DataConfig, size: tuple[int, int]):
        if cfg.path is None:
            raise UserError("data.kind is 'manifest' but data.path is not set; give the dataset folder")
        self.folder = Path(cfg.path)
        self.records = read_manifest(self.folder)
        self.size = size  # (H, W)

    def sample(self, rng: np.random.Generator, num_frames: int) -> Clip:
        import torch
        import torch.nn.functional as F

        rec = self.records[int(rng.integers(len(self.records)))]
        path = self.folder / rec["path"]
        try:
            frames = read_frames(path)
        except FileNotFoundError:
            raise UserError(f"{path} (in {self.folder / MANIFEST}) not found; fix the record's 'path' or remove it") from None
        except (OSError, RuntimeError, ValueError) as e:  # imageio/ffmpeg: not a video it can decode
            raise UserError(f"{path} (in {self.folder / MANIFEST}) cannot be decoded as a video ({first_line(e)}); "
                            "re-encode it (e.g. ffmpeg -i IN -c:v libx264 OUT.mp4) or remove its record") from None
        if len(frames) == 0:
            raise UserError(f"{path} (in {self.folder / MANIFEST}) holds no frames; remove its record")
        start = int(rng.integers(0, max(1, len(frames) - num_frames + 1)))
        frames = frames[start : start + num_frames]
        if len(frames) < num_frames:  # short video: hold the last frame
            frames = np.concatenate([frames, np.repeat(frames[-1:], num_frames - len(frames), 0)])
        if frames.shape[1:3] != self.size:
            x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
            x = F.interpolate(x, size=self.size, mode="area")
            frames = x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        return Clip(frames, (rec["caption"],), continues=start > 0)


def make_source(cfg: DataConfig, size: tuple[int, int]):
    """The clip source the data config names."""
    match cfg.kind:
        case "shapes":
            return ShapesSource(cfg)
        case "manifest":
            return ManifestSource(cfg, size)


# ---------------------------------------------------------------------------
# Writing a Shapes World dataset
# ---------------------------------------------------------------------------


def write_lossless(path: Path, frames: np.ndarray, fps: int) -> None:
    """Write frames [T, H, W, 3] as a lossless RGB H.264 file (libx264rgb, qp 0), atomically: interrupted, it
    leaves nothing (ffmpeg stopped, its temporary file removed)."""
    from soragen.video_io import LosslessWriter

    with LosslessWriter(path, frames.shape[2], frames.shape[1], fps) as writer:
        writer.write(frames)


MAX_CLIP_SECONDS = 600.0  # a clip is rendered whole in memory: 10 min of 64x64 frames is 59 MB
MAX_CLIPS = 10_000_000  # a dataset of 4-s clips this size is about 2 TB


def check_dataset_request(num: int, seconds: float, chinese_fraction: float, two_objects: float = 0.5,
                          seed: int = 0) -> None:
    """Raise a UserError for a dataset request that cannot be rendered."""
    from soragen.config import MAX_SEED

    if not 1 <= num <= MAX_CLIPS:
        raise UserError(f"--num must be between 1 and {MAX_CLIPS:,}, got {num}")
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be between 0 and {MAX_SEED}, got {seed}")
    from soragen.data.shapes import FPS

    if not (1 / FPS <= seconds <= MAX_CLIP_SECONDS):  # also false for nan
        raise UserError(f"--seconds must be between {1 / FPS:g} (one frame at {FPS} fps) and {MAX_CLIP_SECONDS:g}, "
                        f"got {seconds}")
    if not 0 <= chinese_fraction <= 1:
        raise UserError(f"--chinese is a share of the captions, between 0 and 1; got {chinese_fraction}")
    if not 0 <= two_objects <= 1:
        raise UserError(f"--two-objects is a share of the scenes, between 0 and 1; got {two_objects}")


DATASET_MARKER = ".soragen-dataset.json"  # an unfinished dataset's request: the same command continues it


def dataset_request(num: int, seconds: float, seed: int, held_out: bool, chinese_fraction: float,
                    two_objects: float) -> dict[str, Any]:
    """A `dataset shapes` request by its flags, as an unfinished dataset's folder records it."""
    return {"--num": num, "--seconds": seconds, "--seed": seed, "--held-out": held_out, "--chinese": chinese_fraction,
            "--two-objects": two_objects}


def unfinished_request(out: Path) -> dict[str, Any] | None:
    """The request of the interrupted `dataset shapes` run that `out` holds (None: not such a folder)."""
    try:
        request = json.loads((Path(out) / DATASET_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return request if isinstance(request, dict) else None


def write_shapes_dataset(
    out: Path, num: int, seconds: float, seed: int, *, held_out: bool = False, chinese_fraction: float = 0.0,
    two_objects: float = 0.5, on_item: Callable[[int], None] | None = None,
) -> Path:
    """Render `num` Shapes World clips into `out`/videos and write `out`/manifest.jsonl; returns the manifest.

    Until the manifest is written, `out` records the request (DATASET_MARKER): the same request on a folder an
    interrupted run left continues it, keeping its finished clips (the scenes are the same for the same seed)."""
    from soragen.data import shapes
    from soragen.video_io import remove_path, temporaries, write_text

    check_dataset_request(num, seconds, chinese_fraction, two_objects, seed)
    out = Path(out)
    request = dataset_request(num, seconds, seed, held_out, chinese_fraction, two_objects)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    write_text(out / DATASET_MARKER, json.dumps(request) + "\n")
    rng = np.random.default_rng(seed)
    num_frames = max(1, frame_count(seconds, shapes.FPS))
    records = []
    for i in range(num):
        scene = shapes.sample_scene(rng, held_out=held_out, two_objects=two_objects)
        language = "zh" if rng.random() < chinese_fraction else "en"
        text = shapes.caption(scene, rng, language=language)
        rel = f"videos/{i:06d}.mp4"
        if not (out / rel).is_file():  # one a run before finished (written under a temporary name, then renamed)
            for tmp in temporaries(out / rel):  # what a killed run left of it
                remove_path(tmp)
            write_lossless(out / rel, shapes.render(scene, num_frames), shapes.FPS)
        records.append({"path": rel, "caption": text, "fps": shapes.FPS, "frames": num_frames})
        if on_item is not None:
            on_item(i)
    manifest = out / MANIFEST
    write_text(manifest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    (out / DATASET_MARKER).unlink(missing_ok=True)
    return manifest
