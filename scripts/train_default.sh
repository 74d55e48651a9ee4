#!/usr/bin/env bash
# Reproduce the built-in model from nothing on a CPU: train (VAE, then DiT + T5),
# evaluate, and install the model folder into the package (src/soragen/weights/shapes).
# Re-running continues an interrupted run from its newest checkpoint.
#   bash scripts/train_default.sh            # runs/default
set -euo pipefail
cd "$(dirname "$0")/.."
run=runs/default
if [ -d "$run" ]; then resume=--resume; else resume=; fi
soragen train --config configs/default.yaml $resume
python scripts/ship_model.py "$run"
