"""Install a trained run's model into the package as the built-in model, with its model card.

    python scripts/ship_model.py runs/mine --replace [--seeds 1]   # replaces the shipped built-in model
    python scripts/ship_model.py runs/default/{vae-base,base,tune1} --to DIR   # phases in order: the last holds the model
    python scripts/ship_model.py runs/mine --model runs/mine/samples/model --step 3000   # mid-run (one run only)
    python scripts/ship_model.py runs/mine --to models/candidate   # not the built-in model: a folder to fine-tune from
    python scripts/ship_model.py runs/dec --after src/soragen/weights/shapes --replace   # a fine-tune of the shipped model


1. copies RUN/model beside the target (DiT and VAE weights stored as float16; the config without
   the run's own paths),
2. runs `soragen eval` on configs/prompts/shapes-eval.txt (4-second videos) with the copy,
3. writes the model card (README.md; with several run folders, a line per phase: its steps, wall time and
   settings beyond configs/default.yaml; with --after MODEL, the phases and wall times of the model the runs
   fine-tuned first, as its card lists them) and PROMPTS.txt into it, and only then renames it into place:
   src/soragen/weights/shapes (needs --replace when a built-in model is already there), or --to DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "src" / "soragen" / "weights" / "shapes"

PROMPTS = """\
Shapes World captions, in English or Chinese:
  a [small|large] <colour> <shape> <motion> [and a ... <motion>] [behind a gray wall]
  colour: red green blue yellow cyan magenta
  shape:  circle (ball), square (box), triangle
  motion: moving left|right|up|down, moving to the left|right|up|down, bouncing
  e.g. "a large red circle moving right", "a small blue box bouncing and a yellow triangle
  moving to the left behind a gray wall", "一个红色的大圆向右移动"
Native 64x64 at 8 fps, shown 4x enlarged (--upscale). Other text gives arbitrary shapes."""


def wall_time(metrics: Path) -> dict[str, float]:
    """Training seconds per stage, summed over the logged intervals (gaps over 10 min = stopped and resumed)."""
    out: dict[str, float] = {}
    last: dict[str, float] = {}
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        stage, t = rec["stage"], rec["time"]
        if stage in last and 0 < t - last[stage] < 600:
            out[stage] = out.get(stage, 0.0) + t - last[stage]
        last[stage] = t
    return out


def stage_steps(metrics: Path) -> dict[str, int]:
    """The last logged step of each stage of a run."""
    out: dict[str, int] = {}
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        out[rec["stage"]] = max(out.get(rec["stage"], 0), rec["step"])
    return out


def flat(mapping: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def beside(value: object, run: Path) -> object:
    """A path into a folder beside the run (another phase's) by its name there; any other value as it is."""
    if isinstance(value, str) and value:
        path = Path(value).expanduser().resolve()
        if path.exists() and path.is_relative_to(run.resolve().parent):
            return path.relative_to(run.resolve().parent).as_posix()
    return value


def earlier_phases(card: str) -> tuple[list[str], dict[str, float]]:
    """From the card of the model a run fine-tuned: its phase and history lines, and its wall time per stage (s).
    Not its "- Decoder:" line: the new card writes that again from the decoder_finetune.json its model folder holds."""
    import re

    lines = [line for line in card.splitlines() if line.startswith(("- Phase `", "- History:"))]
    wall = next((line for line in card.splitlines() if line.startswith("- Wall time on 2 CPU cores:")), "")
    wall = wall.split("(total")[0]
    return lines, {stage: float(minutes) * 60 for stage, minutes in re.findall(r"(\w+) (\d+) min", wall)}


def phase_line(run: Path, recipe: dict[str, object]) -> str:
    """One phase of a multi-run history: the stages it trained, their wall time and its settings beyond the
    recipe (but those of stages it did not train)."""
    from soragen.config import read_yaml

    settings = flat(read_yaml(run / "config.yaml"))
    steps = stage_steps(run / "metrics.jsonl")
    times = wall_time(run / "metrics.jsonl")
    trained = [f"{stage} {n:,} steps ({times.get(stage, 0) / 60:.0f} min)" for stage, n in steps.items()]
    untrained = tuple(f"train.{stage}." for stage in ("vae", "dit", "decoder") if stage not in steps)
    skip = {"model", "train.output_dir", "train.stages", "vae.latent_mean", "vae.latent_std",
            "video.model_fps"}  # where, not how; the rate is the training clips'
    changed = [f"{key.removeprefix('train.')}={beside(value, run)}" for key, value in settings.items()
               if key not in skip and not key.startswith(untrained) and recipe.get(key) != value]
    return f"- Phase `{run.name}`: {', '.join(trained)}; " + (", ".join(changed) or "configs/default.yaml as it is")


def to_half(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from soragen.video_io import follow_umask

    tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path))
    follow_umask(path)  # readable as the user's other files are, like the rest of the model folder


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two weights files hold the same tensors, floats compared as float16 (as the package stores them)."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    stored = {k: v.half() if v.is_floating_point() else v for k, v in y.items()}
    return x.keys() == y.keys() and all(
        torch.equal(v.half() if v.is_floating_point() else v, stored[k]) for k, v in x.items())


