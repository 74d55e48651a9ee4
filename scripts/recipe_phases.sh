# The phases of scripts/train_default.sh, in order, and how to tell one has finished; sourced by it and by
# scripts/carry_run.sh, with $run the run folder.
phases=(vae-base base tune1 tune2 cool1 cool2 decoder redraw redraw-dit)

# Whether phase NAME has finished: the file it writes last.
finished() {
  case $1 in
    vae-base) [ -f "$run/vae-base/vae/diffusion_pytorch_model.safetensors" ] ;;
    decoder | redraw) [ -f "$run/$1/model/vae/decoder_finetune.json" ] ;;
    *) [ -f "$run/$1/model/soragen.yaml" ] ;;
  esac
}
