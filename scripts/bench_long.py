"""Benchmark long-video generation: time per stage, peak memory, real-time factor, denoiser efficiency.

    python scripts/bench_long.py [--seconds 5 15 30 60] [--model builtin] [--set key=value ...]

For each duration, one fresh process generates a video (so its peak resident memory is
its own) and reports wall time split into text encoding, denoising, VAE decoding and
MP4 encoding, the real-time factor (wall seconds per second of video), and the
denoiser's achieved GFLOP/s (FLOPs counted by torch's FlopCounterMode on one forward).
The same run measures the fp32 matrix-multiply peak, and the time and FLOPs of one
denoising step of soragen's DiT (and of its linear products alone, the most the step could
reach were its other work free) and of a diffusers CogVideoXTransformer3DModel of the
same width, depth and heads on the same number of video tokens, as the reference a user
would otherwise reach for (the two blocks differ: soragen's do more work per token).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def matmul_peak(n: int = 2048, reps: int = 10, rounds: int = 5) -> dict[str, float]:
    """Measured fp32 matrix-multiply GFLOP/s on this machine, per GEMM torch can run: the best of a few timed rounds.

    "matmul" is torch.matmul (MKL on x86); "onednn" is the oneDNN GEMM that soragen's DiT uses
    where torch has it and the CPU has AVX-512 (soragen.linear; there MKL runs AVX2 code and oneDNN AVX-512).
    The first round after start-up can run well below the cores' rate (280 against 390
    GFLOP/s, session 13), which would overstate the denoiser's share of the peak.
    """
    from soragen.linear import Linear, onednn_active

    a = torch.randn(n, n)
    layer = Linear(n, n, bias=False)
    gemms = {"matmul": lambda: a @ layer.weight}
    if onednn_active():
        gemms["onednn"] = lambda: layer(a)
    peaks = {}
    with torch.no_grad():
        for name, gemm in gemms.items():
            for _ in range(2):
                gemm()
            best = 0.0
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _ in range(reps):
                    gemm()
                best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
            peaks[name] = best
    return peaks


def one_run(seconds: float, overrides: list[str]) -> dict:
    """Generate one video in this process; report timings, FLOPs and peak RSS."""
    from torch.utils.flop_counter import FlopCounterMode

    from soragen.config import load_config
    from soragen.pipeline import Pipeline, plan_video, window_frames, window_guidance, window_steps

    cfg = load_config(None, overrides + [f"video.seconds={seconds}"])
    pipe = Pipeline.from_config(cfg)
    plan = plan_video(cfg)
    windows = pipe.windows(plan)
    # FLOPs of the denoiser forwards: per window, its model calls, each batched (cond + uncond) when guided.
    from soragen.sampler import denoise_iterations, guided_steps

    s = cfg.sampler
    flops = 0
    with torch.no_grad():
        text, mask = pipe.encode_text("a red ball", "")
        counter = FlopCounterMode(display=False)
        with counter:
            cond = pipe.dit.condition_text(text, mask)  # as the sampler does: once per window
        flops += counter.get_total_flops() * len(windows)
        for ctx, new in windows:  # as Pipeline.generate_latents: a window with context continues the video
            guidance = window_guidance(s, ctx)
            steps = window_steps(s, ctx)
            guided_share = guided_steps(s, steps) / steps  # sampler.guidance_interval leaves some steps unguided
            frames = window_frames(s, ctx, new)
            calls = denoise_iterations(steps, new, s.frame_lag)  # the staircase stops when the kept frames are clean
            for rows, share in ((2, guided_share), (1, 1.0 - guided_share)) if guidance != 1.0 else ((1, 1.0),):
                x = torch.randn(rows, cfg.vae.latent_channels, frames, plan.latent_height, plan.latent_width)
                counter = FlopCounterMode(display=False)
                with counter:
                    pipe.dit(x, torch.zeros(rows, frames, dtype=torch.long), cond.first(rows), x_self=x)
                flops += counter.get_total_flops() * calls * share
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sidecar = pipe.generate("a large red circle moving right", Path(tmp) / "v.mp4")
        wall = time.perf_counter() - t0
    t = sidecar["timings_seconds"]
    return {
        "seconds": seconds,
        "frames": sidecar["video"]["frames"],
        "windows": len(windows),
        "wall": wall,
        **{k: v for k, v in t.items()},
        "realtime_factor": wall / (sidecar["video"]["frames"] / cfg.video.fps),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "denoiser_gflops": flops / t["denoising"] / 1e9,
        "tokens_per_window": max(ctx + new for ctx, new in windows)
        * (plan.latent_height // cfg.dit.patch_size[1]) * (plan.latent_width // cfg.dit.patch_size[2]) // cfg.dit.patch_size[0],
    }


def forward_cost(forward, reps: int = 10) -> tuple[float, float]:
    """(median seconds, FLOPs) of one call of forward(), after a warm-up call."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad():
        forward()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            forward()
            times.append(time.perf_counter() - t0)
        counter = FlopCounterMode(display=False)
        with counter:
            forward()
    return statistics.median(times), counter.get_total_flops()


