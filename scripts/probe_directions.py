"""How much a Shapes World model reads its direction words.

Renders fresh one-object windows (no wall, no bouncers), encodes them with the model's VAE and
measures the DiT's v-loss at a few timesteps with the true caption and with its direction
word swapped (left <-> right, up <-> down). A model that uses the word pays for the wrong one;
one that ignores it does not. Prints the increase by asked direction and timestep.

    python scripts/probe_directions.py --model builtin [--windows 48] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from soragen.config import load_config
from soragen.data import shapes
from soragen.pipeline import Pipeline
from soragen.sampler import draw_noise, make_scheduler
from soragen.train import _clips_to_tensor
from soragen.vae import frames_for

DIRECTIONS = ("left", "right", "up", "down")
TIMESTEPS = (300, 500, 700, 900)


def one_object_windows(n: int, rng: np.random.Generator, frames: int) -> tuple[list[np.ndarray], list[str], list[str]]:
    """n clips [frames, 64, 64, 3], their captions and the asked direction, an equal share of each."""
    clips, captions, asked = [], [], []
    while len(clips) < n:
        scene = shapes.sample_scene(rng)
        obj = scene.objects[0]
        if len(scene.objects) != 1 or scene.wall or obj.motion != DIRECTIONS[len(clips) % 4]:
            continue
        clips.append(shapes.render(scene, frames))
        captions.append(shapes.caption(scene, rng))
        asked.append(obj.motion)
    return clips, captions, asked


@torch.no_grad()
def v_losses(pipe: Pipeline, sched, z: torch.Tensor, texts: list, t: int, seed: int, correlation: float):
    """Per-window v-loss [n] at timestep t for each encoded caption set, one noise draw for all."""
    noise = draw_noise(tuple(z.shape), torch.Generator().manual_seed(seed + t), correlation)
    t_batch = torch.full((z.shape[0],), t, dtype=torch.long)
    x_t, v = sched.add_noise(z, noise, t_batch), sched.get_velocity(z, noise, t_batch)
    timesteps = t_batch[:, None].expand(-1, z.shape[2])  # (n, T): one timestep per latent frame
    return [(pipe.dit(x_t, timesteps, text, mask) - v).square().mean(dim=(1, 2, 3, 4)) for text, mask in texts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--windows", type=int, default=48, help="windows (a quarter per direction)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    cfg = load_config(None, [], {"model": args.model})
    pipe = Pipeline.from_config(cfg)
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(make_scheduler(cfg.sampler.model_copy(update={"kind": "ddpm"})).config)
    k = cfg.sampler.window  # latent frames of a generation window
    frames = frames_for(k, cfg.vae.temporal_compression)
    clips, captions, asked = one_object_windows(args.windows, np.random.default_rng(args.seed), frames)
    with torch.no_grad():
        z = torch.cat([pipe.vae.normalize(pipe.vae.encode(_clips_to_tensor(clips[i : i + 8]))[0])
                       for i in range(0, len(clips), 8)])  # (n, C, k, h, w)
        texts = [pipe.text_encoder(captions), pipe.text_encoder([shapes.swap_directions(c) for c in captions])]
    print(f"{args.model}: {len(captions)} one-object windows of {k} latent frames, seed {args.seed}")
    print(f"{'t':>4} {'true':>8} {'swapped':>8}  " + "  ".join(f"{d:>6}" for d in DIRECTIONS))
    for t in TIMESTEPS:
        true, wrong = v_losses(pipe, sched, z, texts, t, args.seed, cfg.sampler.noise_correlation)
        by_dir = []
        for d in DIRECTIONS:
            sel = torch.tensor([a == d for a in asked])
            by_dir.append(100.0 * (wrong[sel].mean() / true[sel].mean() - 1.0).item())
        print(f"{t:>4} {true.mean().item():>8.4f} {wrong.mean().item():>8.4f}  "
              + "  ".join(f"{p:>+5.1f}%" for p in by_dir))
    print(f"(increase of the v-loss with the direction word swapped, by asked direction; {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
