#!/usr/bin/env bash
# Train the built-in model's recipe from nothing on a CPU, phase by phase, each phase a `soragen train`
# run in its own folder under runs/default that starts from the one before; then evaluate and install
# the model folder with its card as runs/default/candidate. Compare its card with
# src/soragen/weights/shapes/README.md, and replace the shipped built-in model with it by the same
# ship_model.py line with --replace instead of --to.
# Re-running continues an interrupted phase from its newest checkpoint and skips finished ones, and every phase
# before a finished one; a run whose candidate folder exists is done (delete it to evaluate again). --dry-run lists
# what a run would do next, and trains nothing. To carry a run to another machine, copy what scripts/carry_run.sh
# selects (each phase's config and metrics, the base phase's VAE and the newest finished phase's model, without
# checkpoints or caches) and run this script on the copy.
#   bash scripts/train_default.sh                                   # runs/default
#   bash scripts/train_default.sh --out runs/b --set train.dit.text_binding=0.5   # the recipe with a change
#   bash scripts/train_default.sh --out runs/c --precision no       # in fp32 even where bf16 is native
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
#             sampler's last 10 steps (train stage 'decoder'), 1,000 steps of 8 clips (~20-55 min by
#             machine): its squares' sides come out straighter (docs/training-log.md, session 30)
# About 4.5 h in all, in fp32. In bf16 run rb2 (session 40) took 2 h 33 min from nothing to its evaluated candidate
# on one AMD EPYC with AVX-512 BF16 (vae-base 13, base 62, tune1 12, tune2 20, cool1 11, cool2 15, decoder 17, the
# eval 2 min), and run r38 181 min of steps (vae-base 19, base 8 + 71, tune1 13, tune2 27 on
# an Intel Xeon with AMX; cool1 10, cool2 14, decoder 18 on an AMD EPYC with AVX-512 BF16). On 2 cores without
# AVX-512 (AVX2 only; run r31, sessions 31-33) the phases are slower: vae-base ~35 min, the VAE fine-tune ~17 min,
# the latent cache 10 min, the DiT stage 2.3 s a step (3,600 steps ~2 h 20 min): 6 h or more.
# --precision auto (the default) trains in bf16 (train.mixed_precision=bf16) on a CPU that multiplies bf16 natively
# (AMX or AVX-512 BF16: the DiT steps 1.5-1.8x faster, scripts/bench_train.py) and in fp32 elsewhere; --precision
# bf16 or no chooses. Run r38 (sessions 38-39) took the recipe from nothing in bf16 to a model as good
# as the shipped fp32 one within the eval's noise.
# Each phase resumes from its newest checkpoint (every 100 steps) when the script is run again.
set -euo pipefail
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
run=runs/default
extra=()
dry=0
precision=auto
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry=1; shift ;;
    --precision) case ${2-} in auto|no|bf16) precision=$2; shift 2 ;;
                 *) echo "error: --precision takes auto, no or bf16, got '${2-}'" >&2; exit 2 ;; esac ;;
    --out) [ $# -ge 2 ] || { echo "error: --out needs a folder" >&2; exit 2; }; run=$(realpath -m -- "$2"); shift 2 ;;
    --set) [[ ${2-} == *=* ]] || { echo "error: --set needs KEY=VALUE, e.g. --set train.dit.text_binding=0.5" >&2; exit 2; }
           extra+=(--set "$2"); shift 2 ;;
    *) echo "error: unknown argument '$1'; valid: --out DIR, --set KEY=VALUE, --precision auto|no|bf16, --dry-run, --help" >&2
       exit 2 ;;
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

[ $dry = 1 ] || command -v soragen >/dev/null || {
  echo "error: no soragen command on PATH; activate the environment soragen is installed in (README, set-up: . .venv/bin/activate)" >&2
  exit 2
}

# The training precision: auto takes bf16 where the CPU multiplies it natively (soragen.linear.native_bf16_products).
# A --set train.mixed_precision=... comes after it on every phase's command line, so it wins.
why=""
for arg in ${extra[@]+"${extra[@]}"}; do
  [[ $arg == train.mixed_precision=* ]] && { precision=${arg#*=}; why=" (--set)"; }
done
if [ $precision = auto ]; then
  flag=$(python -c 'from soragen.linear import native_bf16_products as f; print(f() or "")' 2>/dev/null) || flag=""
  if [ -n "$flag" ]; then precision=bf16; why=" (auto: this CPU multiplies bf16 natively, $flag)"
  else precision=no; why=" (auto: no native bf16 products on this CPU, or soragen not importable)"; fi
fi
echo "precision: train.mixed_precision=$precision$why"

if [ $dry = 1 ]; then
  for p in "${phases[@]}"; do
    if done_from "$p"; then echo "$p: done"
    elif [ -d "$run/$p/checkpoints" ] && [ -n "$(ls -A "$run/$p/checkpoints")" ]; then echo "$p: resumes from its newest checkpoint"
    else echo "$p: to train"; fi
  done
  if [ -d "$run/candidate" ]; then echo "candidate: done"; else echo "candidate: to evaluate and write"; fi
  exit 0
fi

# soragen train in $run/NAME, continued (--resume) when begun, with the --set arguments given to this script last.
train() {
  local name=$1; shift
  soragen train --config configs/default.yaml --resume --set "train.output_dir=$run/$name" \
    --set "train.mixed_precision=$precision" "$@" ${extra[@]+"${extra[@]}"}
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
if [ -d "$run/candidate" ]; then
  echo "candidate: $run/candidate is already there (delete it to evaluate the run again)"
else
  python scripts/ship_model.py "$run"/{vae-base,base,tune1,tune2,cool1,cool2,decoder} --seeds 2 --to "$run/candidate"
fi