def products_alone(model: torch.nn.Module, forward, reps: int = 10) -> tuple[float, float]:
    """(seconds, FLOPs) of the linear layers' products of one call of forward(), each timed alone on an input
    of the shape it got there (median of reps each, summed): what a step would cost if everything else were free."""
    calls = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: calls.append((mod, inp[0].shape)))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        forward()
    for hook in hooks:
        hook.remove()
    seconds = flops = 0.0
    with torch.no_grad():
        for mod, shape in calls:
            x = torch.randn(shape)
            mod(x)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                mod(x)
                times.append(time.perf_counter() - t0)
            seconds += statistics.median(times)
            flops += 2 * x.numel() * mod.out_features  # 2 per multiply-add, as FlopCounterMode counts
    return seconds, flops


def soragen_step_cost(overrides: list[str]) -> tuple[float, float, dict]:
    """(seconds, FLOPs, info) of one denoising step (one CFG-batched forward) of soragen's DiT on a full window,
    as the sampler makes it: the text conditioned once per window, the previous x0 estimate as input.
    info["plain_seconds"]: the same step with the linear layers through torch's default GEMM."""
    from soragen.config import load_config
    from soragen.heap import hold_heap
    from soragen.linear import plain_linear
    from soragen.pipeline import Pipeline

    cfg = load_config(None, overrides)
    pipe = Pipeline.from_config(cfg)
    hold_heap()  # as generation does (the reference below runs with it too)
    s = cfg.vae.spatial_compression
    x = torch.randn(2, cfg.vae.latent_channels, cfg.sampler.window, cfg.video.height // s, cfg.video.width // s)
    with torch.no_grad():
        text, mask = pipe.encode_text("a red ball", "")
        cond = pipe.dit.condition_text(text, mask)
    ts = torch.full((2, cfg.sampler.window), 500)
    seconds, flops = forward_cost(lambda: pipe.dit(x, ts, cond, x_self=x))
    with plain_linear():  # the same model through torch's default GEMM, as the reference runs its layers
        plain_seconds, _ = forward_cost(lambda: pipe.dit(x, ts, cond, x_self=x))
    products = products_alone(pipe.dit, lambda: pipe.dit(x, ts, cond, x_self=x))
    info = {"plain_seconds": plain_seconds, "products": products, "cfg": cfg, "latent": tuple(x.shape), "text_len": text.shape[1],
            "text_dim": text.shape[2],
            "real_text_len": cond.keys_values[0][0].shape[2]}  # soragen attends to the prompt's tokens, not the padding
    return seconds, flops, info


def cogvideox_step_cost(cfg, latent: tuple[int, ...], text_len: int, text_dim: int) -> tuple[float, float]:
    """(seconds, FLOPs) of one forward of diffusers' CogVideoXTransformer3DModel at the same width, depth, heads and tokens."""
    from diffusers import CogVideoXTransformer3DModel

    b, c, t, h, w = latent
    d = cfg.dit
    model = CogVideoXTransformer3DModel(
        num_attention_heads=d.heads, attention_head_dim=d.width // d.heads, in_channels=c, out_channels=c,
        num_layers=d.depth, text_embed_dim=text_dim, time_embed_dim=d.width, patch_size=d.patch_size[1],
        sample_width=w, sample_height=h, sample_frames=1 + 4 * (t - 1), max_text_seq_length=text_len,
        use_rotary_positional_embeddings=True,
    ).eval()
    x = torch.randn(b, t, c, h, w)  # CogVideoX takes [B, F, C, H, W]
    text = torch.randn(b, text_len, text_dim)
    ts = torch.full((b,), 500)
    return forward_cost(lambda: model(hidden_states=x, encoder_hidden_states=text, timestep=ts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, nargs="+", default=[5, 15, 30, 60])
    parser.add_argument("--model", default=None, help="model folder or 'builtin' (default: soragen's default model)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)  # internal: run one duration, print JSON
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    overrides = args.overrides + ([f"model={args.model}"] if args.model else [])
    if args.one is not None:
        print(json.dumps(one_run(args.one, overrides)))
        return

    peaks = matmul_peak()
    peak = max(peaks.values())  # the fastest fp32 GEMM this torch has on this machine
    print("fp32 matmul peak (2048^3): " + ", ".join(f"{name} {gflops:.1f}" for name, gflops in peaks.items())
          + f" GFLOP/s; the denoiser's share is of {peak:.1f}")
    rows = []
    head = (f"{'video s':>7} {'windows':>7} {'wall s':>7} {'text':>6} {'denoise':>8} {'decode':>7} {'mp4':>6} "
            f"{'RTF':>6} {'peak MB':>8} {'GFLOP/s':>8} {'% peak':>7}")
    print(head)
    for seconds in args.seconds:
        cmd = [sys.executable, __file__, "--one", str(seconds)] + [x for o in overrides for x in ("--set", o)]
        row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{seconds:>7g} {row['windows']:>7} {row['wall']:>7.2f} {row['text_encoding']:>6.2f} {row['denoising']:>8.2f} "
              f"{row['vae_decoding']:>7.2f} {row['mp4_encoding']:>6.2f} {row['realtime_factor']:>6.3f} "
              f"{row['peak_rss_mb']:>8.0f} {row['denoiser_gflops']:>8.1f} {100 * row['denoiser_gflops'] / peak:>6.1f}%")
    if len(rows) > 1:
        print(f"peak memory, longest / shortest: {rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.3f}x")
    ours, ours_flops, info = soragen_step_cost(overrides)
    # The reference as its pipeline runs it (text padded to the encoder's length) and on the prompt's real tokens only.
    ref, ref_flops = cogvideox_step_cost(info["cfg"], info["latent"], info["text_len"], info["text_dim"])
    ref_short, ref_short_flops = cogvideox_step_cost(info["cfg"], info["latent"], info["real_text_len"], info["text_dim"])
    print(f"per denoising step on one window {info['latent']} (CFG batch, median of 10):")
    reference = "diffusers CogVideoXTransformer3DModel (same width/depth/heads/tokens)"
    for name, sec, flops in (("soragen DiT", ours, ours_flops),
                             ("soragen DiT, linear layers through torch's default GEMM", info["plain_seconds"], ours_flops),
                             (f"{reference}, {info['text_len']} text tokens", ref, ref_flops),
                             (f"{reference}, {info['real_text_len']} text tokens", ref_short, ref_short_flops)):
        print(f"  {name}: {sec * 1000:.1f} ms, {flops / 1e9:.2f} GFLOP, {flops / sec / 1e9:.1f} GFLOP/s "
              f"({100 * flops / sec / 1e9 / peak:.1f}% peak)")
    products_s, products_flops = info["products"]
    print(f"  its linear layers' products alone, each timed at its shape: {products_s * 1000:.1f} ms, "
          f"{products_flops / 1e9:.2f} GFLOP, {products_flops / products_s / 1e9:.1f} GFLOP/s: were everything else "
          f"in the step free, it would reach {100 * ours_flops / products_s / 1e9 / peak:.1f}% of peak")
    if args.json:
        args.json.write_text(json.dumps({"matmul_peak_gflops": peak, "runs": rows, "step_ms": ours * 1000,
                                         "step_gflop": ours_flops / 1e9,
                                         "step_default_gemm_ms": info["plain_seconds"] * 1000,
                                         "step_products_alone_ms": info["products"][0] * 1000,
                                         "step_products_gflop": info["products"][1] / 1e9,
                                         "matmul_peaks_gflops": peaks, "cogvideox_step_ms": ref * 1000,
                                         "cogvideox_step_gflop": ref_flops / 1e9,
                                         "cogvideox_short_text_step_ms": ref_short * 1000,
                                         "cogvideox_short_text_step_gflop": ref_short_flops / 1e9}, indent=2) + "\n")


if __name__ == "__main__":
    main()
