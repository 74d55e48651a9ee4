#!/usr/bin/env bash
# Train the built-in model's recipe from nothing on a CPU: train (VAE, then DiT + T5),
# evaluate, and install the model folder with its card as runs/default/candidate. Compare
# its card with src/soragen/weights/shapes/README.md, and replace the shipped built-in
# model with it by `python scripts/ship_model.py runs/default --replace`.
# Re-running continues an interrupted run from its newest checkpoint.
#   bash scripts/train_default.sh            # runs/default
#
# One phase on configs/default.yaml. On 2 cores (session 23, the linear layers on oneDNN): VAE
# 2,000 steps (18 min in run ve4, session 16; not re-timed since), latent cache (~4 min) and DiT steps with
# self-conditioning, 3,000 at ~1.27 s and 600 more with the direction contrast at ~1.55 s
# (run nc1: 81 min): about 1.8 h in all. The recipe's levers were found as fine-tunes of
# earlier runs (docs/training-log.md, sessions 3-17); the shipped model (run sc2) is this
# recipe's earlier form with two fine-tunes, as its card says.
set -euo pipefail
cd "$(dirname "$0")/.."
run=runs/default
if [ -d "$run" ]; then resume=(--resume); else resume=(); fi
soragen train --config configs/default.yaml --set "train.output_dir=$run" "${resume[@]}"
python scripts/ship_model.py "$run" --to "$run/candidate" --history "one phase (scripts/train_default.sh): configs/default.yaml from step 0"
