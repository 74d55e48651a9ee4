"""scripts/train_default.sh's arguments: --help and bad arguments answer at once and start no training."""

import subprocess
from pathlib import Path

import pytest

from soragen.linear import native_bf16_products

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_default.sh"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30)


def test_help_lists_the_phases_and_trains_nothing(tmp_path):
    out = run_script("--out", str(tmp_path / "runs"), "--help")
    assert out.returncode == 0 and out.stderr == ""
    for phase in ("vae-base", "base", "tune1", "tune2", "cool1", "cool2", "--set KEY=VALUE"):
        assert phase in out.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--set", "train.dit.text_binding"], "--set needs KEY=VALUE"),
    (["--out"], "--out needs a folder"),
    (["--precision", "fp16"], "--precision takes auto, no or bf16, got 'fp16'"),
])
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, args, fragment):
    out = run_script("--out", str(tmp_path / "runs"), *args)
    assert out.returncode == 2 and out.stdout == ""
    assert fragment in out.stderr and out.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_without_soragen_on_path_says_to_activate_it(tmp_path):
    """Started outside the environment soragen is installed in, the script stops at once with what to do (it
    said `scripts/train_default.sh: line 44: soragen: command not found`)."""
    out = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path / "runs")], capture_output=True, text=True,
                         timeout=30, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 2 and out.stdout == "" and out.stderr.count("\n") == 1
    assert "no soragen command on PATH" in out.stderr and ". .venv/bin/activate" in out.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, expected", [
    ([], None),  # auto: bf16 where this CPU multiplies it natively
    (["--precision", "no"], "no"),
    (["--precision", "bf16"], "bf16"),
    (["--precision", "no", "--set", "train.mixed_precision=bf16"], "bf16"),  # the --set comes last on each phase
])
def test_the_training_precision_is_chosen_and_said(tmp_path, args, expected):
    if expected is None:
        expected = "no" if native_bf16_products() is None else "bf16"
    out = run_script("--out", str(tmp_path / "runs"), "--dry-run", *args)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith(f"precision: train.mixed_precision={expected}")
    assert "vae-base: to train" in out.stdout and not (tmp_path / "runs").exists()


CARRY = SCRIPT.parent / "carry_run.sh"


def fake_phase(run: Path, name: str, model: bool = True) -> None:
    """The files a finished phase of train_default.sh leaves (small stand-ins for its weights)."""
    folder = run / name
    (folder / "checkpoints" / "dit-0000100").mkdir(parents=True)
    (folder / "config.yaml").write_text(f"phase: {name}\n")
    (folder / "metrics.jsonl").write_text('{"stage": "dit", "step": 1, "time": 0}\n')
    (folder / "latents.safetensors").write_bytes(b"cache")
    if name in ("vae-base", "base"):
        (folder / "vae").mkdir()
        for f in ("config.json", "diffusion_pytorch_model.safetensors", "gate.json"):
            (folder / "vae" / f).write_text(name)
    if model and name != "vae-base":
        (folder / "model" / "transformer").mkdir(parents=True)
        (folder / "model" / "soragen.yaml").write_text(name)
        (folder / "model" / "transformer" / "diffusion_pytorch_model.safetensors").write_text(name)


