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


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """A tiny run (VAE and DiT stages) by two processes; its model folder is kept aside before other tests resume it."""
    root = tmp_path_factory.mktemp("ddp")
    (root / "tiny.yaml").write_text(train_config(TINY + [f"train.output_dir={root / 'run'}"]).to_yaml())
    first = launch_train(["--config", "tiny.yaml"], root)
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copytree(root / "run" / "model", root / "first-model")
    return root, first


def test_two_processes_write_one_run(two_processes):
    root, first = two_processes
    run = root / "run"
    assert first.stdout.count("done: ") == 1 and first.stdout.strip().endswith(f"done: {run / 'model'}")
    assert first.stderr.count("VAE reconstructions scored") == 1  # the main process speaks for both
    assert (run / "model" / "soragen.yaml").is_file() and (run / "latents.safetensors").is_file()
    assert sorted(p.name for p in (run / "checkpoints").glob("dit-*")) == ["dit-0000002", "dit-0000004"]

    again = launch_train(["--config", "tiny.yaml"], root)  # not empty and no --resume: both processes refuse
    assert again.returncode != 0 and "is not empty; pass --resume" in again.stderr

    resumed = launch_train(["--config", "tiny.yaml", "--resume", "--set", "train.dit.steps=6"], root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed the dit stage" in resumed.stderr and (run / "checkpoints" / "dit-0000006").is_dir()


def test_the_second_process_moves_the_weights(two_processes):
    """Process 0 draws the batches a single process draws, and a run repeated on one thread gives the same
    weights bit for bit; so the two-process model differs from the single process's only if the gradients
    of process 1's batches reached it."""
    root, _ = two_processes
    (root / "alone.yaml").write_text(train_config(TINY + [f"train.output_dir={root / 'alone'}"]).to_yaml())
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as each launched process runs
    alone = subprocess.run([sys.executable, "-m", "soragen", "train", "--config", "alone.yaml"], cwd=root, env=env,
                           capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    for part, weights in (("vae", WEIGHTS), ("transformer", WEIGHTS), ("text_encoder", "model.safetensors")):
        ddp = load_file(str(root / "first-model" / part / weights))
        one = load_file(str(root / "alone" / "model" / part / weights))
        assert ddp.keys() == one.keys()
        assert max(float((ddp[k] - one[k]).abs().max()) for k in ddp) > 1e-4, part
