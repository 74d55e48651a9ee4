#!/usr/bin/env bash
# Train the built-in model's recipe from nothing on a CPU, phase by phase, each phase a `soragen train`
# run in its own folder under runs/default that starts from the one before; then evaluate and install
# the model folder with its card as runs/default/candidate. Compare its card with
# src/soragen/weights/shapes/README.md, and replace the shipped built-in model with it by the same
# ship_model.py line with --replace instead of --to.
# Re-running continues an interrupted phase from its newest checkpoint and skips finished ones, and every phase
# before a finished one. --dry-run lists what a run would do next, and trains nothing. To carry a run to another
# machine, copy what scripts/carry_run.sh selects (each phase's config and metrics, the base phase's VAE and the
# newest finished phase's model, without checkpoints or caches) and run this script on the copy.
#   bash scripts/train_default.sh                                   # runs/default
#   bash scripts/train_default.sh --out runs/b --set train.dit.text_binding=0.5   # the recipe with a change
# Each --set KEY=VALUE is passed to every phase (a setting of a stage a phase does not train has no effect there).
#
# The phases (the shipped model's lineage; docs/training-log.md, sessions 17-25), with their times on 2 cores:
#   vae-base  the VAE stage of configs/default.yaml: 2,000 steps (~20 min)
#   base      that VAE fine-tuned to part squares and circles in its latents (train.vae.shape_separation,
#             600 steps, ~7 min), then the DiT stage of configs/default.yaml on its latents: latent cache
#             (~4 min), 3,600 steps, the direction contrast from step 3,000 (~80 min)
#   tune1     600 steps at lr 1.5e-4 with the direction contrast and twin rows (train.dit.twin_rows: windows
#             noised from their shape twin; its cache ~3 min) (~15 min)
#   tune2     1,200 more steps as tune1 (~30 min)
#   cool1     600 steps at lr 8e-5, EMA 0.995 (~16 min)
#   cool2     800 steps at lr 5e-5 (~21 min)
#   decoder   the VAE decoder fine-tuned on latents cool2's model denoised from real clips noised to one of the
#             sampler's last 10 steps (train stage 'decoder'), 1,000 steps of 8 clips (~55 min): its squares'
#             sides come out straighter (docs/training-log.md, session 30)
# About 4.5 h in all. On 2 cores without AVX-512 (AVX2 only; run r31, sessions 31-33) the phases are slower: vae-base
# ~35 min, the VAE fine-tune ~17 min, the latent cache 10 min, the DiT stage 2.3 s a step (3,600 steps ~2 h 20 min):
# 6 h or more. On a CPU with AMX (Intel Xeon, session 38; scripts/bench_train.py --mixed-precision bf16 tells)
# --set train.mixed_precision=bf16 makes the VAE steps 1.3x and the DiT steps 1.5x faster: run r38 took it.
# Each phase resumes from its newest checkpoint (every 100 steps) when the script is run again.
set -euo pipefail
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
run=runs/default
extra=()
dry=0
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry=1; shift ;;
    --out) [ $# -ge 2 ] || { echo "error: --out needs a folder" >&2; exit 2; }; run=$(realpath -m -- "$2"); shift 2 ;;
    --set) [[ ${2-} == *=* ]] || { echo "error: --set needs KEY=VALUE, e.g. --set train.dit.text_binding=0.5" >&2; exit 2; }
           extra+=(--set "$2"); shift 2 ;;
    *) echo "error: unknown argument '$1'; valid: --out DIR, --set KEY=VALUE, --dry-run, --help" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
. scripts/recipe_phases.sh  # phases, finished NAME

# Whether phase NAME is done: it or a later phase has finished (a carried run holds the newest one's model only).
done_from() {
  local p seen=0
  for p in "${phases[@]}"; do
    [ "$p" = "$1" ] && seen=1
    [ $seen = 1 ] && finished "$p" && return 0
  done
  return 1
}

