"""Benchmark the built-in model's training recipe step by step on this machine.

    python scripts/bench_train.py [--steps 10] [--mixed-precision bf16] [--set KEY=VALUE ...] [--json FILE]

Times, on the built-in model's architecture and the recipe's settings (configs/default.yaml,
scripts/train_default.sh), the steps its phases repeat, each the median of --steps after two
untimed ones:
- the VAE stage: one optimizer step on train.vae.batch_size clips of train.vae.clip_frames frames;
- the DiT stage: one optimizer step of the DiT and the small T5 on train.dit.batch_size windows of
  train.dit.window latent frames, and self-conditioning's forward without gradients, which training
  takes in half the steps (the contrasts' and twins' extra rows, from step 3,000 and in the fine-tunes,
  are not counted);
- the decoder phase: one step's parts on 8 clips of 17 frames: encoding, denoising from the
  sampler's fifth-last step with guidance, and the decoder's forward and backward (the recipe's
  phase denoises from one of the last 10 steps in 80% of its steps: 4.4 steps on average against
  these 5, the last 3 unguided in both);
- encoding the latent cache: clips of 39 frames per second.
Random weights of the built-in model's sizes stand in for trained ones: the work is the same.
With --mixed-precision bf16 the models train.mixed_precision=bf16 trains (the VAE, the DiT and its T5, the decoder)
run their forward under bf16 autocast, as accelerate wraps them; encoding the cache and sampling stay fp32, as there.
Multiply by a phase's steps (scripts/train_default.sh's header lists them) for its time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import contextlib

import torch


def timed(fn, steps: int) -> float:
    """Median seconds of fn() over `steps` calls, after two untimed ones."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def update(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One optimizer step on loss, as training takes it."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed repetitions of each step (median)")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no",
                        help="as train.mixed_precision: bf16 autocast in the training steps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a change to the recipe, as soragen train's --set (e.g. dit.width=384 with dit.heads=6)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    from soragen.config import load_config
    from soragen.pipeline import Pipeline
    from soragen.sampler import denoise, draw_noise, make_scheduler
    from soragen.train import dit_loss, reconstruction_loss, vae_loss

    recipe = load_config(Path(__file__).resolve().parents[1] / "configs" / "default.yaml", ["model=null", *args.set],
                         builtin_default=False)
    pipe = Pipeline.from_config(recipe)  # the recipe's architecture, random weights
    vae, dit, text_encoder = pipe.vae, pipe.dit, pipe.text_encoder
    sampler, t = recipe.sampler, recipe.train
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    size = (recipe.video.height, recipe.video.width)
    results: dict[str, float] = {}

    @contextlib.contextmanager
    def prepared(*models):
        """The models' forward as accelerate's prepare() wraps it for --mixed-precision bf16 (autocast, fp32 outputs)."""
        from accelerate.utils import convert_outputs_to_fp32

        if args.mixed_precision == "bf16":
            for m in models:
                m.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(m.forward))
        try:
            yield
        finally:
            for m in models:
                m.__dict__.pop("forward", None)

    # The VAE stage.
    vae.train().requires_grad_(True)
    clips = torch.rand(t.vae.batch_size, 3, t.vae.clip_frames, *size) * 2 - 1
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=0.0)

    def vae_step():
        update(vae_opt, vae_loss(vae, clips, t.vae)[0])

    with prepared(vae):
        results["vae_step_s"] = timed(vae_step, args.steps)
    vae.eval().requires_grad_(False)

    # The latent cache: clips of 1 + f * (clip_latent_frames - 1) frames (39 in the recipe).
    frames = vae.temporal_compression * (recipe.data.clip_latent_frames - 1) + 1
    cache_clips = torch.rand(8, 3, frames, *size) * 2 - 1
    with torch.no_grad():
        results["cache_clips_per_s"] = len(cache_clips) / timed(lambda: vae.encode(cache_clips), args.steps)

    # The DiT stage.
    scheduler = make_scheduler(sampler)
    dit.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    params = list(dit.parameters()) + list(text_encoder.parameters())
    dit_opt = torch.optim.AdamW(params, lr=0.0)
    b, s = t.dit.batch_size, vae.spatial_compression
    x0 = torch.randn(b, recipe.vae.latent_channels, t.dit.window, size[0] // s, size[1] // s)
    prompts = ["a large red circle moving right and a small blue box bouncing behind a gray wall"] * b
    n_ctx = torch.tensor([t.dit.max_context if i % 2 else 0 for i in range(b)])

    def dit_step():
        text, mask = text_encoder(prompts)
        update(dit_opt, dit_loss(dit, scheduler, x0, text, mask, n_ctx, t.dit.context_noise, generator,
                                 frame_noise=t.dit.frame_noise, noise_correlation=sampler.noise_correlation))

    def first_estimate():  # self-conditioning's forward without gradients, taken in half the steps
        with torch.no_grad():
            text, mask = text_encoder(prompts)
            dit(x0, torch.full(x0.shape[:1], 500), text, mask)

    with prepared(dit, text_encoder):
        results["dit_step_s"] = timed(dit_step, args.steps)
        results["dit_first_estimate_s"] = timed(first_estimate, args.steps)
    dit.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)

    # The decoder phase's parts.
    clips = torch.rand(8, 3, 17, *size) * 2 - 1
    with torch.no_grad():
        results["decoder_phase_encode_s"] = timed(lambda: vae.encode(clips), args.steps)
        z0 = vae.normalize(vae.encode(clips)[0])
        text, mask = text_encoder(prompts[:8] + [sampler.negative_prompt] * 8)
        scheduler.set_timesteps(sampler.steps)
        k = 5
        start_t = scheduler.timesteps[sampler.steps - k].expand(len(z0))

        def sample():
            z_t = scheduler.add_noise(z0, draw_noise(z0.shape, generator, sampler.noise_correlation), start_t)
            return denoise(dit, scheduler, z_t, text, mask, steps=sampler.steps, guidance=sampler.guidance,
                           generator=generator, start=sampler.steps - k, guidance_interval=sampler.guidance_interval)

        results["decoder_phase_denoise_s"] = timed(sample, args.steps)
        z = sample()
    decoder = vae.decoder.train().requires_grad_(True)
    dec_opt = torch.optim.AdamW(decoder.parameters(), lr=0.0)

    def decoder_step():
        update(dec_opt, reconstruction_loss(decoder(vae.denormalize(z)), clips, t.vae.object_weight,
                                            t.vae.edge_weight)[0])

    with prepared(decoder):
        results["decoder_phase_decoder_s"] = timed(decoder_step, args.steps)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; mixed precision {args.mixed_precision}; medians of "
          f"{args.steps} steps")
    print(f"VAE stage step ({t.vae.batch_size} clips x {t.vae.clip_frames} frames): {results['vae_step_s']:.3f} s "
          f"({results['vae_step_s'] * 1000 / 60:.1f} min per 1,000 steps)")
    print(f"latent cache: {results['cache_clips_per_s']:.1f} clips of {frames} frames per second")
    mean = results["dit_step_s"] + results["dit_first_estimate_s"] / 2
    print(f"DiT stage step ({b} windows x {t.dit.window} latent frames): {results['dit_step_s']:.3f} s, "
          f"self-conditioning's first estimate {results['dit_first_estimate_s']:.3f} s in half the steps: "
          f"{mean * 1000 / 60:.1f} min per 1,000 steps")
    dec = sum(results[f"decoder_phase_{p}_s"] for p in ("encode", "denoise", "decoder"))
    print(f"decoder phase step (8 clips x 17 frames): encode {results['decoder_phase_encode_s']:.3f} s, "
          f"denoise from step {sampler.steps - k} of {sampler.steps} {results['decoder_phase_denoise_s']:.3f} s, "
          f"decoder forward and backward {results['decoder_phase_decoder_s']:.3f} s: {dec:.3f} s "
          f"({dec * 1000 / 60:.1f} min per 1,000 such steps; the recipe's phase denoises from one of the last 10 "
          f"steps in 80% of its steps, about as much on average)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
