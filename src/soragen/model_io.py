"""Model folders: weights in safetensors, in the diffusers pipeline layout.

    model_index.json            what each subfolder holds
    soragen.yaml                the resolved config the model was built with
    transformer/                DiT: config.json + diffusion_pytorch_model.safetensors
    vae/                        VideoVAE: config.json + diffusion_pytorch_model.safetensors
    text_encoder/, tokenizer/   T5 (save_pretrained, safetensors) and its tokenizer
    scheduler/                  the diffusers scheduler config
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from soragen.config import Config, read_yaml
from soragen.errors import UserError

WEIGHTS = "diffusion_pytorch_model.safetensors"
BUILTIN_DIR = Path(__file__).parent / "weights"
BUILTIN_NAME = "builtin"


def builtin_path() -> Path:
    """Folder of the built-in model shipped inside the package."""
    return BUILTIN_DIR / "shapes"


def builtin_installed() -> bool:
    """Whether this package ships the built-in model."""
    return (builtin_path() / "soragen.yaml").is_file()


def resolve_model(name: str) -> Path:
    """A model name ('builtin') or folder -> the folder, checked to look like a soragen model.

    A training run's folder stands for the model folder it writes (RUN/model).
    """
    path = builtin_path() if name == BUILTIN_NAME else Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"model {path} is a file; give the folder written by `soragen train` (or 'builtin')")
    if not path.is_dir():
        hint = " (the built-in model is not installed in this package)" if name == BUILTIN_NAME else ""
        raise UserError(f"model folder not found: {path}{hint}; give a folder written by `soragen train` or 'builtin'")
    if not (path / "soragen.yaml").is_file():
        if is_run_folder(path):  # a training run stands for its model folder
            model = path / "model"
            if (model / "soragen.yaml").is_file():
                return model
            if model.exists() or model.is_symlink():
                raise UserError(f"{model}, the model folder of the training run {path}, is damaged (it is not a folder "
                                "with soragen.yaml); delete it and resume the run to write it again")
            raise UserError(f"{path} is a training run that has not written its model yet (its DiT stage writes "
                            f"{path / 'model'}); resume it with the command that started it and --resume")
        raise UserError(f"{path} is not a soragen model folder: soragen.yaml is missing")
    return path


def is_run_folder(path: Path) -> bool:
    """Whether folder `path` is a training run's: its config.yaml records a whole config, training included
    (or, unreadable, sits beside the run's model folder)."""
    if not (path / "config.yaml").is_file():
        return False
    try:
        return {"train", "dit", "vae"} <= read_yaml(path / "config.yaml").keys()
    except UserError:
        return (path / "model" / "soragen.yaml").is_file()


def model_config_data(name: str) -> dict[str, Any]:
    """The config mapping stored in a model folder (its architecture and recommended settings)."""
    path = resolve_model(name) / "soragen.yaml"
    data = read_yaml(path)
    if not data:  # the schema's defaults would describe another architecture than the weights'
        raise UserError(f"{path} is empty; a model folder's soragen.yaml records the config its weights were trained with")
    return data


LATENT_STATISTICS = ("latent_mean", "latent_std", "latent_scale")  # vae settings that shape no tensor


def architecture_changes(cfg: Config, folder: Path) -> list[tuple[str, Any, Any]]:
    """The VAE and DiT settings of `cfg` that differ from those model folder `folder` was trained with, as
    (key, cfg's value, the folder's value) (a full preset given with --config replaces them)."""
    base = read_yaml(Path(folder) / "soragen.yaml")
    ours = cfg.to_dict()
    changes = []
    for section in ("vae", "dit"):
        theirs = base.get(section) if isinstance(base.get(section), dict) else {}
        for key, value in ours[section].items():
            if key in theirs and theirs[key] != value and not (section == "vae" and key in LATENT_STATISTICS):
                changes.append((f"{section}.{key}", value, theirs[key]))
    return changes


def files_digest(paths: list[Path], root: Path | None = None) -> str:
    """A short sha256 of the files' bytes in the order given (and, with `root`, of their paths below it)."""
    import hashlib

    h = hashlib.sha256()
    for path in paths:
        if root is not None:
            h.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


DIGEST_READ_BYTES = 64 << 20  # weights_digest reads files up to this size; a larger one stands by its size and mtime


def weights_digest(model: str | None) -> str | None:
    """A digest of a model folder's weights and tokenizer files (None for no model folder). Videos made from a model
    trained on in place (a run's model/), or from a built-in model a new release replaced, are stale: `eval` and
    `batch` compare it before reusing them. Files up to DIGEST_READ_BYTES are read; a larger one (a T5-XXL's
    weights: reading 19 GB would take a minute) counts by its size and modification time, which a file written
    again (always under a new name, then renamed) changes."""
    import hashlib

    if model is None:
        return None
    folder = resolve_model(model)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".json") and p.is_file()):
        st = path.stat()
        read = st.st_size <= DIGEST_READ_BYTES
        h.update(files_digest([path], root=folder).encode() if read
                 else f"{path.relative_to(folder).as_posix()} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def save_file_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file under a temporary name, then rename it into place."""
    from safetensors.torch import save_file

    from soragen.video_io import follow_umask, temporary_path

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        follow_umask(tmp)  # safetensors leaves its files 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class WeightsMismatch(UserError):
    """A weights file whose tensors do not fit the module the config builds (missing, unexpected, mis-shaped)."""


def load_weights(module: nn.Module, path: Path) -> None:
    """Load a safetensors file into `module`, naming any missing, unexpected or mis-shaped tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"weights file {path} is empty; re-export or re-download the model")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"weights file {path} is not a valid safetensors file (truncated or corrupt?): {e}") from None
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise WeightsMismatch(f"weights file {path} lacks tensor '{missing[0]}' ({len(missing)} missing); it does not match the config")
    if unexpected:
        raise WeightsMismatch(f"weights file {path} has unexpected tensor '{unexpected[0]}'; it does not match the config")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise WeightsMismatch(
                f"weights file {path}: tensor '{key}' has shape {tuple(tensor.shape)} but the config "
                f"needs {tuple(expected[key].shape)}"
            )
    module.load_state_dict(state, strict=True)


def missing_parts(folder: Path, own_text_encoder: bool = True) -> list[str]:
    """The parts of model folder `folder` that loading it needs and it lacks (the text encoder's only if it
    is the folder's own, not a pretrained T5 named by the config)."""
    needed = ["vae/" + WEIGHTS, "transformer/" + WEIGHTS]
    if own_text_encoder:
        needed = ["text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer"] + needed
    return [name for name in needed if not (folder / name).exists()]


def check_model_folder(cfg: Config) -> Path:
    """The model folder cfg names, with a UserError naming what is missing if it lacks a part generation loads."""
    folder = resolve_model(cfg.model)
    missing = missing_parts(folder, own_text_encoder=cfg.text_encoder.pretrained is None)
    if missing:
        raise UserError(f"model folder {folder} is incomplete: {', '.join(missing)} missing (a model folder holds "
                        "soragen.yaml, text_encoder/, tokenizer/, vae/ and transformer/, as training writes it)")
    return folder


def portable_config(cfg: Config) -> Config:
    """cfg as a model folder keeps it: without the paths of the run that trained it (its output folder, the
    model folders it started from) and with the default stages, so that a config layered on the folder
    (generation, `soragen info`, a fine-tune) inherits the model's settings and not another machine's paths;
    with the frame rate it was trained at as `video.model_fps`, which a later `--fps` does not change."""
    t = cfg.train
    fields = type(t).model_fields
    train = t.model_copy(update={
        "output_dir": fields["output_dir"].default, "stages": fields["stages"].default, "vae_model": None,
        "vae": t.vae.model_copy(update={"init_model": None}), "dit": t.dit.model_copy(update={"init_model": None}),
    })
    video = cfg.video.model_copy(update={"model_fps": cfg.video.model_rate})  # the rate it learned
    return cfg.model_copy(update={"model": None, "train": train, "video": video})


def save_model(folder: Path, cfg: Config, text_encoder, vae: nn.Module, dit: nn.Module, scheduler) -> None:
    """Write a complete model folder; assembled in a temporary folder and renamed into place."""
    from soragen.video_io import follow_umask, temporary_folder

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_folder(folder)
    try:
        (tmp / "soragen.yaml").write_text(portable_config(cfg).to_yaml(), encoding="utf-8")
        index = {
            "_class_name": "SoragenPipeline",
            "transformer": ["soragen.dit", "DiT"],
            "vae": ["soragen.vae", "VideoVAE"],
            "text_encoder": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", type(text_encoder.tokenizer).__name__],
            "scheduler": ["diffusers", type(scheduler).__name__],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        for sub, module, section in (("transformer", dit, cfg.dit), ("vae", vae, cfg.vae)):
            save_file_atomic(module.state_dict(), tmp / sub / WEIGHTS)
            (tmp / sub / "config.json").write_text(section.model_dump_json(indent=2) + "\n")
        text_encoder.save(tmp / "text_encoder", tmp / "tokenizer")
        scheduler.save_pretrained(tmp / "scheduler")
        for path in tmp.rglob("*"):  # what save_pretrained and safetensors wrote, readable as the umask allows
            follow_umask(path, directory=path.is_dir())
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
