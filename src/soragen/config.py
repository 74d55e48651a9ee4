"""Typed, frozen configuration: the schema holds every default, YAML holds values.

`load_config(path, overrides)` reads a YAML preset, applies dotted `--set key=value`
overrides and validates once. Unknown keys fail naming the closest valid key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from soragen.errors import UserError

MAX_SEED = 2**63 - 1  # seeds are 64-bit signed integers in torch and numpy


NUMBERS = (int, float, int | None, float | None)  # field types a boolean is refused for


class _Frozen(BaseModel):
    # No inf or nan in any number: JSON (the sidecars, model folders' records) writes them as null, and nan slips
    # past every range check.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, v: Any, info) -> Any:
        """YAML reads yes/no/on/off/true/false as booleans, which pydantic would take as 1 and 0 for a number."""
        if isinstance(v, bool) and cls.model_fields[info.field_name].annotation in NUMBERS:
            raise ValueError("must be a number (YAML reads yes/no, on/off and true/false as booleans)")
        return v


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------


class TextEncoderConfig(_Frozen):
    """Stage 1: prompt -> text tokens [B, L, D]."""

    pretrained: str | None = None  # local folder or hub id of any T5 encoder (e.g. t5-v1_1-xxl), loaded frozen
    max_length: int = 128  # text tokens kept per prompt (longer prompts are truncated with a warning); byt5 counts bytes
    # The small T5 built when `pretrained` is unset:
    tokenizer: Literal["byt5", "words"] = "byt5"  # byt5: bytes, any language; words: vocabulary of the training captions
    d_model: int = 64  # width of the T5 encoder
    num_layers: int = 2  # T5 encoder blocks
    num_heads: int = 4  # attention heads
    d_kv: int = 16  # width of one head
    d_ff: int = 128  # feed-forward width
    trainable: bool = True  # train the small T5 together with the DiT (a pretrained T5 is always frozen)

    @field_validator("max_length", "d_model", "num_layers", "num_heads", "d_kv", "d_ff")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v


class VAEConfig(_Frozen):
    """Stage 4: causal video VAE, frames [B, 3, 1+f*k, H, W] <-> latents [B, C, 1+k, H/s, W/s]."""

    temporal_compression: int = 4  # f: frames per latent frame (after the first frame, which has its own)
    spatial_compression: int = 8  # s: pixels per latent pixel along each side (a power of two)
    latent_channels: int = 8  # C: channels of the KL latent
    channels: tuple[int, ...] = (16, 32, 64, 64)  # per-frame encoder widths, one per resolution (full, /2, /4, ...)
    temporal_channels: int = 128  # width of the causal temporal layers at the latent resolution
    temporal_blocks: int = 1  # causal temporal residual blocks in the encoder and in the decoder
    latent_mean: tuple[float, ...] | None = None  # per-channel latent statistics for normalising before diffusion
    latent_std: tuple[float, ...] | None = None
    # Multiplies the normalised latents. Sparse scenes (a small object on a flat background) have
    # heavy-tailed latents that stay visible through almost all the noise, so the layout would be
    # decided in the last few percent of timesteps; a scale below 1 spreads it over the schedule.
    latent_scale: float = 1.0

    @model_validator(mode="after")
    def _check(self) -> "VAEConfig":
        s = self.spatial_compression
        if s < 1 or s & (s - 1):
            raise ValueError(f"vae.spatial_compression must be a power of two (1, 2, 4, 8, 16), got {s}")
        levels = int(math.log2(s))
        if len(self.channels) != levels + 1:
            raise ValueError(
                f"vae.channels needs {levels + 1} entries for spatial_compression {s} "
                f"(one per resolution), got {len(self.channels)}"
            )
        if self.temporal_compression < 1:
            raise ValueError(f"vae.temporal_compression must be >= 1, got {self.temporal_compression}")
        for name in ("latent_channels", "temporal_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"vae.{name} must be >= 1, got {getattr(self, name)}")
        if self.temporal_blocks < 0:
            raise ValueError(f"vae.temporal_blocks must be >= 0, got {self.temporal_blocks}")
        if min(self.channels) < 1:
            raise ValueError(f"vae.channels entries must be >= 1, got {list(self.channels)}")
        if not (math.isfinite(self.latent_scale) and self.latent_scale > 0):
            raise ValueError(f"vae.latent_scale must be a positive number, got {self.latent_scale}")
        for name in ("latent_mean", "latent_std"):
            stats = getattr(self, name)
            if stats is not None and len(stats) != self.latent_channels:
                raise ValueError(
                    f"vae.{name} needs {self.latent_channels} values (vae.latent_channels), got {len(stats)}"
                )
        return self


class DiTConfig(_Frozen):
    """Stage 3: diffusion transformer over spacetime latent patches."""

    width: int = 128  # D: token width
    depth: int = 2  # transformer blocks
    heads: int = 4  # attention heads (width must divide by heads)
    mlp_ratio: float = 4.0  # MLP hidden width / width
    patch_size: tuple[int, int, int] = (1, 2, 2)  # latent frames x latent rows x latent cols per token
    pooled_text: bool = True  # add the mean text embedding to the timestep conditioning (adaLN)
    # "full": one self-attention over all tokens of the window. "factorized": attention within
    # each token-frame, then across token-frames at each spatial position (VDM, Ho et al. 2022;
    # Latte, Ma et al. 2024): what happens at a place in one frame reaches the same place in
    # the others from the first step, which a small model on a small budget does not learn
    # from full attention (measured: see docs/training-log.md).
    attention: Literal["full", "factorized"] = "full"
    # A depthwise convolution over neighbouring token-frames in every block (kernel 3, then a
    # zero-initialised linear map): each place is mixed with the same place one frame before
    # and after, whatever the tokens hold. Attention between noisy frames follows their noise;
    # without this the DiT denoised every latent frame on its own (docs/training-log.md).
    temporal_conv: bool = False
    # Self-conditioning (Chen, Zhang & Hinton 2022, "Analog Bits", sec. 3.2): the model also
    # sees its previous estimate of the clean latents (zeros at the first sampler step, and in
    # half of the training batches), so a layout once estimated is refined, not re-decided.
    self_condition: bool = False
    # Channels of a convolutional head (0 = none): the linear head's prediction refined at latent
    # resolution by two 3x3 convolutions within each frame, which see across the patch borders;
    # they read per-pixel features of the last tokens, the noisy latents and that prediction.
    # The last convolution starts at zero, so a model gains the head without changing.
    conv_head: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "DiTConfig":
        if self.heads < 1:
            raise ValueError(f"dit.heads must be at least 1, got {self.heads}")
        if self.width < 1:
            raise ValueError(f"dit.width must be at least 1, got {self.width}")
        if not self.mlp_ratio * self.width >= 1:
            raise ValueError(f"dit.mlp_ratio must be positive (the MLP's width / dit.width), got {self.mlp_ratio}")
        if self.width % self.heads:
            raise ValueError(f"dit.width ({self.width}) must be divisible by dit.heads ({self.heads})")
        if min(self.patch_size) < 1:
            raise ValueError(f"dit.patch_size entries must be >= 1, got {list(self.patch_size)}")
        if self.depth < 1:
            raise ValueError(f"dit.depth must be >= 1, got {self.depth}")
        return self


class SamplerConfig(_Frozen):
    """The diffusers scheduler and the denoising loop."""

    kind: Literal["ddim", "ddpm"] = "ddim"  # which diffusers scheduler samples
    steps: int = 20  # denoising steps
    guidance: float = 4.0  # classifier-free guidance scale (1 = off)
    negative_prompt: str = ""  # text steered away from (the empty prompt is the unconditional input)
    num_train_timesteps: int = 1000  # length of the training noise schedule
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "trailing"
    rescale_betas_zero_snr: bool = True  # Lin et al. 2023: the last step starts from pure noise
    # Divides the signal-to-noise ratio of every timestep by shift**2 (the resolution shift of
    # SD3, Esser et al. 2024, sec. 5.3.2). Sparse scenes (a small object on a flat background)
    # stay recognisable through almost all the noise of the plain schedule, so their layout
    # would be decided in the last few percent of timesteps; a shift spreads it over the schedule.
    schedule_shift: float = Field(1.0, gt=0)
    # Share of each latent frame's noise variance that is one draw common to all frames of a
    # window (the mixed noise prior of PYoCo, Ge et al. 2023); 0 = independent noise per frame.
    # Part of the model: training and sampling must use the same value. With it, every frame
    # starts from the same seed for where things are, instead of each settling on its own.
    # (It sets the starting noise; DDPM's noise added at each step stays independent.)
    noise_correlation: float = Field(0.0, ge=0, lt=1)
    # Long videos are generated window by window; each window continues the one before.
    window: int = 9  # latent frames denoised together (the training window)
    # A window the video needs fewer frames of (a video shorter than one window, the last window of a long one)
    # is still denoised whole, and the frames past the video's end dropped: the model learned windows of this
    # length, and in a 1-s video from the built-in model's 5-frame window objects faded out (session 35).
    full_windows: bool = True
    context_frames: int = 3  # latent frames of the previous window carried over as context
    context_timestep: int = 0  # noise level the context frames are re-noised to (0 = clean)
    # Guidance of the windows after the first (None = `guidance`). Their context already holds the
    # scene, so 1 (no unconditional pass) halves their cost.
    continuation_guidance: float | None = Field(None, ge=0)
    # Denoising steps of the windows after the first (None = `steps`): their context frames already
    # fix the scene, so they may need fewer steps than the text-to-video first window.
    continuation_steps: int | None = None
    # Guidance only at timesteps lo <= t <= hi (Kynkaeaenniemi et al. 2024, "Applying guidance in a
    # limited interval"); the other steps take the conditional prediction alone, one forward
    # instead of two. None = guidance at every step.
    guidance_interval: tuple[int, int] | None = None
    # Staircase denoising: latent frame k starts k*frame_lag steps after the first (0 = all frames
    # together). Costs floor((frames - 1) * frame_lag) extra model calls per window.
    frame_lag: float = Field(0.0, ge=0)
    # A self-conditioned DiT under guidance: give its conditional and unconditional passes each
    # their own previous x0 estimate (true), as in training, instead of both the guided one (false).
    branch_estimates: bool = False

    @model_validator(mode="after")
    def _windows(self) -> "SamplerConfig":
        if not 0 <= self.context_frames < self.window:
            raise ValueError(
                f"sampler.context_frames must be between 0 and sampler.window - 1 ({self.window - 1}), got {self.context_frames}"
            )
        if not 0 <= self.context_timestep < self.num_train_timesteps:
            raise ValueError(f"sampler.context_timestep must be in [0, {self.num_train_timesteps}), got {self.context_timestep}")
        if self.guidance_interval is not None:
            lo, hi = self.guidance_interval
            if not 0 <= lo <= hi < self.num_train_timesteps:
                raise ValueError(f"sampler.guidance_interval must be [lo, hi] with 0 <= lo <= hi < {self.num_train_timesteps}, "
                                 f"got [{lo}, {hi}]")
        return self

    @field_validator("steps", "continuation_steps")
    @classmethod
    def _steps(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= 1000:
            raise ValueError(f"must be between 1 and 1000, got {v}")
        return v

    @field_validator("guidance")
    @classmethod
    def _guidance(cls, v: float) -> float:
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"must be a finite number >= 0, got {v}")
        return v


class VideoConfig(_Frozen):
    """What to generate."""

    seconds: float = Field(2.0, allow_inf_nan=True)  # duration (nan and inf are refused by plan_video, naming --seconds)
    fps: int = 8  # frames per second of the output
    # Frames per second the model makes (the rate of the clips it was trained on; a model folder records it).
    # Output at another `fps` is resampled in time from the model's frames, each output frame showing the
    # model frame current at its time (held or skipped), so that motion keeps its speed. None = fps.
    model_fps: int | None = Field(None, ge=1)
    width: int = 64  # generated width in pixels (a multiple of vae.spatial_compression x dit.patch_size)
    height: int = 64  # generated height in pixels
    upscale: int = 1  # integer factor the frames are enlarged by for viewing (nearest neighbour)
    crf: int = 18  # quality of mp4 (H.264: 0 = lossless .. 51 = worst) and webm (VP9: 0 .. 63); unused by gif, frames
    max_seconds: float = 3600.0  # longest video accepted
    format: Literal["mp4", "webm", "gif", "frames"] = "mp4"  # output: H.264 MP4, VP9 WebM, GIF, or a folder of PNGs
    # Final frame size (width, height) in pixels, given as "WxH"; None = width x height times upscale.
    # The frames (after upscale) are scaled to fit inside it keeping their aspect ratio and
    # centred on black bars (letterbox or pillarbox) when the aspect ratios differ.
    output_size: tuple[int, int] | None = None

    @property
    def model_rate(self) -> int:
        """Frames per second the model makes: model_fps, or fps where it is not set."""
        return self.model_fps or self.fps

    @property
    def written_size(self) -> tuple[int, int]:
        """(width, height) of the frames written: output_size, or the frames enlarged by upscale."""
        return self.output_size or (self.width * self.upscale, self.height * self.upscale)

    @field_validator("output_size", mode="before")
    @classmethod
    def _parse_size(cls, v: Any) -> Any:
        if isinstance(v, str):
            m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", v)
            if not m:
                raise ValueError("must be WIDTHxHEIGHT in pixels, e.g. 640x360")
            return (int(m.group(1)), int(m.group(2)))
        if isinstance(v, (int, float)) and not isinstance(v, bool):  # (YAML reads 0x10 as the number 16)
            raise ValueError("must be WIDTHxHEIGHT in pixels, e.g. 640x360, not a number")
        return v

    @model_validator(mode="after")
    def _check_output(self) -> "VideoConfig":
        if not self.max_seconds > 0:  # also false for nan
            raise ValueError(f"video.max_seconds must be a positive number of seconds, got {self.max_seconds}")
        if self.output_size is not None:
            w, h = self.output_size
            if not (2 <= w <= 8192 and 2 <= h <= 8192):
                raise ValueError(f"video.output_size sides must be between 2 and 8192 pixels, got {w}x{h}")
            if self.format in ("mp4", "webm") and (w % 2 or h % 2):
                raise ValueError(
                    f"video.output_size {w}x{h}: {self.format} needs an even width and height (yuv420p); "
                    f"e.g. {w + w % 2}x{h + h % 2}"
                )
        top = {"mp4": 51, "webm": 63}.get(self.format)
        if top is not None and not 0 <= self.crf <= top:
            raise ValueError(f"video.crf for {self.format} must be between 0 (best) and {top} (worst), got {self.crf}")
        return self


class DataConfig(_Frozen):
    """Training data: a manifest of (video, caption) records, or the Shapes World rendered on the fly."""

    kind: Literal["shapes", "manifest"] = "shapes"  # shapes: procedural (WORLD.md); manifest: `path`/manifest.jsonl
    path: str | None = None  # dataset folder holding manifest.jsonl (kind: manifest)
    clips: int = Field(4000, ge=1)  # clips encoded once into the DiT's latent cache
    clip_latent_frames: int = 11  # latent frames per cached clip (1 + f (n - 1) frames each, f = vae.temporal_compression)
    long_fraction: float = Field(0.3, ge=0, le=1)  # shapes: share of clips cut from long trajectories (start time > 0)
    max_start_seconds: float = Field(60.0, ge=0)  # shapes: latest start time of such a clip
    chinese_fraction: float = Field(0.0, ge=0, le=1)  # shapes: share of captions in Chinese
    two_object_fraction: float = Field(0.5, ge=0, le=1)  # shapes: share of scenes with two objects (WORLD.md: one or two)

    @model_validator(mode="after")
    def _path_means_manifest(self) -> "DataConfig":
        if self.kind == "shapes" and self.path is not None:
            raise ValueError(f"data.path applies to data.kind: manifest only; got data.kind: shapes with "
                             f"data.path {self.path!r} (add data.kind: manifest to train on that folder)")
        return self


class VAETrainConfig(_Frozen):
    """Stage 1 of training: the video VAE."""

    steps: int = Field(2000, ge=0)  # optimizer steps
    batch_size: int = Field(8, ge=1)  # clips per step
    clip_frames: int = Field(9, ge=1)  # frames per training clip (1 + f*k)
    lr: float = Field(1e-3, ge=0)  # AdamW learning rate (cosine decay to 10%)
    kl_weight: float = 1e-6  # weight of the KL term: small, so the posterior is near-deterministic
    edge_weight: float = 1.0  # weight of the image-gradient (edge) loss
    object_weight: float = 4.0  # extra weight of pixels that belong to objects (off the background)
    # Shape separation (Shapes World data): each scene is trained beside its shape twin (circle <-> square,
    # triangle -> circle, at the same places) and its background alone, and the loss adds
    # shape_separation * relu(shape_separation_target - |mu - mu_twin|^2 / |mu - mu_background|^2) over
    # the encoder's means (no gradient through the denominator): a squared ratio, so the target 0.5
    # asks a twin to lie 0.71 of the object's own latent norm away (a square and a circle are 0.31 of
    # it apart in the pixels, 0.29 in a VAE trained without it; docs/training-log.md, session 17). A step
    # takes batch_size / 3 scenes (batch_size a multiple of 3), each with its twin and background. 0 = off.
    shape_separation: float = Field(0.0, ge=0)
    shape_separation_target: float = Field(0.5, gt=0)
    # Start from the VAE of this model folder, or of this run folder whose VAE stage has finished (a
    # fine-tune; same vae config), instead of random weights (train.vae_model instead skips the VAE
    # stage and uses that VAE as it is).
    init_model: str | None = None

    @model_validator(mode="after")
    def _whole_triples(self) -> "VAETrainConfig":
        if self.shape_separation > 0 and self.batch_size % 3:
            raise ValueError(f"batch_size must be a multiple of 3 with shape_separation (a scene, its twin and its "
                             f"background), got {self.batch_size}")
        return self


class DiTTrainConfig(_Frozen):
    """Stage 2 of training: the DiT together with the small T5."""

    steps: int = Field(4000, ge=0)  # optimizer steps (0: a fine-tune exports its init_model as trained)
    batch_size: int = Field(32, ge=1)  # windows per step
    window: int = Field(9, ge=1)  # latent frames per training window
    lr: float = Field(4e-4, ge=0)  # AdamW learning rate of the DiT (cosine decay to 10%, after warm-up)
    text_lr: float = Field(1e-3, ge=0)  # learning rate of the small T5
    warmup: int = Field(200, ge=0)  # linear warm-up steps
    ema_decay: float = Field(0.999, ge=0, le=1)  # EMA of the weights used for sampling and shipping
    caption_dropout: float = Field(0.1, ge=0, le=1)  # share of captions replaced by "" (classifier-free guidance)
    context_fraction: float = Field(0.5, ge=0, le=1)  # share of windows given clean leading context frames (no loss on them)
    max_context: int = Field(4, ge=1)  # most context latent frames (below window: a window keeps frames to learn from)
    context_noise: int = 50  # highest timestep a context frame is re-noised to
    # Timesteps are drawn as t = T * u**(1/p), u uniform: p = 1 is uniform, p = 2 makes the density
    # grow linearly with t (3/4 of the windows in the noisier half, where the layout is decided).
    timestep_power: float = Field(1.0, gt=0)
    # "unit_variance" divides each window's loss by the variance of its v target,
    # alpha_bar + (1 - alpha_bar) * vae.latent_scale**2 (EDM's lambda = 1 / c_out**2, Karras et al. 2022):
    # with latents smaller than the noise the noisy timesteps would otherwise count for little.
    loss_weighting: Literal["none", "unit_variance"] = "none"
    # Share of windows whose frames each get their own timestep (diffusion forcing) instead of one
    # shared t: a frame noisier than its neighbours must be predicted from them.
    frame_noise: float = Field(0.0, ge=0, le=1)
    # Stop (with a checkpoint) after this step, leaving the learning-rate schedule set by `steps`;
    # a later `--resume`, possibly with other settings, continues it. None = run to `steps`.
    stop_after: int | None = Field(None, ge=1)
    # Start the DiT and the small T5 from this model folder (a fine-tune) instead of random
    # weights; it must have been trained on latents of the same VAE. Inputs that the new
    # config adds (dit.self_condition) start at zero, so the model begins as the old one.
    init_model: str | None = None
    # Direction contrast (Shapes World captions): up to `direction_contrast_rows` windows of a batch
    # that have no context and a caption naming a direction are drawn at one timestep t >=
    # `direction_contrast_min_t` (where the motion is laid out) and scored a second time with the
    # direction words swapped (left <-> right, up <-> down); the loss adds weight * softplus((L_true -
    # L_swapped) / (0.1 L_true)), so a prediction that ignores the direction word costs. 0 = off.
    direction_contrast: float = Field(0.0, ge=0)
    # Both contrasts start at this step (0 = from the start). The shipped model's lineage took them
    # only as fine-tunes of a model that had laid out its scenes first (its card).
    contrast_from: int = Field(0, ge=0)
    direction_contrast_rows: int = Field(4, ge=1)
    direction_contrast_min_t: int = Field(500, ge=0, le=999)
    # Shape contrast, the same with the shape words swapped (circle <-> square, ball <-> box, triangle ->
    # circle) on up to `shape_contrast_rows` other windows, drawn at a timestep in `shape_contrast_t`
    # [lo, hi), where a shape is settled (the model's x0 for a square at t <= 300 was the same whatever
    # shape word it was given: docs/training-log.md, session 15). 0 = off.
    shape_contrast: float = Field(0.0, ge=0)
    shape_contrast_rows: int = Field(4, ge=1)
    shape_contrast_t: tuple[int, int] = (30, 500)
    # Shape weight (Shapes World data): each latent pixel's squared error counts 1 + shape_weight * cue,
    # the cue being the share of its area where the object's coverage differs from its twin shape's
    # (shapes.SHAPE_TWINS) at the same place (the few pixels that tell a square from a circle: about 1%
    # of an object's loss unweighted, docs/training-log.md, session 9). 0 = off.
    shape_weight: float = Field(0.0, ge=0)
    # Twin inputs (Shapes World data): up to `twin_rows` windows of a batch that have no context and a
    # caption (and not taken by a contrast, whose rows are chosen first) are noised, at one timestep in
    # `twin_t` [lo, hi), from their latents moved a random share (uniform in [0, 1]) of the way to their
    # shape twin's (the same scene with circles and squares swapped, triangles drawn as circles, held-out
    # combinations never made), and must still predict their own clean latents. In the data
    # a noisy frame always holds the true shape, so a model learns to copy the shape its input suggests
    # and ignore the word where shapes are settled; at sampling its input is its own rounded guess
    # (docs/training-log.md, sessions 15 and 24). These rows teach it to take the shape from the word there.
    # 0 rows = off.
    twin_rows: int = Field(0, ge=0)
    twin_t: tuple[int, int] = (30, 300)
    # Text binding (Shapes World captions): a linear probe on the small T5's output tokens (training
    # only, not shipped) must read from each token of an object's words that object's colour, shape,
    # size (named or not) and motion; the loss adds text_binding * its cross-entropy. The T5 trained by
    # the DiT's loss alone encoded each word by itself and its place (a word changed by 0.1% when the
    # other object's words were swapped: docs/training-log.md, session 26), so "square" did not say
    # which colour it was, and a caption of two objects was a bag of attributes. 0 = off.
    text_binding: float = Field(0.0, ge=0)
    # Redrawn windows (Shapes World; a fine-tune of train.dit.init_model): `redraw_windows` windows are generated
    # by the init model from pure noise for training captions at the stage's start (the run folder keeps them),
    # and each in which the detector finds every caption object is redrawn by the renderer where the DiT put
    # them, each object as its caption's shape (soragen.data.redraw, lean=False). `redraw_rows` rows of each
    # batch then take one: noised from the DiT's own latents at one timestep in `redraw_t` [lo, hi), they must
    # predict the latents of the redrawn frames. The data teaches a model to keep the shape its input suggests;
    # at sampling its input is its own blob (a square with wavy sides, drawn round), and these rows teach it to
    # make the caption's shape from that blob. 0 rows = off.
    # Only windows whose every object is one of `redraw_shapes` are taken (by default no triangles: redrawn
    # triangles sit up to a pixel off the DiT's own from frame to frame, and rows of them taught it rounder
    # triangles; docs/training-log.md, session 43).
    # With `redraw_motion` only windows whose every object already moves as its caption says (the eval detector's
    # judgement of the DiT's own frames) are taken: the redrawn target keeps the DiT's motion, so a window that
    # moves the wrong way would teach the DiT its own mistake (off: it moved the eval less than its noise,
    # docs/training-log.md, session 44).
    redraw_windows: int = Field(0, ge=0)
    redraw_rows: int = Field(0, ge=0)
    redraw_t: tuple[int, int] = (30, 1000)
    redraw_shapes: tuple[Literal["circle", "square", "triangle"], ...] = Field(("circle", "square"), min_length=1)
    redraw_motion: bool = False

    @field_validator("shape_contrast_t", "twin_t", "redraw_t")
    @classmethod
    def _shape_span(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] < v[1] <= 1000:
            raise ValueError(f"must be [lo, hi] with 0 <= lo < hi <= 1000, got {list(v)}")
        return v


class DecoderTrainConfig(_Frozen):
    """Stage 3 of training (optional): the VAE decoder fine-tuned on the DiT's own latents.

    Real clips are encoded, noised to one of the sampler's last timesteps and denoised by the
    trained DiT with the sampler (guidance and self-conditioning as in generation); the decoder
    learns to turn those latents, which the DiT leaves softer than the encoder's, back into the
    real frames. The encoder and so the latent space stay fixed: the DiT stays valid.
    """

    steps: int = Field(300, ge=0)  # optimizer steps
    batch_size: int = Field(4, ge=1)  # clips per step
    clip_frames: int = Field(17, ge=1)  # frames per clip (1 + f*k)
    lr: float = Field(2e-4, ge=0)  # AdamW learning rate of the decoder (cosine decay to 10%)
    last_steps: int = Field(4, ge=1)  # clips start at one of the sampler's last N timesteps
    clean_fraction: float = Field(0.25, ge=0, le=1)  # share of steps decoding the encoder's own latents
    # Redrawn windows (Shapes World): `redraw_windows` windows of clip_frames frames are generated from pure
    # noise for training captions at the stage's start (the run folder keeps them), and each that the
    # detector can read is redrawn by the renderer where the DiT put its objects (soragen.data.redraw);
    # `redraw_rows` rows of each batch then decode the DiT's latents of one of them, to the redrawn frames.
    # The other rows are real clips, as above. 0 = off.
    redraw_windows: int = Field(0, ge=0)
    redraw_rows: int = Field(0, ge=0)


class TrainConfig(_Frozen):
    """Where and how often to write."""

    output_dir: str = "runs/default"  # checkpoints, logs, samples and the final model folder
    # Which stages this run trains, in order; "decoder" (after "dit") fine-tunes the VAE decoder on the DiT's latents.
    stages: tuple[Literal["vae", "dit", "decoder"], ...] = ("vae", "dit")
    vae_model: str | None = None  # reuse the VAE of this model folder (or run folder) instead of training one
    checkpoint_every: int = Field(250, ge=1)  # optimizer steps between checkpoints
    sample_every: int = Field(500, ge=1)  # steps between sample videos (and detector scores)
    log_every: int = Field(25, ge=1)  # steps between metric lines
    keep_checkpoints: int = Field(2, ge=1)  # newest checkpoints kept
    vae_gate_clips: int = Field(96, ge=0)  # Shapes World clips the detector scores the VAE's reconstructions on (0 = skip)
    threads: int = Field(0, ge=0)  # torch threads (0 = all cores)
    # Mixed precision (accelerate's autocast; the weights and optimizer stay fp32): "no", "bf16" (GPUs from Ampere on,
    # and CPUs with AMX or AVX-512 BF16, where a DiT step of the recipe took 0.67-0.85 s against fp32's 1.20-1.32 s),
    # or "fp16" (GPUs, with loss scaling). It replaces `accelerate launch --mixed_precision`, which soragen does not read.
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    vae: VAETrainConfig = VAETrainConfig()
    dit: DiTTrainConfig = DiTTrainConfig()
    decoder: DecoderTrainConfig = DecoderTrainConfig()

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_read_as_false(cls, v: Any) -> Any:
        """YAML reads the word no as false: `mixed_precision: no` and `--set train.mixed_precision=no` mean "no"."""
        return "no" if v is False else v

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("is empty; give one or more of vae, dit, decoder, e.g. [vae, dit]")
        return v


class Config(_Frozen):
    """Everything that defines a run; written beside every output and in every checkpoint."""

    model: str | None = None  # model folder with trained weights; None = random weights (testing only)
    seed: int = 0  # seed of the initial noise, 0 .. MAX_SEED
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    vae: VAEConfig = VAEConfig()
    dit: DiTConfig = DiTConfig()
    sampler: SamplerConfig = SamplerConfig()
    video: VideoConfig = VideoConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if not 0 <= v <= MAX_SEED:
            raise ValueError(f"must be between 0 and {MAX_SEED}, got {v}")
        return v

    @model_validator(mode="after")
    def _whole_patches(self) -> "Config":
        pt = self.dit.patch_size[0]  # a window, and the context carried over, are whole token-frames
        for name, value in (("window", self.sampler.window), ("context_frames", self.sampler.context_frames)):
            if value % pt:
                raise ValueError(f"sampler.{name} {value} must be a multiple of the temporal patch size "
                                 f"dit.patch_size[0] = {pt}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON/YAML values."""
        return json.loads(self.model_dump_json())

    def to_yaml(self) -> str:
        """The config as YAML text, loadable with `load_config`."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def digest(self) -> str:
        """A short stable hash of the resolved config (video.model_fps left out where it is the output's rate,
        and sampler.continuation_steps where it is unset or `steps`, as before these settings existed: the
        same frames, the same hash; sampler.full_windows where false, as videos were made before it)."""
        data = self.to_dict()
        if data["video"].get("model_fps") in (None, data["video"]["fps"]):
            del data["video"]["model_fps"]
        if data["sampler"].get("continuation_steps") in (None, data["sampler"]["steps"]):
            del data["sampler"]["continuation_steps"]
        if not data["sampler"].get("full_windows", True):
            del data["sampler"]["full_windows"]
        text = json.dumps(data, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def valid_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections included."""
    keys = []
    for name, field in model.model_fields.items():
        key = prefix + name
        keys.append(key)
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys += valid_keys(sub, key + ".")
    return keys


