"""`soragen train` under `accelerate launch`: two CPU processes train one model together over gloo."""

import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from soragen.model_io import WEIGHTS

from test_train import TINY, train_config


def launch_train(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "-m", "soragen", "train", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )


DECODER = ["--set", "train.decoder.steps=2", "--set", "train.decoder.batch_size=1", "--set", "train.decoder.clip_frames=5",
           "--set", "train.decoder.last_steps=2"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """A tiny run (VAE and DiT stages) by two processes; its model folder is kept aside before other tests resume it."""
    root = tmp_path_factory.mktemp("ddp")
    (root / "tiny.yaml").write_text(train_config(TINY + [f"train.output_dir={root / 'run'}"]).to_yaml())
    first = launch_train(["--config", "tiny.yaml", "--set", "train.stages=[vae,dit,decoder]", *DECODER], root)
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copytree(root / "run" / "model", root / "first-model")
    return root, first


def test_two_processes_write_one_run(two_processes):
    root, first = two_processes
    run = root / "run"
    assert first.stdout.count("done: ") == 1 and first.stdout.strip().endswith(f"done: {run / 'model'}")
    assert first.stderr.count("VAE reconstructions scored") == 1  # the main process speaks for both
    assert (run / "model" / "soragen.yaml").is_file() and (run / "latents.safetensors").is_file()
    assert (run / "tokenizer" / "tokenizer.json").is_file()  # the word vocabulary, written once, for a resume
    assert (run / "model" / "vae" / "decoder_finetune.json").is_file()  # the stage after dit read dit's model folder
    assert sorted(p.name for p in (run / "checkpoints").glob("dit-*")) == ["dit-0000002", "dit-0000004"]

    again = launch_train(["--config", "tiny.yaml"], root)  # not empty and no --resume: both processes refuse
    assert again.returncode != 0 and "is not empty; pass --resume" in again.stderr

    resumed = launch_train(["--config", "tiny.yaml", "--resume", "--set", "train.dit.steps=6"], root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed the dit stage" in resumed.stderr and (run / "checkpoints" / "dit-0000006").is_dir()


def run_alone(root, name, overrides):
    """The same tiny run by one process on one thread, as each launched process runs."""
    (root / f"{name}.yaml").write_text(train_config(TINY + [f"train.output_dir={root / name}", *overrides]).to_yaml())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    alone = subprocess.run([sys.executable, "-m", "soragen", "train", "--config", f"{name}.yaml"], cwd=root, env=env,
                           capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    return root / name / "model"


def largest_difference(a, b, part):
    weights = "model.safetensors" if part == "text_encoder" else WEIGHTS
    x, y = load_file(str(a / part / weights)), load_file(str(b / part / weights))
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def test_the_second_process_moves_the_weights(two_processes):
    """Process 0 draws the batches a single process draws, and a run repeated on one thread gives the same
    weights bit for bit; so a two-process model differs from the single process's only if the gradients of
    process 1's batches reached it. The VAE stage is compared on the first run; the DiT and the small T5 on
    DiT-only runs from one shared VAE, so that a different VAE cannot make the difference."""
    root, _ = two_processes
    one_vae = run_alone(root, "alone", [])
    assert largest_difference(root / "first-model", one_vae, "vae") > 1e-4
    dit_only = ["train.stages=[dit]", f"train.vae_model={root / 'first-model'}"]
    ddp = launch_train(["--config", "tiny.yaml", "--set", f"train.output_dir={root / 'ddp-dit'}",
                        *[a for o in dit_only for a in ("--set", o)]], root)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one_dit = run_alone(root, "alone-dit", dit_only)
    for part in ("transformer", "text_encoder"):
        assert largest_difference(root / "ddp-dit" / "model", one_dit, part) > 1e-4, part


def test_two_processes_train_the_binding_probe_on_batches_without_object_words(two_processes):
    """train.dit.text_binding under DDP with 90% of captions dropped: on some steps one process's batch has no
    word of an object while the other's has, and both must still reduce a gradient for the probe's weights
    (before the fix, process 1 died here with a gloo read error)."""
    root, _ = two_processes
    overrides = ["train.stages=[dit]", f"train.vae_model={root / 'first-model'}", f"train.output_dir={root / 'ddp-bind'}",
                 "train.dit.text_binding=0.5", "train.dit.caption_dropout=0.9"]
    run = launch_train(["--config", "tiny.yaml", *[a for o in overrides for a in ("--set", o)]], root)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (root / "ddp-bind" / "model" / "transformer").is_dir()
    assert sorted(p.name for p in (root / "ddp-bind" / "checkpoints").glob("dit-*"))[-1] == "dit-0000004"
