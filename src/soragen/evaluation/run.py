"""`soragen eval`: generate a video per prompt, score it with the Shapes World detector, tabulate by category."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from soragen.config import Config, update
from soragen.errors import UserError
from soragen.evaluation.detector import APEX_TOLERANCE

CATEGORIES = ("seen", "two objects", "wall", "held out")
ATTRIBUTES = ("colour", "shape", "size", "direction", "count", "all")
LONG_SECONDS = 10.0  # videos at least this long are also scored for coherence over time
MAX_EVAL_SEEDS = 1000  # videos per prompt


def category(prompt: str) -> str:
    """Which table row a prompt belongs to: held out > wall > two objects > seen."""
    from soragen.data.shapes import is_held_out, parse_caption

    specs, wall = parse_caption(prompt)
    if any(is_held_out(s) for s in specs):
        return "held out"
    if wall:
        return "wall"
    if len(specs) == 2:
        return "two objects"
    return "seen"


def read_prompts(path: Path) -> list[str]:
    """Prompts of a text file: one a line; blank lines and `#` comments skipped; each must parse."""
    from soragen.data.shapes import parse_caption

    from soragen.config import read_text, text_lines

    prompts = []
    for n, line in enumerate(text_lines(read_text(Path(path), "prompt file")), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            parse_caption(line)
        except ValueError as e:
            kind = Path(path).suffix.lower()
            plain = (f" (eval reads plain text, one caption a line; batch's {kind} prompt files are not read as such)"
                     if kind in (".jsonl", ".csv", ".yaml", ".yml") else "")
            raise UserError(f"{path} line {n}: not a Shapes World caption: {e}{plain}") from None
        prompts.append(line)
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


def video_verdicts(score: dict[str, Any]) -> dict[str, bool]:
    """One video's score -> a verdict per attribute (an attribute is right if right for every object)."""
    objects = score["objects"]
    out = {}
    for key in ("colour", "shape", "size", "direction"):
        judged = [bool(o[key]) for o in objects if o.get(key) is not None]
        if judged:
            out[key] = all(judged)
    out["count"] = bool(score["count"])
    out["all"] = bool(score["all_correct"])
    return out


