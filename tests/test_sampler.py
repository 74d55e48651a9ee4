import pytest
import torch

from soragen.dit import DiT
from soragen.sampler import denoise, make_scheduler
from soragen.text_encoder import TextEncoder

from conftest import tiny_config


def parts(kind="ddim"):
    cfg = tiny_config(sampler={"kind": kind, "steps": 4})
    torch.manual_seed(0)
    te = TextEncoder.from_config(cfg.text_encoder).eval()
    dit = DiT(cfg.dit, cfg.vae.latent_channels, te.dim).eval()
    for p in dit.parameters():  # a denoiser whose output is not all zeros
        torch.nn.init.normal_(p, std=0.05)
    return cfg, te, dit


def run(cfg, te, dit, seed, context=None):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        text, mask = te(["a red ball", ""])
    noise = torch.randn(1, 4, 3, 4, 4, generator=g)
    return denoise(dit, make_scheduler(cfg.sampler), noise, text, mask, steps=cfg.sampler.steps,
                   guidance=cfg.sampler.guidance, generator=g, context=context)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_same_seed_same_latents(kind):
    cfg, te, dit = parts(kind)
    a, b, c = run(cfg, te, dit, 1), run(cfg, te, dit, 1), run(cfg, te, dit, 2)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_scheduler_kind_selected():
    from diffusers import DDIMScheduler, DDPMScheduler

    assert isinstance(make_scheduler(tiny_config(sampler={"kind": "ddim"}).sampler), DDIMScheduler)
    assert isinstance(make_scheduler(tiny_config(sampler={"kind": "ddpm"}).sampler), DDPMScheduler)


def test_context_frames_are_kept():
    cfg, te, dit = parts()
    context = torch.randn(1, 4, 1, 4, 4)
    out = run(cfg, te, dit, 1, context=context)
    assert torch.equal(out[:, :, :1], context)
    assert not torch.allclose(out, run(cfg, te, dit, 1)[:, :, :])


def test_guidance_one_runs_conditional_only():
    cfg, te, dit = parts()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        text, mask = te(["a red ball"])
    out = denoise(dit, make_scheduler(cfg.sampler), torch.randn(1, 4, 2, 4, 4, generator=g), text, mask,
                  steps=2, guidance=1.0, generator=g)
    assert out.shape == (1, 4, 2, 4, 4)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_schedule_shift_divides_the_snr(kind):
    """sampler.schedule_shift s: every timestep's SNR is the plain schedule's divided by s**2."""
    from soragen.config import SamplerConfig
    from soragen.sampler import make_scheduler

    plain = make_scheduler(SamplerConfig(kind=kind, rescale_betas_zero_snr=False))
    shifted = make_scheduler(SamplerConfig(kind=kind, rescale_betas_zero_snr=False, schedule_shift=3.0))
    snr = lambda s: s.alphas_cumprod / (1 - s.alphas_cumprod)  # noqa: E731
    torch.testing.assert_close(snr(shifted)[:990], snr(plain)[:990] / 9, rtol=1e-3, atol=1e-7)
    # With zero terminal SNR the schedule still ends in pure noise.
    zero = make_scheduler(SamplerConfig(kind=kind, schedule_shift=3.0))
    assert zero.alphas_cumprod[-1] < 1e-6 and zero.alphas_cumprod[0] > 0.99


@pytest.mark.parametrize("lag", [0.5, 1.0, 2.0])
def test_staircase_lags_each_frame(lag):
    """sampler.frame_lag: frame k walks the same timestep ladder, floor(k*lag) model calls behind frame 0."""
    import math

    from soragen.sampler import denoise_iterations

    cfg, te, dit = parts()
    seen = []  # per model call: the timesteps of the conditional batch's frames

    def recording(x, timesteps, text, mask):
        seen.append(timesteps[0].tolist())
        return dit(x, timesteps, text, mask)

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        text, mask = te(["a red ball", ""])
    context = torch.randn(1, 4, 1, 4, 4)
    scheduler = make_scheduler(cfg.sampler)
    out = denoise(recording, scheduler, torch.randn(1, 4, 4, 4, 4, generator=g), text, mask, steps=4, guidance=4.0,
                  generator=g, context=context, frame_lag=lag)
    ladder = [int(t) for t in scheduler.timesteps]
    assert len(seen) == denoise_iterations(4, 3, lag)
    assert all(call[0] == 0 for call in seen)  # the context frame stays clean
    for k in range(3):
        start = math.floor(k * lag)
        expected = [ladder[0]] * start + ladder + [0] * (len(seen) - start - len(ladder))
        assert [call[1 + k] for call in seen] == expected
    assert torch.equal(out[:, :, :1], context)
    assert torch.isfinite(out).all() and not torch.allclose(out[:, :, 1:], out[:, :, 1:2].expand_as(out[:, :, 1:]))


