#!/usr/bin/env bash
# Copy what a run of scripts/train_default.sh needs to go on elsewhere into DEST, without its checkpoints,
# latent caches or samples: for each phase its config.yaml, metrics.jsonl (the model card's phase lines and
# wall times) and detector gates; the base phase's VAE (the later phases encode with it); and the model folder
# of the newest finished phase, which the next phase starts from. About 60 MB.
#   bash scripts/carry_run.sh runs/default carried/default     # then, on the other machine:
#   cp -r carried/default/. runs/default/ && bash scripts/train_default.sh --out runs/default
# train_default.sh skips every phase before a finished one, so the copy goes on with the phase after the newest.
# A phase stopped half-way is not carried: it starts again from the newest finished one.
set -euo pipefail
[ $# -eq 2 ] || { echo "error: give the run folder and the folder to copy into: carry_run.sh RUN DEST" >&2; exit 2; }
run=$1 dest=$2
[ -d "$run" ] || { echo "error: no run folder $run" >&2; exit 2; }
. "$(dirname "$0")/recipe_phases.sh"  # phases, finished NAME
newest=""
for p in "${phases[@]}"; do finished "$p" && newest=$p; done
[ -n "$newest" ] || { echo "error: no phase of $run has finished; nothing to carry" >&2; exit 2; }
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
else
  mkdir -p "$part/base/vae" && cp "$run/base/vae/"{config.json,diffusion_pytorch_model.safetensors} "$part/base/vae/"
fi
cp -r "$run/$newest/model" "$part/$newest/model"
rm -rf "$dest" && mv "$part" "$dest"
echo "carried $run to $dest: phases up to $newest ($(du -sh "$dest" | cut -f1))"
