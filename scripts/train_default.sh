#!/usr/bin/env bash
# Train the built-in model's recipe from nothing on a CPU: train (VAE, then DiT + T5),
# evaluate, and install the model folder with its card as runs/default/candidate. Compare
# its card with src/soragen/weights/shapes/README.md, and replace the shipped built-in
# model with it by `python scripts/ship_model.py runs/default --replace`.
# Re-running continues an interrupted run from its newest checkpoint.
#   bash scripts/train_default.sh            # runs/default
#
# One phase on configs/default.yaml. On 2 cores of a fast machine (sessions 16-17): VAE
# 2,000 steps (~18 min; run ve4), latent cache (~5 min) and DiT steps with
# self-conditioning and both contrasts (~2.3 s each, so ~2.3 h for 3,600; runs dv1 and
# long1): about 2.6 h in all (3.8 h on the slower machine of sessions 6-7). The recipe's levers were found as fine-tunes of
# earlier runs (docs/training-log.md, sessions 3-17); the shipped model (run sc2) is this
# recipe's earlier form with two fine-tunes, as its card says.
set -euo pipefail
cd "$(dirname "$0")/.."
run=runs/default
if [ -d "$run" ]; then resume=(--resume); else resume=(); fi
soragen train --config configs/default.yaml --set "train.output_dir=$run" "${resume[@]}"
python scripts/ship_model.py "$run" --to "$run/candidate" --history "one phase (scripts/train_default.sh): configs/default.yaml from step 0"
