"""`soragen batch` as real processes: SIGKILL halfway and resume; two shards side by side vs one process."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from soragen.batch import files_intact, read_records

from conftest import interactive_sigint
from test_batch import PROMPTS, base_config, count_frames, expected_files, manifest, videos, write_prompt_file


# ---------------------------------------------------------------------------
# Real processes: SIGKILL halfway and resume; shards side by side
# ---------------------------------------------------------------------------


def soragen(args, cwd, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "soragen", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interactive_sigint, **kwargs)


@pytest.fixture(scope="module")
def batch_setup(tmp_path_factory):
    """The 20-prompt file, a tiny config, and one uninterrupted single-process run as the reference."""
    root = tmp_path_factory.mktemp("batch")
    (root / "tiny.yaml").write_text(base_config(fps=8).to_yaml())
    write_prompt_file(root / "p.txt", [{"prompt": p} for p in PROMPTS])
    proc = soragen(["batch", "p.txt", "--out", "reference", "-c", "tiny.yaml"], root)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return root


def test_sigkill_halfway_then_resume(batch_setup):
    root = batch_setup
    out = root / "killed"
    shard_manifest = out / "manifest.shard-0-of-1.jsonl"
    proc = soragen(["batch", "p.txt", "--out", "killed", "-c", "tiny.yaml"], root)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        done = sum(r["status"] == "ok" for r in read_records(shard_manifest))
        if done >= 4:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert 4 <= done < 20, done
    time.sleep(0.3)  # the killed run's ffmpeg sees its input close and exits
    for video in out.glob("*.mp4"):  # whatever has a final name is a complete video
        assert count_frames(video) == 8

    proc = soragen(["batch", "p.txt", "--out", "killed", "-c", "tiny.yaml"], root)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    skipped = int(stdout.split(" already done")[0].rsplit(", ", 1)[1])
    assert skipped >= done
    records = manifest(out)
    assert len(records) == 20 and all(r["status"] == "ok" and files_intact(out, r) for r in records)
    assert {p.name for p in out.iterdir()} == expected_files(records) | {shard_manifest.name}  # no stray files
    assert all(count_frames(v) == 8 for v in out.glob("*.mp4"))
    assert videos(out) == videos(root / "reference")  # the same 20 videos as a run never interrupted


def test_two_shards_side_by_side_equal_one_process(batch_setup):
    root = batch_setup
    procs = [soragen(["batch", "p.txt", "--out", "sharded", "-c", "tiny.yaml", "--shard", f"{i}/2"], root) for i in range(2)]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        assert "10 rendered" in stdout
    out = root / "sharded"
    records = manifest(out)
    assert len(records) == 20 and all(r["status"] == "ok" for r in records)  # both shards' records, merged
    assert sorted(r["shard"] for r in records) == ["0/2"] * 10 + ["1/2"] * 10
    reference = videos(root / "reference")
    assert len(reference) == 20 and videos(out) == reference
    ref_records = {r["key"]: r for r in manifest(root / "reference")}
    assert all(r["files"]["video"]["sha256"] == ref_records[r["key"]]["files"]["video"]["sha256"] for r in records)
    assert {p.name for p in out.iterdir()} == expected_files(records) | {
        "manifest.shard-0-of-2.jsonl", "manifest.shard-1-of-2.jsonl"}
    assert hashlib.sha256((out / "index.html").read_bytes()).hexdigest()  # the gallery was written
    assert (out / "index.html").read_text().count("<video ") == 20


def test_accelerate_launch_splits_the_batch(batch_setup):
    """Under `accelerate launch` (2 CPU processes, no GPU) each process renders its own shard; the manifests merge."""
    root = batch_setup
    write_prompt_file(root / "p4.txt", [{"prompt": p} for p in PROMPTS[:4]])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
         "-m", "soragen", "batch", "p4.txt", "--out", "accelerated", "-c", "tiny.yaml"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "batch (shard 0/2): 2 rendered" in proc.stdout and "batch (shard 1/2): 2 rendered" in proc.stdout
    out = root / "accelerated"
    records = manifest(out)
    assert sorted(r["shard"] for r in records) == ["0/2", "0/2", "1/2", "1/2"]
    reference = videos(root / "reference")
    assert all(reference[name] == data for name, data in videos(out).items()) and len(videos(out)) == 4



@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_stops_cleanly_and_keeps_finished_items(batch_setup, sig):
    root = batch_setup
    name = f"interrupted-{sig.name}"
    out = root / name
    shard_manifest = out / "manifest.shard-0-of-1.jsonl"
    # 60 denoising steps an item: 20 items take far longer than the wait for the first 2,
    # so the signal always lands while the batch is still rendering.
    proc = soragen(["batch", "p.txt", "--out", name, "-c", "tiny.yaml", "--set", "sampler.steps=60"], root)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if sum(r["status"] == "ok" for r in read_records(shard_manifest)) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[1]
    sent = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    # The exit itself (finishing the merged manifest and gallery, interpreter shutdown) takes about
    # 1-2 s on an idle 2-core machine; the bound leaves room for a loaded one.
    assert time.time() - sent < 6.0
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted"
    finished = [r for r in read_records(shard_manifest) if r["status"] == "ok"]
    assert 2 <= len(finished) < 20
    assert all(files_intact(out, r) for r in finished)  # nothing already finished is lost
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert all(count_frames(v) == 8 for v in out.glob("*.mp4"))  # every final name is a complete video