def carried_decoder(model: Path, earlier: list[Path]) -> Path | None:
    """For a model folder without a decoder_finetune.json whose VAE is an earlier model's (a DiT phase on the VAE of
    a model whose decoder was fine-tuned), that model's decoder_finetune.json: the decoder it ships is that one."""
    from soragen.model_io import WEIGHTS

    if (model / "vae" / "decoder_finetune.json").is_file():
        return None
    for folder in earlier:
        marker = folder / "vae" / "decoder_finetune.json"
        if marker.is_file() and same_tensors(model / "vae" / WEIGHTS, folder / "vae" / WEIGHTS):
            return marker
    return None


def fail(message: str) -> None:
    """One line on stderr and exit code 2, as soragen answers bad input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", metavar="run",
                        help="run folder of `soragen train` (holds model/); several: the phases in order, the last "
                             "holding the model")
    parser.add_argument("--seeds", type=int, default=1, help="videos per evaluation prompt")
    parser.add_argument("--model", type=Path, help="model folder to ship (default RUN/model, the finished run)")
    parser.add_argument("--step", type=int, help="DiT step of --model when it is not the finished run")
    parser.add_argument("--history", help="how the run got there, when it changed settings along the way")
    parser.add_argument("--prompts", type=Path, default=ROOT / "configs/prompts/shapes-eval.txt", help="evaluation prompts")
    parser.add_argument("--to", type=Path, default=TARGET, help="where to install it (default: the package's built-in model)")
    parser.add_argument("--replace", action="store_true", help="replace the built-in model that the package ships")
    parser.add_argument("--after", type=Path, metavar="MODEL",
                        help="model folder the runs fine-tuned (e.g. the built-in one): its card's phases come first")
    parser.add_argument("--note", default="", help="a sentence for the card's first paragraph (e.g. what it falls short of)")
    args = parser.parse_args()
    args.run = args.runs[-1]
    for run in args.runs:
        for name in ("config.yaml", "metrics.jsonl"):
            if not (run / name).is_file():
                fail(f"{run} is not a run folder of `soragen train` ({name} is missing)")
    if args.after is not None and not (args.after / "README.md").is_file():
        fail(f"--after {args.after}: no model card (README.md) there to take the earlier phases from")
    if args.step is not None and len(args.runs) > 1:
        fail("--step describes a model taken from the middle of one run; give that run alone")
    target = args.to.resolve()
    builtin = target == TARGET.resolve()
    model = args.model or args.run / "model"
    if not (model / "soragen.yaml").is_file():
        fail(f"{model} is not a finished model folder (RUN/model, written when `soragen train` finishes)")
    if builtin and target.exists() and not args.replace:
        fail(f"{target} already holds the built-in model; pass --replace to replace it, or --to DIR to install "
             "this one elsewhere")
    sys.path.insert(0, str(ROOT / "src"))

    # 1. A copy beside the target, complete before it replaces anything.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    shutil.rmtree(tmp)
    try:
        install(args, model, tmp, target, builtin)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def install(args: argparse.Namespace, model: Path, tmp: Path, target: Path, builtin: bool) -> None:
    """Fill tmp with the model, evaluate it, write its card, then rename it to target."""
    from soragen.config import build_config, load_config, read_yaml
    from soragen.evaluation.run import format_shape_table, format_table
    from soragen.model_io import WEIGHTS, portable_config

    earlier, times = earlier_phases((args.after / "README.md").read_text(encoding="utf-8")) if args.after else ([], {})
    shutil.copytree(model, tmp)
    for sub in ("transformer", "vae"):
        to_half(tmp / sub / WEIGHTS)
    (tmp / "PROMPTS.txt").write_text(PROMPTS + "\n", encoding="utf-8")
    stored = tmp / "soragen.yaml"
    settings = read_yaml(stored)
    earlier_models = [run / "model" for run in reversed(args.runs[:-1])] + ([args.after] if args.after else [])
    if (marker := carried_decoder(model, earlier_models)) is not None:
        # The decoder it ships is that model's: its record (the card's decoder line and gate) and its settings.
        shutil.copy(marker, tmp / "vae" / marker.name)
        settings["train"]["decoder"] = read_yaml(marker.parents[1] / "soragen.yaml")["train"]["decoder"]
    stored.write_text(portable_config(build_config(settings)).to_yaml(), encoding="utf-8")

    # 2. Evaluate the copy as a user would (nothing is replaced yet).
    eval_dir = args.run / "eval-4s"
    subprocess.run([sys.executable, "-m", "soragen", "eval", "--prompts", str(args.prompts), "--model", str(tmp),
                    "--seconds", "4", "--seeds", str(args.seeds), "--out", str(eval_dir)], check=True)
    report = json.loads((eval_dir / "eval.json").read_text())

    # 3. Model card.
    cfg = load_config(None, [f"model={tmp}"])
    for run in args.runs:
        for stage, seconds in wall_time(run / "metrics.jsonl").items():
            times[stage] = times.get(stage, 0.0) + seconds
    vaes = [run / "vae" for run in args.runs if (run / "vae" / WEIGHTS).is_file()]  # the newest trained the model's VAE
    gate_path = vaes[-1] / "gate.json" if vaes else None
    gate = json.loads(gate_path.read_text()) if gate_path is not None and gate_path.is_file() else {}
    sizes = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in tmp.rglob("*.safetensors")}
    history = ""
    phased = len(args.runs) > 1 or args.after is not None
    if phased:
        recipe = flat(load_config(ROOT / "configs" / "default.yaml").model_dump(mode="json"))
        history = "\n" + "\n".join(earlier + [phase_line(run, recipe) for run in args.runs])
    history += f"\n- History: {args.history}." if args.history else ""
    source = "builtin" if builtin else str(args.to)
    role = ('It is soragen\'s default model: `soragen generate "a large red circle moving right"`.' if builtin
            else "It is not the built-in model.")
    role += f" {args.note}" if args.note else ""
    role += (f" Continue training from it with `soragen train --config configs/default.yaml --set train.output_dir=runs/continue "
             f"--set 'train.stages=[dit]' "
             f"--set train.vae_model={source} --set train.dit.init_model={source}`.")
    decoder_path = tmp / "vae" / "decoder_finetune.json"
    decoder = json.loads(decoder_path.read_text()) if decoder_path.is_file() else None
    if decoder:
        gate = decoder.get("gate") or gate  # the reconstructions now come from the fine-tuned decoder
        steps_text = "" if phased else f" for {decoder['steps']} steps"  # phased: the phase lines give the steps
        if "redraw_windows" in decoder:  # the redraw phase: the phase lines give the earlier decoder phase's settings
            history += (f"\n- Decoder: fine-tuned on the DiT's own latents (train stage 'decoder'), last{steps_text} on "
                        f"{decoder['redrawn']} of {decoder['redraw_windows']} windows the DiT generated from pure noise, "
                        "redrawn by the renderer where it put each object, beside real clips (train.decoder.redraw_rows "
                        f"{decoder['redraw_rows']} of each batch).")
        else:
            history += (f"\n- Decoder: fine-tuned{steps_text} on the DiT's own latents (train stage 'decoder', "
                        f"the sampler's last {decoder['last_steps']} steps).")
    d = cfg.train.dit
    windows = (f"{d.batch_size} windows of {d.window} latent frames; {d.context_fraction:.0%} of windows with "
               f"1-{d.max_context} context frames; caption dropout {d.caption_dropout:.0%}")
    timesteps = (f"timesteps drawn as 1000 * u**(1/{d.timestep_power:g}); {d.frame_noise:.0%} of windows with a "
                 "timestep per frame")
    if phased:  # the phases' lines below say what each trained
        steps = (f"- DiT + T5: {windows};\n  {timesteps}. In phases, each from the one before, with the settings of "
                 "configs/default.yaml but those named (for the stages each trained):")
    else:
        steps = (f"- VAE: {cfg.train.vae.steps} steps of {cfg.train.vae.batch_size} clips of {cfg.train.vae.clip_frames} frames.\n"
                 f"- DiT + T5: {f'{args.step} of the planned {d.steps}' if args.step else d.steps} steps of {windows}; "
                 f"EMA {d.ema_decay};\n  {timesteps}.")
    guidance = f"guidance {cfg.sampler.guidance:g}"
    if cfg.sampler.guidance_interval is not None:
        guidance += " at t in [{}, {}] (unguided below)".format(*cfg.sampler.guidance_interval)
    prompts = args.prompts.resolve()
    shown_prompts = prompts.relative_to(ROOT) if prompts.is_relative_to(ROOT) else prompts
    continuing = ("" if cfg.sampler.continuation_steps is None
                  else f", each window after the first in {cfg.sampler.continuation_steps} steps")
    card = f"""# soragen built-in model: Shapes World

