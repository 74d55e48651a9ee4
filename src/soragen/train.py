"""Training: stage 1 the causal video VAE, stage 2 the DiT together with the small T5.

Built on HF accelerate, so the same code runs on one CPU, one GPU or many
(`accelerate launch -m soragen train ...`). A run folder holds:

    checkpoints/<stage>-<step>/   accelerate state + EMA + run meta, written atomically
    vae/                          the trained VAE (a partial model folder) once stage 1 ends
    latents.safetensors           the DiT's latent cache (clips encoded once)
    shape_cues.safetensors        where the cached clips' shapes show (train.dit.shape_weight)
    twin_latents.safetensors      the cached clips' shape twins, encoded (train.dit.twin_rows)
    samples/                      sample videos (and detector scores) every N steps
    metrics.jsonl                 one JSON line per logged step
    model/                        the final model folder (safetensors, diffusers layout)

The DiT trains for continuation from the start: some windows get clean (or lightly
re-noised) leading latent frames as context, with their own per-frame timestep and
no loss, so the same model later extends videos window by window.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from soragen.config import Config, update
from soragen.errors import UserError, first_line
from soragen.heap import hold_heap, trim_heap

log = logging.getLogger("soragen")


class CheckpointMismatch(UserError):
    """--resume found a checkpoint written with other model settings (sizes, parts, optimizer groups)."""


PROCESS_GROUP_TIMEOUT_HOURS = 6  # how long processes of a multi-process run wait for each other

# (stage, step, total, metrics); on the steps that write a metric line (train.log_every) the metrics hold
# the stage's rate, samples_per_s or clips_per_s.
Progress = Callable[[str, int, int, dict[str, float]], None]


# ---------------------------------------------------------------------------
# Run folder, checkpoints, metrics
# ---------------------------------------------------------------------------


class RunFolder:
    """Paths of a run, checkpoints written atomically and found again on resume."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.vae = self.root / "vae"
        self.latents = self.root / "latents.safetensors"
        self.shape_cues = self.root / "shape_cues.safetensors"
        self.twin_latents = self.root / "twin_latents.safetensors"
        self.redraw_pool = self.root / "redraw_pool.safetensors"  # the decoder stage's (train.decoder.redraw_rows)
        self.dit_redraw_pool = self.root / "dit_redraw_pool.safetensors"  # the DiT stage's (train.dit.redraw_rows)
        self.samples = self.root / "samples"
        self.metrics = self.root / "metrics.jsonl"
        self.model = self.root / "model"
        self.vocabulary = self.root / "tokenizer"  # the word tokenizer a DiT stage built (text_encoder.tokenizer: words)

    def step(self, stage: str) -> int:
        """The step of the stage's newest checkpoint (0 without one)."""
        ckpt = self.latest(stage)
        return 0 if ckpt is None else int(ckpt.name.rsplit("-", 1)[1])

    def caches(self) -> list[str]:
        """The names of the caches a stage makes before its first step (kept for the next run to use: each is keyed,
        and made anew when its key does not fit the run)."""
        return [self.latents.name, self.latents.with_suffix(".json").name, self.twin_latents.name, self.shape_cues.name,
                self.redraw_pool.name, self.dit_redraw_pool.name]

    def latest(self, stage: str) -> Path | None:
        """Newest complete checkpoint of a stage (complete = renamed into place)."""
        found = sorted(p for p in self.checkpoints.glob(f"{stage}-*") if (p / "meta.json").is_file())
        return found[-1] if found else None

    def save_checkpoint(self, stage: str, step: int, write: Callable[[Path], None], keep: int) -> Path:
        """Call write(tmp_dir), then rename tmp_dir to checkpoints/<stage>-<step>; keep the newest `keep`."""
        from soragen.video_io import temporary_folder

        self.checkpoints.mkdir(parents=True, exist_ok=True)
        for stale in self.checkpoints.glob(f".{stage}-*"):  # a checkpoint being written when its process was killed
            shutil.rmtree(stale, ignore_errors=True)
        final = self.checkpoints / f"{stage}-{step:07d}"
        tmp = temporary_folder(final)
        try:
            write(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = sorted(p for p in self.checkpoints.glob(f"{stage}-*") if p.is_dir())[:-keep]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        return final

    def log_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def forget_metrics(self, stage: str, after: int) -> None:
        """Drop the stage's metric lines past step `after` (logged after the checkpoint a resume continues from,
        and about to be logged again), so metrics.jsonl holds each step once. The VAE gate's line at the checkpoint's
        own step goes too: a run killed between the gate and the weights scores its reconstructions again."""
        if not self.metrics.is_file():
            return
        lines = self.metrics.read_text(encoding="utf-8").splitlines(keepends=True)

        def later(line: str) -> bool:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a killed process
                return True
            if not (isinstance(record, dict) and record.get("stage") == stage and isinstance(record.get("step"), int)):
                return False
            return record["step"] > after or (record["step"] == after and any(k.startswith("gate_") for k in record))

        kept = [line for line in lines if not later(line)]
        if len(kept) != len(lines):
            _write_text_atomic(self.metrics, "".join(kept))


def _write_json(path: Path, data: dict) -> None:
    _write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _write_text_atomic(path: Path, text: str) -> None:
    """Replace path's text all at once: written under a temporary name beside it, then renamed."""
    from soragen.video_io import temporary_path

    tmp = temporary_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _cpu_only() -> bool:
    """No GPU or other accelerator: processes started by `accelerate launch` then train together over gloo."""
    try:
        return torch.accelerator.current_accelerator() is None
    except RuntimeError:  # torch 2.6 raises on CPU-only builds
        return True


def _make_accelerator(root: Path, mixed_precision: str):
    """The stage's Accelerator, with train.mixed_precision (its autocast wraps the forward of every prepared model)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    shared = AcceleratorState._shared_state  # (reading it does not create the state, as AcceleratorState() would)
    if shared and shared.get("_mixed_precision") != mixed_precision:
        # An earlier run in this process trained at another precision: accelerate keeps one per process unless its
        # state is cleared (the process group, in PartialState, stays).
        AcceleratorState._reset_state()
    log_with = "tensorboard" if importlib.util.find_spec("tensorboard") is not None else None
    try:
        acc = Accelerator(cpu=_cpu_only(), log_with=log_with, mixed_precision=mixed_precision,
                          project_config=ProjectConfiguration(project_dir=str(root), logging_dir=str(root / "tb")))
    except ValueError as e:  # e.g. a device without autocast in that precision
        if mixed_precision == "no":
            raise
        raise UserError(f"train.mixed_precision '{mixed_precision}': {str(e).rstrip('.')}; 'no' works everywhere") from None
    if mixed_precision != "no" and not acc.native_amp:  # accelerate would train in fp32 without a word
        raise UserError(f"train.mixed_precision '{mixed_precision}' is not available on this run's device "
                        f"({acc.device}); use 'no'" + (" or 'bf16'" if mixed_precision == "fp16" else ""))
    if log_with:
        acc.init_trackers("soragen")
    return acc


def _end_stage(acc) -> None:
    """Wait until the main process has written the stage's results (the next stage reads them), then close
    the stage's trackers. Unlike `acc.end_training`, this keeps the process group for the next stage."""
    acc.wait_for_everyone()
    for tracker in acc.trackers:
        tracker.finish()


class _StageLog:
    """Checkpoints, metric lines (with a throughput) and progress of a training stage.

    The stage's state is accelerate's, plus whatever `save_extra(tmp) -> meta fields` writes
    beside it and `load_extra(checkpoint, meta)` reads back (the DiT's EMA). `extra_metrics()`
    adds measures to each logged line; a checkpoint is also written at step `end` (a run
    stopped early by train.dit.stop_after).
    """

    def __init__(self, acc, run: RunFolder, cfg: Config, stage: str, total: int, batch: int, progress: Progress | None,
                 *, end: int | None = None, rate: str = "clips_per_s",
                 extra_metrics: Callable[[], dict[str, float]] | None = None,
                 save_extra: Callable[[Path], dict[str, Any]] | None = None,
                 load_extra: Callable[[Path, dict[str, Any]], None] | None = None, lr_sched=None):
        self.acc, self.run, self.cfg, self.stage, self.total, self.batch, self.progress = acc, run, cfg, stage, total, batch, progress
        self.lr_sched = lr_sched
        self.end = total if end is None else end
        self.rate, self.extra_metrics, self.save_extra, self.load_extra = rate, extra_metrics, save_extra, load_extra
        self.t_last, self.n_last = time.perf_counter(), 0

    def resume(self) -> int:
        """Load the stage's newest checkpoint, if any; returns its step (0 without one)."""
        step = 0
        if (ckpt := self.run.latest(self.stage)) is not None:
            from safetensors import SafetensorError

            def damaged(e: Exception) -> CheckpointMismatch:
                return CheckpointMismatch(
                    f"checkpoint {ckpt} is damaged ({first_line(e)}); delete it to resume from the one before it, "
                    f"or train the {self.stage} stage anew in another train.output_dir")

            configured = _learning_rates(self.lr_sched)
            if _is_carried(ckpt):
                step = self._resume_carried(ckpt, damaged)
                _keep_learning_rates(self.lr_sched, configured, self.stage)
                if self.acc.is_main_process:
                    self.run.forget_metrics(self.stage, after=step)
                self.t_last, self.n_last = time.perf_counter(), step
                return step
            scaler = self.acc.scaler  # fp16's loss scaler (GPU), absent from checkpoints written in bf16 or fp32
            if scaler is not None and not (ckpt / "state" / "scaler.pt").is_file():
                self.acc.scaler = None  # the checkpoint has no scale to load: the scaler starts afresh
            try:
                self.acc.load_state(str(ckpt / "state"))
            except (SafetensorError, EOFError) as e:  # a file cut short or overwritten
                raise damaged(e) from None
            except Exception as e:
                if _cut_short(e):
                    raise damaged(e) from None
                if not isinstance(e, (RuntimeError, ValueError, KeyError, FileNotFoundError)):
                    raise
                raise CheckpointMismatch(  # other model sizes, parts or groups
                    f"checkpoint {ckpt} does not fit this run's settings ({first_line(e)}); resume with the settings "
                    f"it was written with, or train the {self.stage} stage anew in another train.output_dir") from None
            finally:
                self.acc.scaler = scaler
            try:
                meta = json.loads((ckpt / "meta.json").read_text())
                step = meta["step"]
                if self.load_extra is not None:
                    self.load_extra(ckpt, meta)
            except (SafetensorError, OSError, ValueError, KeyError, TypeError, IndexError) as e:
                raise damaged(e) from None
            log.info("resumed the %s stage from %s (step %d)", self.stage, ckpt, step)
            _keep_learning_rates(self.lr_sched, configured, self.stage)
            if self.acc.is_main_process:
                self.run.forget_metrics(self.stage, after=step)
        self.t_last, self.n_last = time.perf_counter(), step
        return step

    def _resume_carried(self, ckpt: Path, damaged: Callable[[Exception], Exception]) -> int:
        """Resume from a checkpoint carried to another machine (scripts/carry_run.sh): the models' weights only,
        stored as float16. They load into this run's models; the optimizer starts afresh (its moments are not
        carried), the learning-rate schedule goes on from the checkpoint's step, and load_extra gets the meta."""
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        try:
            meta = json.loads((ckpt / "meta.json").read_text())
            step = int(meta["step"])
            for i, model in enumerate(self.acc._models):  # the models accelerate saves, in its file order
                name = "model.safetensors" if i == 0 else f"model_{i}.safetensors"  # float16, cast on loading;
                load_model(self.acc.unwrap_model(model), str(ckpt / "state" / name))  # tied weights saved once
            if self.load_extra is not None:
                self.load_extra(ckpt, meta)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise damaged(e) from None
        except RuntimeError as e:  # load_state_dict: other sizes or parts
            raise CheckpointMismatch(
                f"carried checkpoint {ckpt} does not fit this run's settings ({first_line(e)}); resume with the "
                f"settings it was written with, or train the {self.stage} stage anew in another train.output_dir") from None
        if self.lr_sched is not None:
            with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose here
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(step):
                    self.lr_sched.step()
        log.info("resumed the %s stage from the carried checkpoint %s (step %d; its optimizer starts afresh)",
                 self.stage, ckpt, step)
        return step

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        """After optimizer step `step`: the metric line (every log_every), progress, the checkpoint (every checkpoint_every)."""
        acc, cfg = self.acc, self.cfg
        if acc.is_main_process:
            if step % cfg.train.log_every == 0 or step in (self.total, self.end):
                now = time.perf_counter()
                metrics[self.rate] = (step - self.n_last) * self.batch * acc.num_processes / (now - self.t_last)
                self.t_last, self.n_last = now, step
                if self.extra_metrics is not None:
                    metrics.update(self.extra_metrics())
                self.run.log_metrics({"stage": self.stage, "step": step, "time": time.time(), **metrics})
                acc.log({f"{self.stage}/{k}": v for k, v in metrics.items()}, step=step)
            if self.progress:
                self.progress(self.stage, step, self.total, metrics)
        if step % cfg.train.checkpoint_every == 0 or step in (self.total, self.end):
            acc.wait_for_everyone()
            if acc.is_main_process:
                self.run.save_checkpoint(self.stage, step, lambda tmp: self._save(tmp, step), cfg.train.keep_checkpoints)

    def _save(self, tmp: Path, step: int) -> None:
        self.acc.save_state(str(tmp / "state"), safe_serialization=True)
        extra = self.save_extra(tmp) if self.save_extra is not None else {}
        _write_json(tmp / "meta.json", {"stage": self.stage, "step": step, **extra, "config": self.cfg.to_dict()})


def carry_checkpoint(ckpt: Path, dest: Path) -> Path:
    """Write a checkpoint's weights-only copy for carrying a half-trained phase to another machine
    (scripts/carry_run.sh): each model's weights as float16 and the meta marked carried; no optimizer moments,
    EMA copy, RNG or scheduler state, about a quarter of the checkpoint. `--resume` takes it as _StageLog does.
    Written under a temporary name, then renamed."""
    from safetensors.torch import load_file, save_file

    ckpt, dest = Path(ckpt), Path(dest)
    meta = json.loads((ckpt / "meta.json").read_text())
    part = dest.with_name(dest.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    (part / "state").mkdir(parents=True)
    for weights in sorted((ckpt / "state").glob("model*.safetensors")):
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
        save_file(tensors, str(part / "state" / weights.name))
    _write_json(part / "meta.json", {**meta, "carried": True})
    shutil.rmtree(dest, ignore_errors=True)
    part.rename(dest)
    return dest


def _is_carried(ckpt: Path) -> bool:
    """Whether a checkpoint is a carried one (weights only; scripts/carry_checkpoint.py wrote it)."""
    try:
        return bool(json.loads((ckpt / "meta.json").read_text()).get("carried"))
    except (OSError, ValueError, AttributeError):
        return False  # the full resume names what is wrong with it


def _learning_rates(lr_sched) -> list[float] | None:
    """The peak learning rate of each parameter group, as the run's settings give them."""
    if lr_sched is None:
        return None
    inner = getattr(lr_sched, "scheduler", lr_sched)  # accelerate's AcceleratedScheduler wraps torch's
    return [float(group["initial_lr"]) for group in inner.optimizer.param_groups]


def _keep_learning_rates(lr_sched, configured: list[float] | None, stage: str) -> None:
    """After a resume, the run's learning rates rather than the checkpoint's: accelerate restores the scheduler's
    base rates with its state, so `--resume --set train.dit.lr=...` would otherwise train on at the old ones."""
    if lr_sched is None or configured is None:
        return
    inner = getattr(lr_sched, "scheduler", lr_sched)
    restored = [float(x) for x in inner.base_lrs]
    if restored != configured:
        log.info("the %s stage's learning rates: %s from the settings (its checkpoint had %s)", stage,
                 configured, restored)
    inner.base_lrs = list(configured)
    for group, lr, factor in zip(inner.optimizer.param_groups, configured, inner.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(inner.last_epoch)
    inner._last_lr = [group["lr"] for group in inner.optimizer.param_groups]


def _cut_short(e: Exception) -> bool:
    """Whether torch's reading of a file failed because the file is damaged (cut short, not a zip archive, or
    not the data torch's safe loader expects)."""
    text = str(e)
    return type(e).__name__ == "UnpicklingError" or "PytorchStreamReader" in text or "central directory" in text


def _cosine(optimizer, warmup: int, total: int):
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _clips_to_tensor(frames: list[np.ndarray]) -> torch.Tensor:
    """uint8 clips [T, H, W, 3] -> floats [B, 3, T, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.stack(frames)).float()  # (B, T, H, W, 3)
    return (x / 127.5 - 1.0).permute(0, 4, 1, 2, 3).contiguous()  # (B, 3, T, H, W)


# ---------------------------------------------------------------------------
# Stage 1: the VAE
# ---------------------------------------------------------------------------


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, object_weight: float, edge_weight: float
                        ) -> tuple[torch.Tensor, dict[str, float]]:
    """Object-weighted L1 + L2 and edge (image-gradient L1) terms of frames recon vs x [B, 3, T, H, W] in [-1, 1]."""
    weight = 1.0 + object_weight * (x.amax(dim=1, keepdim=True) > -0.9).float()  # (B, 1, T, H, W): objects count more
    err = recon - x
    l1 = (weight * err.abs()).mean()
    l2 = (weight * err.square()).mean()
    edge = (torch.diff(recon, dim=-1) - torch.diff(x, dim=-1)).abs().mean() + (
        torch.diff(recon, dim=-2) - torch.diff(x, dim=-2)
    ).abs().mean()
    loss = l1 + l2 + edge_weight * edge
    mse = err.square().mean().item()
    return loss, {"l1": l1.item(), "edge": edge.item(), "psnr": 10 * math.log10(4.0 / max(mse, 1e-10))}


def vae_loss(vae, x: torch.Tensor, cfg) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction terms plus the KL term (and the shape separation) for frames x [B, 3, T, H, W]."""
    recon, mean, logvar = vae(x)
    loss, metrics = reconstruction_loss(recon, x, cfg.object_weight, cfg.edge_weight)
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
    loss = loss + cfg.kl_weight * kl
    if cfg.shape_separation > 0:  # x holds (clips, twins, backgrounds)
        separation, extra = separation_loss(mean, cfg.shape_separation_target)
        loss = loss + cfg.shape_separation * separation
        metrics |= extra
    return loss, {"loss": loss.item(), **metrics, "kl": kl.item()}


def separation_loss(mean: torch.Tensor, target: float) -> tuple[torch.Tensor, dict[str, float]]:
    """relu(target - shape distance / object energy) over encoder means [3n, C, K, h, w] ordered
    (clips, their shape twins, their backgrounds); rows whose twin is the clip itself are left out."""
    clip, twin, background = mean.chunk(3)
    shape = (clip - twin).square().sum(dim=(1, 2, 3, 4))  # (n,)
    # The object's own energy only sets the scale: with a gradient through it the encoder could raise
    # the ratio by drawing objects closer to the empty frame instead of shapes further from each other.
    energy = (clip - background).square().sum(dim=(1, 2, 3, 4)).detach().clamp(min=1e-8)  # (n,)
    ratio = shape / energy
    keep = shape > 1e-12  # a clip whose objects all keep their shape has nothing to separate
    if not keep.any():
        return mean.sum() * 0.0, {}
    ratio = ratio[keep]
    return F.relu(target - ratio).mean(), {"separation": ratio.median().item()}


def twin_batch(source, rng: np.random.Generator, scenes: int, num_frames: int) -> torch.Tensor:
    """[3 * scenes, 3, T, H, W]: the scenes' clips, then their shape twins, then their backgrounds
    (the order `separation_loss` reads), from ShapesSource.sample_twins."""
    triples = [source.sample_twins(rng, num_frames) for _ in range(scenes)]
    return _clips_to_tensor([triple[part] for part in range(3) for triple in triples])


def shapes_options_off(cfg: Config) -> Config:
    """cfg with the Shapes World's own training options switched off, each with a warning, when the
    data is something else (configs/default.yaml on a user's dataset), and a warning for the renderer's
    draw settings set away from their defaults; cfg itself on Shapes World data."""
    if cfg.data.kind == "shapes":
        return cfg
    drawn = [f"data.{k} ({getattr(cfg.data, k)})" for k in ("long_fraction", "max_start_seconds", "chinese_fraction",
                                                             "two_object_fraction")
             if getattr(cfg.data, k) != type(cfg.data).model_fields[k].default]
    if drawn:  # the renderer's draw settings: a manifest's clips and captions are read as they are
        log.warning("%s set but not used: they draw Shapes World clips (this run has data.kind: %s)",
                    ", ".join(drawn), cfg.data.kind)
    vae, dit = cfg.train.vae, cfg.train.dit
    for option, value, why in (("train.vae.shape_separation", vae.shape_separation, "it renders each scene's shape twin"),
                               ("train.dit.shape_weight", dit.shape_weight, "the renderer knows where shapes show"),
                               ("train.dit.twin_rows", dit.twin_rows, "it renders each clip's shape twin"),
                               ("train.dit.text_binding", dit.text_binding, "it reads each caption's objects")):
        if value > 0:
            log.warning("%s is off for this run: %s, so it needs data.kind: shapes (this run has data.kind: %s)",
                        option, why, cfg.data.kind)
    train = cfg.train.model_copy(update={"vae": vae.model_copy(update={"shape_separation": 0.0}),
                                         "dit": dit.model_copy(update={"shape_weight": 0.0, "twin_rows": 0,
                                                                       "text_binding": 0.0})})
    return cfg.model_copy(update={"train": train})


def train_vae(cfg: Config, run: RunFolder, resume: bool, progress: Progress | None) -> None:
    """Stage 1: train the VAE on clips of the data source; writes run/vae."""
    from soragen.data.clips import make_source
    from soragen.model_io import WEIGHTS, load_weights, save_file_atomic
    from soragen.vae import VideoVAE

    t = cfg.train.vae
    acc = _make_accelerator(run.root, cfg.train.mixed_precision)
    torch.manual_seed(cfg.seed)
    vae = VideoVAE(cfg.vae)
    if t.init_model is not None:
        load_weights(vae, _finished_vae(t.init_model, "train.vae.init_model"))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=t.lr, weight_decay=0.0)
    scheduler = _cosine(optimizer, warmup=min(100, t.steps // 10), total=t.steps)
    vae, optimizer, scheduler = acc.prepare(vae, optimizer, scheduler)
    source = make_source(cfg.data, (cfg.video.height, cfg.video.width))
    stage = _StageLog(acc, run, cfg, "vae", t.steps, t.batch_size, progress, lr_sched=scheduler)
    step = stage.resume() if resume else 0
    rng = np.random.default_rng([cfg.seed, step, acc.process_index])
    vae.train()
    while step < t.steps:
        if t.shape_separation > 0:
            x = twin_batch(source, rng, t.batch_size // 3, t.clip_frames).to(acc.device)
        else:
            x = _clips_to_tensor([source.sample(rng, t.clip_frames).frames for _ in range(t.batch_size)]).to(acc.device)
        loss, metrics = vae_loss(vae, x, t)
        optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        stage.after_step(step, metrics)
    acc.wait_for_everyone()
    if acc.is_main_process:
        model = acc.unwrap_model(vae)
        run.vae.mkdir(parents=True, exist_ok=True)
        if cfg.data.kind == "shapes" and cfg.train.vae_gate_clips:
            gate = vae_gate(cfg, model.eval(), clips=cfg.train.vae_gate_clips)
            _write_json(run.vae / "gate.json", gate)
            run.log_metrics({"stage": "vae", "step": step, "time": time.time(), **{f"gate_{k}": v for k, v in gate.items()}})
            log.info("VAE reconstructions scored by the detector: %s", gate)
        # The weights last: a run killed before them resumes the stage from its last checkpoint, gate and all.
        _write_text_atomic(run.vae / "config.json", cfg.vae.model_dump_json(indent=2) + "\n")
        save_file_atomic(model.state_dict(), run.vae / WEIGHTS)
    _end_stage(acc)


@torch.no_grad()
def vae_gate(cfg: Config, vae, clips: int = 96, seconds: float = 4.0) -> dict[str, Any]:
    """Reconstruct fresh Shapes World clips and score them with the detector: the VAE's ceiling."""
    from soragen.data import shapes
    from soragen.evaluation.detector import score_video
    from soragen.vae import frames_for, latent_frames_for

    f = cfg.vae.temporal_compression
    n = frames_for(latent_frames_for(1 + f * math.ceil((seconds * shapes.FPS - 1) / f), f), f)
    rng = np.random.default_rng(12345)
    tally: dict[str, list[bool]] = {}
    for _ in range(clips):
        scene = shapes.sample_scene(rng, held_out=bool(rng.random() < 0.25))
        text = shapes.caption(scene, rng)
        frames = shapes.render(scene, n)
        mean, _ = vae.encode(_clips_to_tensor([frames]))
        recon = ((vae.decode(mean)[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()
        score = score_video(recon, text, fps=shapes.FPS)
        tally.setdefault("all_correct", []).append(bool(score["all_correct"]))
        for obj in score["objects"]:
            for key in ("colour", "shape", "size", "direction"):
                if obj.get(key) is not None:
                    tally.setdefault(key, []).append(bool(obj[key]))
    return {key: float(np.mean(v)) for key, v in tally.items()} | {"clips": clips}


def _finished_vae(name: str, setting: str) -> Path:
    """The VAE weights a setting names: a model folder's, or a run folder's (its model's VAE when it has
    written one, else its VAE stage's)."""
    from soragen.model_io import WEIGHTS, is_run_folder, resolve_model

    folder = Path(name).expanduser()
    if is_run_folder(folder):
        stage = RunFolder(folder).vae / WEIGHTS
        path = next((p for p in (folder / "model" / "vae" / WEIGHTS, stage) if p.is_file()), None)
        if path is None:
            raise UserError(f"{setting}: the run {folder} has no finished VAE stage ({stage} is missing)")
        return path
    try:
        path = resolve_model(name) / "vae" / WEIGHTS
    except UserError as e:
        raise UserError(f"{setting}: {e}") from None
    if not path.is_file():
        raise UserError(f"{setting}: {path} is missing; give a model folder or a run folder with a trained VAE")
    return path


def load_trained_vae(cfg: Config, run: RunFolder):
    """The VAE of stage 1 (run/vae) or of `train.vae_model`, in eval mode."""
    from soragen.model_io import load_weights
    from soragen.vae import VideoVAE

    vae = VideoVAE(cfg.vae)
    load_weights(vae, vae_weights(cfg, run))
    return vae.eval().requires_grad_(False)


def vae_weights(cfg: Config, run: RunFolder) -> Path:
    """The weights file of the VAE the DiT stage encodes with: run/vae or `train.vae_model`'s."""
    from soragen.model_io import WEIGHTS

    if cfg.train.vae_model is not None:
        return _finished_vae(cfg.train.vae_model, "train.vae_model")
    path = run.vae / WEIGHTS
    if not path.is_file():
        raise UserError(f"no trained VAE in {run.vae}; run the 'vae' stage first (train.stages) or set train.vae_model")
    return path


# ---------------------------------------------------------------------------
# Stage 2: the latent cache, then the DiT with the small T5
# ---------------------------------------------------------------------------


def build_latent_cache(cfg: Config, run: RunFolder, vae, progress: Progress | None) -> dict[str, Any]:
    """Encode cfg.data.clips clips once (posterior means); returns latents, captions and the per-channel stats."""
    from safetensors.torch import load_file

    from soragen.model_io import save_file_atomic

    captions_path = run.latents.with_suffix(".json")
    weights = vae_weights(cfg, run)
    digest, dataset = _cache_digest(cfg, weights), _dataset_digest(cfg)
    if run.latents.is_file() and captions_path.is_file():
        try:
            meta = json.loads(captions_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):  # cut short (written in place before session 35)
            meta = {"config_digest": None}
        # A cache written before caches recorded their dataset has no "dataset" to compare, and its key holds the
        # manifest's folder as the run was given it: it stays valid while that matches.
        if (meta.get("config_digest") == digest and meta.get("dataset") == dataset) or (
                meta.get("config_digest") == _cache_digest(cfg, weights, with_path=True)
                and meta.get("dataset", dataset) == dataset):
            tensors = load_file(str(run.latents))
            return {"latents": tensors["latents"], "captions": meta["captions"], "continues": meta["continues"]}
        log.warning("latent cache %s was built for another config or dataset; rebuilding it", run.latents)
    z, captions, continues = _encode_cache_clips(cfg, vae, progress, "encode")  # (N, C, K, h, w)
    save_file_atomic({"latents": z}, run.latents)
    _write_json(captions_path, {"config_digest": digest, "dataset": dataset, "captions": captions, "continues": continues})
    return {"latents": z, "captions": captions, "continues": continues}


def _encode_cache_clips(cfg: Config, vae, progress: Progress | None, label: str, twin: bool = False
                        ) -> tuple[torch.Tensor, list[list[str]], list[bool]]:
    """Draw the latent cache's cfg.data.clips clips (its own random stream, so every cache of a run
    holds the same clips row for row) and encode each, or with `twin` its shape twin, 16 at a time:
    posterior means (N, C, K, h, w) float16, the clips' caption variants and `continues` flags."""
    from soragen.data.clips import make_source
    from soragen.vae import frames_for

    d = cfg.data
    source = make_source(d, (cfg.video.height, cfg.video.width))
    rng = np.random.default_rng([cfg.seed, 1234])
    num_frames = frames_for(d.clip_latent_frames, cfg.vae.temporal_compression)
    latents, captions, continues = [], [], []
    with torch.no_grad():
        for start in range(0, d.clips, 16):
            clips = [source.sample(rng, num_frames, twin=True) if twin else source.sample(rng, num_frames)
                     for _ in range(min(16, d.clips - start))]
            mean, _ = vae.encode(_clips_to_tensor([c.twin if twin else c.frames for c in clips]))  # (b, C, K, h, w)
            latents.append(mean.half())
            captions += [list(c.captions) for c in clips]
            continues += [c.continues for c in clips]
            if progress:
                progress(label, start + len(clips), d.clips, {})
    return torch.cat(latents), captions, continues


def _read_cache(path: Path, digest: str, key: str) -> torch.Tensor | None:
    """Tensor `key` of a cache file written for `digest` (its metadata), else None (missing or stale)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        if (handle.metadata() or {}).get("config_digest") == digest:
            return handle.get_tensor(key)
    log.warning("%s was built for another config; rebuilding it", path)
    return None


def build_shape_cues(cfg: Config, run: RunFolder, progress: Progress | None) -> torch.Tensor:
    """The shape cue of every cached clip at latent resolution: (N, K, h, w) float16 in [0, 1].

    Replays the latent cache's draws (the same clips, in the same order, without the VAE) and
    pools `shapes.shape_cue` onto the latent grid: the mean over each latent pixel's area, the
    most over the frames of each latent frame (the first latent frame holds frame 0 alone).
    """
    from soragen.data.clips import ShapesSource
    from soragen.model_io import save_file_atomic
    from soragen.vae import frames_for

    if cfg.data.kind != "shapes":
        raise UserError(f"train.dit.shape_weight needs data.kind: shapes (the renderer knows where shapes show), "
                        f"got data.kind: {cfg.data.kind}")
    digest = _cache_digest(cfg)
    if (cues := _read_cache(run.shape_cues, digest, "cues")) is not None:
        return cues
    d, f, s = cfg.data, cfg.vae.temporal_compression, cfg.vae.spatial_compression
    source = ShapesSource(d)
    rng = np.random.default_rng([cfg.seed, 1234])  # _encode_cache_clips's stream
    num_frames = frames_for(d.clip_latent_frames, f)
    cues = []
    for i in range(d.clips):
        cue = torch.from_numpy(source.sample(rng, num_frames, shape_cue=True).shape_cue)  # (T, H, W)
        cue = F.avg_pool2d(cue[:, None], s)[:, 0]  # (T, h, w)
        later = cue[1:].unflatten(0, (-1, f)).amax(dim=1)  # (K - 1, h, w)
        cues.append(torch.cat([cue[:1], later]).half())  # (K, h, w)
        if progress and (i + 1) % 100 == 0:
            progress("shape cues", i + 1, d.clips, {})
    cues = torch.stack(cues)  # (N, K, h, w)
    save_file_atomic({"cues": cues}, run.shape_cues, metadata={"config_digest": digest})
    return cues


def build_twin_latents(cfg: Config, run: RunFolder, vae, progress: Progress | None) -> torch.Tensor:
    """The shape twin of every cached clip, encoded: (N, C, K, h, w) float16 posterior means, row for
    row beside the latent cache (the same draws, each scene's twin rendered at the same times:
    `shapes.shape_twin`)."""
    from soragen.model_io import save_file_atomic

    if cfg.data.kind != "shapes":
        raise UserError(f"train.dit.twin_rows needs data.kind: shapes (the renderer draws each scene's shape twin), "
                        f"got data.kind: {cfg.data.kind}")
    digest = _cache_digest(cfg, vae_weights(cfg, run))
    if (z := _read_cache(run.twin_latents, digest, "latents")) is not None:
        return z
    z, _, _ = _encode_cache_clips(cfg, vae, progress, "encode twins", twin=True)
    save_file_atomic({"latents": z}, run.twin_latents, metadata={"config_digest": digest})
    return z


def _dataset_digest(cfg: Config) -> str | None:
    """What a manifest's latent cache depends on beyond the config: the records, and each video's size and
    time (a dataset edited in place); None for the Shapes World, drawn from the config's seed alone."""
    import hashlib

    from soragen.data.clips import MANIFEST, read_manifest

    if cfg.data.kind != "manifest":
        return None
    folder = Path(cfg.data.path)
    stats = []
    for rec in read_manifest(folder):
        try:
            st = (folder / rec["path"]).stat()
            stats.append([st.st_size, st.st_mtime_ns])
        except OSError:  # missing: the cache's encoding says so
            stats.append(None)
    return hashlib.sha256((folder / MANIFEST).read_bytes() + json.dumps(stats).encode()).hexdigest()[:16]


def _cache_digest(cfg: Config, weights: Path | None = None, *, with_path: bool = False) -> str:
    """What a cache of the run's clips depends on: data, VAE settings and seed, and for latents the
    VAE encoder's weights, wherever they are read from (a VAE retrained in the same run folder makes
    its latent cache stale; a run on the same VAE as train.vae_model may reuse a copy). A setting added
    later is left out at its default, which draws what was drawn before it, so older caches stay valid.
    A manifest's folder is left out (`_dataset_digest` follows its content, however the path is written:
    relative, or absolute in the run's config.yaml), but with `with_path`, the key of caches written before."""
    import hashlib

    data = cfg.data.model_dump(exclude={"two_object_fraction"} if cfg.data.two_object_fraction == 0.5 else set())
    if cfg.data.kind == "manifest" and not with_path:
        data["path"] = None
    key = json.dumps({"data": data, "vae": cfg.vae.model_dump(exclude={"latent_mean", "latent_std", "latent_scale"}),
                      "seed": cfg.seed}, sort_keys=True, default=str)
    if weights is not None:  # the encoder's tensors only: a fine-tuned decoder leaves the latents as they are
        from safetensors import safe_open

        h = hashlib.sha256()
        with safe_open(str(weights), framework="pt") as handle:
            for name in sorted(k for k in handle.keys() if not k.startswith("decoder.")):
                h.update(name.encode())
                h.update(handle.get_tensor(name).float().numpy().tobytes())
        key += h.hexdigest()
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def latent_stats(z: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of latents [N, C, K, h, w]."""
    zf = z.float().transpose(0, 1).reshape(z.shape[1], -1)  # (C, N*K*h*w)
    return tuple(zf.mean(1).tolist()), tuple(zf.std(1).clamp(min=1e-3).tolist())


def sample_windows(
    rng: np.random.Generator, continues: list[bool], num_clips: int, clip_frames: int, t, batch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pick (clip index, window start, context length) for a batch of training windows.

    Text-to-video windows start at latent 0 with no context. Continuation windows get
    1..max_context context frames; clips cut from long trajectories (whose caption no
    longer describes the first frame) always get context and start after latent 0, so
    every frame is a whole group of the temporal compression, as in a long video.
    """
    idx = rng.integers(0, num_clips, size=batch)
    starts = np.zeros(batch, dtype=np.int64)
    ctx = np.zeros(batch, dtype=np.int64)
    last = clip_frames - t.window
    for i, k in enumerate(idx):
        if continues[k] or rng.random() < t.context_fraction:
            ctx[i] = rng.integers(1, t.max_context + 1)
            starts[i] = rng.integers(1 if last >= 1 else 0, last + 1)
    return idx, starts, ctx


CONTRAST_TEMPERATURE = 0.1  # a swapped caption 10% worse than the true one is one logit of evidence


@dataclass(frozen=True)
class SwappedCaptions:
    """Rows of a training batch to predict a second time from captions with a word swapped (a contrast)."""

    rows: torch.Tensor  # (R,) batch rows, all without context frames
    text: torch.Tensor  # (R, L, D) the swapped captions, encoded
    mask: torch.Tensor  # (R, L)
    timesteps: torch.Tensor  # (R, 2) each row is drawn at one timestep in [lo, hi)


@dataclass(frozen=True)
class TwinInputs:
    """Rows of a training batch noised from other latents than those they must predict: moved towards their shape
    twin's (train.dit.twin_rows), or the DiT's own for redrawn targets (train.dit.redraw_rows)."""

    rows: torch.Tensor  # (R,) batch rows, all without context frames, with a caption, not contrast rows
    x0: torch.Tensor  # (R, C, T, h, w) the latents the rows' inputs are noised from (moved to)
    span: tuple[int, int]  # each row is drawn at one timestep in [lo, hi)
    share: float | None = None  # how far each row's input is moved to x0; None: uniform in [0, 1] per row
    keep: torch.Tensor | None = None  # (R, T) bool: frames with a target (None: all)


def twin_inputs(twins: torch.Tensor, idx: np.ndarray, starts: np.ndarray, window: int, prompts: list[str],
                n_ctx: np.ndarray, limit: int, span: tuple[int, int], skip: Sequence[int] = ()) -> TwinInputs | None:
    """The first `limit` rows of a batch without context, with a caption and not in `skip`, and their
    twins' windows cut from `twins` (N, C, K, h, w) as the batch's were."""
    rows = [i for i in range(len(prompts)) if n_ctx[i] == 0 and prompts[i] and i not in skip][:limit]
    if not rows:
        return None
    x0 = torch.stack([twins[idx[i], :, starts[i] : starts[i] + window] for i in rows]).float()
    return TwinInputs(torch.tensor(rows), x0, tuple(span))


def swapped_rows(prompts: list[str], n_ctx: np.ndarray, limit: int, swap: Callable[[str], str | None] | None = None,
                 skip: Sequence[int] = ()) -> tuple[list[int], list[str]]:
    """The first `limit` rows without context (and not in `skip`) whose caption `swap` changes, and those
    captions swapped; `swap` defaults to the Shapes World direction swap (left <-> right, up <-> down). A swap
    that names a held-out combination (magenta moving up -> down, cyan circle -> square) is not used: those
    never appear in training data, as negatives neither."""
    from soragen.data.shapes import names_held_out, swap_directions

    swap = swap or swap_directions
    rows, texts = [], []
    for i, prompt in enumerate(prompts):
        other = swap(prompt) if n_ctx[i] == 0 and i not in skip else None
        if other is not None and len(rows) < limit and not names_held_out(other):
            rows.append(i)
            texts.append(other)
    return rows, texts


def contrast_batch(text_encoder, prompts: list[str], n_ctx: np.ndarray, t, num_train: int, skip: Sequence[int] = ()
                   ) -> tuple[SwappedCaptions | None, list[tuple[str, float, int]]]:
    """The contrast rows of a batch (not in `skip`): direction rows (t >= direction_contrast_min_t), then shape
    rows (t in shape_contrast_t); and per contrast (name, weight, how many rows) in that order."""
    from soragen.data.shapes import swap_shapes

    groups, rows, texts, ranges = [], [], [], []
    specs = (("direction", t.direction_contrast, t.direction_contrast_rows, None, (t.direction_contrast_min_t, num_train)),
             ("shape", t.shape_contrast, t.shape_contrast_rows, swap_shapes, tuple(t.shape_contrast_t)))
    for name, weight, limit, swap, span in specs:
        if weight <= 0:
            continue
        r, x = swapped_rows(prompts, n_ctx, limit, swap, skip=rows + list(skip))
        if r:
            groups.append((name, weight, len(r)))
            rows, texts, ranges = rows + r, texts + x, ranges + [span] * len(r)
    if not rows:
        return None, []
    return SwappedCaptions(torch.tensor(rows), *text_encoder(texts), torch.tensor(ranges)), groups


class BindingProbe(torch.nn.Module):
    """train.dit.text_binding: reads, from each text token, the colour, shape, size and motion of the
    object whose words it belongs to, and how many objects the caption names (a linear map; trained
    with the run, never shipped)."""

    def __init__(self, dim: int):
        from soragen.data import shapes

        super().__init__()
        self.names = [list(shapes.PALETTE), list(shapes.SHAPES), ["small", "large", None], list(shapes.MOTIONS), [1, 2]]
        self.proj = torch.nn.Linear(dim, sum(len(n) for n in self.names))

    def labels(self, tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
        """(B, L, 5) class of each token's object per attribute, the last the caption's number of objects;
        -100 for tokens of no object (the padding, </s>, " and ", the wall phrase, an empty prompt)."""
        from soragen.data.shapes import object_spans

        batch = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length,
                          return_offsets_mapping=True)
        out = torch.full((len(prompts), max_length, len(self.names)), -100, dtype=torch.long)
        for i, (prompt, offsets) in enumerate(zip(prompts, batch["offset_mapping"])):
            objects = object_spans(prompt) if prompt else []
            spans = [(lo, hi, torch.tensor([names.index(v) for names, v in zip(
                          self.names, (spec.colour, spec.shape, spec.size, spec.motion, len(objects)))]))
                     for lo, hi, spec in objects]
            for j, (start, end) in enumerate(offsets):
                for lo, hi, classes in spans:
                    if end > start and lo <= start < hi:
                        out[i, j] = classes
        return out

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Mean cross-entropy over the attributes and the labelled tokens, and the share read right."""
        out = self.proj(tokens)
        logits = out.split([len(n) for n in self.names], dim=-1)
        # Zero times the logits keeps the probe in the graph when a batch has no object words (every caption
        # dropped), so each process of a multi-process run still has a gradient to reduce for it.
        loss, right, total = out.sum() * 0.0, 0, 0
        for k, part in enumerate(logits):
            target = labels[..., k].to(tokens.device)
            known = target >= 0
            if known.any():
                loss = loss + F.cross_entropy(part[known], target[known]) / len(logits)
                right += int((part[known].argmax(-1) == target[known]).sum())
                total += int(known.sum())
        return loss, right / max(total, 1)


def dit_loss(
    dit, scheduler, x0: torch.Tensor, text, mask, n_ctx: torch.Tensor, context_noise: int, generator,
    timestep_power: float = 1.0, sigma_data: float | None = None, frame_noise: float = 0.0,
    self_condition: bool = False, noise_correlation: float = 0.0, swapped: SwappedCaptions | None = None,
    weight: torch.Tensor | None = None, twin: TwinInputs | None = None, redrawn: TwinInputs | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v-prediction loss (Salimans & Ho 2022, eq. 9) on the frames after each sample's context.

    x0 [B, C, T, h, w] clean latents; n_ctx [B] context frames per sample (timestep in
    [0, context_noise], no loss); the other frames share one timestep t = num_train * u**(1/timestep_power).
    A share `frame_noise` of the windows draws t for each of those frames on its own instead
    (diffusion forcing, Chen et al. 2024): a frame noisier than its neighbours can only be
    predicted from them, which teaches the model to look across frames.
    With `sigma_data` (the std of x0), each frame's loss is divided by the variance of its
    v target, alpha_bar + (1 - alpha_bar) * sigma_data**2, so every noise level counts alike.
    With `self_condition`, half the batches first estimate x0 without gradients and give the
    estimate to the model as its previous one; the other half give none (zeros), as at the
    first sampler step. `noise_correlation` is sampler.noise_correlation (noise shared across frames).
    With `swapped`, its rows (windows without context) get one timestep each in their range and
    are predicted a second time from the swapped captions (their own self-conditioning estimate
    included); returns (loss, contrast, gap), per row [R]: contrast = softplus((L_true - L_swapped) /
    (CONTRAST_TEMPERATURE * L_true)), gap = (L_swapped - L_true) / L_true.
    `weight` [B, T, h, w] weighs each latent pixel's squared error (1 = plain), in the contrast too.
    With `twin`, its rows get one timestep each in its span and are noised from x0 + s * (x0_twin - x0),
    s uniform in [0, 1] per row; their target is the v whose x0 estimate is the row's own x0.
    `redrawn` rows are moved likewise, all the way (its share), and only its frames to keep count.
    """
    from soragen.sampler import draw_noise, x0_estimate

    b, _, t_frames = x0.shape[:3]
    num_train = scheduler.config.num_train_timesteps
    frame = torch.arange(t_frames)[None]  # (1, T)
    is_ctx = frame < n_ctx[:, None]  # (B, T)
    u = torch.rand((b, 1), generator=generator)
    per_frame = torch.rand((b, 1), generator=generator) < frame_noise  # (B, 1): windows with a t per frame
    u = torch.where(per_frame, torch.rand((b, t_frames), generator=generator), u)  # (B, T)
    t_main = (num_train * u ** (1.0 / timestep_power)).long().clamp(max=num_train - 1)  # (B, T)
    if swapped is not None:  # the contrast rows: one timestep in the row's range for the whole window
        lo, hi = swapped.timesteps[:, 0], swapped.timesteps[:, 1]  # (R,)
        drawn = lo + (torch.rand(len(swapped.rows), generator=generator) * (hi - lo)).long()  # (R,)
        t_main[swapped.rows] = drawn[:, None].expand(-1, t_frames)
    moved = [m for m in (twin, redrawn) if m is not None]
    for m in moved:
        lo, hi = m.span
        t_main[m.rows] = torch.randint(lo, hi, (len(m.rows), 1), generator=generator).expand(-1, t_frames)
    t_ctx = torch.randint(0, context_noise + 1, (b, 1), generator=generator)
    timesteps = torch.where(is_ctx, t_ctx, t_main)  # (B, T): one timestep per latent frame
    noise = draw_noise(x0.shape, generator, noise_correlation)  # (B, C, T, h, w)
    alpha_bar = scheduler.alphas_cumprod[timesteps].to(x0)[:, None, :, None, None]  # (B, 1, T, 1, 1)
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise  # q(x_t | x_0), DDPM eq. 4
    v = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0  # velocity target
    for m in moved:  # x_t from x0 + d, d = s (m.x0 - x0); sqrt(a) x_t - sqrt(1 - a) v' = x0 gives v' = v + a d / sqrt(1 - a)
        r, a = m.rows, alpha_bar[m.rows]
        share = torch.rand((len(r), 1, 1, 1, 1), generator=generator) if m.share is None else torch.tensor(m.share)
        shift = share.to(x0) * (m.x0.to(x0) - x0[r])  # (R, C, T, h, w)
        x_t[r] = x_t[r] + a.sqrt() * shift
        v[r] = v[r] + a / (1 - a).sqrt() * shift
    x_t, timesteps = x_t.to(x0.device), timesteps.to(x0.device)
    if swapped is not None:  # one forward over the batch and the swapped rows (one backward, as DDP wants)
        rows = swapped.rows
        x_t, timesteps = torch.cat([x_t, x_t[rows]]), torch.cat([timesteps, timesteps[rows]])
        text, mask = torch.cat([text, swapped.text]), torch.cat([mask, swapped.mask])
    if not self_condition:
        pred = dit(x_t, timesteps, text, mask)
    else:
        estimate = torch.zeros_like(x_t)  # (B, C, T, h, w): "no estimate yet"
        if torch.rand((), generator=generator) < 0.5:
            with torch.no_grad():
                first = dit(x_t, timesteps, text.detach(), mask, x_self=estimate)
            estimate = x0_estimate(scheduler, x_t, first, timesteps)  # the sampler's own conversion
        pred = dit(x_t, timesteps, text, mask, x_self=estimate)
    if swapped is not None:
        pred, pred_swapped = pred[:b], pred[b:]  # (B, ...), (R, ...)

    def frame_error(p: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        sq = (p - target).square().mean(dim=1)  # (n, T, h, w)
        return (sq if w is None else sq * w).mean(dim=(2, 3))  # (n, T)

    err = frame_error(pred, v, weight)  # (B, T)
    if swapped is not None:
        loss_true = err[rows].mean(dim=1)  # (R,): the rows have no context frames
        loss_swapped = frame_error(pred_swapped, v[rows], None if weight is None else weight[rows]).mean(dim=1)  # (R,)
        scale = CONTRAST_TEMPERATURE * loss_true.detach()
        contrast = F.softplus((loss_true - loss_swapped) / scale)  # (R,)
        gap = ((loss_swapped - loss_true) / loss_true).detach()  # (R,)
    if sigma_data is not None:
        a_main = scheduler.alphas_cumprod[t_main].to(err)  # (B, T)
        err = err / (a_main + (1 - a_main) * sigma_data**2)
    keep = ~is_ctx  # (B, T)
    for m in moved:
        if m.keep is not None:
            keep[m.rows] &= m.keep
    keep = keep.float().to(err.device)
    loss = (err * keep).sum() / keep.sum().clamp(min=1.0)
    return loss if swapped is None else (loss, contrast, gap)


def _save_vocabulary(tokenizer, folder: Path) -> None:
    """Write a tokenizer to `folder` whole or not at all: assembled in a temporary folder, renamed into place."""
    from soragen.video_io import temporary_folder

    tmp = temporary_folder(folder)
    try:
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)  # one saved before the run's first checkpoint
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _init_from_model(cfg: Config, name: str):
    """The text encoder and DiT of model folder `name`, for fine-tuning with `cfg`.

    A DiT that gains self-conditioning gets zero weights for the new input, and one that gains
    a conv head (dit.conv_head) its initial head, whose last convolution is zero: either starts as
    the model it came from.
    """
    from safetensors.torch import load_file

    from soragen.dit import DiT
    from soragen.model_io import WEIGHTS, resolve_model
    from soragen.text_encoder import TextEncoder

    folder = resolve_model(name)
    text_encoder = TextEncoder.from_pretrained(folder / "text_encoder", cfg.text_encoder.max_length,
                                               tokenizer_path=folder / "tokenizer", trainable=cfg.text_encoder.trainable)
    dit = DiT(cfg.dit, cfg.vae.latent_channels, text_encoder.dim)
    state = load_file(str(folder / "transformer" / WEIGHTS))
    weight = state.get("x_embedder.weight")
    wanted = dit.x_embedder.weight.shape
    if weight is not None and cfg.dit.self_condition and weight.shape[1] * 2 == wanted[1]:
        state["x_embedder.weight"] = torch.cat([weight, torch.zeros_like(weight)], dim=1)  # (D, 2*patch_dim)
    if dit.conv_head is not None and not any(k.startswith("conv_head.") for k in state):  # a new conv head: starts at zero
        state |= {k: v for k, v in dit.state_dict().items() if k.startswith("conv_head.")}
    try:
        dit.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"train.dit.init_model {folder}: its DiT does not match this config's dit settings "
                        f"({first_line(e)})") from None
    log.info("started the DiT and the text encoder from %s", folder)
    return text_encoder, dit


SAMPLE_PROMPTS = (
    "a large red circle moving right",
    "a small blue square moving left",
    "a yellow triangle bouncing",
    "a large green circle moving up and a small magenta box moving down",
)


def _report_long_captions(text_encoder, captions: list[str]) -> None:
    """Warn once about training captions longer than the text encoder keeps; then stop its warning per prompt
    (every batch would repeat it)."""
    lengths = [len(ids) for ids in text_encoder.tokenizer(captions, add_special_tokens=True)["input_ids"]]
    longer = sum(n > text_encoder.max_length for n in lengths)
    if longer:
        log.warning("%d of %d training captions are longer than text_encoder.max_length %d (the longest has %d tokens) "
                    "and are cut; raise text_encoder.max_length to keep them whole",
                    longer, len(lengths), text_encoder.max_length, max(lengths))
    text_encoder.warn_truncation = False


def _dit_redraw_pool(cfg: Config, run: RunFolder, vae, acc, progress: Progress | None) -> dict[str, Any]:
    """train.dit.redraw_rows: windows of train.dit.init_model redrawn (_redraw_pool, lean=False; kept in the run
    folder as dit_redraw_pool.safetensors) as the stage trains on them: targets (N, C, W, h, w), the redrawn
    frames encoded by the run's `vae`; moved (N, C, W, h, w), the DiT's own latents in the same normalization;
    keep (N, W) bool, the latent frames whose every frame has a target; captions (N strings). Only windows whose
    every caption object has a shape of train.dit.redraw_shapes (and, with train.dit.redraw_motion, moves as the
    caption says)."""
    from soragen.config import load_config
    from soragen.data.shapes import parse_caption
    from soragen.model_io import resolve_model
    from soragen.pipeline import Pipeline

    t, f = cfg.train.dit, cfg.vae.temporal_compression
    folder = resolve_model(t.init_model)
    pipe = Pipeline.from_config(load_config(None, [f"model={folder}"]))
    with acc.main_process_first():  # the main process generates; the others read its file
        pool = _redraw_pool(cfg, run.dit_redraw_pool, folder, pipe, t.redraw_windows,
                            (t.window - 1) * f + 1, t.redraw_rows, "train.dit.redraw_rows", False,
                            progress if acc.is_main_process else None)
    taken = [i for i, caption in enumerate(pool["captions"])
             if all(spec.shape in t.redraw_shapes for spec in parse_caption(caption)[0])
             and (pool["moves"][i] or not t.redraw_motion)]
    if len(taken) < t.redraw_rows:
        which = " that move as their captions say (train.dit.redraw_motion)" if t.redraw_motion else ""
        fix = ", name more shapes or set train.dit.redraw_motion=false" if t.redraw_motion else " or name more shapes"
        raise UserError(f"only {len(taken)} of the pool's redrawn windows{which} have shapes of "
                        f"train.dit.redraw_shapes {list(t.redraw_shapes)}, fewer than train.dit.redraw_rows "
                        f"{t.redraw_rows}; raise train.dit.redraw_windows{fix}")
    log.info("redraw rows from %d of the pool's %d windows (shapes %s%s)", len(taken), len(pool["captions"]),
             ", ".join(t.redraw_shapes), "; moving as captioned" if t.redraw_motion else "")
    pool = {name: pool[name][taken] for name in ("latents", "frames", "has_target")} | {
        "captions": [pool["captions"][i] for i in taken]}
    targets = []
    with torch.no_grad():
        for i in range(0, len(pool["frames"]), 8):
            x = _clips_to_tensor(list(pool["frames"][i : i + 8].numpy()))  # (b, 3, T, H, W)
            targets.append(vae.normalize(vae.encode(x)[0]).half())
        moved = vae.normalize(pipe.vae.denormalize(pool["latents"])).half()
    keep = latent_frames_with_target(pool["has_target"].bool(), f)  # (N, W)
    return {"targets": torch.cat(targets), "moved": moved, "keep": keep, "captions": pool["captions"]}


def latent_frames_with_target(has_target: torch.Tensor, f: int) -> torch.Tensor:
    """(N, 1 + (T - 1) / f) bool from (N, T) bool frames with a target: latent frame 0 stands for frame 0, latent
    frame k > 0 for frames (k - 1) f + 1 .. k f (the causal VAE), and has a target when all of them have."""
    return torch.cat([has_target[:, :1], has_target[:, 1:].unflatten(1, (-1, f)).all(dim=2)], dim=1)


def train_dit(cfg: Config, run: RunFolder, resume: bool, progress: Progress | None) -> Config:
    """Stage 2: the DiT and the small T5 on the latent cache; writes run/model. Returns the final config."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel
    from safetensors.torch import load_file

    from soragen.dit import DiT
    from soragen.model_io import save_file_atomic, save_model
    from soragen.sampler import make_scheduler
    from soragen.text_encoder import TextEncoder

    t = cfg.train.dit
    if t.contrast_from >= t.steps and (t.direction_contrast > 0 or t.shape_contrast > 0):
        log.warning("train.dit.contrast_from %d is not below train.dit.steps %d: the contrasts never start "
                    "(a fine-tune counts its own steps; set train.dit.contrast_from=0)", t.contrast_from, t.steps)
    # A resume keeps the word vocabulary its checkpoints were trained with; decided by every process before
    # the main one may write it below.
    kept = resume and run.latest("dit") is not None and (run.vocabulary / "tokenizer.json").is_file()
    acc = _make_accelerator(run.root, cfg.train.mixed_precision)
    vae = load_trained_vae(cfg, run)
    with acc.main_process_first():  # one process encodes the clips; the others read its cache
        cache = build_latent_cache(cfg, run, vae, progress if acc.is_main_process else None)
    z_all = cache["latents"]  # (N, C, K, h, w) float16
    mean, std = latent_stats(z_all)
    cfg = update(cfg, vae={"latent_mean": mean, "latent_std": std})
    vae = load_trained_vae(cfg, run)
    z_all = vae.normalize(z_all.float())  # (N, C, K, h, w): zero mean, std vae.latent_scale per channel
    captions, continues = cache["captions"], cache["continues"]  # captions: variants per clip
    cues = None
    if t.shape_weight > 0:
        with acc.main_process_first():
            cues = build_shape_cues(cfg, run, progress if acc.is_main_process else None)
    twins = None
    if t.twin_rows > 0:
        with acc.main_process_first():
            twins = build_twin_latents(cfg, run, vae, progress if acc.is_main_process else None)
        twins = vae.normalize(twins.float()).half()  # (N, C, K, h, w), as z_all (cast per batch)
    if z_all.shape[2] < t.window:
        raise UserError(f"train.dit.window {t.window} is longer than data.clip_latent_frames {z_all.shape[2]}")
    pool = _dit_redraw_pool(cfg, run, vae, acc, progress) if t.redraw_rows else None

    torch.manual_seed(cfg.seed)
    corpus = [c for variants in captions for c in variants]
    if cfg.data.kind == "shapes":  # the whole vocabulary of the grammar, in both languages, held-out words too
        from soragen.data import shapes

        corpus += shapes.vocabulary_corpus()
    if t.init_model is None:
        text_encoder = TextEncoder.from_config(cfg.text_encoder, corpus=corpus, vocabulary=run.vocabulary if kept else None)
        if cfg.text_encoder.tokenizer == "words" and cfg.text_encoder.pretrained is None and not kept and acc.is_main_process:
            _save_vocabulary(text_encoder.tokenizer, run.vocabulary)  # the checkpoints' word ids, for a resume
        dit = DiT(cfg.dit, cfg.vae.latent_channels, text_encoder.dim)
    else:
        text_encoder, dit = _init_from_model(cfg, t.init_model)
    _report_long_captions(text_encoder, [c for variants in captions for c in variants])
    train_text = cfg.text_encoder.pretrained is None and cfg.text_encoder.trainable
    params = [{"params": list(dit.parameters()), "lr": t.lr}]
    if train_text:
        params.append({"params": list(text_encoder.t5.parameters()), "lr": t.text_lr})
    trained = [p for g in params for p in g["params"]]  # what the EMA follows
    probe = None
    if t.text_binding > 0:
        probe = BindingProbe(text_encoder.dim)
        params.append({"params": list(probe.parameters()), "lr": t.text_lr})
    optimizer = torch.optim.AdamW(params, weight_decay=0.0, betas=(0.9, 0.99))
    lr_sched = _cosine(optimizer, warmup=t.warmup, total=t.steps)
    dit, optimizer, lr_sched = acc.prepare(dit, optimizer, lr_sched)
    if train_text:
        text_encoder = acc.prepare(text_encoder)
    else:  # frozen (a pretrained T5): not prepared, so neither placed nor run under the run's autocast by accelerate
        text_encoder.to(acc.device)
    if probe is not None:
        probe = acc.prepare(probe)  # after the text encoder: its weights are the checkpoint's third model
    ema = EMAModel(trained, decay=t.ema_decay, use_ema_warmup=True, power=0.75)
    noise_sched = DDPMScheduler.from_config(make_scheduler(cfg.sampler.model_copy(update={"kind": "ddpm"})).config)

    def save_ema(tmp: Path) -> dict[str, Any]:
        state = ema.state_dict()
        save_file_atomic({f"{i}": p for i, p in enumerate(state.pop("shadow_params"))}, tmp / "ema.safetensors")
        return {"ema": state}

    def load_ema(ckpt: Path, meta: dict[str, Any]) -> None:
        if meta.get("carried"):  # weights only: the average starts again from the carried weights, its step kept
            shadow = [p.detach().clone() for p in trained]
        else:
            weights = load_file(str(ckpt / "ema.safetensors"))
            shadow = [weights[f"{i}"] for i in range(len(weights))]
        ema.load_state_dict({**meta["ema"], "shadow_params": shadow})
        if ema.decay != t.ema_decay:  # the checkpoint's decay came with its state; the run's settings decide
            log.info("the EMA decay: %s from the settings (its checkpoint had %s)", t.ema_decay, ema.decay)
            ema.decay = t.ema_decay

    def gap() -> dict[str, float]:
        return text_gap(acc.unwrap_model(dit), acc.unwrap_model(text_encoder), noise_sched, z_all, captions, t,
                        cfg.sampler.noise_correlation)

    end = t.steps if t.stop_after is None else min(t.stop_after, t.steps)
    stage = _StageLog(acc, run, cfg, "dit", t.steps, t.batch_size, progress, end=end, rate="samples_per_s",
                      extra_metrics=gap, save_extra=save_ema, load_extra=load_ema, lr_sched=lr_sched)
    step = stage.resume() if resume else 0
    exported = step >= t.steps and (run.model / "soragen.yaml").is_file()  # a finished stage, resumed

    def export(folder: Path) -> None:
        """Write a model folder with the EMA weights."""
        ema.store(trained)
        ema.copy_to(trained)
        try:
            save_model(folder, cfg, acc.unwrap_model(text_encoder), vae, acc.unwrap_model(dit), make_scheduler(cfg.sampler))
        finally:
            ema.restore(trained)

    rng = np.random.default_rng([cfg.seed, step, acc.process_index])
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + step + acc.process_index)
    dit.train()
    text_encoder.train(train_text)

    def encode(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The captions' embeddings; a frozen text encoder (not prepared) under the run's autocast, fp32 out."""
        if train_text:
            return text_encoder(prompts)
        with acc.autocast():
            text, mask = text_encoder(prompts)
        return text.float(), mask

    redraw_rows = t.redraw_rows if pool is not None else 0
    while step < end:
        idx, starts, n_ctx = sample_windows(rng, continues, len(captions), z_all.shape[2], t, t.batch_size - redraw_rows)
        x0 = torch.stack([z_all[k, :, s : s + t.window] for k, s in zip(idx, starts)])  # (B - R, C, W, h, w)
        pixel_weight = None
        if cues is not None:  # (B, W, h, w)
            cue = torch.stack([cues[k, s : s + t.window] for k, s in zip(idx, starts)]).float()
            cue = torch.cat([cue, cue.new_zeros(redraw_rows, *cue.shape[1:])])  # redrawn rows: plain
            pixel_weight = (1.0 + t.shape_weight * cue).to(acc.device)
        prompts = ["" if rng.random() < t.caption_dropout else captions[k][rng.integers(len(captions[k]))] for k in idx]
        redrawn, own = None, list(range(len(idx), t.batch_size))  # the last R rows: redrawn windows, captions kept
        if pool is not None:
            chosen = torch.from_numpy(rng.choice(len(pool["captions"]), redraw_rows, replace=False))
            x0 = torch.cat([x0, pool["targets"][chosen]])
            prompts += [pool["captions"][k] for k in chosen]
            n_ctx = np.concatenate([n_ctx, np.zeros(redraw_rows, dtype=n_ctx.dtype)])
            redrawn = TwinInputs(torch.tensor(own), pool["moved"][chosen], t.redraw_t, share=1.0,
                                 keep=pool["keep"][chosen])
        x0 = x0.to(acc.device)  # (B, C, W, h, w)
        text, mask = encode(prompts)  # (B, L, D), (B, L)
        sigma_data = cfg.vae.latent_scale if t.loss_weighting == "unit_variance" else None
        swapped, groups = None, []
        if step >= t.contrast_from:
            swapped, groups = contrast_batch(encode, prompts, n_ctx, t, noise_sched.config.num_train_timesteps, skip=own)
        metrics, twin = {}, None
        if probe is not None:
            labels = acc.unwrap_model(probe).labels(acc.unwrap_model(text_encoder).tokenizer, prompts,
                                                     text.shape[1])
            binding, metrics["binding_acc"] = probe(text, labels)
            metrics["binding"] = binding.item()
        if twins is not None:
            taken = (swapped.rows.tolist() if swapped is not None else []) + own
            twin = twin_inputs(twins, idx, starts, t.window, prompts, n_ctx, t.twin_rows, t.twin_t, skip=taken)
            metrics["twin_rows"] = 0 if twin is None else len(twin.rows)
        loss = dit_loss(dit, noise_sched, x0, text, mask, torch.from_numpy(n_ctx), t.context_noise, generator,
                        t.timestep_power, sigma_data, t.frame_noise, cfg.dit.self_condition,
                        cfg.sampler.noise_correlation, swapped, pixel_weight, twin, redrawn)
        if swapped is not None:
            loss, contrast, gap = loss
            metrics["v_loss"] = loss.item()
            first = 0
            for name, weight, n in groups:
                part = slice(first, first + n)
                first += n
                loss = loss + weight * contrast[part].mean()
                prefix = "" if name == "direction" else f"{name}_"  # the direction contrast keeps its metric names
                metrics |= {f"{prefix}contrast": contrast[part].mean().item(), f"{prefix}swap_gap": gap[part].mean().item()}
        if probe is not None:
            loss = loss + t.text_binding * binding
        optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        grad_norm = acc.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        lr_sched.step()
        ema.step(trained)
        step += 1
        stage.after_step(step, {"loss": loss.item(), "grad_norm": float(grad_norm), **metrics})
        if acc.is_main_process and (step % cfg.train.sample_every == 0 or step == t.steps):
            export(run.root / "samples" / "model")
            write_samples(cfg, run, step)
    acc.wait_for_everyone()
    if acc.is_main_process:
        if step < t.steps:
            log.info("stopped at step %d of %d (train.dit.stop_after); continue with --resume", step, t.steps)
        elif exported:  # exporting again would undo what later stages did to the folder (stage 3's decoder)
            log.info("the DiT stage finished at step %d and %s holds its model; skipping stage 2", step, run.model)
        else:
            export(run.model)
    _end_stage(acc)
    return cfg


@torch.no_grad()
def text_gap(dit, text_encoder, scheduler, z_all, captions, t, noise_correlation: float = 0.0, n: int = 16,
             timestep: int = 500) -> dict[str, float]:
    """Loss with the real caption vs with "" on fixed windows at t=`timestep` (loss_text, loss_empty,
    text_gap) and the gap at t=900 (text_gap_900), where the layout is decided: the text signal."""
    from soragen.sampler import draw_noise

    was = dit.training, text_encoder.training
    dit.eval()
    text_encoder.eval()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, z_all.shape[0], (n,), generator=g)
    x0 = z_all[idx, :, : t.window]
    noise = draw_noise(x0.shape, g, noise_correlation)  # (n, C, T, h, w)
    real, empty = text_encoder([captions[i][0] for i in idx]), text_encoder([""] * n)
    out = {}
    for step, suffix in ((timestep, ""), (900, "_900")):
        a = scheduler.alphas_cumprod[step]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        v = a.sqrt() * noise - (1 - a).sqrt() * x0
        ts = torch.full((n,), step)
        losses = [F.mse_loss(dit(x_t, ts, *text), v).item() for text in (real, empty)]
        if not suffix:
            out["loss_text"], out["loss_empty"] = losses
        out["text_gap" + suffix] = losses[1] - losses[0]
    dit.train(was[0])
    text_encoder.train(was[1])
    return out


def write_samples(cfg: Config, run: RunFolder, step: int) -> None:
    """Generate the sample prompts with the EMA model just exported; score them if the data is the Shapes World."""
    from soragen.config import load_config
    from soragen.pipeline import Pipeline

    folder = run.samples / f"step-{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline.from_config(load_config(None, [f"model={run.root / 'samples' / 'model'}", "video.seconds=4"]))
    pipe.text_encoder.warn_truncation = False  # the run reported its long captions once
    scores = {}
    for i, prompt in enumerate(SAMPLE_PROMPTS):
        path = folder / f"{i}.mp4"
        pipe.generate(prompt, path, overwrite=True)
        if cfg.data.kind == "shapes":
            from soragen.data.clips import read_frames
            from soragen.evaluation.detector import score_video

            scores[prompt] = score_video(read_frames(path), prompt, fps=cfg.video.fps)
    if scores:
        _write_json(folder / "scores.json", scores)
        correct = sum(bool(s["all_correct"]) for s in scores.values())
        run.log_metrics({"stage": "dit", "step": step, "time": time.time(), "samples_all_correct": correct / len(scores)})


# ---------------------------------------------------------------------------
# Stage 3 (optional): the decoder on the DiT's own latents
# ---------------------------------------------------------------------------

DECODER_DONE = "decoder_finetune.json"  # in model/vae once stage 3 has replaced the decoder


def train_decoder(cfg: Config, run: RunFolder, resume: bool, progress: Progress | None) -> None:
    """Stage 3: fine-tune the VAE decoder of run/model on latents the DiT denoised from real clips.

    Each step encodes fresh clips, noises them to one of the sampler's last `last_steps`
    timesteps and runs the rest of the sampler with the trained DiT and the clips' captions
    (a share `clean_fraction` of steps decodes the encoder's latents instead); the decoder
    learns to map the result to the real frames. Replaces run/model/vae when done.
    """
    from soragen.config import load_config
    from soragen.data.clips import make_source
    from soragen.model_io import WEIGHTS, files_digest, portable_config, save_file_atomic
    from soragen.pipeline import Pipeline
    from soragen.sampler import denoise, draw_noise, make_scheduler

    t = cfg.train.decoder
    done_marker = run.model / "vae" / DECODER_DONE
    if not (run.model / "soragen.yaml").is_file():
        raise UserError(f"no trained model in {run.model}; the 'decoder' stage runs after the 'dit' stage")
    if resume and done_marker.is_file():
        log.info("the decoder of %s is fine-tuned; skipping stage 3", run.model)
        return
    model_cfg = load_config(None, [f"model={run.model}"])
    pipe = Pipeline.from_config(model_cfg)
    s = model_cfg.sampler
    if t.last_steps > s.steps:
        raise UserError(f"train.decoder.last_steps {t.last_steps} is more than sampler.steps {s.steps}; "
                        "lower train.decoder.last_steps or raise sampler.steps")
    vae, dit, text_encoder = pipe.vae, pipe.dit.requires_grad_(False), pipe.text_encoder.requires_grad_(False)
    vae.requires_grad_(False)
    decoder = vae.decoder.requires_grad_(True)
    acc = _make_accelerator(run.root, cfg.train.mixed_precision)
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=t.lr, weight_decay=0.0)
    lr_sched = _cosine(optimizer, warmup=min(50, t.steps // 10), total=t.steps)
    for frozen in (vae, dit, text_encoder):  # accelerate places the decoder only
        frozen.to(acc.device)
    tuned_on = files_digest([run.model / "transformer" / WEIGHTS])  # the DiT whose latents the decoder learns
    pool = None
    if t.redraw_rows:  # made by the model folder's decoder as the stage found it, before a checkpoint is loaded
        with acc.main_process_first():  # the main process generates; the others read its file
            pool = _redraw_pool(cfg, run.redraw_pool, run.model, pipe, t.redraw_windows, t.clip_frames, t.redraw_rows,
                                "train.decoder.redraw_rows", True, progress if acc.is_main_process else None)
    decoder, optimizer, lr_sched = acc.prepare(decoder, optimizer, lr_sched)
    scheduler = make_scheduler(s)
    scheduler.set_timesteps(s.steps)
    ladder = scheduler.timesteps.clone()  # (steps,): the sampler's timesteps, noisiest first
    source = make_source(cfg.data, (cfg.video.height, cfg.video.width))
    if resume:
        _forget_stale_decoder(acc, run, tuned_on)
    stage = _StageLog(acc, run, cfg, "decoder", t.steps, t.batch_size, progress, lr_sched=lr_sched,
                      save_extra=lambda tmp: {"dit_weights": tuned_on})
    step = stage.resume() if resume else 0
    rng = np.random.default_rng([cfg.seed, 3, step, acc.process_index])
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + 3 + step + acc.process_index)
    vt = cfg.train.vae
    decoder.train()
    while step < t.steps:
        clips = [source.sample(rng, t.clip_frames) for _ in range(t.batch_size - t.redraw_rows)]
        x = _clips_to_tensor([c.frames for c in clips]).to(acc.device)  # (B, 3, T, H, W)
        with torch.no_grad():
            z0 = vae.normalize(vae.encode(x)[0])  # (B, C, K, h, w): the latents the DiT works on
            k = 0 if rng.random() < t.clean_fraction else int(rng.integers(1, t.last_steps + 1))
            if k:
                prompts = ["" if c.continues else c.captions[rng.integers(len(c.captions))] for c in clips]
                text, mask = text_encoder(prompts + [s.negative_prompt] * len(clips) if s.guidance != 1.0 else prompts)
                noise = draw_noise(z0.shape, generator, s.noise_correlation)
                z_t = scheduler.add_noise(z0, noise, ladder[s.steps - k].expand(z0.shape[0]))
                z = denoise(dit, scheduler, z_t, text, mask, steps=s.steps, guidance=s.guidance,
                            generator=generator, start=s.steps - k, guidance_interval=s.guidance_interval)
            else:
                z = z0
        if pool is not None:  # the DiT's own windows, to their redrawn frames
            rows = torch.from_numpy(rng.choice(len(pool["latents"]), t.redraw_rows, replace=False))
            z = torch.cat([pool["latents"][rows].to(acc.device), z])
            x = torch.cat([_clips_to_tensor(list(pool["frames"][rows].numpy())).to(acc.device), x])
        recon = decoder(vae.denormalize(z))  # (B, 3, T, H, W)
        if pool is not None:  # frames without a target (an object not found) cost nothing
            has_target = torch.cat([pool["has_target"][rows].bool(), torch.ones(len(clips), x.shape[2], dtype=torch.bool)])
            x = torch.where(has_target[:, None, :, None, None].to(acc.device), x, recon.detach())
        loss, metrics = reconstruction_loss(recon, x, vt.object_weight, vt.edge_weight)
        optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(decoder.parameters(), 1.0)
        optimizer.step()
        lr_sched.step()
        step += 1
        stage.after_step(step, {"loss": loss.item(), **metrics, "sampler_steps": k})
    acc.wait_for_everyone()
    if acc.is_main_process:
        vae.decoder = acc.unwrap_model(decoder, keep_fp32_wrapper=False)  # its gate decodes in fp32, as generation does
        vae.eval()
        save_file_atomic(vae.state_dict(), run.model / "vae" / WEIGHTS)
        # The folder's config records this stage's settings, not those of the run that trained the DiT.
        model_cfg = model_cfg.model_copy(update={"train": model_cfg.train.model_copy(update={"decoder": t})})
        _write_text_atomic(run.model / "soragen.yaml", portable_config(model_cfg).to_yaml())
        info: dict[str, Any] = {"steps": t.steps, "last_steps": t.last_steps, "clean_fraction": t.clean_fraction}
        if pool is not None:
            info |= {"redraw_windows": t.redraw_windows, "redraw_rows": t.redraw_rows, "redrawn": len(pool["latents"])}
        if cfg.data.kind == "shapes" and cfg.train.vae_gate_clips:
            info["gate"] = vae_gate(model_cfg, vae, clips=cfg.train.vae_gate_clips)
            log.info("fine-tuned decoder, reconstructions scored by the detector: %s", info["gate"])
        _write_json(done_marker, info)
    _end_stage(acc)


REDRAW_BATCH = 4  # windows generated together for the redraw pool
REDRAW_VERSION = "1"  # of soragen.data.redraw's rules, in the pool's key: a pool redrawn by other rules is made anew


def _redraw_pool(cfg: Config, path: Path, model: Path, pipe, windows: int, clip_frames: int, rows: int, option: str,
                 lean: bool, progress: Progress | None) -> dict[str, Any]:
    """`windows` windows of `clip_frames` frames generated by the DiT of model folder `model` (loaded as `pipe`) for
    training captions, and those of them that soragen.data.redraw redraws (with `lean`): latents (N, C, K, h, w)
    normalized by the model's VAE, frames (N, T, H, W, 3) uint8, has_target (N, T), captions (N strings), and for
    the DiT's pool (`lean` False) moves (N,) uint8: 1 where the eval detector judges every object of the DiT's own
    frames to move as the caption says.
    Kept at `path` for the model it was made with; made anew for another. `option` (the setting that asked
    for `rows` rows a batch) names the fix when too few windows are redrawn."""
    from safetensors import safe_open

    from soragen.config import load_config
    from soragen.data.clips import make_source
    from soragen.data.redraw import redraw
    from soragen.model_io import WEIGHTS, files_digest, save_file_atomic
    from soragen.sampler import denoise, draw_noise, make_scheduler
    from soragen.vae import latent_frames_for
    from soragen.video_io import to_uint8

    key = {"dit_weights": files_digest([model / "transformer" / WEIGHTS]),
           "vae_weights": files_digest([model / "vae" / WEIGHTS]), "windows": str(windows),
           "clip_frames": str(clip_frames), "seed": str(cfg.seed), "data": cfg.data.model_dump_json(),
           "redraw": REDRAW_VERSION, "lean": str(lean)}
    if path.is_file():
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            captions = json.loads(meta.pop("captions", "null"))
            if meta == key and captions is not None and (lean or "moves" in handle.keys()):  # DiT: since session 44
                return {name: handle.get_tensor(name) for name in handle.keys()} | {"captions": captions}
    model_cfg = load_config(None, [f"model={model}"])
    s = model_cfg.sampler
    source = make_source(cfg.data, (cfg.video.height, cfg.video.width))
    rng = np.random.default_rng([cfg.seed, 5])
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + 5)
    scheduler = make_scheduler(s)
    f, sc = model_cfg.vae.temporal_compression, model_cfg.vae.spatial_compression
    shape = (model_cfg.vae.latent_channels, latent_frames_for(clip_frames, f), cfg.video.height // sc, cfg.video.width // sc)
    kept: dict[str, list] = {"latents": [], "frames": [], "has_target": [], "captions": []}
    if not lean:
        kept["moves"] = []
    made = 0
    with torch.no_grad():
        while made < windows:
            b = min(REDRAW_BATCH, windows - made)
            clips = [source.sample(rng, 1) for _ in range(b)]  # their captions only: each names a scene at its start
            prompts = [c.captions[rng.integers(len(c.captions))] for c in clips]
            text, mask = pipe.text_encoder(prompts + [s.negative_prompt] * b if s.guidance != 1.0 else prompts)
            z = denoise(pipe.dit, scheduler, draw_noise((b, *shape), generator, s.noise_correlation), text, mask,
                        steps=s.steps, guidance=s.guidance, generator=generator,
                        guidance_interval=s.guidance_interval, branch_estimates=s.branch_estimates)
            x = pipe.vae.decode(pipe.vae.denormalize(z))  # (b, 3, T, H, W) in [-1, 1]
            for zi, xi, prompt in zip(z, x, prompts):
                own = to_uint8(xi[None].cpu())
                if (drawn := redraw(own, prompt, lean=lean)) is not None:
                    kept["latents"].append(zi.float())
                    kept["frames"].append(torch.from_numpy(drawn[0]))
                    kept["has_target"].append(torch.from_numpy(drawn[1].astype(np.uint8)))
                    if not lean:
                        kept["moves"].append(torch.tensor(moves_as_captioned(own, prompt, model_cfg.video.model_rate),
                                                          dtype=torch.uint8))
                    kept["captions"].append(prompt)
            made += b
            if progress:
                progress("redraw", made, windows, {"kept": len(kept["latents"])})
    if len(kept["latents"]) < rows:
        raise UserError(f"only {len(kept['latents'])} of {windows} generated windows could be redrawn, fewer than "
                        f"{option} {rows}; raise {option.replace('_rows', '_windows')}")
    log.info("redraw pool: %d of %d generated windows redrawn", len(kept["latents"]), windows)
    captions = kept.pop("captions")
    pool = {name: torch.stack(v) for name, v in kept.items()}
    save_file_atomic(pool, path, metadata=key | {"captions": json.dumps(captions, ensure_ascii=False)})
    return pool | {"captions": captions}


def moves_as_captioned(frames: np.ndarray, caption: str, fps: int) -> int:
    """1 when the eval detector judges every object of a window [T, H, W, 3] uint8 to move as `caption` says (its
    direction over the first 1.5 s, or its fall and rebound), else 0."""
    from soragen.evaluation.detector import score_video

    return int(all(o["direction"] for o in score_video(frames, caption, fps=fps)["objects"]))


def _forget_stale_decoder(acc, run: RunFolder, tuned_on: str) -> None:
    """Decoder checkpoints written on another DiT's latents (the DiT stage trained on and exported since) are
    removed: stage 3 starts again rather than give the new model a decoder tuned for the old one."""
    ckpt = run.latest("decoder")
    if ckpt is None:
        return
    try:
        theirs = json.loads((ckpt / "meta.json").read_text(encoding="utf-8")).get("dit_weights")
    except (OSError, ValueError, AttributeError):  # damaged: the stage's resume names it
        return
    if theirs is None or theirs == tuned_on:  # (checkpoints before session 35 do not say)
        return
    log.warning("the decoder checkpoints in %s were tuned on an earlier DiT's latents; stage 3 starts again",
                run.checkpoints)
    acc.wait_for_everyone()  # every process has read the checkpoint before the main one removes it
    if acc.is_main_process:
        for old in run.checkpoints.glob("decoder-*"):
            shutil.rmtree(old)
        run.forget_metrics("decoder", after=0)
    acc.wait_for_everyone()


# ---------------------------------------------------------------------------
# Entry
# ---------------------------------------------------------------------------


def warn_short_clips(cfg: Config) -> None:
    """Warn when a manifest's videos (by their records' 'frames') are shorter than the clips the run's stages
    cut: each such clip is filled by holding its last frame, and the model learns scenes that stop."""
    from soragen.data.clips import read_manifest, whole_number
    from soragen.vae import frames_for

    if cfg.data.kind != "manifest":
        return
    t = cfg.train
    wants = {"vae": (t.vae.clip_frames, "train.vae.clip_frames"),
             "dit": (frames_for(cfg.data.clip_latent_frames, cfg.vae.temporal_compression), "data.clip_latent_frames"),
             "decoder": (t.decoder.clip_frames, "train.decoder.clip_frames")}
    need, setting = max(wants[s] for s in t.stages)
    frames = [whole_number(rec.get("frames")) for rec in read_manifest(Path(cfg.data.path))]
    short = sum(f is not None and f < need for f in frames)
    if short:
        seconds = math.ceil(need / cfg.video.model_rate)
        log.warning("%d of the manifest's %d videos have fewer than the %d frames a training clip takes (%s); their "
                    "last frame is held to fill the clip: give longer videos (e.g. soragen dataset shapes --seconds %d) "
                    "or lower %s", short, len(frames), need, setting, seconds, setting)


def with_data_rate(cfg: Config) -> Config:
    """cfg with video.model_fps set to the frame rate of its training clips, which its model folder records
    (generation at another --fps resamples from it). A manifest whose records give no single rate keeps
    video.model_fps (or video.fps), with a warning; one above the rates generation makes is refused."""
    from soragen.data.clips import data_fps
    from soragen.pipeline import MAX_FPS

    v = cfg.video
    rate = data_fps(cfg.data)
    if rate is None:
        rate = v.model_rate
        log.warning("the manifest's records give no single whole-number frame rate ('fps'); the model is taken to make %d fps "
                    "(set video.model_fps to its clips' rate)", rate)
    elif rate > MAX_FPS:
        raise UserError(f"the manifest's clips are {rate} fps; soragen models make 1 to {MAX_FPS} fps: re-encode "
                        f"the clips at {MAX_FPS} fps or less (ffmpeg -r) and give that rate as their records' 'fps'")
    elif v.model_fps is not None and v.model_fps != rate:
        log.warning("video.model_fps (%d) is not the rate of the training clips (%d fps); the model records %d",
                    v.model_fps, rate, rate)
    return cfg.model_copy(update={"video": v.model_copy(update={"model_fps": rate})})


def check_before_stages(cfg: Config, run: RunFolder, resume: bool) -> None:
    """Settings a later stage would refuse, refused before the first stage spends its hour: the folders
    the stages start from, and windows that fit the clips."""
    from soragen.model_io import WEIGHTS, missing_parts, resolve_model

    t = cfg.train
    if t.mixed_precision == "fp16" and _cpu_only():  # accelerate would take it and train in fp32 without a word
        raise UserError("train.mixed_precision 'fp16' needs a GPU, and this machine has none; on a CPU use 'bf16' "
                        "(fast on CPUs with AMX or AVX-512 BF16) or 'no'")
    if "vae" in t.stages and t.vae_model is None and t.vae.init_model is not None and not (
            resume and (run.vae / WEIGHTS).is_file()):  # (a resumed run whose VAE is trained does not start from it)
        _finished_vae(t.vae.init_model, "train.vae.init_model")
    if t.vae_model is not None and {"vae", "dit"} & set(t.stages):
        _finished_vae(t.vae_model, "train.vae_model")
    if "dit" in t.stages:
        _check_redraw(cfg, "dit")
        if t.dit.redraw_rows and t.dit.init_model is None:
            raise UserError("train.dit.redraw_rows redraws windows a trained DiT generated: set train.dit.init_model "
                            "to the model folder to fine-tune, or train.dit.redraw_rows=0")
        if t.dit.text_binding > 0 and (cfg.text_encoder.pretrained is not None or not cfg.text_encoder.trainable):
            raise UserError("train.dit.text_binding trains the small T5 with the DiT: it needs text_encoder.trainable: "
                            "true and no text_encoder.pretrained (or set train.dit.text_binding=0)")
        if t.dit.window > cfg.data.clip_latent_frames:
            raise UserError(f"train.dit.window {t.dit.window} is longer than data.clip_latent_frames "
                            f"{cfg.data.clip_latent_frames}; lower the window or cache longer clips")
        if t.dit.max_context >= t.dit.window:
            raise UserError(f"train.dit.max_context {t.dit.max_context} leaves windows of train.dit.window "
                            f"{t.dit.window} latent frames with no frame to learn from; set it below the window")
        if t.dit.init_model is not None:
            try:
                folder = resolve_model(t.dit.init_model)
            except UserError as e:
                raise UserError(f"train.dit.init_model: {e}") from None
            missing = missing_parts(folder)
            if missing:
                raise UserError(f"train.dit.init_model {folder} is incomplete: {', '.join(missing)} missing; give a "
                                "model folder as training writes it")
            _check_same_text_encoder(cfg, folder)
            _check_same_dit(cfg, folder)
    if {"dit", "decoder"} <= set(t.stages) and t.decoder.last_steps > cfg.sampler.steps:  # the model gets cfg.sampler
        raise UserError(f"train.decoder.last_steps {t.decoder.last_steps} is more than sampler.steps {cfg.sampler.steps}; "
                        "lower train.decoder.last_steps or raise sampler.steps")
    if "decoder" in t.stages:
        _check_redraw(cfg, "decoder")


def _check_redraw(cfg: Config, stage: str) -> None:
    """train.STAGE.redraw_windows and redraw_rows (the DiT and decoder stages): rows that some windows fill, fewer
    than a batch (real data in every batch keeps the stage true to it), and a renderer to redraw with."""
    s, name = getattr(cfg.train, stage), f"train.{stage}"
    if s.redraw_windows and not s.redraw_rows:
        raise UserError(f"{name}.redraw_windows {s.redraw_windows} makes windows no batch would use: set "
                        f"{name}.redraw_rows (rows of each batch from them) or {name}.redraw_windows=0")
    if not s.redraw_rows:
        return
    if s.redraw_rows >= s.batch_size:
        raise UserError(f"{name}.redraw_rows {s.redraw_rows} must be less than {name}.batch_size {s.batch_size}; "
                        f"give at most {s.batch_size - 1}")
    if s.redraw_windows < s.redraw_rows:
        raise UserError(f"{name}.redraw_rows {s.redraw_rows} needs at least as many {name}.redraw_windows, got "
                        f"{s.redraw_windows}")
    if cfg.data.kind != "shapes":
        raise UserError(f"{name}.redraw_rows needs data.kind shapes (the Shapes World renderer redraws the windows), "
                        f"got {cfg.data.kind}; set {name}.redraw_rows=0")


def _check_same_dit(cfg: Config, folder: Path) -> None:
    """A fine-tune loads its init model's DiT, so cfg's dit settings (and latent channels) must be the ones it was
    trained with; it may only gain self-conditioning or a conv head. Checked before the latent cache is encoded."""
    from soragen.model_io import architecture_changes

    differ = [(key, theirs) for key, ours, theirs in architecture_changes(cfg, folder)
              if (key.startswith("dit.") or key == "vae.latent_channels")
              and not (key == "dit.self_condition" and ours) and not (key == "dit.conv_head" and not theirs)]
    if differ:
        raise UserError(f"train.dit.init_model {folder} was trained with other DiT settings than this config's: a "
                        "fine-tune keeps its model's, so set " + ", ".join(f"{k}={v}" for k, v in differ))


def _check_same_text_encoder(cfg: Config, folder: Path) -> None:
    """A fine-tune continues its init model's text encoder, so cfg must describe that encoder (the model folder
    it writes records cfg): a different one is refused rather than silently ignored."""
    from soragen.config import TextEncoderConfig
    from soragen.model_io import model_config_data

    theirs = TextEncoderConfig.model_validate(model_config_data(str(folder)).get("text_encoder") or {})
    ours = cfg.text_encoder
    fields = ["pretrained"] if ours.pretrained or theirs.pretrained else ["tokenizer", "d_model", "num_layers",
                                                                          "num_heads", "d_kv", "d_ff"]
    differ = [name for name in fields if getattr(ours, name) != getattr(theirs, name)]
    if differ:
        raise UserError(f"train.dit.init_model {folder} has another text encoder than this config: a fine-tune keeps "
                        "its model's, so set " + ", ".join(f"text_encoder.{n}={getattr(theirs, n)}" for n in differ)
                        + f" (or start from --config {folder / 'soragen.yaml'})")


def _written(run: RunFolder) -> set[tuple[str, int]]:
    """What a run has written that config.yaml describes: its checkpoints and its stages' weights, with their times."""
    paths = [*run.checkpoints.glob("*/meta.json"), *run.root.glob("vae/*.safetensors"), *run.model.glob("**/*.safetensors")]
    return {(str(p), p.stat().st_mtime_ns) for p in paths if p.is_file()}


def _not_a_run(run: RunFolder) -> str | None:
    """The first entry of a folder without a run's config.yaml that a run would not have put there, or None.

    A run begins with its config.yaml. Before that, a folder may already hold what a fine-tune is set up
    with (a model folder as `model`, as scripts/train_default.sh copies for its decoder phase, and latent
    caches); anything else is someone's files, which the run's exports could replace."""
    if not run.root.is_dir() or (run.root / "config.yaml").is_file():
        return None
    allowed = set(run.caches()) | {"tb"}
    for p in sorted(run.root.iterdir()):
        if p.name.startswith(".") or p.name in allowed or (p == run.model and (p / "soragen.yaml").is_file()):
            continue
        return p.name + ("/" if p.is_dir() else "")
    return None


def import_package() -> None:
    """Import every module of soragen now. A run lasts hours: under an editable install (pip install -e .),
    a module first imported by a later stage would be the file as edited by then, which need not fit the
    modules loaded at the start (a run of session 31 stopped at its DiT stage on such an ImportError)."""
    import importlib
    import pkgutil

    import soragen

    for module in pkgutil.walk_packages(soragen.__path__, "soragen."):
        if module.name != "soragen.__main__":  # it runs the CLI
            importlib.import_module(module.name)


def train(cfg: Config, *, resume: bool = False, progress: Progress | None = None) -> Path:
    """Run the configured stages; returns the final model folder (or the run folder when there is none yet)."""
    from accelerate import PartialState

    from soragen.video_io import missing_folders

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    import_package()
    hold_heap()  # each step's freed activations serve the next: no fresh page faults every step
    # Under `accelerate launch`, one of several processes. The others wait while the main one alone encodes
    # the latent cache or writes samples, which can outlast gloo's default 30 minutes on a slow machine.
    state = PartialState(cpu=_cpu_only(), timeout=timedelta(hours=PROCESS_GROUP_TIMEOUT_HOURS))
    if not state.is_main_process:
        log.setLevel(logging.ERROR)  # the main process tells what the run does, and warns once
    cfg = with_data_rate(shapes_options_off(cfg))  # before config.yaml records what the run does
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # accelerate launch --mixed_precision (or its config)
    if launched in ("bf16", "fp16") and launched != cfg.train.mixed_precision:
        log.warning("accelerate launch's mixed precision '%s' is not used: soragen trains with train.mixed_precision "
                    "'%s'; set that (e.g. --set train.mixed_precision=%s)", launched, cfg.train.mixed_precision, launched)
    warn_short_clips(cfg)
    run = RunFolder(Path(cfg.train.output_dir))
    check_before_stages(cfg, run, resume)
    if run.root.exists() and not run.root.is_dir():
        raise UserError(f"train.output_dir {run.root} is a file; give a folder for the run")
    inside = next((p for p in run.root.resolve().parents
                   if (p / "soragen.yaml").is_file() and (p / "model_index.json").is_file()), None)
    if inside is not None:  # its run would replace that folder, and this run with it, when it exports
        raise UserError(f"train.output_dir {run.root} is inside the model folder {inside}; choose a folder outside it")
    foreign = _not_a_run(run)
    if foreign:
        raise UserError(f"train.output_dir {run.root} holds {foreign}, which no soragen run wrote; choose an empty "
                        "folder or a run folder")
    # A run that failed before its first step leaves only config.yaml, TensorBoard's folder, its caches and its
    # word vocabulary: starting again is not resuming anything (the caches are used again if they fit).
    begun = {"config.yaml", "tb", run.vocabulary.name, *run.caches()}
    if run.root.exists() and any(p.name not in begun for p in run.root.iterdir()) and not resume:
        raise UserError(f"run folder {run.root} is not empty; pass --resume to continue it or set train.output_dir")
    if resume and not (run.root.exists() and any(run.root.iterdir())):
        log.info("--resume: nothing to resume in %s; starting a new run there", run.root)
    state.wait_for_everyone()  # every process has looked at the folder before the first one writes to it
    config_file = run.root / "config.yaml"
    previous = config_file.read_text(encoding="utf-8") if config_file.is_file() else None
    made = missing_folders(run.root)  # the folders this run creates, deepest first
    had_tb = (run.root / "tb").exists()
    if state.is_main_process:
        run.root.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(config_file, recorded_config(cfg).to_yaml())
    written = _written(run)
    try:
        finished = _run_stages(cfg, run, resume, progress)
        state.wait_for_everyone()  # the main process has written the model folder
    except UserError:  # e.g. a checkpoint or a stage's weights that do not fit the new settings
        if state.is_main_process and _written(run) == written:
            if previous is not None:
                _write_text_atomic(config_file, previous)  # nothing new: the folder still describes its checkpoints
            else:
                _undo_start(run, made, had_tb)
        raise
    finally:
        state.destroy_process_group()  # once, after the last stage (each stage's accelerator shares the group)
    return run.model if finished and (run.model / "soragen.yaml").is_file() else run.root


def _undo_start(run: RunFolder, made: list[Path], had_tb: bool) -> None:
    """A new run refused before it wrote anything leaves no trace: its config.yaml, the TensorBoard folder it
    began and the folders it created go, unless something else (e.g. a latent cache) is in them."""
    from soragen.video_io import remove_empty_folders

    (run.root / "config.yaml").unlink(missing_ok=True)
    if not had_tb:
        shutil.rmtree(run.root / "tb", ignore_errors=True)
    remove_empty_folders(made)


# The settings that name a folder (relative ones are taken from the working directory).
PATH_SETTINGS = (("model",), ("text_encoder", "pretrained"), ("data", "path"), ("train", "output_dir"),
                 ("train", "vae_model"), ("train", "vae", "init_model"), ("train", "dit", "init_model"))


def recorded_config(cfg: Config) -> Config:
    """cfg as a run's config.yaml records it: each folder it names that exists here given as an absolute path, so
    that `soragen train --config RUN/config.yaml --resume` continues the run from any directory. A name that is
    not a folder here ('builtin', a hub id) stays as it is."""
    from soragen.config import build_config
    from soragen.model_io import BUILTIN_NAME

    data = cfg.to_dict()
    for keys in PATH_SETTINGS:
        *sections, name = keys
        section = data
        for key in sections:
            section = section[key]
        value = section[name]
        if isinstance(value, str) and value != BUILTIN_NAME and Path(value).expanduser().exists():
            section[name] = os.path.abspath(Path(value).expanduser())  # symbolic links kept, as given
    return build_config(data)


def _run_stages(cfg: Config, run: RunFolder, resume: bool, progress: Progress | None) -> bool:
    """The configured stages in order; False if the DiT stage stopped early (train.dit.stop_after)."""
    from soragen.model_io import WEIGHTS

    if "vae" in cfg.train.stages:
        if cfg.train.vae_model is not None:
            log.info("train.vae_model is set: the DiT stage uses that VAE, so stage 1 does not run")
        elif resume and (run.vae / WEIGHTS).is_file():
            log.info("the VAE of %s is trained; skipping stage 1", run.root)
        else:
            train_vae(cfg, run, resume, progress)
            trim_heap()  # the VAE's activations and data are freed: return them before the DiT stage
    if "dit" in cfg.train.stages:
        train_dit(cfg, run, resume, progress)
        trim_heap()
        if run.step("dit") < cfg.train.dit.steps:
            return False  # stopped early (train.dit.stop_after): no model yet
    if "decoder" in cfg.train.stages:
        train_decoder(cfg, run, resume, progress)
    return True
