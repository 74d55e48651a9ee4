"""The stages in order: prompt -> T5 -> DiT denoising -> causal VAE decoding -> MP4."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from soragen import __version__
from soragen.config import Config
from soragen.errors import UserError

MAX_FPS = 60
MAX_SIDE = 4096
DECODE_WINDOW = 4  # latent frames decoded (and streamed to ffmpeg) at a time


# ---------------------------------------------------------------------------
# Checking a request
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoPlan:
    """Sizes of one generation, derived from the config and checked."""

    num_frames: int  # frames written
    latent_frames: int  # latent frames generated (covering num_frames, rounded up)
    latent_height: int
    latent_width: int


def _nearest_multiples(value: int, m: int) -> str:
    low = max(m, (value // m) * m)
    high = low + m if low < value else low
    return f"{low}" if low == high else f"{low} or {high}"


def check_prompt(prompt: str) -> str:
    """Reject an empty or whitespace-only prompt."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("the prompt is empty; describe the video, e.g. soragen generate \"a red ball bouncing\"")
    return prompt.strip()


def plan_video(cfg: Config) -> VideoPlan:
    """Check duration, fps and size against what the model can make; return the latent sizes."""
    v = cfg.video
    if not math.isfinite(v.seconds) or v.seconds <= 0:
        raise UserError(f"--seconds must be a positive number of seconds, got {v.seconds}")
    if v.seconds > v.max_seconds:
        raise UserError(f"--seconds {v.seconds:g} is above the maximum of {v.max_seconds:g} (video.max_seconds)")
    if not 1 <= v.fps <= MAX_FPS:
        raise UserError(f"--fps must be between 1 and {MAX_FPS}, got {v.fps}")
    s = cfg.vae.spatial_compression
    _, ph, pw = cfg.dit.patch_size
    for name, value, m in (("width", v.width, s * pw), ("height", v.height, s * ph)):
        if value < m or value > MAX_SIDE or value % m:
            if value < m or value > MAX_SIDE:
                valid = f"between {m} and {MAX_SIDE}"
            else:
                valid = f"a multiple of {m}; nearest: {_nearest_multiples(value, m)}"
            raise UserError(f"--{name} {value} is not valid: it must be {valid}")
    if not 1 <= v.upscale <= 16:
        raise UserError(f"--upscale must be an integer between 1 and 16, got {v.upscale}")
    num_frames = round(v.seconds * v.fps)
    if num_frames < 1:
        raise UserError(f"--seconds {v.seconds:g} at {v.fps} fps gives no frame; ask for at least {1 / v.fps:.3g} s")
    f = cfg.vae.temporal_compression
    pt = cfg.dit.patch_size[0]
    latent_frames = 1 + math.ceil((num_frames - 1) / f)
    latent_frames = pt * math.ceil(latent_frames / pt)
    return VideoPlan(num_frames, latent_frames, v.height // s, v.width // s)


# ---------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------


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
        from soragen.model_io import WEIGHTS, load_weights, resolve_model
        from soragen.text_encoder import TextEncoder
        from soragen.vae import VideoVAE

        if cfg.model is None:
            torch.manual_seed(0)  # random weights are the same on every run
            text_encoder = TextEncoder.from_config(cfg.text_encoder)
            vae = VideoVAE(cfg.vae)
            dit = DiT(cfg.dit, cfg.vae.latent_channels, text_encoder.dim)
            return cls(cfg, text_encoder, vae, dit, "random weights (untrained; configs/tiny.yaml)")
        folder = resolve_model(cfg.model)
        if cfg.text_encoder.pretrained is not None:
            text_encoder = TextEncoder.from_pretrained(cfg.text_encoder.pretrained, cfg.text_encoder.max_length)
        else:
            text_encoder = TextEncoder.from_pretrained(
                folder / "text_encoder", cfg.text_encoder.max_length, tokenizer_path=folder / "tokenizer"
            )
        vae = VideoVAE(cfg.vae)
        load_weights(vae, folder / "vae" / WEIGHTS)
        dit = DiT(cfg.dit, cfg.vae.latent_channels, text_encoder.dim)
        load_weights(dit, folder / "transformer" / WEIGHTS)
        return cls(cfg, text_encoder, vae, dit, cfg.model)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part."""
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"text_encoder": count(self.text_encoder), "vae": count(self.vae), "dit": count(self.dit)}

    @torch.no_grad()
    def encode_text(self, prompt: str, negative_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens for the sampler: [cond; uncond] batched when guidance is on."""
        prompts = [prompt, negative_prompt] if self.cfg.sampler.guidance != 1.0 else [prompt]
        return self.text_encoder(prompts)  # (1 or 2, L, D), (1 or 2, L)

    @torch.no_grad()
    def generate_latents(
        self, plan: VideoPlan, text: torch.Tensor, mask: torch.Tensor, on_step: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Denoise seeded noise into latents [1, C, K, h, w] (normalised)."""
        from soragen.sampler import denoise, make_scheduler

        generator = torch.Generator().manual_seed(self.cfg.seed)
        shape = (1, self.cfg.vae.latent_channels, plan.latent_frames, plan.latent_height, plan.latent_width)
        noise = torch.randn(shape, generator=generator)  # (1, C, K, h, w)
        s = self.cfg.sampler
        return denoise(
            self.dit, make_scheduler(s), noise, text, mask,
            steps=s.steps, guidance=s.guidance, generator=generator, on_step=on_step,
        )

    @torch.no_grad()
    def decode_frames(self, latents: torch.Tensor, num_frames: int) -> Iterator[torch.Tensor]:
        """Decode latents window by window, yielding frames [1, 3, T_i, H, W] until num_frames are out."""
        from soragen.vae import frames_for

        z = self.vae.denormalize(latents)
        windows = (z[:, :, i : i + DECODE_WINDOW] for i in range(0, z.shape[2], DECODE_WINDOW))
        remaining = num_frames
        for frames in self.vae.decode_windows(windows):
            if remaining <= 0:
                break
            yield frames[:, :, :remaining]
            remaining -= frames.shape[2]
        assert frames_for(z.shape[2], self.vae.temporal_compression) >= num_frames

    def generate(
        self,
        prompt: str,
        output: Path,
        *,
        overwrite: bool = False,
        on_step: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Generate one video for `prompt` into `output` (MP4) plus its JSON sidecar; returns the sidecar."""
        from soragen.video_io import Mp4Writer, check_writable, sidecar_path, to_uint8, upscale, write_json

        cfg = self.cfg
        prompt = check_prompt(prompt)
        plan = plan_video(cfg)
        output = Path(output)
        check_writable(output, overwrite)
        check_writable(sidecar_path(output), overwrite)
        timings: dict[str, float] = {}

        # 1. Text.
        t0 = time.perf_counter()
        text, mask = self.encode_text(prompt, cfg.sampler.negative_prompt)
        timings["text_encoding"] = time.perf_counter() - t0

        # 2. Denoising.
        t0 = time.perf_counter()
        latents = self.generate_latents(plan, text, mask, on_step)
        timings["denoising"] = time.perf_counter() - t0

        # 3-4. Decoding window by window, each window streamed into ffmpeg at once.
        v = cfg.video
        timings["vae_decoding"] = timings["mp4_encoding"] = 0.0
        with Mp4Writer(output, v.width * v.upscale, v.height * v.upscale, v.fps, v.crf) as writer:
            t0 = time.perf_counter()
            for frames in self.decode_frames(latents, plan.num_frames):
                t1 = time.perf_counter()
                writer.write(upscale(to_uint8(frames), v.upscale))
                t2 = time.perf_counter()
                timings["vae_decoding"] += t1 - t0
                timings["mp4_encoding"] += t2 - t1
                t0 = time.perf_counter()
            t0 = time.perf_counter()
        timings["mp4_encoding"] += time.perf_counter() - t0

        sidecar = {
            "prompt": prompt,
            "negative_prompt": cfg.sampler.negative_prompt,
            "seed": cfg.seed,
            "model": self.model_name,
            "video": {
                "path": output.name,
                "frames": plan.num_frames,
                "fps": v.fps,
                "seconds": plan.num_frames / v.fps,
                "width": v.width * v.upscale,
                "height": v.height * v.upscale,
            },
            "timings_seconds": {k: round(val, 4) for k, val in timings.items()},
            "soragen_version": __version__,
            "torch_version": torch.__version__,
            "config": cfg.to_dict(),
        }
        write_json(sidecar_path(output), sidecar)
        return sidecar
