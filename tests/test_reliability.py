"""Reliability with real processes: a full disk, --debug, and SIGINT/SIGTERM/SIGKILL during generate and train."""

from __future__ import annotations

import errno
import json
import os
import platform
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from soragen.cli import main
from soragen.train import RunFolder, train


from conftest import interactive_sigint
from test_train import TINY, train_config

FAST = ["--set", "video.seconds=1", "--set", "sampler.steps=2"]




def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def soragen(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "soragen", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env(), preexec_fn=interactive_sigint, **kwargs)


def leftovers(folder: Path) -> list[str]:
    """Temporary (hidden) files and folders left in `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def wait_for(condition, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < end, "timed out waiting for the process to get going"
        time.sleep(0.05)


def stop(proc: subprocess.Popen, sig: int) -> tuple[int, str, float]:
    """Send `sig`; return the exit code, stderr and the seconds the process took to exit."""
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err, time.monotonic() - t0


# ---------------------------------------------------------------------------
# Disk full
# ---------------------------------------------------------------------------


def _small_file_limit() -> None:
    """In the child: files may not grow past 1000 bytes; a bigger write fails with EFBIG instead of killing it."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_disk_full_while_writing_leaves_nothing(tmp_path, tiny_yaml):
    """ffmpeg (a child, with the same limit) fails to write the MP4: one line, exit 2, no partial or final file."""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "soragen", "generate", "a red ball", "-c", str(tiny_yaml), *FAST,
                           "-o", str(out / "a.mp4")], capture_output=True, text=True, env=env(), preexec_fn=_small_file_limit)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write") and "file too large" in last, proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(out.iterdir()) == []  # no a.mp4, no a.json, no temporary file


def test_no_space_for_the_sidecar_removes_the_video(tmp_path, tiny_yaml, capsys, monkeypatch):
    """The video is renamed into place before its sidecar: if the sidecar cannot be written, the video goes too."""
    import soragen.video_io

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(soragen.video_io, "write_json", full)
    out = tmp_path / "a.mp4"
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "x", "-c", str(tiny_yaml), *FAST, "-o", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.strip().splitlines()[-1] == (
        "error: cannot write the output: no space left on the device; free some space or choose another folder, then run again"
    )
    assert list(tmp_path.iterdir()) == [tiny_yaml]


# ---------------------------------------------------------------------------
# --debug
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("debug", [True, False])
def test_debug_shows_the_traceback_and_still_exits_2(tmp_path, debug):
    args = [sys.executable, "-m", "soragen", *(["--debug"] if debug else []), "generate", ""]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env())
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: the prompt is empty")
    assert ("Traceback (most recent call last)" in proc.stderr) is debug
    assert ("UserError" in proc.stderr) is debug


# ---------------------------------------------------------------------------
# Interruptions
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_generate_stops_fast_and_leaves_nothing(tmp_path, tiny_yaml, sig):
    out = tmp_path / "out"
    out.mkdir()
    proc = soragen("generate", "a red ball", "-c", str(tiny_yaml), "--seconds", "60", "--steps", "20",
                   "-o", str(out / "a.mp4"))
    wait_for(lambda: leftovers(out), proc)  # the writer has opened its temporary file: generation is under way
    time.sleep(0.5)  # well inside the 420 denoising steps (several seconds)
    code, err, took = stop(proc, sig)
    assert code == 130, err
    assert err.strip().splitlines()[-1] == "interrupted"
    assert took < 2.0
    assert list(out.iterdir()) == []  # no partial file, nothing under the final name


