"""Benchmark long-video generation: time per stage, peak memory, real-time factor, denoiser efficiency.

    python scripts/bench_long.py [--seconds 5 15 30 60] [--model builtin] [--set key=value ...]

For each duration, one fresh process generates a video (so its peak resident memory is
its own) and reports wall time split into text encoding, denoising, VAE decoding and
MP4 encoding (ffmpeg encodes beside the denoising: its own CPU time is shown too), the
wall time from the process's launch (Python, imports, model loading: what a user of
`soragen generate` waits for) and the real-time factor (wall seconds per second of video),
the peak resident memory while generating, and the denoiser's achieved GFLOP/s (FLOPs
counted by torch's FlopCounterMode on one forward of each kind, after the timed video:
nothing is warmed up for it) against the fp32 matrix-multiply peak measured in the same
process after it. The parent measures that peak too, and the time and FLOPs of one
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


def count_attention_flops() -> None:
    """Give torch's FlopCounterMode the FLOPs of CPU attention. torch counts its CUDA attention kernels but has no
    formula for the CPU one (`_scaled_dot_product_flash_attention_for_cpu`), which it then counts as 0: a third of
    the reference's work below went uncounted before session 36."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_registry or op.default in flop_registry:
        return

    def attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    register_flop_formula(op)(attention_flops)


count_attention_flops()


def resident_mb(field: str) -> float | None:
    """VmRSS or VmHWM (the high-water mark) of this process in MB, from /proc (None where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Start the high-water mark of resident memory afresh at the current RSS (Linux: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def one_run(seconds: float, overrides: list[str]) -> dict:
    """Generate one video in this process, timed first (cold, as a user's run); then count the denoiser's FLOPs and
    measure the matmul peak. Reports timings, FLOPs and the peak RSS while generating."""
    from torch.utils.flop_counter import FlopCounterMode

    from soragen.config import load_config
    from soragen.pipeline import Pipeline, plan_video, window_frames, window_guidance, window_steps

    cfg = load_config(None, overrides + [f"video.seconds={seconds}"])
    pipe = Pipeline.from_config(cfg)
    plan = plan_video(cfg)
    windows = pipe.windows(plan)
    loaded_epoch = time.time()
    rss_before = resident_mb("VmRSS")
    fresh = reset_peak_rss()
    children_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sidecar = pipe.generate("a large red circle moving right", Path(tmp) / "v.mp4")
        wall = time.perf_counter() - t0
        done_epoch = time.time()
    peak_rss = resident_mb("VmHWM") if fresh else None
    if peak_rss is None:  # no /proc: the process's own high-water mark, loading included
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ffmpeg = resource.getrusage(resource.RUSAGE_CHILDREN)
    ffmpeg_cpu = (ffmpeg.ru_utime + ffmpeg.ru_stime) - (children_cpu.ru_utime + children_cpu.ru_stime)

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
    t = sidecar["timings_seconds"]
    peak = max(matmul_peak(reps=5, rounds=3).values())  # this process's own, right after its run
    video_seconds = sidecar["video"]["frames"] / cfg.video.fps
    return {
        "seconds": seconds,
        "frames": sidecar["video"]["frames"],
        "windows": len(windows),
        "wall": wall,
        "loaded_epoch": loaded_epoch,
        "done_epoch": done_epoch,
        **{k: v for k, v in t.items()},
        "ffmpeg_cpu_seconds": ffmpeg_cpu,
        "realtime_factor": wall / video_seconds,
        "video_seconds": video_seconds,
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak_rss,
        "peak_rss_while_generating": fresh,
        "denoiser_gflops": flops / t["denoising"] / 1e9,
        "matmul_peak_gflops": peak,
        "tokens_per_window": max(window_frames(s, ctx, new) for ctx, new in windows)
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
    """(seconds, FLOPs) of one forward of diffusers' CogVideoXTransformer3DModel at the same width, depth, heads and
    tokens, with its rotary position embedding made once outside the timing, as CogVideoXPipeline does."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

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
    grid = (h // model.config.patch_size, w // model.config.patch_size)
    rotary = get_3d_rotary_pos_embed(embed_dim=model.config.attention_head_dim,
                                     crops_coords=get_resize_crop_region_for_grid(grid, grid[1], grid[0]),
                                     grid_size=grid, temporal_size=t)
    return forward_cost(lambda: model(hidden_states=x, encoder_hidden_states=text, timestep=ts, image_rotary_emb=rotary))


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
    print("per video: generate()'s wall time and its stages (ffmpeg encodes beside the denoising: 'mp4' is the time spent "
          "waiting for it, 'ffmpeg' its own CPU time); 'launch' the wall time from starting the process (Python, imports, "
          "model loading) to the finished file, what `soragen generate` takes; RTF of each per second of video; peak "
          "resident memory while generating (the process's RSS before it in brackets); the denoiser's rate against the "
          "matmul peak its own process measured right after")
    head = (f"{'video s':>7} {'windows':>7} {'wall s':>7} {'text':>6} {'denoise':>8} {'decode':>7} {'mp4':>6} {'ffmpeg':>7} "
            f"{'launch':>7} {'RTF':>6} {'RTF l.':>6} {'peak MB':>13} {'GFLOP/s':>8} {'% peak':>7}")
    print(head)
    for seconds in args.seconds:
        cmd = [sys.executable, __file__, "--one", str(seconds)] + [x for o in overrides for x in ("--set", o)]
        launched = time.time()
        row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        row["from_launch"] = row["done_epoch"] - launched
        row["loading"] = row["loaded_epoch"] - launched
        row["realtime_factor_from_launch"] = row["from_launch"] / row["video_seconds"]
        rows.append(row)
        before = f"({row['rss_before_mb']:.0f})" if row["rss_before_mb"] is not None else ""
        print(f"{seconds:>7g} {row['windows']:>7} {row['wall']:>7.2f} {row['text_encoding']:>6.2f} {row['denoising']:>8.2f} "
              f"{row['vae_decoding']:>7.2f} {row['mp4_encoding']:>6.2f} {row['ffmpeg_cpu_seconds']:>7.2f} "
              f"{row['from_launch']:>7.2f} {row['realtime_factor']:>6.3f} {row['realtime_factor_from_launch']:>6.3f} "
              f"{row['peak_rss_mb']:>6.0f} {before:>6} {row['denoiser_gflops']:>8.1f} "
              f"{100 * row['denoiser_gflops'] / row['matmul_peak_gflops']:>6.1f}%")
    if len(rows) > 1:
        short, long = min(rows, key=lambda r: r["seconds"]), max(rows, key=lambda r: r["seconds"])
        print(f"peak memory while generating, {long['seconds']:g} s / {short['seconds']:g} s: "
              f"{long['peak_rss_mb'] / short['peak_rss_mb']:.3f}x"
              + (f"; growth over the RSS before generating: {long['peak_rss_mb'] - long['rss_before_mb']:.0f} MB / "
                 f"{short['peak_rss_mb'] - short['rss_before_mb']:.0f} MB" if long["rss_before_mb"] else ""))
    if rows:
        own = [r["matmul_peak_gflops"] for r in rows]
        print(f"model loading (launch to loaded): {', '.join(format(r['loading'], '.2f') for r in rows)} s; "
              f"matmul peak in the video processes {min(own):.1f}-{max(own):.1f} GFLOP/s (the parent's: {peak:.1f})")
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
