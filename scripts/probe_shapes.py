"""Where a Shapes World model loses its shapes: real clips noised part-way and denoised.

Renders fresh one-object clips (no wall, no bouncers; an equal share of circles, squares and
triangles), encodes them with the model's VAE, noises the latents to one of the sampler's
timesteps and runs the rest of the sampler from there with the clip's own caption (the
model's guidance and self-conditioning), then decodes. Prints, per start timestep, the median
fill ratio of each shape's blobs (what the detector reads shape from: circle ~0.79, square
~1.0, triangle ~0.5; squares are called above 0.89) and the share of frames whose blob the
detector calls the asked shape. The first row is the VAE's own reconstruction (the ceiling).

    python scripts/probe_shapes.py --model builtin [--clips 24] [--starts 19 17 15 12] [--set ...]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from soragen.config import load_config
from soragen.data import shapes
from soragen.evaluation.detector import detect_frame
from soragen.pipeline import Pipeline
from soragen.sampler import denoise, draw_noise, make_scheduler
from soragen.train import _clips_to_tensor
from soragen.vae import frames_for
from soragen.video_io import to_uint8

SHAPES = ("circle", "square", "triangle")


def one_object_clips(n: int, rng: np.random.Generator, frames: int) -> tuple[list[np.ndarray], list[str], list[str]]:
    """n clips [frames, 64, 64, 3] of one moving object, their captions and shapes, a third of each shape."""
    clips, captions, asked = [], [], []
    while len(clips) < n:
        scene = shapes.sample_scene(rng)
        obj = scene.objects[0]
        if len(scene.objects) != 1 or scene.wall or obj.motion == "bouncing" or obj.shape != SHAPES[len(clips) % 3]:
            continue
        clips.append(shapes.render(scene, frames))
        captions.append(shapes.caption(scene, rng))
        asked.append(obj.shape)
    return clips, captions, asked


def shape_reads(video: torch.Tensor, asked: str) -> tuple[list[float], list[bool]]:
    """Fill ratio of the largest blob of each frame of a decoded clip [1, 3, T, H, W] and whether it reads as `asked`."""
    fills, right = [], []
    for frame in to_uint8(video):
        blobs = [b for b in detect_frame(frame) if not b.clipped]
        if blobs:
            big = max(blobs, key=lambda b: b.area)
            fills.append(big.fill_ratio)
            right.append(big.shape == asked)
    return fills, right


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--clips", type=int, default=24, help="clips (a third per shape)")
    parser.add_argument("--starts", type=int, nargs="+", default=[19, 17, 15, 12],
                        help="sampler step indices to start from (0 = pure noise .. steps-1 = the last step)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    args = parser.parse_args()
    start_time = time.perf_counter()
    cfg = load_config(None, args.overrides, {"model": args.model})
    pipe = Pipeline.from_config(cfg)
    s = cfg.sampler
    scheduler = make_scheduler(s)
    scheduler.set_timesteps(s.steps)
    ladder = [int(t) for t in scheduler.timesteps]
    frames = frames_for(s.window, cfg.vae.temporal_compression)
    clips, captions, asked = one_object_clips(args.clips, np.random.default_rng(args.seed), frames)
    with torch.no_grad():
        z = torch.cat([pipe.vae.encode(_clips_to_tensor(clips[i : i + 8]))[0] for i in range(0, len(clips), 8)])
        z = pipe.vae.normalize(z)  # (n, C, k, h, w)
        texts = [pipe.encode_text(c, s.negative_prompt) for c in captions]  # [cond; uncond] when guided
    print(f"{args.model}: {len(clips)} one-object clips of {frames} frames, sampler {s.kind} {s.steps} steps, "
          f"guidance {s.guidance}, seed {args.seed}")
    print(f"{'start':>14}  " + "  ".join(f"{name + ' fill':>13} {'read':>5}" for name in SHAPES))
    rows = [("reconstruction", None)] + [(f"t={ladder[k]} ({k})", k) for k in args.starts if 0 <= k < s.steps]
    for label, k in rows:
        fills: dict[str, list[float]] = {name: [] for name in SHAPES}
        right: dict[str, list[bool]] = {name: [] for name in SHAPES}
        for i in range(len(clips)):
            zi = z[i : i + 1]
            if k is not None:
                g = torch.Generator().manual_seed(args.seed * 1000 + i)
                noise = draw_noise(tuple(zi.shape), g, s.noise_correlation)
                x_t = scheduler.add_noise(zi, noise, torch.tensor([ladder[k]]))
                text, mask = texts[i]
                with torch.no_grad():
                    zi = denoise(pipe.dit, scheduler, x_t, text, mask, steps=s.steps,
                                 guidance=s.guidance, generator=g, start=k, guidance_interval=s.guidance_interval,
                                 branch_estimates=s.branch_estimates)
            with torch.no_grad():
                video = pipe.vae.decode(pipe.vae.denormalize(zi))  # (1, 3, T, H, W)
            f, r = shape_reads(video, asked[i])
            fills[asked[i]] += f
            right[asked[i]] += r
        print(f"{label:>14}  " + "  ".join(
            f"{np.median(fills[name]) if fills[name] else float('nan'):>13.3f} {100 * np.mean(right[name]) if right[name] else 0:>4.0f}%"
            for name in SHAPES))
    print(f"({time.perf_counter() - start_time:.0f} s)")


if __name__ == "__main__":
    main()