A text-to-video model trained from scratch by `scripts/train_default.sh` on the Shapes
World (64x64 scenes of one or two coloured shapes; `src/soragen/data/shapes.py`), rendered procedurally, on 2 CPU cores. {role}

## What it understands
{PROMPTS}

## Parts
- Text encoder: T5 encoder, {cfg.text_encoder.num_layers} layers, width {cfg.text_encoder.d_model}, word-level vocabulary of the captions (trained with the DiT).
- VAE: causal, {cfg.vae.temporal_compression} x {cfg.vae.spatial_compression} x {cfg.vae.spatial_compression} compression, {cfg.vae.latent_channels} latent channels; the DiT sees them normalised per channel and scaled by {cfg.vae.latent_scale}.
- DiT: width {cfg.dit.width}, depth {cfg.dit.depth}, {cfg.dit.heads} heads, patch {"x".join(map(str, cfg.dit.patch_size))}, {cfg.dit.attention} attention; v-prediction, {cfg.sampler.beta_schedule} schedule shifted by {cfg.sampler.schedule_shift:g} (SNR / {cfg.sampler.schedule_shift ** 2:g}), zero terminal SNR.
- Sampling defaults: {cfg.sampler.kind.upper()} {cfg.sampler.steps} steps, {guidance}; long videos in windows of {cfg.sampler.window} latent frames, {cfg.sampler.context_frames} of them context from the window before{continuing}.
- Weights (safetensors; DiT and VAE stored as float16): {", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(sizes.items()))}.

## Training
- Data: the Shapes World rendered on the fly; {cfg.data.clips} clips of {1 + cfg.vae.temporal_compression * (cfg.data.clip_latent_frames - 1)} frames encoded once for the DiT,
  {cfg.data.long_fraction:.0%} of them cut from long trajectories (start up to {cfg.data.max_start_seconds:g} s), {cfg.data.chinese_fraction:.0%} of captions in Chinese;
  held-out combinations never rendered.
{steps}{history}
- Wall time on 2 CPU cores: {", ".join(f"{k} {v / 60:.0f} min" for k, v in times.items())} (total {sum(times.values()) / 60:.0f} min).
- VAE reconstructions{" (by the fine-tuned decoder)" if decoder else ""} scored by the detector (the ceiling of the model): {json.dumps({k: round(v, 3) for k, v in gate.items()})}

## Evaluation (`soragen eval --prompts {shown_prompts} --seconds 4 --seeds {report["seeds"]}`, {report["seeds"]} seed{"s" * (report["seeds"] > 1)} per prompt; default sampler, {cfg.sampler.kind.upper()} {cfg.sampler.steps} steps, {guidance})

```
{format_table(report["table"])}

{format_shape_table(report["shape_table"])}
```
"""
    (tmp / "README.md").write_text(card, encoding="utf-8")

    # 4. Into place, complete.
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)
    print(card)


if __name__ == "__main__":
    main()