@pytest.mark.parametrize("continuation, rows", [(None, [2, 2, 2]), (1.0, [2, 1, 1])])
def test_continuation_guidance(continuation, rows):
    """sampler.continuation_guidance = 1: windows after the first run the conditional pass only."""
    from soragen.pipeline import Pipeline, plan_video

    cfg = tiny_config(sampler={"steps": 2, "guidance": 4.0, "window": 3, "context_frames": 1,
                               "continuation_guidance": continuation}, video={"seconds": 3})
    pipe = Pipeline.from_config(cfg)
    plan = plan_video(cfg)
    calls = []
    dit = pipe.dit
    pipe.dit = lambda x, t, text, mask: calls.append(x.shape[0]) or dit(x, t, text, mask)
    text, mask = pipe.encode_text("a red ball", "")
    windows = list(pipe.generate_latents(plan, text, mask))
    assert len(windows) == len(pipe.windows(plan)) >= 3
    per_window = [calls[i] for i in range(0, len(calls), 2)][:3]
    assert per_window == rows
    assert len(calls) == pipe.denoise_calls(plan)


def test_a_video_shorter_than_a_window_is_cut_from_a_whole_one():
    """sampler.full_windows: a video that needs fewer latent frames than one window is denoised as a whole window
    and its first frames kept, the same latents as the start of a video one window long; without it, only its own
    frames are denoised. The progress counts the model calls made either way."""
    from soragen.pipeline import Pipeline, plan_video

    def latents(seconds: float, full: bool) -> torch.Tensor:
        cfg = tiny_config(sampler={"steps": 2, "window": 5, "context_frames": 1, "frame_lag": 0.5, "full_windows": full},
                          video={"seconds": seconds})
        pipe = Pipeline.from_config(cfg)
        plan = plan_video(cfg)
        calls = []
        dit = pipe.dit
        pipe.dit = lambda x, *a, **k: calls.append(x.shape[2]) or dit(x, *a, **k)
        text, mask = pipe.encode_text("a red ball", "")
        out = torch.cat(list(pipe.generate_latents(plan, text, mask)), dim=2)
        assert out.shape[2] == plan.latent_frames and len(calls) == pipe.denoise_calls(plan)
        assert set(calls) == {5 if full else plan.latent_frames}
        return out

    whole = latents(9 / 8, True)  # 9 frames: the window's 5 latent frames
    short = latents(2 / 8, True)  # 2 frames: 2 latent frames
    assert short.shape[2] == 2 and torch.equal(short, whole[:, :, :2])
    assert not torch.allclose(latents(2 / 8, False), short)


def test_continuation_guidance_of_zero_is_guidance():
    """continuation_guidance 0 (the unconditional prediction alone) needs the unconditional text rows even when the
    first window is unguided: it is not read as "unset"."""
    from soragen.pipeline import Pipeline

    cfg = tiny_config(sampler={"guidance": 1.0, "continuation_guidance": 0.0})
    text, _ = Pipeline.from_config(cfg).encode_text("a red ball", "")
    assert text.shape[0] == 2


def test_the_staircase_gives_each_branch_its_own_estimate():
    """sampler.branch_estimates holds in the staircase (frame_lag > 0) too, for a self-conditioned model."""
    cfg = tiny_config(sampler={"kind": "ddim", "steps": 3}, dit={"self_condition": True})
    torch.manual_seed(0)
    te = TextEncoder.from_config(cfg.text_encoder).eval()
    dit = DiT(cfg.dit, cfg.vae.latent_channels, te.dim).eval()
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        text, mask = te(["a red ball", ""])

    def sample(branch: bool) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(1, 4, 3, 4, 4, generator=g)
        return denoise(dit, make_scheduler(cfg.sampler), noise, text, mask, steps=3, guidance=3.0, generator=g,
                       frame_lag=0.5, branch_estimates=branch)

    assert not torch.allclose(sample(True), sample(False))


def test_continuation_steps():
    """sampler.continuation_steps: the first window takes `steps` model calls, each later window its own number,
    and the progress total counts them."""
    from soragen.pipeline import Pipeline, plan_video

    cfg = tiny_config(sampler={"steps": 4, "continuation_steps": 2, "window": 3, "context_frames": 1},
                      video={"seconds": 3})
    pipe = Pipeline.from_config(cfg)
    plan = plan_video(cfg)
    calls = []
    dit = pipe.dit
    pipe.dit = lambda x, t, text, mask: calls.append(int(t[0, -1])) or dit(x, t, text, mask)
    text, mask = pipe.encode_text("a red ball", "")
    windows = list(pipe.generate_latents(plan, text, mask))
    assert len(windows) >= 3
    assert len(calls) == 4 + 2 * (len(windows) - 1) == pipe.denoise_calls(plan)
    assert calls[:4] == sorted(calls[:4], reverse=True) and calls[4] == calls[0] and calls[4:6] == calls[6:8]


