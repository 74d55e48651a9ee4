"""Does a model's text encoder bind words to their object? A probe of two-object captions.

For two-object captions of the Shapes World, swaps one attribute between the two objects
(their colours, shapes or motions) and measures how much the encoding of every *unchanged*
word moves, relative to its length: 0 means each word is encoded by itself and its place
alone, so "square" does not say which colour it is, and the DiT cannot tell "a red square
and a blue circle" from "a blue square and a red circle" except by where words stand. The
swapped words themselves move by about 1 (another word), for scale. For models with the
word-level tokenizer (`text_encoder.tokenizer: words`, the built-in model's): one token a word.

    python scripts/probe_text_binding.py [--model builtin] [--model /work/runs/tb1/model ...] [--captions 200]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from soragen.config import load_config
from soragen.data import shapes
from soragen.pipeline import Pipeline


def swapped(text: str, what: str) -> str | None:
    """`text` with the two objects' colours, shapes or motions exchanged (None if they are the same)."""
    (a, b), _ = shapes.parse_caption(text)
    pairs = {"colour": (a.colour, b.colour), "shape": (a.shape, b.shape), "motion": (a.motion, b.motion)}[what]
    if pairs[0] == pairs[1]:
        return None
    words = text.split()
    cut = words.index("and")
    names = {"colour": set(shapes.PALETTE), "shape": set(shapes._EN_SHAPE_WORDS), "motion": set(shapes.MOTIONS)}[what]
    i = next(k for k in range(cut) if words[k] in names)
    j = next(k for k in range(cut + 1, len(words)) if words[k] in names)
    if what == "motion" and (words[i] == "bouncing") != (words[j] == "bouncing"):
        return None  # "moving left" and "bouncing" differ in length: the words would change places
    words[i], words[j] = words[j], words[i]
    return " ".join(words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="model folder, or builtin (repeatable)")
    parser.add_argument("--captions", type=int, default=200, help="two-object captions drawn")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    texts = []
    while len(texts) < args.captions:
        scene = shapes.sample_scene(rng, two_objects=1.0)
        texts.append(shapes.caption(scene, rng))
    for model in args.model or ["builtin"]:
        cfg = load_config(None, [] if model == "builtin" else [f"model={model}"])
        pipe = Pipeline.from_config(cfg)
        row = []
        for what in ("colour", "shape", "motion"):
            kept, moved = [], []
            for text in texts:
                other = swapped(text, what)
                if other is None:
                    continue
                with torch.no_grad():
                    ea, ma = pipe.text_encoder([text])
                    eb, _ = pipe.text_encoder([other])
                n = int(ma[0].sum())
                change = ((ea[0, :n] - eb[0, :n]).norm(dim=-1) / ea[0, :n].norm(dim=-1).clamp(min=1e-8)).tolist()
                same = [w == v for w, v in zip(text.split(), other.split())]
                kept += [c for c, s in zip(change, same) if s]
                moved += [c for c, s in zip(change, same) if not s]
            row.append(f"{what} swapped: unchanged words move {statistics.mean(kept):.3f} "
                       f"(median {statistics.median(kept):.3f}), swapped words {statistics.mean(moved):.3f}")
        print(f"{model}: " + "; ".join(row))


if __name__ == "__main__":
    main()
