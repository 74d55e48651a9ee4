"""The `soragen` command: flags become config values, the library does the work.

Every error a user can cause prints one line on stderr and exits with code 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import difflib
import errno
import gc
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

try:  # recent typer vendors click; older releases use the click package
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc

from soragen.errors import UserError

app = typer.Typer(
    name="soragen",
    help="Text-to-video from the command line: T5 text encoder, diffusion transformer, causal video VAE, MP4.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

_state = {"debug": False, "stopped": False, "stopped_at": 0.0}
STOP_GRACE_SECONDS = 2.0  # a second stop signal within this time of the first is the same stop

def _home(path: Optional[Path]) -> Optional[Path]:
    """A path given with a leading ~ (quoted, so the shell left it) means the home folder, as it does for --model."""
    return path.expanduser() if path is not None else None


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML preset to start from.", callback=_home)]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="Override a config value, e.g. --set dit.depth=4 (repeatable).")
]


def _print_version(asked: bool) -> None:
    """--version: soragen's version and those of the libraries that do its work (read without importing them)."""
    if not asked:
        return
    from importlib.metadata import PackageNotFoundError, version

    from soragen import __version__

    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{name} {of(name)}" for name in ("torch", "diffusers", "transformers", "accelerate"))
    typer.echo(f"soragen {__version__} ({libraries}; Python {sys.version.split()[0]})")
    raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the versions of soragen and its libraries, then exit.",
                                          callback=_print_version, is_eager=True)] = False,
) -> None:
    """soragen: prompt -> T5 -> DiT over spacetime latent patches -> causal video VAE -> MP4."""
    _state["debug"] = debug


STEPS_HELP = ("Denoising steps of every window (default: the model's sampler.steps, and its "
              "sampler.continuation_steps in the windows after the first).")


def _flag_values(overrides: list[str] | None = None, **flags: Any) -> dict[str, Any]:
    """Map CLI flags that were given to dotted config keys (`overrides`: the command's --set values)."""
    from soragen.config import parse_override

    keys = {
        "seconds": "video.seconds", "fps": "video.fps", "width": "video.width", "height": "video.height",
        "upscale": "video.upscale", "crf": "video.crf", "steps": "sampler.steps", "guidance": "sampler.guidance",
        "negative_prompt": "sampler.negative_prompt", "sampler": "sampler.kind", "seed": "seed", "model": "model",
        "format": "video.format", "output_size": "video.output_size",
    }
    values = {keys[name]: value for name, value in flags.items() if value is not None}
    continuation_set = any(parse_override(o)[0] == ["sampler", "continuation_steps"] for o in overrides or [])
    if "sampler.steps" in values and not continuation_set:  # --steps N: N steps in every window, the later ones too
        values["sampler.continuation_steps"] = None
    return values


