"""The stages in order: prompt -> T5 -> DiT denoising -> causal VAE decoding -> MP4."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soragen import __version__
from soragen.config import Config, frame_count
from soragen.errors import UserError
from soragen.heap import hold_heap, trim_heap

MAX_FPS = 60
MAX_SIDE = 4096


# ---------------------------------------------------------------------------
# Checking a request
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoPlan:
    """Sizes of one generation, derived from the config and checked."""

    num_frames: int  # frames written (at video.fps)
    latent_frames: int  # latent frames generated (covering model_frames, rounded up)
    latent_height: int
    latent_width: int
    model_frames: int  # frames the model makes (at its own rate, video.model_fps)
    fps: int  # the output's rate
    model_fps: int  # the model's rate

    def source_frame(self, j: int) -> int:
        """The model frame written as output frame j: the one showing at its time (the last at or before it)."""
        return j * self.model_fps // self.fps


def _nearest_multiples(value: int, m: int) -> str:
    low = max(m, (value // m) * m)
    high = low + m if low < value else low
    return f"{low}" if low == high else f"{low} or {high}"


def check_prompt(prompt: str) -> str:
    """Reject an empty or whitespace-only prompt."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("the prompt is empty; describe the video, e.g. soragen generate \"a red ball bouncing\"")
    check_utf8(prompt, "the prompt")
    return prompt.strip()