def _unknown_key(key: str) -> UserError:
    keys = valid_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid sections: {', '.join(Config.model_fields)}"
    return UserError(f"unknown config key {key!r}{hint}")


def _check_keys(data: dict[str, Any], model: type[BaseModel], prefix: str = "") -> None:
    for key, value in data.items():
        if not isinstance(key, str) or key not in model.model_fields:  # YAML also allows keys like 1 or true
            raise _unknown_key(prefix + str(key))
        sub = model.model_fields[key].annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            if not isinstance(value, dict):
                raise UserError(f"config key '{prefix}{key}' is a section; give it a mapping, not {value!r}")
            _check_keys(value, sub, prefix + key + ".")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (["a", "b", "c"], parsed value); values are YAML scalars or lists, but a text
    setting's value is its words as written (YAML reads a quoted one; null clears it)."""
    if "=" not in text:
        raise UserError(f"--set expects key.path=value, got {text!r}")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise UserError(f"--set expects key.path=value with a non-empty dotted key, got {text!r}")
    text = raw.strip()
    if _takes_text(parts) and text[:1] not in ("'", '"') and text not in ("null", "Null", "NULL", "~"):
        return parts, text  # a text setting takes the words as written: negative_prompt=yes, "blurry, #1 worst"
    try:
        value = yaml.safe_load(raw) if text else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the text as a string, validation judges it
    return parts, value


