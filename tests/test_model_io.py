import pytest
import torch
from safetensors.torch import save_file

from soragen.config import load_config
from soragen.errors import UserError
from soragen.model_io import WEIGHTS, load_weights, save_model
from soragen.pipeline import Pipeline
from soragen.sampler import make_scheduler

from conftest import tiny_config


@pytest.fixture
def folder(tmp_path):
    cfg = tiny_config()
    pipe = Pipeline.from_config(cfg)
    for p in pipe.dit.parameters():
        torch.nn.init.normal_(p, std=0.02)
    save_model(tmp_path / "m", cfg, pipe.text_encoder, pipe.vae, pipe.dit, make_scheduler(cfg.sampler))
    return tmp_path / "m", pipe


def test_model_folder_layout_and_round_trip(folder):
    path, pipe = folder
    for name in ("model_index.json", "soragen.yaml", f"transformer/{WEIGHTS}", f"vae/{WEIGHTS}",
                 "text_encoder/model.safetensors", "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json"):
        assert (path / name).is_file(), name
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt"))
    cfg = load_config(None, [f"model={path}"])
    assert cfg.dit.width == 32  # architecture comes from the folder
    loaded = Pipeline.from_config(cfg)
    for a, b in zip(loaded.dit.state_dict().values(), pipe.dit.state_dict().values()):
        assert torch.equal(a, b)
    with torch.no_grad():
        torch.testing.assert_close(loaded.text_encoder(["hi"])[0], pipe.text_encoder(["hi"])[0])


def test_a_model_folder_keeps_the_frame_rate_it_was_made_at(folder):
    """--fps sets the output's rate; the model's own (video.model_fps) stays, in folders saved before it too."""
    path, _ = folder
    assert load_config(None, [f"model={path}", "video.fps=24"]).video.model_fps == 8
    text = (path / "soragen.yaml").read_text()
    assert "model_fps: 8" in text
    (path / "soragen.yaml").write_text(text.replace("model_fps: 8", "model_fps: null").replace("fps: 8", "fps: 12"))
    cfg = load_config(None, [f"model={path}", "video.fps=24"])
    assert (cfg.video.fps, cfg.video.model_fps) == (24, 12)


