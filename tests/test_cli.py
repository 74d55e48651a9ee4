"""The CLI end to end: real ffmpeg, real files, read back with imageio."""

import json
import subprocess
import sys

import imageio.v2 as imageio
import pytest


from conftest import run_cli






def read_video(path):
    reader = imageio.get_reader(path)
    meta = reader.get_meta_data()
    frames = [f for f in reader]
    reader.close()
    return meta, frames


@pytest.mark.parametrize("seconds, fps, width, height", [(2, 8, 64, 64), (1.5, 6, 96, 48)])
def test_generate_writes_requested_video(tmp_path, tiny_yaml, capsys, seconds, fps, width, height):
    out = tmp_path / "a.mp4"
    code, stdout, _ = run_cli(["generate", "a red ball", "--config", str(tiny_yaml), "--seconds", str(seconds),
                               "--fps", str(fps), "--width", str(width), "--height", str(height), "--output", str(out)], capsys)
    assert code == 0, stdout
    meta, frames = read_video(out)
    assert len(frames) == round(seconds * fps)
    assert meta["fps"] == fps
    assert frames[0].shape == (height, width, 3)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["prompt"] == "a red ball" and sidecar["seed"] == 0
    assert set(sidecar["timings_seconds"]) == {"text_encoding", "denoising", "vae_decoding", "mp4_encoding"}
    assert sidecar["config"]["video"]["fps"] == fps and sidecar["soragen_version"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_generate_chinese_and_upscale(tmp_path, tiny_yaml, capsys):
    out = tmp_path / "b.mp4"
    code, _, _ = run_cli(["generate", "一位时尚的女士漫步在东京的街道", "--config", str(tiny_yaml), "--seconds", "1",
                          "--upscale", "2", "--output", str(out)], capsys)
    assert code == 0
    meta, frames = read_video(out)
    assert len(frames) == 8 and frames[0].shape == (128, 128, 3)


def test_same_seed_same_frames(tmp_path, tiny_yaml, capsys):
    paths = [tmp_path / f"{i}.mp4" for i in range(3)]
    for path, seed in zip(paths, (5, 5, 6)):
        assert run_cli(["generate", "a red ball", "-c", str(tiny_yaml), "--seed", str(seed), "-o", str(path)], capsys)[0] == 0
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["generate", ""], "prompt is empty"),
        (["generate", "   "], "prompt is empty"),
        (["generate", "x", "--seconds", "-1"], "--seconds (video.seconds) must be a positive"),
        (["generate", "x", "--seconds", "0"], "--seconds (video.seconds) must be a positive"),
        (["generate", "x", "--seconds", "nan"], "--seconds (video.seconds) must be a positive"),
        (["generate", "x", "--seconds", "inf"], "--seconds (video.seconds) must be a positive"),
        (["generate", "x", "--seconds", "1e9"], "above the maximum"),
        (["generate", "x", "--width", "70"], "nearest: 64 or 80"),
        (["generate", "x", "--fps", "0"], "--fps (video.fps) must be between"),
        (["generate", "x", "--set", "dit.depthh=3"], "did you mean 'dit.depth'"),
        (["generate", "x", "--config", "missing.yaml"], "config file not found"),
        (["generate", "x", "--sampler", "euler"], "'ddim' or 'ddpm'"),
        (["generate", "x", "--seconds", "abc"], "--seconds"),
        (["generate", "x", "--no-such-flag"], "No such option: --no-such-flag; valid: --seconds, --fps,"),
        (["generate", "x", "--seonds", "3"], "No such option: --seonds; did you mean --seconds?"),
        (["dataset", "shapes", "--clips", "3"], "valid: --out, --num, --seconds, --seed, --held-out, --chinese"),
        (["dataset", "shapes", "--out", "d", "--num", "x"], "(see 'soragen dataset shapes --help')"),
    ],
)
def test_user_errors_are_one_line_exit_2(args, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert fragment in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


def test_existing_output_refused_then_overwritten(tmp_path, tiny_yaml, capsys):
    out = tmp_path / "a.mp4"
    out.write_bytes(b"precious")
    code, _, err = run_cli(["generate", "x", "-c", str(tiny_yaml), "-o", str(out)], capsys)
    assert code == 2 and "--overwrite" in err and out.read_bytes() == b"precious"
    code, _, _ = run_cli(["generate", "x", "-c", str(tiny_yaml), "-o", str(out), "--overwrite"], capsys)
    assert code == 0 and out.read_bytes() != b"precious"


def test_version_names_soragen_and_its_libraries(capsys):
    from importlib.metadata import version

    from soragen import __version__

    code, out, err = run_cli(["--version"], capsys)
    assert code == 0 and err == ""
    assert out.startswith(f"soragen {__version__} (torch {version('torch')}, diffusers {version('diffusers')}, ")


def test_info_describes_model(capsys, tiny_yaml):
    code, out, _ = run_cli(["info", "--config", str(tiny_yaml)], capsys)
    assert code == 0
    assert "dit" in out and "parameters" in out and "random" in out


def test_info_refuses_video_settings_generate_refuses(capsys, tiny_yaml):
    """info showed `--set video.fps=1000` as the model's config, with exit code 0; generate refuses it."""
    code, out, err = run_cli(["info", "--config", str(tiny_yaml), "--set", "video.fps=1000"], capsys)
    assert code == 2 and out == "" and err.strip() == "error: --fps (video.fps) must be between 1 and 60, got 1000"


def test_a_config_that_changes_a_models_architecture_is_named(capsys):
    """A full preset given with --model replaces the folder's architecture: the weights then do not fit, and the
    error names the setting that changed, not only the first missing tensor."""
    from pathlib import Path

    tiny = Path(__file__).parent.parent / "configs" / "tiny.yaml"
    code, out, err = run_cli(["info", "--model", "builtin", "--config", str(tiny)], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "it does not match the config, which sets vae.temporal_compression 4 where the model has 2 (and also " in err
    assert "dit.patch_size); a model's architecture comes from its folder" in err
    assert err.strip().endswith("leave the vae and dit settings out of --config and --set")
    code, _, err = run_cli(["info", "--model", "builtin", "--set", "dit.depth=4", "--set", "dit.pooled_text=false"], capsys)
    assert code == 2 and "which sets dit.depth 4 where the model has 6 (and also dit.pooled_text);" in err


def test_a_corrupt_weights_file_is_not_blamed_on_the_config(capsys, tmp_path):
    """Only weights that do not fit the config's modules get the note on architecture settings; a truncated file
    is named as such even when the config changes a setting that shapes no tensor."""
    import shutil

    from soragen.model_io import WEIGHTS, builtin_path

    model = tmp_path / "m"
    shutil.copytree(builtin_path(), model)
    (model / "vae" / WEIGHTS).write_bytes((model / "vae" / WEIGHTS).read_bytes()[:1000])
    code, _, err = run_cli(["info", "--model", str(model), "--set", "vae.latent_scale=0.5", "--set", "dit.depth=4"], capsys)
    assert code == 2 and "is not a valid safetensors file (truncated or corrupt?)" in err and "which sets" not in err


def test_steps_flag_sets_every_windows_steps(tmp_path, tiny_yaml, capsys, monkeypatch):
    """--steps N gives N steps to every window: the model's fewer steps for the windows after the first
    (sampler.continuation_steps) are for its own default, not for a number the user asked for; unless the same
    command sets them with --set. A batch item's own 'steps' means the same as --steps."""
    from soragen.batch import Item, item_config
    from soragen.config import load_config

    monkeypatch.chdir(tmp_path)
    preset = tmp_path / "preset.yaml"  # a model's or a preset's own setting
    preset.write_text(tiny_yaml.read_text().replace("continuation_steps: null", "continuation_steps: 1"))
    base = ["generate", "x", "-c", str(preset), "--seconds", "0.5"]
    for extra, steps, continuation in (([], load_config(tiny_yaml).sampler.steps, 1), (["--steps", "4"], 4, None),
                                       (["--steps", "5", "--set", "sampler.continuation_steps=2"], 5, 2)):
        code, _, err = run_cli(base + extra + ["-o", f"s{steps}.mp4"], capsys)
        assert code == 0, err
        sampler = json.loads((tmp_path / f"s{steps}.json").read_text())["config"]["sampler"]
        assert (sampler["steps"], sampler["continuation_steps"]) == (steps, continuation)
    cfg = load_config(tiny_yaml, ["sampler.continuation_steps=1"])
    assert item_config(cfg, Item(0, "line 1", "k", {"prompt": "x"}, seed=0)).sampler.continuation_steps == 1
    assert item_config(cfg, Item(0, "line 1", "k", {"prompt": "x", "steps": 5}, seed=0)).sampler.continuation_steps is None


def test_info_reads_a_prompt_list_that_is_not_utf8(capsys, tmp_path):
    """A model folder's PROMPTS.txt in another encoding is shown with replacement characters (it was a traceback
    half-way through the output)."""
    import shutil

    from soragen.model_io import builtin_path

    model = tmp_path / "m"
    shutil.copytree(builtin_path(), model)
    (model / "PROMPTS.txt").write_bytes(b"caf\xe9 au lait\n")
    code, out, err = run_cli(["info", "--model", str(model)], capsys)
    assert code == 0 and "caf\ufffd au lait" in out and "Traceback" not in err


def test_info_describes_a_training_preset_before_it_is_trained(capsys):
    """configs/default.yaml (word tokenizer, no model yet): its parameters, from the grammar's vocabulary."""
    from pathlib import Path

    preset = Path(__file__).parent.parent / "configs" / "default.yaml"
    code, out, err = run_cli(["info", "--config", str(preset)], capsys)
    assert code == 0, err
    dit = next(line for line in out.splitlines() if line.strip().startswith("dit "))
    assert float(dit.split()[1]) > 10  # width 256, depth 6: about 12 M
    assert "the config names no model" in out


def test_console_script_and_module_entry(tmp_path):
    """`python -m soragen` is a real process with a real exit code."""
    proc = subprocess.run([sys.executable, "-m", "soragen", "generate", "x", "--seconds", "-1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --seconds (video.seconds) must be a positive number of seconds, got -1.0"


def test_a_log_file_gets_a_line_per_tenth_of_a_cache_whatever_its_chunks():
    """Under nohup the latent cache reports in chunks (64 clips of 3,500): each tenth it passes gets one line (a
    step count that is never a multiple of a tenth logged only the end); training logs its metric lines and its
    last step, not every step."""
    from soragen.cli import plain_line_due

    tenths: dict[str, int] = {}
    steps = [*range(64, 3500, 64), 3500]
    logged = [s for s in steps if plain_line_due("latents", s, 3500, {}, tenths)]
    assert [s * 10 // 3500 for s in logged] == list(range(1, 11)) and logged[-1] == 3500
    dit = [s for s in range(1, 101) if plain_line_due("dit", s, 100, {"loss": 0.5, **(
        {"samples_per_s": 5.0} if s % 25 == 0 else {})}, tenths)]
    assert dit == [25, 50, 75, 100]