if [ $dry = 1 ]; then
  for p in "${phases[@]}"; do
    if done_from "$p"; then echo "$p: done"
    elif [ -d "$run/$p/checkpoints" ] && [ -n "$(ls -A "$run/$p/checkpoints")" ]; then echo "$p: resumes from its newest checkpoint"
    else echo "$p: to train"; fi
  done
  exit 0
fi
command -v soragen >/dev/null || {
  echo "error: no soragen command on PATH; activate the environment soragen is installed in (README, set-up: . .venv/bin/activate)" >&2
  exit 2
}

# soragen train in $run/NAME, continued (--resume) when begun, with the --set arguments given to this script last.
train() {
  local name=$1; shift
  soragen train --config configs/default.yaml --resume --set "train.output_dir=$run/$name" "$@" ${extra[@]+"${extra[@]}"}
}

# One phase: skipped when done.
phase() {
  done_from "$1" || train "$@"
}

# A DiT phase from the phase before, on the base phase's VAE (the run folder base: its model's VAE, or its VAE
# stage's in a carried run). The latent caches are copied from the phase
# before (under a temporary name, then renamed: an interrupted copy is never taken for a cache), not encoded again.
tune() {
  local name=$1 from=$2 cache; shift 2
  done_from "$name" && return 0
  mkdir -p "$run/$name"
  for cache in latents.safetensors latents.json twin_latents.safetensors; do
    if [ -f "$run/$from/$cache" ] && [ ! -f "$run/$name/$cache" ]; then
      cp "$run/$from/$cache" "$run/$name/$cache.part" && mv "$run/$name/$cache.part" "$run/$name/$cache"
    fi
  done
  phase "$name" --set 'train.stages=[dit]' --set "train.vae_model=$run/base" \
    --set "train.dit.init_model=$run/$from/model" --set train.dit.contrast_from=0 --set train.dit.twin_rows=4 "$@"
}

done_from vae-base || train vae-base --set 'train.stages=[vae]'
phase base --set "train.vae.init_model=$run/vae-base" --set train.vae.shape_separation=0.3 \
  --set train.vae.batch_size=12 --set train.vae.lr=3e-4 --set train.vae.steps=600
tune tune1 base --set train.dit.steps=600 --set train.dit.lr=1.5e-4 --set train.dit.text_lr=4e-4 \
  --set train.dit.warmup=40 --set train.dit.ema_decay=0.998
tune tune2 tune1 --set train.dit.steps=1200 --set train.dit.lr=1.5e-4 --set train.dit.text_lr=4e-4 \
  --set train.dit.warmup=40 --set train.dit.ema_decay=0.998
tune cool1 tune2 --set train.dit.steps=600 --set train.dit.lr=8e-5 --set train.dit.text_lr=2e-4 \
  --set train.dit.warmup=20 --set train.dit.ema_decay=0.995
tune cool2 cool1 --set train.dit.steps=800 --set train.dit.lr=5e-5 --set train.dit.text_lr=1.2e-4 \
  --set train.dit.warmup=20 --set train.dit.ema_decay=0.995
# The decoder phase works on a copy of cool2's model folder (copied under a temporary name, then renamed).
if ! done_from decoder; then
  mkdir -p "$run/decoder"
  if [ ! -d "$run/decoder/model" ]; then
    rm -rf "$run/decoder/model.part"
    cp -r "$run/cool2/model" "$run/decoder/model.part" && mv "$run/decoder/model.part" "$run/decoder/model"
  fi
  train decoder --set 'train.stages=[decoder]' --set train.decoder.steps=1000 --set train.decoder.batch_size=8 \
    --set train.decoder.last_steps=10 --set train.decoder.clean_fraction=0.2
fi
python scripts/ship_model.py "$run"/{vae-base,base,tune1,tune2,cool1,cool2,decoder} --seeds 2 --to "$run/candidate"
