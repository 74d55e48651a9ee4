"""scripts/train_default.sh's arguments: --help and bad arguments answer at once and start no training."""

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_default.sh"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30)


def test_help_lists_the_phases_and_trains_nothing(tmp_path):
    out = run("--out", str(tmp_path / "runs"), "--help")
    assert out.returncode == 0 and out.stderr == ""
    for phase in ("vae-base", "base", "tune1", "tune2", "cool1", "cool2", "--set KEY=VALUE"):
        assert phase in out.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--set", "train.dit.text_binding"], "--set needs KEY=VALUE"),
    (["--out"], "--out needs a folder"),
])
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, args, fragment):
    out = run("--out", str(tmp_path / "runs"), *args)
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