@pytest.mark.parametrize("gap", [0.0, 0.02, 0.06])
def test_a_second_stop_signal_does_not_break_the_first(tmp_path, tiny_yaml, gap):
    """`kill` sent twice, or to the process group and the process: the second signal comes while the first one's
    stop is removing partial files and exiting; it must not interrupt that with a traceback."""
    out = tmp_path / "out"
    out.mkdir()
    proc = soragen("generate", "a red ball", "-c", str(tiny_yaml), "--seconds", "60", "--steps", "20",
                   "-o", str(out / "a.mp4"))
    wait_for(lambda: leftovers(out), proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    time.sleep(gap)
    second = proc.poll() is None  # the stop takes longer than the smallest gaps: the second signal meets it
    if second:
        proc.send_signal(signal.SIGTERM)
    assert second or gap > 0.02
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err
    assert list(out.iterdir()) == []


def vae_run(root: Path, steps: int) -> list[str]:
    """Overrides of a tiny VAE-only training run that checkpoints every 2 steps."""
    return TINY + [f"train.output_dir={root}", "train.stages=[vae]", f"train.vae.steps={steps}",
                   "train.checkpoint_every=2", "train.vae_gate_clips=0", "train.log_every=1000"]


def assert_resumable(root: Path) -> None:
    """The newest complete checkpoint loads and training continues from it."""
    ckpt = RunFolder(root).latest("vae")
    assert ckpt is not None
    tensors = load_file(ckpt / "state" / "model.safetensors")
    assert tensors and all(t.numel() for t in tensors.values())
    step = json.loads((ckpt / "meta.json").read_text())["step"]
    train(train_config(vae_run(root, step + 2)), resume=True)
    assert RunFolder(root).latest("vae").name == f"vae-{step + 2:07d}"


def test_training_into_a_log_file_prints_a_line_per_metric_line(tmp_path):
    """Under nohup (stderr a file), a progress bar shows nothing until the stage ends: each metric line
    (train.log_every) is also a plain progress line, with the time spent and the time left."""
    args = ["train"]
    for override in vae_run(tmp_path / "run", 4) + ["train.log_every=2"]:
        args += ["--set", override]
    proc = subprocess.run([sys.executable, "-m", "soragen", *args], capture_output=True, text=True, env=env())
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("vae ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"], proc.stderr  # each metric line, and the last step
    assert lines[0].startswith("vae 2/4 loss ") and "clips_per_s" in lines[0] and lines[0].endswith(" left)")
    assert "━" not in proc.stderr  # no progress bars dumped into the log


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_interrupted_training_resumes_from_its_newest_checkpoint(tmp_path, sig):
    root = tmp_path / "run"
    args = ["train"]
    for override in vae_run(root, 100_000):
        args += ["--set", override]
    proc = soragen(*args)
    checkpoints = root / "checkpoints"
    wait_for(lambda: checkpoints.is_dir() and any(p.name.startswith("vae-") for p in checkpoints.iterdir()), proc, 30)
    time.sleep(random.uniform(0.0, 1.5))  # a random moment, possibly in the middle of writing a checkpoint
    code, err, took = stop(proc, sig)
    assert took < 2.0
    if sig == signal.SIGTERM:
        assert code == 130, err
        assert leftovers(checkpoints) == []  # a checkpoint being written when stopped is removed
    else:
        assert code == -signal.SIGKILL
    assert_resumable(root)


_HEAP_PROBE = """
import sys, numpy as np
from soragen.heap import trim_heap
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
a = np.ones(8 << 17); del a                 # 8 MB, mmapped; glibc then raises its threshold to 8 MB
base = rss()
b = np.ones(6 << 17); pin = np.ones(2000)   # 6 MB from the heap, and a small block after it
del b
trimmed = sys.argv[1] == "trim" and trim_heap()
print(trimmed, rss() - base)
"""


glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")


def heap_probe(source: str, mode: str) -> list[str]:
    """Run a heap probe in a fresh process (glibc's own thresholds: no MALLOC_* tunables); its printed words."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", source, mode], capture_output=True, text=True, check=True, env=env)
    return out.stdout.split()


@glibc_only
def test_trim_heap_returns_freed_activations_to_the_system():
    done, mb = heap_probe(_HEAP_PROBE, "keep")
    assert (done, float(mb)) == ("False", pytest.approx(6.0, abs=0.5))  # glibc keeps the freed 6 MB resident
    done, mb = heap_probe(_HEAP_PROBE, "trim")
    assert done == "True" and float(mb) < 0.5


_HOLD_PROBE = """
import resource, sys, numpy as np
from soragen.heap import hold_heap, trim_heap
held = sys.argv[1] == "hold" and hold_heap()
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
a = np.ones(8 << 17); del a                  # glibc raises its mmap threshold to 8 MB, its trim threshold to 16
def forward():                               # six 4-MB activations alive at once, then freed
    acts = [np.ones(4 << 17) for _ in range(6)]
forward()
f0 = faults()
for _ in range(10):
    forward()
refaulted = faults() - f0
before = rss()
trimmed = trim_heap()
print(held, refaulted, trimmed, before - rss())
"""


@glibc_only
def test_hold_heap_reuses_freed_blocks_and_trim_still_returns_them():
    held, refaulted, _, _ = heap_probe(_HOLD_PROBE, "keep")
    assert held == "False" and int(refaulted) > 5000  # glibc's default gives the 24 MB back and faults it in again
    held, refaulted, trimmed, released_mb = heap_probe(_HOLD_PROBE, "hold")
    if held != "True":
        pytest.skip("this glibc refused the thresholds (mallopt returned 0)")
    assert int(refaulted) < 100  # the same blocks are reused
    assert trimmed == "True" and float(released_mb) > 20  # and trim_heap still returns them after a window
