"""How far apart a VAE puts the Shapes World's shapes in its latents, against the pixels.

Renders still one-object scenes (4 colours x 2 sizes x 3 places, no wall) once as a circle,
once as a square and once as a triangle, and the empty frame; encodes them (posterior
means), scaled per channel by the spread of 48 random training scenes (as the DiT sees
them). Prints the medians of |square - circle| / |circle - empty| and |triangle - circle|
/ |circle - empty|, in the pixels and in each VAE's latents: the share of an object's own
latent energy that tells its shape. The DiT's loss can only reward a shape as much as this.

    python scripts/probe_vae_shapes.py src/soragen/weights/shapes /work/runs/vs1   # model folders or run folders (vae/)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from soragen.config import VAEConfig
from soragen.data import shapes
from soragen.model_io import WEIGHTS, load_weights
from soragen.train import _clips_to_tensor
from soragen.vae import VideoVAE

FRAMES = 9


def load_vae(folder: Path) -> VideoVAE:
    cfg = VAEConfig(**json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8")))
    vae = VideoVAE(cfg)
    load_weights(vae, folder / "vae" / WEIGHTS)
    return vae.eval()


def stills() -> list[list[np.ndarray]]:
    """Per scene: [circle, square, triangle, empty] clips [FRAMES, 64, 64, 3] of one still object."""
    out = []
    for colour in ("red", "green", "blue", "yellow"):
        for size in ("small", "large"):
            for x, y in ((20.0, 20.0), (40.5, 30.25), (30.75, 44.5)):
                clips = []
                for shape in shapes.SHAPES:
                    obj = shapes.ShapeObject(colour, shape, size, "bouncing", x, y, 0.0)
                    clips.append(shapes.render(shapes.Scene((obj,), False), 1).repeat(FRAMES, axis=0))
                out.append(clips + [np.zeros_like(clips[0])])
    return out


def ratios(codes: torch.Tensor) -> tuple[float, float]:
    """codes [n, 4, ...] (circle, square, triangle, empty) -> medians of the two distance ratios."""
    flat = codes.flatten(2)  # (n, 4, D)
    energy = (flat[:, 0] - flat[:, 3]).norm(dim=1)
    square = (flat[:, 1] - flat[:, 0]).norm(dim=1) / energy
    triangle = (flat[:, 2] - flat[:, 0]).norm(dim=1) / energy
    return square.median().item(), triangle.median().item()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="model folders or run folders holding vae/")
    args = parser.parse_args()
    scenes = stills()
    pixels = torch.stack([_clips_to_tensor(s) for s in scenes])  # (n, 4, 3, T, H, W)
    rng = np.random.default_rng(7)
    random = _clips_to_tensor([shapes.render(shapes.sample_scene(rng), FRAMES) for _ in range(48)])
    print(f"{len(scenes)} still scenes; median |square - circle| and |triangle - circle| over |circle - empty|")
    print(f"{'':>40} {'square':>7} {'triangle':>8}")
    square, triangle = ratios(pixels)
    print(f"{'pixels':>40} {square:>7.3f} {triangle:>8.3f}")
    for folder in args.folders:
        vae = load_vae(folder)
        spread = vae.encode(random)[0].transpose(0, 1).flatten(1).std(dim=1)  # (C,)
        codes = torch.stack([vae.encode(p)[0] for p in pixels]) / spread.view(1, 1, -1, 1, 1, 1)  # (n, 4, C, k, h, w)
        square, triangle = ratios(codes)
        print(f"{str(folder)[-40:]:>40} {square:>7.3f} {triangle:>8.3f}")


if __name__ == "__main__":
    main()