def test_guided_steps_counts_the_interval_on_any_ladder():
    """guided_steps: how many of a window's steps take the unconditional pass too, for the sampler's own steps or
    another number (bench_long counts the FLOPs of 12-step windows after a 20-step first one)."""
    from soragen.sampler import guided_steps

    s = tiny_config(sampler={"steps": 20, "guidance_interval": (150, 999)}).sampler
    scheduler = make_scheduler(s)
    for steps in (20, 12):
        scheduler.set_timesteps(steps)
        assert guided_steps(s, steps) == sum(150 <= int(t) <= 999 for t in scheduler.timesteps) < steps
    assert guided_steps(s) == guided_steps(s, 20)
    assert guided_steps(tiny_config(sampler={"steps": 20}).sampler, 12) == 12  # no interval: every step


def self_conditioned_run(prompts: list[str], guidance: float, **options):
    """Denoise 3 DDIM steps with a small self-conditioned DiT; returns the scheduler and each call's
    (x, timesteps, x_self fed, output)."""
    cfg = tiny_config(sampler={"kind": "ddim", "steps": 3}, dit={"self_condition": True})
    _, te, _ = parts()
    torch.manual_seed(0)
    dit = DiT(cfg.dit, cfg.vae.latent_channels, te.dim).eval()
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.05)
    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cfg = dit.cfg

        def forward(self, x, t, text, mask, x_self=None):
            out = dit(x, t, text, mask, x_self=x_self)
            calls.append((x, t, x_self, out))
            return out

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        text, mask = te(prompts)
        scheduler = make_scheduler(cfg.sampler)
        denoise(Recorder(), scheduler, torch.randn(1, 4, 2, 4, 4, generator=g), text, mask, steps=3, guidance=guidance,
                generator=g, **options)
    return scheduler, calls


def test_self_conditioning_feeds_back_the_previous_estimate():
    """dit.self_condition: step 1 sees zeros, each later step the x0 estimate of the step before."""
    from soragen.sampler import x0_estimate

    scheduler, calls = self_conditioned_run(["a red ball"], 1.0)
    assert len(calls) == 3 and torch.equal(calls[0][2], torch.zeros_like(calls[0][0]))
    for (x, t, _, out), (_, _, fed, _) in zip(calls, calls[1:]):
        torch.testing.assert_close(fed, x0_estimate(scheduler, x, out, t))
        assert fed.abs().sum() > 0


def test_branch_estimates_give_each_guided_pass_its_own_estimate():
    """sampler.branch_estimates: under guidance the conditional pass gets the conditional x0 estimate of the
    step before and the unconditional pass the unconditional one (not both the guided estimate)."""
    from soragen.sampler import x0_estimate

    scheduler, calls = self_conditioned_run(["a red ball", ""], 3.0, branch_estimates=True)
    assert len(calls) == 3 and torch.equal(calls[0][2], torch.zeros_like(calls[0][0]))
    for (x, t, _, out), (_, _, fed, _) in zip(calls, calls[1:]):
        torch.testing.assert_close(fed, x0_estimate(scheduler, x, out, t))  # (2, ...): one estimate per pass
        assert not torch.allclose(fed[0], fed[1])


@pytest.mark.parametrize("r", [0.0, 0.5, 0.8])
def test_noise_correlation_shares_that_much_variance_across_frames(r):
    """sampler.noise_correlation: unit variance per value; corr(frame i, frame j) = r within a window."""
    from soragen.sampler import draw_noise

    noise = draw_noise((64, 4, 5, 8, 8), torch.Generator().manual_seed(0), r)  # (B, C, T, H, W)
    assert abs(noise.var().item() - 1.0) < 0.02
    a, b = noise[:, :, 1].flatten(), noise[:, :, 4].flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item() - r) < 0.03
    other = draw_noise((64, 4, 5, 8, 8), torch.Generator().manual_seed(1), r)  # another window shares nothing
    assert abs(torch.corrcoef(torch.stack([a, other[:, :, 1].flatten()]))[0, 1].item()) < 0.03
    if r == 0:  # independent noise is plain torch.randn, so earlier seeds give what they gave
        assert torch.equal(noise, torch.randn((64, 4, 5, 8, 8), generator=torch.Generator().manual_seed(0)))