def _progress():
    """Progress bars on stderr; every update also stops the work if a stop signal came (see _on_stop_signal)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    class StoppableProgress(Progress):
        def __enter__(self):  # the display starts with the first bar: an error before it stays one line
            return self

        def __exit__(self, *exc) -> None:
            if self.live.is_started:
                self.stop()

        def add_task(self, *args, **kwargs):
            if not self.live.is_started:
                self.start()
            return super().add_task(*args, **kwargs)

        def update(self, *args, **kwargs) -> None:
            _raise_if_stopped()
            super().update(*args, **kwargs)

        def advance(self, *args, **kwargs) -> None:
            _raise_if_stopped()
            super().advance(*args, **kwargs)

    console = Console(stderr=True)
    return StoppableProgress(  # a log file gets no bars (rich would dump each finished bar at the end)
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False, disable=not console.is_terminal,
    )


def _duration(seconds: float) -> str:
    """1:02:03 for hours, 2:03 for minutes."""
    seconds = int(seconds)
    h, m, sec = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def default_output(prompt: str, seed: int, fmt: str = "mp4") -> Path:
    """outputs/<prompt slug>_seed<seed>.mp4 (.webm, .gif, or a folder for frames), numbered if that name is taken."""
    from soragen.naming import slugify
    from soragen.video_io import SUFFIXES, sidecar_path

    folder = Path("outputs")
    stem = f"{slugify(prompt)}_seed{seed}"
    path = folder / f"{stem}{SUFFIXES[fmt]}"
    n = 2
    while path.exists() or sidecar_path(path).exists():
        path = folder / f"{stem}_{n}{SUFFIXES[fmt]}"
        n += 1
    return path


FormatOpt = Annotated[Optional[str], typer.Option("--format", help="mp4 (H.264), webm (VP9), gif, or frames (a folder of PNGs).")]
OutputSizeOpt = Annotated[
    Optional[str],
    typer.Option("--output-size", help="Final frame size WxH; frames are scaled to fit, keeping their aspect ratio, on black bars."),
]


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help="What the video shows.")],
    seconds: Annotated[Optional[float], typer.Option(help="Duration in seconds.")] = None,
    fps: Annotated[Optional[int], typer.Option(
        help="Frames per second of the output; the model makes its own (video.model_fps), held or skipped to it.")] = None,
    width: Annotated[Optional[int], typer.Option(help="Width in pixels (before --upscale).")] = None,
    height: Annotated[Optional[int], typer.Option(help="Height in pixels (before --upscale).")] = None,
    upscale: Annotated[Optional[int], typer.Option(help="Integer factor to enlarge the frames for viewing.")] = None,
    steps: Annotated[Optional[int], typer.Option(help=STEPS_HELP)] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale (1 = off).")] = None,
    negative_prompt: Annotated[Optional[str], typer.Option(help="What to steer away from.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the initial noise.")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="ddim or ddpm.")] = None,
    crf: Annotated[Optional[int], typer.Option(help="Quality: H.264 0 (lossless) to 51; VP9 0 to 63.")] = None,
    format_: FormatOpt = None,
    output_size: OutputSizeOpt = None,
    model: Annotated[Optional[str], typer.Option(help="Model folder, or 'builtin'.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output path (default: outputs/<prompt>_seed<seed>.mp4).", callback=_home)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
) -> None:
    """Generate a video from a text prompt."""
    from soragen.config import load_config
    from soragen.pipeline import Pipeline, check_prompt, plan_video
    from soragen.video_io import (
        check_output_suffix, check_writable, missing_folders, remove_empty_folders, remove_path, sidecar_path, temporaries,
    )

    prompt = check_prompt(prompt)
    values = _flag_values(
        set_, seconds=seconds, fps=fps, width=width, height=height, upscale=upscale, steps=steps, guidance=guidance,
        negative_prompt=negative_prompt, seed=seed, sampler=sampler, crf=crf, model=model, format=format_,
        output_size=output_size,
    )
    cfg = load_config(config, set_ or [], values)
    plan = plan_video(cfg)  # fail on a bad request before loading any model
    output = output if output is not None else default_output(prompt, cfg.seed, cfg.video.format)
    check_output_suffix(output, cfg.video.format)
    made = missing_folders(output.parent)  # removed again if the command fails, while empty
    check_writable(output, overwrite, folder_output=cfg.video.format == "frames")
    check_writable(sidecar_path(output), overwrite, sidecar_of=output)
    old_temporaries = temporaries(output) | temporaries(sidecar_path(output))
    try:
        pipe = Pipeline.from_config(cfg)
        with _progress() as progress:
            windows = len(pipe.windows(plan))
            task = progress.add_task(f"denoising ({windows} window{'s' * (windows > 1)})", total=pipe.denoise_calls(plan))
            sidecar = pipe.generate(prompt, output, overwrite=overwrite, on_step=lambda i: progress.update(task, completed=i + 1))
    except BaseException:  # (Pipeline.generate removes a video whose sidecar it could not write)
        for tmp in (temporaries(output) | temporaries(sidecar_path(output))) - old_temporaries:
            remove_path(tmp)  # in case an interruption landed between a file's creation and its writer's cleanup
        remove_empty_folders(made)
        raise
    t = sidecar["timings_seconds"]
    v = sidecar["video"]
    typer.echo(
        f"wrote {output} ({v['frames']} frames, {v['width']}x{v['height']} at {v['fps']} fps) in {sum(t.values()):.1f} s "
        f"[text {t['text_encoding']:.2f} s, denoise {t['denoising']:.2f} s, decode {t['vae_decoding']:.2f} s, "
        f"{cfg.video.format} {t['mp4_encoding']:.2f} s]"
    )


@app.command()
def batch(
    prompts_file: Annotated[Path, typer.Argument(metavar="PROMPTS_FILE", help="Prompts: .txt (one a line, # comments), .jsonl, .csv or .yaml.", callback=_home)],
    out: Annotated[Path, typer.Option("--out", help="Folder for the videos, manifest.jsonl and index.html.", callback=_home)],
    seconds: Annotated[Optional[float], typer.Option(help="Duration in seconds (an item's own 'seconds' wins).")] = None,
    fps: Annotated[Optional[int], typer.Option(
        help="Frames per second of the output; the model makes its own (video.model_fps), held or skipped to it.")] = None,
    width: Annotated[Optional[int], typer.Option(help="Width in pixels (before --upscale).")] = None,
    height: Annotated[Optional[int], typer.Option(help="Height in pixels (before --upscale).")] = None,
    upscale: Annotated[Optional[int], typer.Option(help="Integer factor to enlarge the frames for viewing.")] = None,
    steps: Annotated[Optional[int], typer.Option(help=STEPS_HELP + " An item's own 'steps' wins.")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale (an item's own wins).")] = None,
    negative_prompt: Annotated[Optional[str], typer.Option(help="What to steer away from (an item's own wins).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Base seed: items without a seed get one derived from it and the item.")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="ddim or ddpm.")] = None,
    crf: Annotated[Optional[int], typer.Option(help="Quality: H.264 0 (lossless) to 51; VP9 0 to 63.")] = None,
    format_: FormatOpt = None,
    output_size: OutputSizeOpt = None,
    model: Annotated[Optional[str], typer.Option(help="Model folder, or 'builtin'.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    shard: Annotated[
        Optional[str],
        typer.Option(help="Render shard i of n (0-based, e.g. 0/2 and 1/2); default: from accelerate launch (RANK/WORLD_SIZE), else all."),
    ] = None,
) -> None:
    """Render every prompt of a file into a folder (resumable): videos, previews, manifest.jsonl, index.html."""
    from soragen.batch import parse_shard, run_batch, shard_from_environment
    from soragen.config import load_config
    from soragen.model_io import check_model_folder
    from soragen.pipeline import plan_video

    values = _flag_values(
        set_, seconds=seconds, fps=fps, width=width, height=height, upscale=upscale, steps=steps, guidance=guidance,
        negative_prompt=negative_prompt, seed=seed, sampler=sampler, crf=crf, model=model, format=format_,
        output_size=output_size,
    )
    cfg = load_config(config, set_ or [], values)
    plan_video(cfg)
    which = parse_shard(shard) if shard is not None else (shard_from_environment() or (0, 1))
    if cfg.model is not None:
        check_model_folder(cfg)  # a broken model fails the command at once, before the progress bars
    with _progress() as progress:
        result = run_batch(cfg, prompts_file, out, shard=which, reporter=_BatchBars(progress))
    ok = sum(r.get("status") == "ok" for r in result.manifest)
    part = f" (shard {which[0]}/{which[1]})" if which[1] > 1 else ""
    typer.echo(
        f"batch{part}: {len(result.rendered)} rendered, {len(result.skipped)} already done, {len(result.failed)} failed "
        f"in {result.seconds:.1f} s; folder {out}: {ok}/{len(result.manifest)} items done; "
        f"see {out / 'index.html'} and {out / 'manifest.jsonl'}"
    )
    if which[1] > result.items and not (result.rendered or result.skipped or result.failed):
        dealt = "shard 0" if result.items == 1 else f"shards 0-{result.items - 1}"
        typer.echo(f"shard {which[0]}/{which[1]} has none of the file's {result.items} items: they are dealt to {dealt} "
                   "only; fewer shards than items give every shard work")
    if result.failed:
        typer.echo(f"failed ({len(result.failed)}):")
        for item, message in result.failed:
            prompt = item.fields.get("prompt", "")
            shown = f" {prompt[:60]!r}" if prompt else ""
            typer.echo(f"  {item.where}{shown}: {message}")
        raise typer.Exit(1)


class _BatchBars:
    """Progress bars of a batch: items done with ETA, and the denoising steps of the current item."""

    def __init__(self, progress):
        self.progress = progress
        self.items = self.steps = None

    def start(self, total: int, shard: tuple[int, int]) -> None:
        name = f"items (shard {shard[0]}/{shard[1]})" if shard[1] > 1 else "items"
        self.items = self.progress.add_task(name, total=total)

    def item_start(self, item, steps: int) -> None:
        if self.steps is None:
            self.steps = self.progress.add_task("denoising", total=steps)
        self.progress.reset(self.steps, total=steps, description=f"denoising {item.stem[:40]}")

    def step(self, done: int) -> None:
        self.progress.update(self.steps, completed=done)

    def item_end(self, item, status: str, rec) -> None:
        from rich.markup import escape

        self.progress.advance(self.items)
        if status != "skipped":
            shown = "ok" if status == "ok" else f"FAILED: {rec.get('error')}"
            self.progress.console.print(escape(f"{item.where}: {item.stem} {shown}"), highlight=False)


@app.command()
def info(
    model: Annotated[Optional[str], typer.Option(help="Model folder, or 'builtin'.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Describe the model: its config, parameters per part and the prompts it understands."""
    from soragen.config import load_config
    from soragen.pipeline import Pipeline, plan_video

    cfg = load_config(config, set_ or [], _flag_values(model=model))
    plan_video(cfg)  # video settings generate would refuse are refused here too, not shown as the model's
    pipe = Pipeline.from_config(cfg)
    counts = pipe.parameter_counts()
    typer.echo(f"model: {pipe.model_name}")
    typer.echo("parameters:")
    for part, n in counts.items():
        typer.echo(f"  {part:<13} {n / 1e6:8.3f} M")
    typer.echo(f"  {'total':<13} {sum(counts.values()) / 1e6:8.3f} M")
    typer.echo("prompts it understands:")
    if cfg.model is None:
        typer.echo(
            "  none: the weights are random (the config names no model), so every prompt gives noise.\n"
            "  They make every stage run end to end; train a model with `soragen train` and pass --model."
        )
    else:
        from soragen.model_io import resolve_model

        card = resolve_model(cfg.model) / "PROMPTS.txt"
        typer.echo("  " + (card.read_text(encoding="utf-8", errors="replace").strip().replace("\n", "\n  ") if card.is_file() else "any text"))
    typer.echo("config:")
    typer.echo("  " + cfg.to_yaml().strip().replace("\n", "\n  "))


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in train.output_dir from its newest checkpoint.")] = False,
) -> None:
    """Train a model (VAE, then DiT with the small T5) with HF accelerate; see configs/default.yaml."""
    from soragen.config import load_config
    from soragen.train import train as run_training

    cfg = load_config(config, set_ or [], builtin_default=False)  # training starts from a preset, not the built-in model
    with _progress() as progress:
        tasks: dict[str, Any] = {}
        tenths: dict[str, int] = {}

        def report(stage: str, step: int, total: int, metrics: dict[str, float]) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            shown = " ".join(f"{k} {metrics[k]:.4g}" for k in ("loss", "psnr", "samples_per_s", "clips_per_s") if k in metrics)
            progress.update(tasks[stage], completed=step, description=f"{stage} {shown}")
            if not progress.console.is_terminal:  # a log file (nohup): plain lines instead of the bars
                if plain_line_due(stage, step, total, metrics, tenths):
                    task = progress.tasks[tasks[stage]]
                    left = "" if task.time_remaining is None or step == total else (
                        f", about {_duration(task.time_remaining)} left")
                    progress.console.print(f"{stage} {step}/{total}{' ' + shown if shown else ''} "
                                           f"({_duration(task.elapsed or 0)}{left})", highlight=False, soft_wrap=True)

        out = run_training(cfg, resume=resume, progress=report)
    if os.environ.get("RANK", "0") == "0":  # under `accelerate launch`, the main process speaks for all
        typer.echo(f"done: {out}")


