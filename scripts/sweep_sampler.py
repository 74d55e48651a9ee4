"""Choose the built-in model's sampling defaults: quality per second of compute.

    python scripts/sweep_sampler.py [--model builtin] [--prompts 24] [--kinds ddim ddpm] [--steps 10 20 30] [--guidance 2 4 6]

For each (sampler, steps, guidance) it generates 4-second videos of the first N prompts of
configs/prompts/shapes-eval.txt, scores them with the Shapes World detector and
prints the share of videos with every attribute right next to the measured seconds
per video. Results go to sweep.json in the output folder.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--prompts", type=int, default=24, help="first N prompts of the evaluation list")
    parser.add_argument("--kinds", nargs="+", choices=["ddim", "ddpm"], default=["ddim", "ddpm"], help="samplers")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 30])
    parser.add_argument("--guidance", type=float, nargs="+", default=[2.0, 4.0, 6.0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    args = parser.parse_args()

    from soragen.config import load_config
    from soragen.evaluation.run import evaluate, read_prompts

    prompts = read_prompts(ROOT / "configs/prompts/shapes-eval.txt")
    # spread the subset over the categories: every k-th prompt
    step = max(1, len(prompts) // args.prompts)
    prompts = prompts[::step][: args.prompts]
    rows = []
    print(f"{'sampler':>7} {'steps':>5} {'guidance':>8} {'all right':>9} {'colour':>7} {'shape':>6} {'direction':>9} {'s/video':>8}")
    for kind, steps, guidance in itertools.product(args.kinds, args.steps, args.guidance):
        cfg = load_config(None, [f"model={args.model}", f"sampler.kind={kind}", f"sampler.steps={steps}",
                                 f"sampler.guidance={guidance}", "video.seconds=4"])
        t0 = time.perf_counter()
        report = evaluate(cfg, prompts, args.out / f"{kind}_s{steps}_g{guidance:g}", seeds=args.seeds)
        per_video = (time.perf_counter() - t0) / (len(prompts) * args.seeds)
        row = report["table"]["overall"]
        rows.append({"sampler": kind, "steps": steps, "guidance": guidance, "seconds_per_video": per_video, **row})
        print(f"{kind:>7} {steps:>5} {guidance:>8g} {100 * row['all']:>8.1f}% {100 * row['colour']:>6.1f}% "
              f"{100 * row['shape']:>5.1f}% {100 * row['direction']:>8.1f}% {per_video:>8.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