def test_mismatched_weights_name_tensor_and_shapes(folder):
    path, _ = folder
    with pytest.raises(UserError, match=r"tensor '.*' has shape \(.*\) but the config needs \(.*\)"):
        Pipeline.from_config(load_config(None, [f"model={path}", "dit.width=64"]))


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "missing"])
def test_broken_weights_are_clear_errors(folder, damage):
    path, pipe = folder
    file = path / "vae" / WEIGHTS
    data = file.read_bytes()
    match damage:
        case "empty":
            file.write_bytes(b"")
        case "truncated":
            file.write_bytes(data[: len(data) // 2])
        case "garbage":
            file.write_bytes(b"\x00\xff" * 100)
        case "missing":
            file.unlink()
    with pytest.raises(UserError) as err:
        load_weights(pipe.vae, file)
    assert str(file) in str(err.value)


@pytest.mark.parametrize("part", ["text_encoder/config.json", "tokenizer", f"transformer/{WEIGHTS}"])
def test_an_incomplete_model_folder_names_what_is_missing(tmp_path, folder, part):
    import shutil

    path, _ = folder
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    target = broken / part
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(UserError, match=f"model folder {broken} is incomplete: {part} missing"):
        Pipeline.from_config(load_config(None, [f"model={broken}"]))


def test_a_damaged_tokenizer_is_named_not_the_text_encoder(tmp_path, folder):
    import shutil

    path, _ = folder
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / "tokenizer" / "tokenizer_config.json").write_text("")
    with pytest.raises(UserError, match=f"cannot load the tokenizer from '{broken / 'tokenizer'}'"):
        Pipeline.from_config(load_config(None, [f"model={broken}"]))


def test_an_invalid_value_in_a_model_folders_config_names_the_folder(folder):
    path, _ = folder
    text = (path / "soragen.yaml").read_text()
    (path / "soragen.yaml").write_text(text.replace("seed: 0", "seed: -1", 1) if "seed: 0" in text else text + "seed: -1\n")
    with pytest.raises(UserError, match=f"model folder {path}: its soragen.yaml is not valid: config key 'seed'"):
        load_config(None, [f"model={path}"])
    with pytest.raises(UserError, match=r"^config key 'seed'"):  # a bad value of the user's own is the user's
        load_config(None, ["seed=-2"])


def test_an_empty_soragen_yaml_is_named(folder):
    path, _ = folder
    (path / "soragen.yaml").write_text("")
    with pytest.raises(UserError, match="soragen.yaml is empty"):
        load_config(None, [f"model={path}"])


def test_a_batch_on_a_broken_model_is_one_command_error(tmp_path, folder, capsys):
    """Not a failure per item: no item can render, so the command stops with one line and exit code 2."""
    from conftest import run_cli

    path, _ = folder
    (path / "transformer" / WEIGHTS).unlink()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red ball\na blue ball\n")
    code, _, err = run_cli(["batch", str(prompts), "--out", str(tmp_path / "out"), "--model", str(path),
                            "--seconds", "1"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "is incomplete: transformer/" in lines[0]


def test_missing_tensor_named(tmp_path, folder):
    _, pipe = folder
    state = dict(pipe.vae.state_dict())
    name = sorted(state)[0]
    del state[name]
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    with pytest.raises(UserError, match=f"lacks tensor '{name}'"):
        load_weights(pipe.vae, tmp_path / "w.safetensors")


def test_unknown_model_folder(tmp_path):
    with pytest.raises(UserError, match="model folder not found"):
        load_config(None, ["model=/nonexistent/model"])
    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError, match=f"model {tmp_path / 'afile'} is a file; give the folder written by"):
        load_config(None, [f"model={tmp_path / 'afile'}"])


def test_a_training_run_folder_stands_for_its_model(tmp_path, folder, capsys):
    """`--model RUN` uses RUN/model, as a user who trained into RUN would expect; before the DiT stage has
    written it, the error says so instead of calling the run 'not a model folder'."""
    import shutil

    from conftest import run_cli

    path, _ = folder
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("dit: {depth: 1}\n")  # someone's config.yaml: not a run
    with pytest.raises(UserError, match="is not a soragen model folder: soragen.yaml is missing"):
        load_config(None, [f"model={run}"])
    (run / "config.yaml").write_text(tiny_config().to_yaml())  # a run before its first checkpoint
    with pytest.raises(UserError, match="training run that has not written its model yet"):
        load_config(None, [f"model={run}"])
    (run / "model").write_text("")  # damaged: a file where the model folder goes
    with pytest.raises(UserError, match="the model folder of the training run .* is damaged"):
        load_config(None, [f"model={run}"])
    (run / "model").unlink()
    shutil.copytree(path, run / "model")
    assert load_config(None, [f"model={run}"]).dit.width == 32
    (run / "config.yaml").write_text("train: [")  # an unreadable config.yaml does not hide the model beside it
    assert load_config(None, [f"model={run}"]).dit.width == 32
    code, _, err = run_cli(["generate", "a red ball", "--model", str(run), "--seconds", "1",
                            "--output", str(tmp_path / "a.mp4")], capsys)
    assert code == 0, err
    assert (tmp_path / "a.mp4").stat().st_size > 0


def test_weights_digest_reads_small_files_and_stats_large_ones(folder, monkeypatch):
    """A changed weight changes the digest; a large file is not read but its rewrite (new mtime) still counts."""
    import os

    import soragen.model_io as mi

    path, _ = folder
    first = mi.weights_digest(str(path))
    assert mi.weights_digest(str(path)) == first
    weights = path / "transformer" / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    st = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and time: only reading tells
    second = mi.weights_digest(str(path))
    assert second != first
    monkeypatch.setattr(mi, "DIGEST_READ_BYTES", 0)  # every file "large": stands by size and time
    stat_only = mi.weights_digest(str(path))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert mi.weights_digest(str(path)) != stat_only


def test_a_text_encoder_missing_weights_or_cut_short_is_named(folder, tmp_path):
    """transformers starts missing T5 weights at random and carries on; a half file raised SafetensorError."""
    import shutil

    from safetensors.torch import load_file

    path, _ = folder
    weights = path / "text_encoder" / "model.safetensors"
    whole = weights.read_bytes()
    tensors = load_file(weights)
    dropped = sorted(k for k in tensors if "block" in k)[-1]
    save_file({k: v for k, v in tensors.items() if k != dropped}, weights)
    with pytest.raises(UserError, match=f"lacks 1 of its weights \\(e.g. {dropped}\\)"):
        Pipeline.from_config(load_config(None, [f"model={path}"]))
    weights.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match="cannot load the T5 text encoder"):
        Pipeline.from_config(load_config(None, [f"model={path}"]))
    weights.write_bytes(whole)
    other = tmp_path / "big"
    cfg = tiny_config(text_encoder={"tokenizer": "words"})
    from soragen.text_encoder import TextEncoder

    big = TextEncoder.from_config(cfg.text_encoder, corpus=[" ".join(f"w{i}" for i in range(600))])
    big.tokenizer.save_pretrained(other)
    shutil.rmtree(path / "tokenizer")
    shutil.copytree(other, path / "tokenizer")
    with pytest.raises(UserError, match="tokens but the T5 text encoder .* embeds"):
        Pipeline.from_config(load_config(None, [f"model={path}"]))


def test_a_run_config_with_a_model_folder_keeps_the_folders_latent_statistics(folder, tmp_path):
    """A run's config.yaml holds null for what training measured (latent statistics, the model's frame rate);
    given with --config beside the run's model folder, the folder's values stay."""
    path, _ = folder
    cfg = tiny_config(vae={"latent_mean": [0.5] * 4, "latent_std": [3.0] * 4}, video={"model_fps": 8})
    pipe = Pipeline.from_config(cfg)
    save_model(tmp_path / "m2", cfg, pipe.text_encoder, pipe.vae, pipe.dit, make_scheduler(cfg.sampler))
    run_config = tmp_path / "config.yaml"
    run_config.write_text(tiny_config().to_yaml())
    assert tiny_config().vae.latent_mean is None
    loaded = load_config(run_config, [f"model={tmp_path / 'm2'}", "video.fps=16"])
    assert loaded.vae.latent_mean == (0.5,) * 4 and loaded.vae.latent_std == (3.0,) * 4
    assert loaded.video.model_fps == 8 and loaded.video.fps == 16


def test_text_encoder_settings_beside_a_model_folder_are_the_folders(folder):
    """The folder's own T5 runs whatever --set says of its size; the config (and so the sidecar) records what ran."""
    path, pipe = folder
    cfg = load_config(None, [f"model={path}", "text_encoder.d_model=256", "text_encoder.num_layers=6"])
    assert cfg.text_encoder.d_model == pipe.text_encoder.dim and cfg.text_encoder.num_layers != 6
    assert Pipeline.from_config(cfg).text_encoder.dim == cfg.text_encoder.d_model