def tabulate(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per category: videos and the share right per attribute."""
    table: dict[str, dict[str, Any]] = {}
    for cat in CATEGORIES + ("overall",):
        rows = [r for r in results if cat == "overall" or r["category"] == cat]
        if not rows:
            continue
        entry: dict[str, Any] = {"videos": len(rows)}
        for attr in ATTRIBUTES:
            vals = [r["verdicts"][attr] for r in rows if attr in r["verdicts"]]
            entry[attr] = float(np.mean(vals)) if vals else None
        table[cat] = entry
    return table


def tabulate_shapes(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per shape asked for (synonyms folded): the objects asked for it in every video, the share drawn as asked,
    and how many the detector saw as each shape ("none": no blob matched the object). The category table's shape
    column pools the shapes; a model that draws one of them badly shows here which and as what."""
    from soragen.data.shapes import SHAPES, parse_caption

    counts = {shape: {"objects": 0, "right": 0, "drawn": dict.fromkeys((*SHAPES, "none"), 0)} for shape in SHAPES}
    for r in results:
        specs, _ = parse_caption(r["prompt"])
        for spec, obj in zip(specs, r["score"]["objects"]):
            entry = counts[spec.shape]
            entry["objects"] += 1
            entry["right"] += bool(obj["shape"])
            drawn = obj["drawn_shape"] or "none"  # or a shape of no caption's, e.g. "upside-down triangle"
            entry["drawn"][drawn] = entry["drawn"].get(drawn, 0) + 1
    return {shape: {**entry, "right": entry["right"] / entry["objects"]}
            for shape, entry in counts.items() if entry["objects"]}


def made_before(path: Path, prompt: str, model: str, cfg: Config, weights: str | None) -> dict[str, Any] | None:
    """The sidecar of video `path` if an earlier (interrupted) evaluation finished it for this prompt, model (its
    name and its weights' `weights_digest`) and config, else None. A video file is complete once it exists
    (written under a temporary name, then renamed), and its sidecar is written after it."""
    from soragen.video_io import read_sidecar

    sidecar = read_sidecar(path)
    same = (sidecar is not None and sidecar.get("prompt") == prompt and sidecar.get("model") == model
            and sidecar.get("eval_weights") == weights and sidecar.get("config") == cfg.to_dict())
    return sidecar if same and path.is_file() else None


def video_name(index: int, seed: int) -> str:
    """The file name of prompt `index`'s video for `seed` in an evaluation folder."""
    return f"{index:03d}_seed{seed}.mp4"


def earlier_videos(out: Path) -> set[str]:
    """Names of the videos in `out` that an evaluation made (their sidecars carry `eval_video`)."""
    from soragen.video_io import read_sidecar

    videos = (side.with_suffix(".mp4") for side in out.glob("*_seed*.json"))
    return {video.name for video in videos if (read_sidecar(video) or {}).get("eval_video") == video.name}


def not_made_by_eval(out: Path, prompts: list[str], cfg: Config, seeds: int) -> Path | None:
    """The first file in `out` named like one of this evaluation's videos (or their sidecars) that no evaluation
    wrote, or None. An evaluation's own carry `eval_video` in their sidecars; one made before sidecars did is
    known by its prompt and seed, those of this evaluation's video of that name."""
    from soragen.video_io import read_sidecar, sidecar_path

    for i, prompt in enumerate(prompts):
        for seed in range(cfg.seed, cfg.seed + seeds):
            path = out / video_name(i, seed)
            side = sidecar_path(path)
            if not (path.exists() or side.exists()):
                continue
            sidecar = read_sidecar(path)
            ours = sidecar is not None and (sidecar.get("eval_video") == path.name or (
                "eval_video" not in sidecar and sidecar.get("prompt") == prompt and sidecar.get("seed") == seed))
            if not ours:
                return path if path.exists() else side
    return None


def evaluate(
    cfg: Config, prompts: list[str], out: Path, *, seeds: int = 1, reuse: bool = False,
    on_video: Callable[[int, int], None] | None = None, on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Generate and score every prompt (x seeds); writes out/eval.json and returns it.

    With `reuse`, videos that an interrupted evaluation in `out` finished with the same prompt, seed, model and
    config are scored again instead of made again (report["reused"] counts them)."""
    from soragen.pipeline import Pipeline
    from soragen.video_io import missing_folders, remove_empty_folders

    out = Path(out)
    if reuse and (mine := not_made_by_eval(out, prompts, cfg, seeds)) is not None:
        raise UserError(f"{mine} is in the way: no soragen eval recorded it as its own (a file of yours, or a video a "
                        "killed evaluation left without its sidecar); move it away, choose another --out, or pass "
                        "--overwrite to make every video again")
    pipe = Pipeline.from_config(cfg)  # a model that does not load fails before --out is made
    made = missing_folders(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        remove_empty_folders(made)
        raise UserError(f"cannot write the evaluation into --out {out}: {e.strerror}; choose another --out") from None
    try:
        return _evaluate(pipe, cfg, prompts, out, seeds, reuse, on_video, on_step)
    except BaseException:
        remove_empty_folders(made)  # interrupted before its first video
        raise


def _evaluate(pipe, cfg: Config, prompts: list[str], out: Path, seeds: int, reuse: bool,
              on_video: Callable[[int, int], None] | None, on_step: Callable[[int], None] | None) -> dict[str, Any]:
    """evaluate's work once the model is loaded and --out is made."""
    from soragen.model_io import weights_digest
    from soragen.video_io import remove_path, sidecar_path, write_json

    weights = weights_digest(cfg.model)
    if not reuse:  # replacing: an interrupted run must not leave the old report beside new videos
        remove_path(out / "eval.json")
        names = {video_name(i, cfg.seed + s) for i in range(len(prompts)) for s in range(seeds)}
        for video in earlier_videos(out) - names:  # an earlier evaluation's videos this one does not make again
            remove_path(out / video)
            remove_path(sidecar_path(out / video))
    results = []
    reused = 0
    total = len(prompts) * seeds
    for i, prompt in enumerate(prompts):
        for s in range(seeds):
            seed = cfg.seed + s
            pipe.cfg = update(cfg, seed=seed)
            path = out / video_name(i, seed)
            sidecar = made_before(path, prompt, pipe.model_name, pipe.cfg, weights) if reuse else None
            if sidecar is None:
                sidecar = pipe.generate(prompt, path, overwrite=True, on_step=on_step,
                                        sidecar_extra={"eval_video": path.name, "eval_weights": weights})
            else:
                reused += 1
            record = {"prompt": prompt, "seed": seed, "category": category(prompt), "video": path.name,
                      **score_file(path, prompt, pipe.cfg), "timings_seconds": sidecar["timings_seconds"]}
            results.append(record)
            if on_video is not None:
                on_video(len(results), total)
    report = {"model": pipe.model_name, "seconds": cfg.video.seconds, "seeds": seeds, "reused": reused,
              "table": tabulate(results), "shape_table": tabulate_shapes(results),
              "long_table": tabulate_long(results), "results": results, "config": cfg.to_dict()}
    write_json(out / "eval.json", report)
    return report


def score_file(path: Path, prompt: str, cfg: Config) -> dict[str, Any]:
    """Score the video at `path`, made for `prompt` with `cfg`: its verdicts and score, and for a long video
    ("long") its coherence with the jump at the seams between generation windows."""
    from soragen.data.clips import read_frames
    from soragen.evaluation.detector import boundary_jump, frame_change_profile, score_long_video, score_video
    from soragen.pipeline import plan_video, window_starts

    frames = read_frames(path)
    score = score_video(frames, prompt, fps=cfg.video.fps)
    out: dict[str, Any] = {"verdicts": video_verdicts(score), "score": score}
    if cfg.video.seconds >= LONG_SECONDS:
        out["long"] = score_long_video(frames, prompt, fps=cfg.video.fps)
        profile = frame_change_profile(frames)  # (T - 1,)
        seams = [k - 1 for k in window_starts(cfg, plan_video(cfg)) if k - 1 < len(profile)]
        if 0 < len(seams) < len(profile):  # a window's last frame to the next one's first, against inside
            out["long"]["boundary_jump"] = boundary_jump(profile, seams)
    return out


LONG_MEASURES = (  # (key, what is measured, issue 4's target)
    ("keeps", "keeps its colour and shape (2-s windows)", ">= 95%"),
    ("moves", "keeps moving (1-s windows)", ">= 95%"),
    ("never_vanishes", "never vanishes (but behind the wall)", "100%"),
    ("keeps_bouncing", "keeps bouncing to the same height", "100%"),
    ("re_emerges", "re-emerges from behind the wall", "100%"),
    ("count", "object count right (2-s windows)", "100%"),
)


# Graded companions of two all-or-nothing measures, pooled over the objects found (an object gone for good fails
# the measure above but has no apexes or passages to pool): (key, what, of which measure, the per-object counts it
# pools). A single bad apex or passage fails a whole object above; these show how far off.
GRADED_MEASURES = (
    ("apexes_in_band", f"its apexes within {APEX_TOLERANCE / 2:g} px of their median", "keeps_bouncing",
     ("apexes_in_band", "apexes")),
    ("passages_through", "its passages that end on the far side", "re_emerges",
     ("wall_passages_through", "wall_passages")),
)


def tabulate_long(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Coherence of the long videos: each measure averaged over their objects (None without long videos).

    boundary_jump: the mean, over videos, of the frame-to-frame change where one generation
    window ends and the next begins, divided by the median change inside windows (1 = seamless).
    """
    rows = [r["long"] for r in results if "long" in r]
    if not rows:
        return None
    objects = [o for r in rows for o in r["objects"]]
    mean = lambda values: float(np.mean(values)) if values else None  # noqa: E731
    per_object = {
        "keeps": [o["keeps"] for o in objects if o.get("keeps") is not None],
        "moves": [o["moves"] for o in objects if o.get("moves") is not None],
        "never_vanishes": [not o["vanishes"] for o in objects],
        "keeps_bouncing": [o["keeps_bouncing"] for o in objects if "keeps_bouncing" in o],
        "re_emerges": [o["re_emerges"] for o in objects if "re_emerges" in o],
    }
    graded = {}
    for key, _, _, (part, whole) in GRADED_MEASURES:
        n = sum(o[whole] for o in objects if part in o)
        graded[key] = sum(o[part] for o in objects if part in o) / n if n else None
    return {"videos": len(rows), "objects": len(objects), **{k: mean(v) for k, v in per_object.items()}, **graded,
            "count": mean([r["count"] for r in rows if r.get("count") is not None]),
            "boundary_jump": mean([r["boundary_jump"] for r in rows if "boundary_jump" in r])}


def format_long_table(long: dict[str, Any]) -> str:
    """The coherence measures of tabulate_long as aligned text."""
    head = f"coherence over time ({long['videos']} videos, {long['objects']} objects)"
    lines = [f"{head:<46} {'measured':>9}   target"]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for key, what, target in LONG_MEASURES:
        lines.append(f"  {what:<44} {pct(long[key]):>9}   {target}")
        for graded, detail, of, _ in GRADED_MEASURES:
            if of == key and long.get(graded) is not None:
                lines.append(f"    {detail:<42} {pct(long[graded]):>9}")
    jump = "-" if long["boundary_jump"] is None else f"{long['boundary_jump']:.2f}x"
    lines.append(f"  {'change at window boundaries / inside windows':<44} {jump:>9}   about 1x")
    return "\n".join(lines)


def format_table(table: dict[str, dict[str, Any]]) -> str:
    """The category table as aligned text (percentages)."""
    head = f"{'category':<12} {'videos':>6} " + " ".join(f"{a:>9}" for a in ATTRIBUTES)
    lines = [head, "-" * len(head)]
    for cat, row in table.items():
        cells = " ".join(f"{'-':>9}" if row[a] is None else f"{100 * row[a]:8.1f}%" for a in ATTRIBUTES)
        lines.append(f"{cat:<12} {row['videos']:>6} {cells}")
    return "\n".join(lines)


def format_shape_table(shapes: dict[str, dict[str, Any]]) -> str:
    """The per-shape table of tabulate_shapes as aligned text."""
    from soragen.data.shapes import SHAPES

    other = sorted({n for row in shapes.values() for n in row["drawn"]} - set(SHAPES) - {"none"})
    names = (*SHAPES, *other, "none")
    head = f"{'shape asked':<12} {'objects':>7} {'right':>8}   drawn as " + " / ".join(
        "not found" if n == "none" else n for n in names)
    lines = [head]
    for shape, row in shapes.items():
        lines.append(f"{shape:<12} {row['objects']:>7} {100 * row['right']:7.1f}%   "
                     + " / ".join(str(row["drawn"].get(n, 0)) for n in names))
    return "\n".join(lines)


def summary_json(report: dict[str, Any]) -> str:
    """The table as compact JSON, for model cards and notes."""
    return json.dumps(report["table"], indent=2)