def plain_line_due(stage: str, step: int, total: int, metrics: dict[str, float], tenths: dict[str, int]) -> bool:
    """Whether a training report gets a line in a log file: a metric line (train.log_every), a stage's last
    step, and for work without metric lines (the latent caches) each tenth it passes, whatever its chunks'
    size (`tenths`: the last tenth logged, by stage)."""
    if "samples_per_s" in metrics or "clips_per_s" in metrics or step >= total:
        return True
    tenth = step * 10 // max(total, 1)
    if "loss" in metrics or "psnr" in metrics or tenth <= tenths.get(stage, 0):
        return False
    tenths[stage] = tenth
    return True


@app.command("eval")
def eval_(
    prompts: Annotated[Path, typer.Option("--prompts", help="Prompt file, one Shapes World caption a line.", callback=_home)],
    out: Annotated[Path, typer.Option("--out", help="Folder for the videos and eval.json.", callback=_home)] = Path("eval"),
    seconds: Annotated[Optional[float], typer.Option(help="Duration of each video.")] = None,
    seeds: Annotated[int, typer.Option(help="Videos per prompt, 1 to 1000 (seeds seed, seed+1, ...).")] = 1,
    seed: Annotated[Optional[int], typer.Option(help="First seed.")] = None,
    steps: Annotated[Optional[int], typer.Option(help=STEPS_HELP)] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model folder, or 'builtin'.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier evaluation in --out, and make every video "
                                                 "again (without it, videos an interrupted one finished are reused, and "
                                                 "files named like its videos that no evaluation wrote are refused).")] = False,
) -> None:
    """Generate a video per prompt and score it with the Shapes World detector; prints a table per category."""
    from soragen.config import MAX_SEED, load_config
    from soragen.data.shapes import SIZE as SHAPES_SIZE
    from soragen.evaluation.run import (MAX_EVAL_SEEDS, evaluate, format_long_table, format_shape_table, format_table,
                                         read_prompts)
    from soragen.pipeline import denoise_calls, plan_video

    if not 1 <= seeds <= MAX_EVAL_SEEDS:
        raise UserError(f"--seeds must be between 1 and {MAX_EVAL_SEEDS}, got {seeds}")
    items = read_prompts(prompts)
    values = _flag_values(set_, seconds=seconds, seed=seed, steps=steps, guidance=guidance, model=model)
    cfg = load_config(config, set_ or [], values)
    if cfg.seed + seeds - 1 > MAX_SEED:
        raise UserError(f"--seed {cfg.seed} with --seeds {seeds} goes past the largest seed, {MAX_SEED}")
    plan = plan_video(cfg)
    if cfg.video.format != "mp4":
        raise UserError(f"eval writes and scores mp4 videos; video.format is {cfg.video.format!r}, leave it at 'mp4'")
    if plan.fps != plan.model_fps:
        raise UserError(f"eval scores videos at the model's own frame rate; video.fps is {plan.fps}, leave it at "
                        f"{plan.model_fps} (video.model_fps)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the videos and eval.json")
    v = cfg.video
    width, height = v.written_size
    if v.width != v.height or width != height or width % SHAPES_SIZE:
        raise UserError(f"eval scores square frames whose side is a multiple of {SHAPES_SIZE} (the Shapes World, "
                        f"enlarged); these settings make {v.width}x{v.height} frames written at {width}x{height} "
                        "(video.width, video.height, video.upscale, video.output_size)")
    if (out / "eval.json").is_dir():  # --overwrite replaces an evaluation's report, not a folder of anything
        raise UserError(f"{out / 'eval.json'} is a folder, where the evaluation's report goes; move it away or choose "
                        "another --out")
    if (out / "eval.json").exists() and not overwrite:
        raise UserError(f"{out} already holds an evaluation (eval.json); pass --overwrite to replace it or choose another --out")
    calls = denoise_calls(cfg, plan)
    with _progress() as progress:
        task = progress.add_task("videos", total=len(items) * seeds)
        step = progress.add_task("denoising", total=calls)  # within the current video

        def on_video(n: int, total: int) -> None:
            progress.update(task, completed=n)
            if n < total:
                progress.reset(step, total=calls)

        report = evaluate(cfg, items, out, seeds=seeds, reuse=not overwrite, on_video=on_video,
                          on_step=lambda i: progress.update(step, completed=i + 1))
    if report["reused"]:
        typer.echo(f"{report['reused']} of {len(items) * seeds} videos were finished by an earlier, interrupted "
                   f"evaluation in {out} with the same settings: scored, not made again (--overwrite makes all)")
    typer.echo(format_table(report["table"]))
    typer.echo(format_shape_table(report["shape_table"]))
    if report["long_table"] is not None:
        typer.echo(format_long_table(report["long_table"]))
    typer.echo(f"wrote {out / 'eval.json'}")