def test_noise_correlation_reaches_the_sampler_and_training(monkeypatch):
    """The pipeline's starting noise and dit_loss's noise are both drawn with the configured correlation."""
    from diffusers import DDPMScheduler

    import soragen.sampler
    from soragen.pipeline import Pipeline, plan_video
    from soragen.train import dit_loss

    started = []
    monkeypatch.setattr(soragen.sampler, "denoise", lambda dit, sched, noise, *a, **k: started.append(noise) or noise)
    for r in (0.0, 0.9):
        cfg = tiny_config(sampler={"steps": 2, "noise_correlation": r}, video={"seconds": 1})
        pipe = Pipeline.from_config(cfg)
        text, mask = pipe.encode_text("a red ball", "")
        list(pipe.generate_latents(plan_video(cfg), text, mask))
        noise = started[-1]  # (1, C, T, h, w)
        assert noise.shape[2] > 1
        spread = (noise - noise.mean(dim=2, keepdim=True)).var().item()  # what is not shared by the frames
        assert abs(spread - (1 - r) * (1 - 1 / noise.shape[2])) < 0.15

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t, text, mask):
            seen.append(x)
            return torch.zeros_like(x)

    # At t = 999 (zero terminal SNR) x_t is the noise itself.
    x0 = torch.zeros(256, 2, 4, 4, 4)
    text, mask = torch.zeros(256, 1, 2), torch.ones(256, 1, dtype=torch.bool)
    for r in (0.0, 0.6):
        dit_loss(Recorder(), sched, x0, text, mask, torch.zeros(256, dtype=torch.long), 20,
                 torch.Generator().manual_seed(0), noise_correlation=r)
        x = seen[-1]
        corr = torch.corrcoef(torch.stack([x[:, :, 0].flatten(), x[:, :, 3].flatten()]))[0, 1].item()
        assert abs(corr - r) < 0.05


@pytest.mark.parametrize("start", [1, 3])
def test_start_runs_only_the_last_steps(start):
    """denoise(start=k) from the latents a full run had at its k-th timestep ends where the full run ends."""
    cfg, te, dit = parts()
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t, text, mask):
            seen.append((x[:1].clone(), int(t[0, 0])))
            return dit(x, t, text, mask)

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        text, mask = te(["a red ball", ""])
    scheduler = make_scheduler(cfg.sampler)
    full = denoise(Recorder(), scheduler, torch.randn(1, 4, 3, 4, 4, generator=g), text, mask, steps=4, guidance=3.0,
                   generator=g)
    x_k, t_k = seen[start]
    seen.clear()
    part = denoise(Recorder(), scheduler, x_k, text, mask, steps=4, guidance=3.0, generator=g, start=start)
    assert len(seen) == 4 - start and seen[0][1] == t_k
    torch.testing.assert_close(part, full)


def test_window_starts_are_where_decoded_windows_begin():
    """Pipeline.window_starts names the first frame of each window after the first, as decoding yields them."""
    from soragen.pipeline import Pipeline, plan_video

    cfg = tiny_config(sampler={"steps": 1, "guidance": 1.0, "window": 3, "context_frames": 1}, video={"seconds": 3})
    pipe = Pipeline.from_config(cfg)
    plan = plan_video(cfg)
    text, mask = pipe.encode_text("a red ball", "")
    sizes = [chunk.shape[2] for chunk in pipe.decode_frames(pipe.generate_latents(plan, text, mask), plan.model_frames)]
    assert len(sizes) == len(pipe.windows(plan)) >= 3
    assert pipe.window_starts(plan) == [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]


def test_guidance_interval_guides_only_the_steps_inside_it():
    """sampler.guidance_interval: steps outside [lo, hi] take one conditional forward (batch 1)."""
    from soragen.config import load_config
    from soragen.errors import UserError

    cfg, te, dit = parts("ddpm")
    scheduler = make_scheduler(cfg.sampler)
    scheduler.set_timesteps(cfg.sampler.steps)
    ladder = [int(t) for t in scheduler.timesteps]  # 4 steps, noisiest first
    lo = ladder[1]  # guide the first two steps only
    rows = []
    hook = dit.register_forward_pre_hook(lambda m, args: rows.append((int(args[1][0, 0]), args[0].shape[0])))
    with torch.no_grad():
        text, mask = te(["a red ball", ""])
    outs = []
    for interval in (None, (lo, 999), (0, 999)):
        g = torch.Generator().manual_seed(3)
        rows.clear()
        outs.append(denoise(dit, scheduler, torch.randn(1, 4, 3, 4, 4, generator=g), text, mask, steps=4,
                            guidance=4.0, generator=g, guidance_interval=interval))
        if interval == (lo, 999):
            assert rows == [(ladder[0], 2), (ladder[1], 2), (ladder[2], 1), (ladder[3], 1)]
    hook.remove()
    assert torch.equal(outs[0], outs[2])  # an interval holding every step is plain guidance
    assert not torch.allclose(outs[0], outs[1])
    with pytest.raises(UserError, match="guidance_interval"):
        load_config(None, ["sampler.guidance_interval=[500,100]"])