def _takes_text(parts: list[str]) -> bool:
    """Whether the config key `parts` names a text field (str, or str | None); False for unknown keys."""
    model: type[BaseModel] = Config
    for part in parts[:-1]:
        sub = model.model_fields[part].annotation if part in model.model_fields else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return False
        model = sub
    field = model.model_fields.get(parts[-1])
    return field is not None and field.annotation in (str, str | None)


def apply_override(data: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set data[p0][p1]...[pn] = value, checking each key against the schema."""
    model: type[BaseModel] = Config
    node = data
    for i, part in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        if part not in model.model_fields:
            raise _unknown_key(dotted)
        sub = model.model_fields[part].annotation
        last = i == len(parts) - 1
        is_section = isinstance(sub, type) and issubclass(sub, BaseModel)
        if last:
            if is_section and not isinstance(value, dict):
                raise UserError(f"config key '{dotted}' is a section; set one of its keys, e.g. '{dotted}.<key>=...'")
            node[part] = value
        else:
            if not is_section:
                raise UserError(f"config key '{dotted}' is a value, not a section; cannot set '{'.'.join(parts)}'")
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"config key '{dotted}' is a section; give it a mapping")
            model = sub


def read_text(path: Path, what: str) -> str:
    """A user-given text file (UTF-8, BOM dropped), every failure turned into one clear line naming `what`."""
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give the file itself")
    if not path.exists():  # (a pipe, as bash's <(...) gives, is read as a file)
        raise UserError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from None


def frame_count(seconds: float, fps: float) -> int:
    """Frames in `seconds` at `fps`, a half frame rounded up (Python's round sends halves to the even number, so
    2.5 s at 1 fps would give 2 frames and 3.5 s 4)."""
    return math.floor(seconds * fps + 0.5)


def text_lines(text: str) -> list[str]:
    """Lines ended by \n, \r\n or \r only, as an editor numbers them: unlike str.splitlines, a form feed or
    U+0085 and U+2028 stay inside a line (JSON strings, and the manifests batch writes with ensure_ascii=False,
    may hold them raw)."""
    return re.split(r"\r\n?|\n", text)


def _key_twice(node) -> tuple[str, int] | None:
    """(key, line) of the first key given twice in one mapping of a composed YAML document, or None. safe_load keeps
    the last silently: a second `dit:` section would drop the first."""
    stack = [node]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        return key.value, key.start_mark.line + 1
                    seen.add(key.value)
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return None


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping with safe_load (and no key given twice), turning every failure into one clear line."""
    path = Path(path)
    text = read_text(path, "config file")
    try:
        data = yaml.safe_load(text)
        twice = _key_twice(yaml.compose(text, Loader=yaml.SafeLoader))  # nodes only: nothing is constructed
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise UserError(f"config file {path} is malformed YAML{where}: {problem}") from None
    if twice is not None:
        raise UserError(f"config file {path} gives the key '{twice[0]}' twice in one mapping (line {twice[1]}); "
                        "give each key once (merge the two sections)")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys (e.g. 'dit: {{depth: 4}}'), got {type(data).__name__}")
    return data


def build_config(data: dict[str, Any]) -> Config:
    """Validate a nested mapping into a Config, with one-line errors."""
    _check_keys(data, Config)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        given = err.get("input")
        said = msg.endswith((f"got {given}", f"got {given!r}"))  # soragen's own checks name the value
        shown = "" if isinstance(given, dict) or said else f" (got {given!r})"
        named = not key or msg.startswith(f"{key}.")  # a section's check names its own keys
        raise UserError(f"{msg}{shown}" if named else f"config key '{key}': {msg}{shown}") from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    values: dict[str, Any] | None = None,
    *,
    builtin_default: bool = True,
) -> Config:
    """Load a YAML preset (or the defaults), apply `key.path=value` overrides, then typed
    `values` ({"video.seconds": 2.0}, as CLI flags give them), and validate once.

    With no preset and no `model`, the built-in model (when installed) is the base for
    generation; `builtin_default=False` (training) keeps the schema defaults instead."""
    data = read_yaml(Path(path)) if path is not None else {}
    _check_keys(data, Config)
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(data, parts, value)
    for key, value in (values or {}).items():
        apply_override(data, key.split("."), value)
    if path is None and "model" not in data and builtin_default:
        from soragen.model_io import builtin_installed

        if builtin_installed():  # no config given: the built-in model is the default
            data["model"] = "builtin"
    model = data.get("model", Config.model_fields["model"].default)
    if model is not None:
        # Layers: schema defaults < the model folder's own config < the file < --set.
        from soragen.model_io import model_config_data

        if not isinstance(model, str):
            raise UserError(f"config key 'model' must be a folder path or 'builtin', got {model!r}")
        base = model_config_data(model)
        _check_keys(base, Config)
        video = base.get("video")
        if isinstance(video, dict) and video.get("model_fps") is None:  # a folder saved before video.model_fps:
            video["model_fps"] = video.get("fps", VideoConfig.model_fields["fps"].default)  # its rate is its fps
        data = merge(base, data)
        _keep_folder_values(base, data)
        data["model"] = model
        try:
            return build_config(data)
        except UserError as e:
            try:
                build_config({**base, "model": None})
            except UserError:  # the folder's own config is at fault: name the file to fix
                from soragen.model_io import resolve_model

                raise UserError(f"model folder {resolve_model(model)}: its soragen.yaml is not valid: {e}") from None
            raise
    return build_config(data)