dataset_app = typer.Typer(help="Write training datasets.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")


@dataset_app.command("shapes")
def dataset_shapes(
    out: Annotated[Path, typer.Option("--out", help="Folder to write videos/ and manifest.jsonl into.", callback=_home)],
    num: Annotated[int, typer.Option("--num", help="Number of clips.")],
    seconds: Annotated[float, typer.Option(help="Seconds per clip.")] = 4.0,
    seed: Annotated[int, typer.Option(help="Seed of the scenes and captions.")] = 0,
    held_out: Annotated[bool, typer.Option("--held-out", help="Only scenes with held-out combinations (for evaluation).")] = False,
    chinese: Annotated[float, typer.Option(help="Share of captions in Chinese.")] = 0.0,
    two_objects: Annotated[float, typer.Option("--two-objects", help="Share of scenes with two objects.")] = 0.5,
) -> None:
    """Render a Shapes World dataset (the world the built-in model learns): lossless videos plus manifest.jsonl."""
    from soragen.data.clips import (
        MANIFEST, check_dataset_request, dataset_request, unfinished_request, write_shapes_dataset,
    )
    from soragen.video_io import check_can_hold

    check_dataset_request(num, seconds, chinese, two_objects, seed)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for videos/ and manifest.jsonl")
    check_can_hold(out, out, "--out")
    if (out / MANIFEST).exists():
        raise UserError(f"{out / MANIFEST} already exists; choose an empty --out folder")
    request = dataset_request(num, seconds, seed, held_out, chinese, two_objects)
    unfinished = unfinished_request(out)
    if unfinished is not None and unfinished != request:  # an interrupted run's: only its own request continues it
        flags = " ".join(f"{k} {v}" if not isinstance(v, bool) else k for k, v in unfinished.items() if v is not False)
        raise UserError(f"--out {out} holds a dataset interrupted while rendering with {flags}; run with those flags "
                        "to finish it, or choose an empty or new folder")
    if unfinished is None and out.exists() and any(out.iterdir()):  # its videos/ would be overwritten or mixed
        raise UserError(f"--out {out} is not empty; choose an empty or new folder for the dataset")
    if unfinished is not None:
        done = sum(1 for p in (out / "videos").glob("*.mp4") if not p.name.startswith("."))
        typer.echo(f"continuing the dataset interrupted in {out}: {min(done, num)} of {num} clips were rendered")
    with _progress() as progress:
        task = progress.add_task("rendering", total=num)
        manifest = write_shapes_dataset(out, num, seconds, seed, held_out=held_out, chinese_fraction=chinese,
                                        two_objects=two_objects,
                                        on_item=lambda i: progress.update(task, completed=i + 1))
    typer.echo(f"wrote {num} clip{'s' * (num != 1)} and {manifest}")


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


_NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _os_error_message(e: OSError) -> str:
    """One line for a file-system error: the path, what went wrong and, for a full disk, what to do."""
    what = f"cannot write {e.filename}" if e.filename else "cannot write the output"
    if e.errno in _NO_SPACE:
        reason = "no space left on the device" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "file too large (file size limit)"
        return f"{what}: {reason}; free some space or choose another folder, then run again"
    if not e.filename:  # not about a path (ffmpeg failing, a closed pipe, the network)
        return str(e) or type(e).__name__
    where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    if e.errno == errno.EEXIST:  # mkdir under a broken symbolic link says only "File exists"
        from soragen.video_io import broken_link

        broken = broken_link(Path(os.fsdecode(e.filename)))
        if broken is not None:
            return (f"cannot use {where}: {broken} is a broken symbolic link (to {os.readlink(broken)}); "
                    "remove it or choose another folder")
    return f"cannot use {where}: {e.strerror or e}; check the path and its permissions"


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record, not at set-up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging() -> None:
    log = logging.getLogger("soragen")
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(_OneLine())
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    for noisy in ("transformers", "diffusers", "accelerate", "imageio_ffmpeg"):  # ffmpeg's on an interrupted video
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _on_stop_signal(signum, frame) -> None:
    """SIGINT and SIGTERM: stop like Ctrl-C, so partial files are removed on the way out.

    Python runs this handler between bytecodes, and an exception raised where Python
    cannot pass it on (an at-fork hook as a subprocess starts, a __del__) is printed
    and dropped. The flag survives that: the next progress update raises again.
    The same stop asked twice within STOP_GRACE_SECONDS (`kill` to the process group and to the
    process, a double Ctrl-C) is one stop: the second would interrupt the first's clean-up. Asked
    again later, the process ends at once (a final name is never half-written; the temporary files
    a stop would have removed are removed by the next run).
    """
    now = time.monotonic()
    if _state["stopped"]:
        if now - _state["stopped_at"] < STOP_GRACE_SECONDS:
            return
        print("interrupted again: exiting at once", file=sys.stderr, flush=True)
        os._exit(130)
    _state.update(stopped=True, stopped_at=now)
    raise KeyboardInterrupt


