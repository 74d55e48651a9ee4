"""`soragen eval`: generate a video per prompt, score it with the Shapes World detector, tabulate by category."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from soragen.config import Config, update
from soragen.errors import UserError

CATEGORIES = ("seen", "two objects", "wall", "held out")
ATTRIBUTES = ("colour", "shape", "size", "direction", "count", "all")
LONG_SECONDS = 10.0  # videos at least this long are also scored for coherence over time


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

    from soragen.config import read_text

    prompts = []
    for n, line in enumerate(read_text(Path(path), "prompt file").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            parse_caption(line)
        except ValueError as e:
            raise UserError(f"{path} line {n}: not a Shapes World caption: {e}") from None
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


def evaluate(
    cfg: Config, prompts: list[str], out: Path, *, seeds: int = 1,
    on_video: Callable[[int, int], None] | None = None, on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Generate and score every prompt (x seeds); writes out/eval.json and returns it."""
    from soragen.data.clips import read_frames
    from soragen.evaluation.detector import score_long_video, score_video
    from soragen.pipeline import Pipeline
    from soragen.video_io import write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline.from_config(cfg)
    results = []
    total = len(prompts) * seeds
    for i, prompt in enumerate(prompts):
        for s in range(seeds):
            seed = cfg.seed + s
            pipe.cfg = update(cfg, seed=seed)
            path = out / f"{i:03d}_seed{seed}.mp4"
            sidecar = pipe.generate(prompt, path, overwrite=True, on_step=on_step)
            frames = read_frames(path)
            score = score_video(frames, prompt, fps=cfg.video.fps)
            record = {"prompt": prompt, "seed": seed, "category": category(prompt), "video": path.name,
                      "verdicts": video_verdicts(score), "score": score, "timings_seconds": sidecar["timings_seconds"]}
            if cfg.video.seconds >= LONG_SECONDS:
                record["long"] = score_long_video(frames, prompt, fps=cfg.video.fps)
            results.append(record)
            if on_video is not None:
                on_video(len(results), total)
    report = {"model": pipe.model_name, "seconds": cfg.video.seconds, "seeds": seeds, "table": tabulate(results),
              "results": results, "config": cfg.to_dict()}
    write_json(out / "eval.json", report)
    return report


def format_table(table: dict[str, dict[str, Any]]) -> str:
    """The category table as aligned text (percentages)."""
    head = f"{'category':<12} {'videos':>6} " + " ".join(f"{a:>9}" for a in ATTRIBUTES)
    lines = [head, "-" * len(head)]
    for cat, row in table.items():
        cells = " ".join(f"{'-':>9}" if row[a] is None else f"{100 * row[a]:8.1f}%" for a in ATTRIBUTES)
        lines.append(f"{cat:<12} {row['videos']:>6} {cells}")
    return "\n".join(lines)


def summary_json(report: dict[str, Any]) -> str:
    """The table as compact JSON, for model cards and notes."""
    return json.dumps(report["table"], indent=2)
