#!/usr/bin/env bash
# Copy what a run of scripts/train_default.sh needs to go on elsewhere into DEST, without its full checkpoints,
# latent caches or samples: for each phase its config.yaml, metrics.jsonl (the model card's phase lines and
# wall times) and detector gates; the base phase's VAE (the later phases encode with it); and the model folder
# of the newest finished phase, which the next phase starts from. About 60 MB. A phase half-trained when the
# session ends is carried too: its config, metrics, word ids, finished VAE stage (if any) and its newest checkpoint
# as weights only (float16, no optimizer moments: soragen.train.carry_checkpoint); --resume goes on from that
# step with a fresh optimizer (the recipe's DiT at width 256: about 25 MB).
#   bash scripts/carry_run.sh runs/default carried/default     # then, on the other machine:
#   cp -r carried/default/. runs/default/ && bash scripts/train_default.sh --out runs/default
# train_default.sh skips every phase before a finished one, so the copy goes on with the phase after the newest,
# from its carried checkpoint when there is one (its latent caches are encoded again).
set -euo pipefail
[ $# -eq 2 ] || { echo "error: give the run folder and the folder to copy into: carry_run.sh RUN DEST" >&2; exit 2; }
run=$1 dest=$2
[ -d "$run" ] || { echo "error: no run folder $run" >&2; exit 2; }
. "$(dirname "$0")/recipe_phases.sh"  # phases, finished NAME
newest="" next=""
for p in "${phases[@]}"; do
  if finished "$p"; then newest=$p next=""
  elif [ -z "$next" ]; then next=$p; fi
done
# The phase after the newest finished one, when it has a checkpoint: its newest (the stage it is training).
ckpt=""
if [ -n "$next" ] && [ -d "$run/$next/checkpoints" ]; then
  ckpt=$(ls -td "$run/$next/checkpoints"/*/ 2>/dev/null | head -1 || true)  # not .NAME: one being written
  ckpt=${ckpt%/}
  [ -n "$ckpt" ] && [ -f "$ckpt/meta.json" ] || ckpt=""
fi
[ -n "$newest" ] || [ -n "$ckpt" ] || { echo "error: no phase of $run has finished or has a checkpoint; nothing to carry" >&2; exit 2; }
part="$dest.part"
rm -rf "$part"
for p in "${phases[@]}"; do
  finished "$p" || continue
  mkdir -p "$part/$p"
  cp "$run/$p/config.yaml" "$run/$p/metrics.jsonl" "$part/$p/"
  if [ -f "$run/$p/vae/gate.json" ]; then mkdir -p "$part/$p/vae" && cp "$run/$p/vae/gate.json" "$part/$p/vae/"; fi
done
if [ "$newest" = vae-base ]; then  # the VAE the base phase fine-tunes
  mkdir -p "$part/vae-base/vae" && cp "$run/vae-base/vae/"{config.json,diffusion_pytorch_model.safetensors} "$part/vae-base/vae/"
elif [ -n "$newest" ] || [ "$next" = base ]; then  # base's VAE: its VAE stage's, or its model's (a run on train.vae_model)
  for vae in "$run/base/vae" "$run/base/model/vae"; do
    if [ -f "$vae/diffusion_pytorch_model.safetensors" ]; then
      mkdir -p "$part/base/vae" && cp "$vae/"{config.json,diffusion_pytorch_model.safetensors} "$part/base/vae/"
      break
    fi
  done
fi
[ -z "$newest" ] || cp -r "$run/$newest/model" "$part/$newest/model"
what="phases up to ${newest:-none}"
if [ -n "$ckpt" ]; then  # the half-trained phase
  mkdir -p "$part/$next"
  for f in config.yaml metrics.jsonl; do [ ! -f "$run/$next/$f" ] || cp "$run/$next/$f" "$part/$next/"; done
  [ ! -d "$run/$next/tokenizer" ] || cp -r "$run/$next/tokenizer" "$part/$next/"
  python -c 'import sys; from soragen.train import carry_checkpoint as c; c(sys.argv[1], sys.argv[2])' \
    "$ckpt" "$part/$next/checkpoints/$(basename "$ckpt")"
  what="$what, and $next at its checkpoint $(basename "$ckpt")"
fi
rm -rf "$dest" && mv "$part" "$dest"
echo "carried $run to $dest: $what ($(du -sh "$dest" | cut -f1))"