def _raise_if_stopped() -> None:
    if _state["stopped"]:
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user errors become one line on stderr and exit code 2.

    argv None: the process's own arguments (the console script, `python -m soragen`), and the
    process ends when this returns; tests pass a list and keep their interpreter as it was.
    """
    try:
        _main(argv)
    finally:
        if argv is None and _state["stopped"]:  # stopping: another SIGTERM (a process manager's) would break an
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # atexit hook, or kill the exit once Python resets handlers
        if argv is None:  # the process ends here: spare it the last full garbage collection
            # With torch, transformers and diffusers imported, the interpreter's final collection
            # walks millions of objects: 2.7 s between "interrupted" and the exit on a 2-core machine.
            gc.freeze()


def _no_such_option(e: Any) -> str:
    """An unknown option: the one it is close to, else the command's options.

    Click's own suggestion takes any option at 60% likeness (`--clips` got "Possible options: --chinese,
    --help"); a typo is closer than that, and otherwise the whole list helps more than a guess.
    """
    params = e.ctx.command.params if e.ctx is not None else []
    options = [o for p in params if p.param_type_name == "option" for o in p.opts if o.startswith("--") and o != "--help"]
    close = difflib.get_close_matches(e.option_name, options, n=1, cutoff=0.75)
    if close:
        return f"No such option: {e.option_name}; did you mean {close[0]}?"
    return f"No such option: {e.option_name}; valid: {', '.join(options)}" if options else e.format_message()


def _main(argv: list[str] | None) -> None:
    _setup_logging()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_stop_signal)
        # Not when started with SIGINT ignored (a background job of a script): Ctrl-C cannot reach it there.
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _on_stop_signal)
    args = sys.argv[1:] if argv is None else list(argv)
    _state.update(debug="--debug" in args, stopped=False)
    try:
        result = app(args=args, prog_name="soragen", standalone_mode=False)
    except click_exc.NoArgsIsHelpError as e:
        print(e.format_message() if hasattr(e, "format_message") else str(e), file=sys.stderr)
        sys.exit(2)
    except click_exc.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None and e.ctx.parent is not None else ""
        message = _no_such_option(e) if isinstance(e, click_exc.NoSuchOption) else e.format_message()
        _fail(f"{message}{hint}")
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except UserError as e:
        if _state["debug"]:
            traceback.print_exc()
        _fail(str(e))
    except OSError as e:  # a path that cannot be written (a folder where a file goes, no permission, disk full)
        if _state["debug"]:
            traceback.print_exc()
        _fail(_os_error_message(e))
    if result == 130 or _state["stopped"]:  # typer returns 130 for Ctrl-C; a stop signal may have come at the end
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)