def check_utf8(text: str, what: str) -> None:
    """Refuse text holding bytes that were not UTF-8 (Python keeps them as lone surrogates: a Latin-1 terminal,
    `$(cat file)`), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{what} holds a byte that is not UTF-8 at character {e.start + 1} "
                        f"({text[max(0, e.start - 10):e.start]!r} before it); pass the text in UTF-8") from None


def plan_video(cfg: Config) -> VideoPlan:
    """Check duration, fps and size against what the model can make; return the latent sizes."""
    v = cfg.video
    check_utf8(cfg.sampler.negative_prompt, "--negative-prompt (sampler.negative_prompt)")
    if not math.isfinite(v.seconds) or v.seconds <= 0:
        raise UserError(f"--seconds (video.seconds) must be a positive number of seconds, got {v.seconds}")
    if v.seconds > v.max_seconds:
        raise UserError(f"--seconds {v.seconds:.12g} is above the maximum of {v.max_seconds:.12g} (video.max_seconds)")
    if not 1 <= v.fps <= MAX_FPS:
        raise UserError(f"--fps (video.fps) must be between 1 and {MAX_FPS}, got {v.fps}")
    model_fps = v.model_rate
    if not 1 <= model_fps <= MAX_FPS:
        raise UserError(f"video.model_fps must be between 1 and {MAX_FPS}, got {model_fps}")
    s = cfg.vae.spatial_compression
    _, ph, pw = cfg.dit.patch_size
    for name, value, m in (("width", v.width, s * pw), ("height", v.height, s * ph)):
        if value < m or value > MAX_SIDE or value % m:
            if value < m or value > MAX_SIDE:
                valid = f"between {m} and {MAX_SIDE}"
            else:
                valid = f"a multiple of {m}; nearest: {_nearest_multiples(value, m)}"
            raise UserError(f"--{name} {value} (video.{name}) is not valid: it must be {valid}")
    if not 1 <= v.upscale <= 16:
        raise UserError(f"--upscale (video.upscale) must be an integer between 1 and 16, got {v.upscale}")
    if max(v.width, v.height) * v.upscale > MAX_SIDE:
        raise UserError(f"--upscale {v.upscale} makes frames of {v.width * v.upscale}x{v.height * v.upscale}; "
                        f"upscaled frames are at most {MAX_SIDE} px a side (--output-size then fits them)")
    num_frames = frame_count(v.seconds, v.fps)
    if num_frames < 1:
        least = math.ceil(0.5 / v.fps * 1e4) / 1e4  # half a frame, rounded up to a value that gives one
        raise UserError(f"--seconds {v.seconds:g} at {v.fps} fps gives no frame (seconds x fps, rounded); ask for at "
                        f"least {least:g} s, half a frame")
    # The model frames up to the one the last output frame shows (all of them when the rates agree).
    model_frames = (num_frames - 1) * model_fps // v.fps + 1
    f = cfg.vae.temporal_compression
    pt = cfg.dit.patch_size[0]
    latent_frames = 1 + math.ceil((model_frames - 1) / f)
    latent_frames = pt * math.ceil(latent_frames / pt)
    return VideoPlan(num_frames, latent_frames, v.height // s, v.width // s, model_frames, v.fps, model_fps)


class FrameResampler:
    """Which model frames become output frames, chunk by chunk: output frame j shows model frame
    plan.source_frame(j) (held for several output frames when the output's rate is higher, some
    skipped when it is lower)."""

    def __init__(self, plan: VideoPlan):
        self.plan = plan
        self.received = 0  # model frames seen so far
        self.written = 0  # output frames given so far

    def take(self, count: int) -> list[int]:
        """The next `count` model frames arrived -> the output frames they complete, as indices into them."""
        start, self.received = self.received, self.received + count
        picks = []
        while self.written < self.plan.num_frames and self.plan.source_frame(self.written) < self.received:
            picks.append(self.plan.source_frame(self.written) - start)
            self.written += 1
        return picks


def frame_runs(order: list[int]) -> list[tuple[int, int]]:
    """[a, b) runs of consecutive indices in `order`: one write for frames in sequence, one per held frame."""
    runs: list[list[int]] = []
    for i in order:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(a, b) for a, b in runs]


# ---------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------


def plan_windows(cfg: Config, plan: VideoPlan) -> list[tuple[int, int]]:
    """(context frames, new frames) of each generation window covering plan.latent_frames."""
    s = cfg.sampler
    pt = cfg.dit.patch_size[0]
    out, done = [], 0
    while done < plan.latent_frames:
        ctx = 0 if done == 0 else min(s.context_frames, done)
        new = min(s.window - ctx, plan.latent_frames - done)
        new = pt * math.ceil(new / pt)
        out.append((ctx, new))
        done += new
    return out


def window_starts(cfg: Config, plan: VideoPlan) -> list[int]:
    """Index of the first output frame of each window after the first, within plan.num_frames."""
    from soragen.vae import frames_for

    starts, done = [], 0
    for _, new in plan_windows(cfg, plan)[:-1]:
        done += new  # latent frames 0..done-1 decode to model frames 0..frames_for(done)-1
        first = frames_for(done, cfg.vae.temporal_compression)  # the window's first model frame
        starts.append(-(-first * plan.fps // plan.model_fps))  # the first output frame that shows it
    return [k for k in starts if k < plan.num_frames]


def denoise_calls(cfg: Config, plan: VideoPlan) -> int:
    """Model calls (progress steps) of a whole generation: per window, the steps plus any staircase lag."""
    from soragen.sampler import denoise_iterations

    s = cfg.sampler
    return sum(denoise_iterations(window_steps(s, ctx), new, s.frame_lag) for ctx, new in plan_windows(cfg, plan))


def window_frames(s, ctx: int, new: int) -> int:
    """Latent frames a window with `ctx` context frames and `new` frames of the video denoises: the whole
    sampler.window with `full_windows` (the frames past the video's end are dropped), else ctx + new."""
    return max(ctx + new, s.window) if s.full_windows else ctx + new


def window_steps(s, ctx: int) -> int:
    """Denoising steps of a window with `ctx` context frames: `continuation_steps` continues a video, when set."""
    return s.steps if not ctx or s.continuation_steps is None else s.continuation_steps


def window_guidance(s, ctx: int) -> float:
    """Guidance of a window with `ctx` context frames: `continuation_guidance` continues a video, when set."""
    return s.guidance if not ctx or s.continuation_guidance is None else s.continuation_guidance


class Pipeline:
    """The models of one config, ready to generate."""

    def __init__(self, cfg: Config, text_encoder, vae, dit, model_name: str):
        self.cfg = cfg
        self.text_encoder = text_encoder.eval()
        self.vae = vae.eval()
        self.dit = dit.eval()
        self.model_name = model_name

    @classmethod
    def from_config(cls, cfg: Config) -> "Pipeline":
        """Build the models of `cfg`: from its model folder, or with random weights when `model` is unset."""
        from soragen.dit import DiT
        from soragen.model_io import WEIGHTS, WeightsMismatch, architecture_changes, check_model_folder, load_weights
        from soragen.text_encoder import TextEncoder
        from soragen.vae import VideoVAE

        if cfg.model is None:
            torch.manual_seed(0)  # random weights are the same on every run
            corpus = None
            if cfg.text_encoder.tokenizer == "words" and cfg.data.kind == "shapes":  # the vocabulary training builds
                from soragen.data import shapes

                corpus = shapes.vocabulary_corpus()
            text_encoder = TextEncoder.from_config(cfg.text_encoder, corpus=corpus)
            vae = VideoVAE(cfg.vae)
            dit = DiT(cfg.dit, cfg.vae.latent_channels, text_encoder.dim)
            return cls(cfg, text_encoder, vae, dit, "random weights (untrained: the config names no model)")
        folder = check_model_folder(cfg)
        if cfg.text_encoder.pretrained is not None:
            text_encoder = TextEncoder.from_pretrained(cfg.text_encoder.pretrained, cfg.text_encoder.max_length)
        else:
            text_encoder = TextEncoder.from_pretrained(
                folder / "text_encoder", cfg.text_encoder.max_length, tokenizer_path=folder / "tokenizer"
            )
        try:
            vae = VideoVAE(cfg.vae)
            load_weights(vae, folder / "vae" / WEIGHTS)
            dit = DiT(cfg.dit, cfg.vae.latent_channels, text_encoder.dim)
            load_weights(dit, folder / "transformer" / WEIGHTS)
        except WeightsMismatch as e:
            changes = architecture_changes(cfg, folder)
            if not changes:
                raise
            (key, ours, theirs), rest = changes[0], [k for k, _, _ in changes[1:]]
            also = f" (and also {', '.join(rest)})" if rest else ""
            raise UserError(f"{e}, which sets {key} {json.dumps(ours)} where the model has {json.dumps(theirs)}{also}; "
                            "a model's architecture comes from its folder, so leave the vae and dit settings out of "
                            "--config and --set") from None
        return cls(cfg, text_encoder, vae, dit, cfg.model)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part."""
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"text_encoder": count(self.text_encoder), "vae": count(self.vae), "dit": count(self.dit)}

    @torch.no_grad()
    def encode_text(self, prompt: str, negative_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens for the sampler: [cond; uncond] batched when guidance is on."""
        s = self.cfg.sampler
        guided = s.guidance != 1.0 or (s.continuation_guidance is not None and s.continuation_guidance != 1.0)
        prompts = [prompt, negative_prompt] if guided else [prompt]
        return self.text_encoder(prompts)  # (1 or 2, L, D), (1 or 2, L)

    def windows(self, plan: VideoPlan) -> list[tuple[int, int]]:
        """(context frames, new frames) of each generation window covering plan.latent_frames."""
        return plan_windows(self.cfg, plan)

    def window_starts(self, plan: VideoPlan) -> list[int]:
        """Index of the first output frame of each window after the first, within plan.num_frames."""
        return window_starts(self.cfg, plan)

    def denoise_calls(self, plan: VideoPlan) -> int:
        """Model calls (progress steps) of a whole generation: per window, the steps plus any staircase lag."""
        return denoise_calls(self.cfg, plan)

    @torch.no_grad()
    def generate_latents(
        self, plan: VideoPlan, text: torch.Tensor, mask: torch.Tensor, on_step: Callable[[int], None] | None = None
    ) -> Iterator[torch.Tensor]:
        """Denoise seeded noise window by window, yielding each window's new latents [1, C, n, h, w] (normalised).

        The first window is text-to-video; each next one is conditioned on the last
        latent frames of the one before as context (per-frame timesteps), and continues.
        """
        from soragen.sampler import denoise, denoise_iterations, draw_noise, make_scheduler

        hold_heap()  # one forward's freed blocks serve the next: no fresh page faults every step
        s = self.cfg.sampler
        generator = torch.Generator().manual_seed(self.cfg.seed)
        scheduler = make_scheduler(s)
        previous: torch.Tensor | None = None  # (1, C, n, h, w): the last window's latents
        done = 0  # model calls of the windows before
        for ctx, new in self.windows(plan):
            frames = window_frames(s, ctx, new)  # ctx + new, or the whole window
            shape = (1, self.cfg.vae.latent_channels, frames, plan.latent_height, plan.latent_width)
            noise = draw_noise(shape, generator, s.noise_correlation)  # (1, C, frames, h, w)
            context = previous[:, :, previous.shape[2] - ctx :] if ctx else None
            guidance = window_guidance(s, ctx)
            rows = 2 if guidance != 1.0 else 1  # [cond; uncond] or cond only
            steps = window_steps(s, ctx)
            x = denoise(
                self.dit, scheduler, noise, text[:rows], mask[:rows], steps=steps, guidance=guidance, generator=generator,
                context=context, context_timestep=s.context_timestep, frame_lag=s.frame_lag,
                guidance_interval=s.guidance_interval, branch_estimates=s.branch_estimates, finish=new,
                on_step=None if on_step is None else (lambda i, done=done: on_step(done + i)),
            )
            done += denoise_iterations(steps, new, s.frame_lag)  # the staircase stops when the kept frames are clean
            previous = x[:, :, : ctx + new]  # the frames past the video's end are not the video's
            trim_heap()  # the window's activations are freed: keeps peak memory flat in the video's length
            yield previous[:, :, ctx:]  # (1, C, new, h, w)

    @torch.no_grad()
    def decode_frames(self, latent_windows: Iterator[torch.Tensor], num_frames: int) -> Iterator[torch.Tensor]:
        """Decode latent windows as they come (causal cache), yielding frames [1, 3, T_i, H, W] up to num_frames."""
        remaining = num_frames
        for frames in self.vae.decode_windows(self.vae.denormalize(z) for z in latent_windows):
            if remaining <= 0:
                break
            yield frames[:, :, :remaining]
            remaining -= frames.shape[2]

    def generate(
        self,
        prompt: str,
        output: Path,
        *,
        overwrite: bool = False,
        on_step: Callable[[int], None] | None = None,
        on_frames: Callable[[np.ndarray], None] | None = None,
        sidecar_extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Generate one video for `prompt` into `output` (in `video.format`) plus its JSON sidecar; returns the sidecar.

        `on_frames` sees each chunk of final frames [T_i, H, W, 3] uint8 as it is written; `sidecar_extra`
        adds fields to the sidecar (batch marks its items' videos as its own).
        """
        from soragen.video_io import (
            check_output_suffix, check_writable, finished_or_removed, fit_frames, open_writer, sidecar_path, to_uint8,
            upscale, write_json,
        )

        cfg = self.cfg
        prompt = check_prompt(prompt)
        plan = plan_video(cfg)
        output = Path(output)
        check_output_suffix(output, cfg.video.format)
        check_writable(output, overwrite, folder_output=cfg.video.format == "frames")
        check_writable(sidecar_path(output), overwrite, sidecar_of=output)
        timings: dict[str, float] = {}

        # 1. Text.
        t0 = time.perf_counter()
        text, mask = self.encode_text(prompt, cfg.sampler.negative_prompt)
        timings["text_encoding"] = time.perf_counter() - t0

        # 2-4. Denoising window by window; each window is decoded and streamed into ffmpeg at once.
        v = cfg.video
        timings.update(denoising=0.0, vae_decoding=0.0, mp4_encoding=0.0)
        clock = {"t": time.perf_counter()}

        def lap(stage: str) -> None:
            now = time.perf_counter()
            timings[stage] += now - clock["t"]
            clock["t"] = now

        def timed_latents():
            for z in self.generate_latents(plan, text, mask, on_step):
                lap("denoising")
                yield z

        # 5. Writing: upscale (nearest), fit into video.output_size, encode in video.format.
        # ("mp4_encoding" keeps its name for every format: the time spent in the writer.)
        # An interruption after the video is renamed into place, before its sidecar is written, removes the video.
        with finished_or_removed(output):
            width, height = v.written_size
            resampler = FrameResampler(plan)  # the model's rate to the output's (the same frames when they agree)
            with open_writer(output, v.format, width, height, v.fps, v.crf) as writer:
                for frames in self.decode_frames(timed_latents(), plan.model_frames):
                    lap("vae_decoding")
                    picks = resampler.take(frames.shape[2])  # output frames, as indices into this chunk (maybe none)
                    if picks:  # each model frame written is enlarged once, however often it is held
                        used, order = np.unique(picks, return_inverse=True)  # order: each pick's place in used
                        final = fit_frames(upscale(to_uint8(frames)[used], v.upscale), v.output_size)  # (U, height, width, 3)
                        for a, b in frame_runs(order.tolist()):
                            writer.write(final[a:b])
                            if on_frames is not None:
                                on_frames(final[a:b])
                    lap("mp4_encoding")
                clock["t"] = time.perf_counter()
            lap("mp4_encoding")
            trim_heap()  # the last window's decoding too: a batch of videos starts each one from a trimmed heap

            sidecar = {
                "prompt": prompt,
                "negative_prompt": cfg.sampler.negative_prompt,
                "seed": cfg.seed,
                "model": self.model_name,
                "video": {
                    "path": output.name,
                    "format": v.format,
                    "frames": plan.num_frames,
                    "fps": v.fps,
                    "model_fps": plan.model_fps,
                    "seconds": plan.num_frames / v.fps,
                    "width": width,
                    "height": height,
                    "windows": len(self.windows(plan)),
                },
                "timings_seconds": {k: round(val, 4) for k, val in timings.items()},
                "soragen_version": __version__,
                "torch_version": torch.__version__,
                "config": cfg.to_dict(),
            } | (sidecar_extra or {})
            write_json(sidecar_path(output), sidecar)
        return sidecar