# Settings a model folder records about its weights: measured in training, so the config a run began with holds
# null for them. A null from --config or --set does not replace the folder's value.
WEIGHT_FACTS = (("vae", "latent_mean"), ("vae", "latent_std"), ("video", "model_fps"))


# The small T5's settings: a model folder's own text encoder (text_encoder/, used unless text_encoder.pretrained
# names another) has them built in, whatever --config or --set say.
TEXT_ENCODER_BUILT = ("tokenizer", "d_model", "num_layers", "num_heads", "d_kv", "d_ff")


def _keep_folder_values(base: dict[str, Any], data: dict[str, Any]) -> None:
    """Put back, in the merged config `data`, what the model folder's config `base` fixes: its WEIGHT_FACTS where the
    layers above left null, and its small-T5 settings wherever they changed them (the folder's text encoder is what
    runs, and the config and sidecars record it; said at debug level: a full preset given with --model changes them
    all, and its vae and dit settings then make the one error line)."""
    import logging

    for section, key in WEIGHT_FACTS:
        ours, theirs = data.get(section), base.get(section)
        if isinstance(ours, dict) and isinstance(theirs, dict) and ours.get(key) is None and theirs.get(key) is not None:
            ours[key] = theirs[key]
    theirs, ours = base.get("text_encoder"), data.get("text_encoder")
    if not (isinstance(theirs, dict) and isinstance(ours, dict)) or ours.get("pretrained") is not None:
        return
    changed = [k for k in TEXT_ENCODER_BUILT if k in theirs and k in ours and ours[k] != theirs[k]]
    if changed:
        logging.getLogger(__name__).debug(
            "%s: ignored; the model folder's own text encoder runs (%s)",
            ", ".join(f"text_encoder.{k} {ours[k]!r}" for k in changed),
            ", ".join(f"{k} {theirs[k]!r}" for k in changed))
        for k in changed:
            ours[k] = theirs[k]


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: values in `top` win."""
    out = dict(base)
    for key, value in top.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def update(cfg: Config, **sections: dict[str, Any]) -> Config:
    """A copy of cfg with some fields of some sections replaced, validated again."""
    data = cfg.to_dict()
    for section, values in sections.items():
        if isinstance(data.get(section), dict):
            data[section].update(values)
        else:
            data[section] = values
    return build_config(data)