def test_a_carried_run_goes_on_after_its_newest_finished_phase(tmp_path):
    """carry_run.sh copies each finished phase's config and metrics, the base VAE and the newest model, and no
    checkpoints or caches; train_default.sh --dry-run on the copy skips every phase up to that one."""
    run, dest = tmp_path / "run", tmp_path / "carried"
    for name in ("vae-base", "base", "tune1"):
        fake_phase(run, name)
    (run / "tune2" / "checkpoints" / "dit-0000300").mkdir(parents=True)  # a phase stopped half-way: not carried
    out = subprocess.run(["bash", str(CARRY), str(run), str(dest)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "phases up to tune1" in out.stdout
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == sorted([
        "vae-base/config.yaml", "vae-base/metrics.jsonl", "vae-base/vae/gate.json",
        "base/config.yaml", "base/metrics.jsonl", "base/vae/gate.json", "base/vae/config.json",
        "base/vae/diffusion_pytorch_model.safetensors",
        "tune1/config.yaml", "tune1/metrics.jsonl", "tune1/model/soragen.yaml",
        "tune1/model/transformer/diffusion_pytorch_model.safetensors"])
    plan = run_script("--out", str(dest), "--dry-run")
    assert plan.returncode == 0 and plan.stderr == ""
    assert plan.stdout.splitlines()[1:] == ["vae-base: done", "base: done", "tune1: done", "tune2: to train",
                                        "cool1: to train", "cool2: to train", "decoder: to train", "redraw: to train",
                                        "redraw-dit: to train", "candidate: to evaluate and write"]
    plan = run_script("--out", str(run), "--dry-run")  # the original: tune2 resumes from its checkpoint
    assert plan.stdout.splitlines()[4] == "tune2: resumes from its newest checkpoint"


def test_a_half_trained_phase_is_carried_as_its_newest_checkpoints_weights(tmp_path):
    """The phase after the newest finished one, stopped at a checkpoint, is carried with its config, metrics and word
    ids and that checkpoint's weights as float16 (no optimizer state); train_default.sh resumes it from there."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    run, dest = tmp_path / "run", tmp_path / "carried"
    for name in ("vae-base", "base"):
        fake_phase(run, name)
    tune1 = run / "tune1"
    for step in (200, 300):
        ckpt = tune1 / "checkpoints" / f"dit-0000{step}"
        (ckpt / "state").mkdir(parents=True)
        save_file({"w": torch.full((4,), step / 1000)}, str(ckpt / "state" / "model.safetensors"))
        (ckpt / "state" / "optimizer.bin").write_bytes(b"moments")
        (ckpt / "meta.json").write_text(json.dumps({"stage": "dit", "step": step}))
    (tune1 / "checkpoints" / ".dit-0000400").mkdir()  # being written when the process was stopped
    (tune1 / "config.yaml").write_text("phase: tune1\n")
    (tune1 / "metrics.jsonl").write_text('{"stage": "dit", "step": 300, "time": 0}\n')
    (tune1 / "tokenizer").mkdir()
    (tune1 / "tokenizer" / "tokenizer.json").write_text("{}")
    (tune1 / "latents.safetensors").write_bytes(b"cache")
    out = subprocess.run(["bash", str(CARRY), str(run), str(dest)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "phases up to base, and tune1 at its checkpoint dit-0000300" in out.stdout
    files = sorted(str(p.relative_to(dest / "tune1")) for p in (dest / "tune1").rglob("*") if p.is_file())
    assert files == ["checkpoints/dit-0000300/meta.json", "checkpoints/dit-0000300/state/model.safetensors",
                     "config.yaml", "metrics.jsonl", "tokenizer/tokenizer.json"]
    weights = load_file(str(dest / "tune1" / "checkpoints" / "dit-0000300" / "state" / "model.safetensors"))
    assert weights["w"].dtype == torch.float16 and torch.allclose(weights["w"].float(), torch.full((4,), 0.3), atol=1e-3)
    meta = json.loads((dest / "tune1" / "checkpoints" / "dit-0000300" / "meta.json").read_text())
    assert meta == {"stage": "dit", "step": 300, "carried": True}
    assert (dest / "base" / "model" / "soragen.yaml").is_file() and (dest / "base" / "vae" / "config.json").is_file()
    plan = run_script("--out", str(dest), "--dry-run")
    assert plan.stdout.splitlines()[1:4] == ["vae-base: done", "base: done", "tune1: resumes from its newest checkpoint"]


def test_carry_run_with_no_finished_phase_carries_nothing(tmp_path):
    (tmp_path / "run" / "vae-base" / "checkpoints").mkdir(parents=True)
    out = subprocess.run(["bash", str(CARRY), str(tmp_path / "run"), str(tmp_path / "dest")], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and "no phase of" in out.stderr and out.stderr.count("\n") == 1
    assert not (tmp_path / "dest").exists()


def test_a_finished_run_with_its_candidate_is_not_evaluated_again(tmp_path):
    """Run again on a run whose phases and candidate are all there, the script trains nothing and does not
    evaluate again (ship_model.py's 144 videos), and says how to make it."""
    run = tmp_path / "run"
    for name in ("vae-base", "base", "tune1", "tune2", "cool1", "cool2", "decoder", "redraw", "redraw-dit"):
        fake_phase(run, name)
    for name in ("decoder", "redraw"):
        (run / name / "model" / "vae").mkdir()
        (run / name / "model" / "vae" / "decoder_finetune.json").write_text("{}")
    (run / "candidate").mkdir()
    plan = run_script("--out", str(run), "--dry-run")
    assert plan.returncode == 0 and plan.stdout.splitlines()[1:] == [
        f"{name}: done" for name in ("vae-base", "base", "tune1", "tune2", "cool1", "cool2", "decoder", "redraw",
                                     "redraw-dit", "candidate")]
    out = run_script("--out", str(run), "--precision", "no")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1:] == [f"candidate: {run}/candidate is already there (delete it to evaluate the run again)"]
    assert sorted(p.name for p in run.iterdir()) == sorted(["vae-base", "base", "tune1", "tune2", "cool1", "cool2",
                                                          "decoder", "redraw", "redraw-dit", "candidate"])
