"""Stage 3 loop: diffusers schedulers and the visible denoising loop with classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable

import torch

from soragen.config import SamplerConfig
from soragen.dit import DiT


def shifted_betas(betas: torch.Tensor, shift: float) -> list[float]:
    """Betas whose alpha_bar has the signal-to-noise ratio of `betas` divided by shift**2."""
    alpha_bar = torch.cumprod(1.0 - betas.double(), dim=0)
    snr = alpha_bar / (1.0 - alpha_bar)
    shifted = snr / shift**2
    alpha_bar = shifted / (1.0 + shifted)  # (T,)
    ratio = alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    return (1.0 - ratio).clamp(max=0.999).tolist()


def make_scheduler(cfg: SamplerConfig):
    """The diffusers scheduler the config names (DDIM or DDPM), over the training noise schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        timestep_spacing=cfg.timestep_spacing,
        rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
        clip_sample=False,
    )
    if cfg.schedule_shift != 1.0:  # the plain schedule's betas, shifted (zero terminal SNR is applied after)
        plain = DDPMScheduler(**{**common, "rescale_betas_zero_snr": False})
        common["trained_betas"] = shifted_betas(plain.betas, cfg.schedule_shift)
    match cfg.kind:
        case "ddim":
            return DDIMScheduler(**common, set_alpha_to_one=True)
        case "ddpm":
            return DDPMScheduler(**common, variance_type="fixed_small")


@torch.no_grad()
def denoise(
    dit: DiT,
    scheduler,
    noise: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    steps: int,
    guidance: float,
    generator: torch.Generator,
    context: torch.Tensor | None = None,
    context_timestep: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Denoise `noise` [B, C, T, H, W] into clean latents.

    text/text_mask hold the conditional batch followed by the unconditional (negative
    prompt) batch, [2B, L, D] / [2B, L], when guidance != 1, else just [B, L, D].
    `context` [B, C, Tc, H, W] fixes the first Tc latent frames (clean, or re-noised to
    `context_timestep`); they carry their own per-frame timestep and are never stepped.
    """
    b, _, t_frames, _, _ = noise.shape
    guided = guidance != 1.0
    n_ctx = 0 if context is None else context.shape[2]

    # 1. Timesteps and the initial latents x_T.
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma  # (B, C, T, H, W)
    if n_ctx:
        ctx_t = torch.full((b,), context_timestep, dtype=torch.long)
        ctx = scheduler.add_noise(context, torch.randn(context.shape, generator=generator), ctx_t) if context_timestep else context

    # 2. Denoising loop.
    for i, t in enumerate(scheduler.timesteps):
        # 2a. Per-frame timesteps: context frames keep theirs, the rest are at t.
        timesteps = torch.full((b, t_frames), int(t), dtype=torch.long)  # (B, T)
        if n_ctx:
            x[:, :, :n_ctx] = ctx
            timesteps[:, :n_ctx] = context_timestep

        # 2b. Classifier-free guidance (Ho & Salimans 2022, eq. 6): one batched forward, split, combine.
        x_in = torch.cat([x, x]) if guided else x  # (2B or B, C, T, H, W)
        t_in = torch.cat([timesteps, timesteps]) if guided else timesteps
        pred = dit(x_in, t_in, text, text_mask)
        if guided:
            pred_cond, pred_uncond = pred.chunk(2)
            pred = pred_uncond + guidance * (pred_cond - pred_uncond)

        # 2c. One scheduler step x_t -> x_{t-1}.
        x = scheduler.step(pred, t, x, generator=generator).prev_sample
        if on_step is not None:
            on_step(i)

    if n_ctx:
        x[:, :, :n_ctx] = context  # context frames are given, not generated
    return x
