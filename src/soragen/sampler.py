"""Stage 3 loop: diffusers schedulers and the visible denoising loop with classifier-free guidance."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from soragen.config import SamplerConfig
from soragen.dit import DiT, TextConditioning


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


def draw_noise(shape: tuple[int, ...], generator: torch.Generator, correlation: float = 0.0) -> torch.Tensor:
    """Unit-variance Gaussian noise [B, C, T, H, W]; a share `correlation` of each value's variance
    is drawn once per window and shared by all T frames (sampler.noise_correlation)."""
    noise = torch.randn(shape, generator=generator)  # (B, C, T, H, W)
    if correlation > 0:
        shared = torch.randn((shape[0], shape[1], 1, *shape[3:]), generator=generator)  # (B, C, 1, H, W)
        noise = math.sqrt(1.0 - correlation) * noise + math.sqrt(correlation) * shared
    return noise


def frame_indices(iteration: int, frames: int, steps: int, lag: float) -> list[int]:
    """Schedule position of each frame (0 = pure noise .. steps = clean) at `iteration`, frame k lagging k*lag steps."""
    return [min(steps, max(0, iteration - math.floor(lag * k))) for k in range(frames)]


def denoise_iterations(steps: int, frames: int, lag: float) -> int:
    """Model evaluations `denoise` makes: the last frame starts floor((frames-1)*lag) iterations late."""
    return steps + math.floor(lag * max(frames - 1, 0))


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
    frame_lag: float = 0.0,
    start: int = 0,
    on_step: Callable[[int], None] | None = None,
    guidance_interval: tuple[int, int] | None = None,
    branch_estimates: bool = False,
    finish: int | None = None,
) -> torch.Tensor:
    """Denoise `noise` [B, C, T, H, W] into clean latents.

    text/text_mask hold the conditional batch followed by the unconditional (negative
    prompt) batch, [2B, L, D] / [2B, L], when guidance != 1, else just [B, L, D].
    `context` [B, C, Tc, H, W] fixes the first Tc latent frames (clean, or re-noised to
    `context_timestep`); they carry their own per-frame timestep, and are put back after every step.
    With `frame_lag` > 0 the frames are denoised in a staircase: frame k starts k*lag
    steps after the first, so each frame is denoised next to cleaner frames before it
    (the "pyramid" schedule of diffusion forcing). It takes `denoise_iterations` model calls.
    With `start` > 0 the first `start` of the `steps` timesteps are skipped: `noise` is then the
    latents at timestep scheduler.timesteps[start] (clean latents noised to it with
    `scheduler.add_noise`), and only the last steps - start steps run.
    With `guidance_interval` (lo, hi), only steps at lo <= t <= hi are guided (in the staircase,
    by the noisiest generated frame's t); the others take one conditional forward.
    With `branch_estimates`, a self-conditioned model's conditional and unconditional passes each
    get their own previous x0 estimate (as in training, where the estimate is the model's own
    unguided one) instead of both getting the guided estimate.
    With `finish`, the staircase stops once the first `finish` generated frames are clean: the frames
    after them, which the caller drops (sampler.full_windows), are left part-way.
    """
    if start and frame_lag > 0:
        raise ValueError("denoise: start > 0 is not supported with the staircase (frame_lag > 0)")
    if frame_lag > 0:
        return _denoise_staircase(dit, scheduler, noise, text, text_mask, steps=steps, guidance=guidance,
                                  generator=generator, context=context, context_timestep=context_timestep,
                                  frame_lag=frame_lag, on_step=on_step, guidance_interval=guidance_interval,
                                  branch_estimates=branch_estimates, finish=finish)
    b, _, t_frames, _, _ = noise.shape
    n_ctx = 0 if context is None else context.shape[2]
    text, text_mask = _condition_text(dit, text, text_mask)

    # 1. Timesteps and the initial latents x_T.
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma if not start else noise.clone()  # (B, C, T, H, W)
    if n_ctx:
        ctx_t = torch.full((b,), context_timestep, dtype=torch.long)
        ctx = scheduler.add_noise(context, torch.randn(context.shape, generator=generator), ctx_t) if context_timestep else context

    # 2. Denoising loop (a self-conditioned model also gets its previous x0 estimate).
    estimate = torch.zeros_like(x) if _self_conditioned(dit) else None  # (B, C, T, H, W)
    for i, t in enumerate(scheduler.timesteps[start:]):
        # 2a. Per-frame timesteps: context frames keep theirs, the rest are at t.
        timesteps = torch.full((b, t_frames), int(t), dtype=torch.long)  # (B, T)
        if n_ctx:
            x[:, :, :n_ctx] = ctx
            timesteps[:, :n_ctx] = context_timestep

        # 2b. Classifier-free guidance (Ho & Salimans 2022, eq. 6): one batched forward, split, combine.
        pred, branches = _guided(dit, x, timesteps, text, text_mask, _guidance_at(guidance, int(t), guidance_interval),
                                 estimate)
        if estimate is not None:
            estimate = next_estimate(scheduler, x, pred, branches, timesteps, branch_estimates)

        # 2c. One scheduler step x_t -> x_{t-1}.
        x = scheduler.step(pred, t, x, generator=generator).prev_sample
        if on_step is not None:
            on_step(i)

    if n_ctx:
        x[:, :, :n_ctx] = context  # context frames are given, not generated
    return x


def _self_conditioned(dit) -> bool:
    """Whether the denoiser takes its previous x0 estimate (dit.self_condition)."""
    return bool(getattr(getattr(dit, "cfg", None), "self_condition", False))


def next_estimate(scheduler, x: torch.Tensor, pred: torch.Tensor, branches: torch.Tensor | None,
                  timesteps: torch.Tensor, branch_estimates: bool) -> torch.Tensor:
    """A self-conditioned model's previous x0 estimate for its next call: one per guided branch [2B, ...]
    (conditional rows, then unconditional) with `branch_estimates` on a guided step, else the guided one [B, ...]."""
    if branch_estimates and branches is not None:
        return x0_estimate(scheduler, torch.cat([x, x]), branches, torch.cat([timesteps, timesteps]))
    return x0_estimate(scheduler, x, pred, timesteps)


def x0_estimate(scheduler, x: torch.Tensor, pred: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The clean latents implied by a prediction on x [B, C, T, H, W] at per-frame timesteps [B, T]."""
    a = scheduler.alphas_cumprod[timesteps].to(x)[:, None, :, None, None]  # (B, 1, T, 1, 1)
    if scheduler.config.prediction_type == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * pred
    return (x - (1 - a).sqrt() * pred) / a.sqrt().clamp(min=1e-4)  # epsilon


def _condition_text(dit, text: torch.Tensor, text_mask: torch.Tensor) -> tuple:
    """What the denoiser takes from the text at every step: a DiT's `condition_text`, computed once per
    window, and no mask beside it; any other denoiser gets the text and mask as they are."""
    model = getattr(dit, "module", dit)  # a DiT wrapped for distributed training
    if isinstance(model, DiT):
        return model.condition_text(text, text_mask), None
    return text, text_mask


def _first_rows(text, text_mask, n: int) -> tuple:
    """The first n rows of the text (the conditional ones of a guided batch)."""
    if isinstance(text, TextConditioning):
        return text.first(n), None
    return text[:n], text_mask[:n]


def _guided(dit: DiT, x: torch.Tensor, timesteps: torch.Tensor, text, text_mask, guidance: float,
            estimate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's prediction with classifier-free guidance (one batched forward when guided), and the
    branches' own predictions [2B, ...] (conditional rows, then unconditional; None when unguided).

    `estimate` is the previous x0 estimate, [B, ...] for both branches or [2B, ...] one per branch.
    """
    b = x.shape[0]
    if guidance == 1.0:  # text may still hold the unconditional rows after the conditional ones
        extra = {} if estimate is None else {"x_self": estimate[:b]}
        return dit(x, timesteps, *_first_rows(text, text_mask, b), **extra), None
    extra = {}
    if estimate is not None:
        extra = {"x_self": estimate if estimate.shape[0] == 2 * b else torch.cat([estimate, estimate])}
    both = dit(torch.cat([x, x]), torch.cat([timesteps, timesteps]), text, text_mask, **extra)  # (2B, ...)
    pred_cond, pred_uncond = both.chunk(2)
    return pred_uncond + guidance * (pred_cond - pred_uncond), both


def _guided_at(t: int, interval: tuple[int, int] | None) -> bool:
    """Whether a step at timestep t is guided (sampler.guidance_interval; None = every step)."""
    return interval is None or interval[0] <= t <= interval[1]


def _guidance_at(guidance: float, t: int, interval: tuple[int, int] | None) -> float:
    """The guidance scale of a step at timestep t: 1 (unguided) outside the interval."""
    return guidance if _guided_at(t, interval) else 1.0


def guided_steps(cfg: SamplerConfig, steps: int | None = None) -> int:
    """How many of `steps` sampler steps (default cfg.steps) are guided (two forwards) under cfg.guidance_interval."""
    steps = cfg.steps if steps is None else steps
    if cfg.guidance_interval is None:
        return steps
    scheduler = make_scheduler(cfg)
    scheduler.set_timesteps(steps)
    return sum(_guided_at(int(t), cfg.guidance_interval) for t in scheduler.timesteps)


def _denoise_staircase(
    dit: DiT, scheduler, noise: torch.Tensor, text, text_mask, *, steps: int, guidance: float,
    generator: torch.Generator, context: torch.Tensor | None, context_timestep: int, frame_lag: float,
    on_step: Callable[[int], None] | None, guidance_interval: tuple[int, int] | None = None,
    branch_estimates: bool = False, finish: int | None = None,
) -> torch.Tensor:
    """`denoise` with frame k lagging k*frame_lag steps; frames at the same step are stepped together."""
    b, _, t_frames, _, _ = noise.shape
    n_ctx = 0 if context is None else context.shape[2]
    new = t_frames - n_ctx
    finish = new if finish is None else min(finish, new)
    text, text_mask = _condition_text(dit, text, text_mask)
    scheduler.set_timesteps(steps)
    ladder = [int(t) for t in scheduler.timesteps]  # (steps,): noisiest first
    x = noise * scheduler.init_noise_sigma  # (B, C, T, H, W)
    if n_ctx:
        ctx_t = torch.full((b,), context_timestep, dtype=torch.long)
        x[:, :, :n_ctx] = scheduler.add_noise(context, torch.randn(context.shape, generator=generator), ctx_t) if context_timestep else context
    estimate = torch.zeros_like(x) if _self_conditioned(dit) else None  # (B, C, T, H, W)
    for it in range(denoise_iterations(steps, finish, frame_lag)):
        pos = frame_indices(it, new, steps, frame_lag)  # (new,): position of each generated frame
        # A clean frame is shown at timestep 0, like a context frame.
        t_new = [ladder[p] if p < steps else 0 for p in pos]
        timesteps = torch.tensor([context_timestep] * n_ctx + t_new, dtype=torch.long).expand(b, t_frames)
        pred, branches = _guided(dit, x, timesteps, text, text_mask,
                                 _guidance_at(guidance, max(t_new), guidance_interval), estimate)
        if estimate is not None:
            estimate = next_estimate(scheduler, x, pred, branches, timesteps, branch_estimates)
        # Step the frames that are at the same schedule position together, with the diffusers scheduler.
        for p in sorted(set(pos) - {steps}):
            frames = [n_ctx + k for k, q in enumerate(pos) if q == p and it - math.floor(frame_lag * k) >= 0]
            if not frames:
                continue
            x[:, :, frames] = scheduler.step(pred[:, :, frames], ladder[p], x[:, :, frames], generator=generator).prev_sample
        if on_step is not None:
            on_step(it)
    if n_ctx:
        x[:, :, :n_ctx] = context
    return x
