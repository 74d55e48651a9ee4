"""Tiny models from literal configs: every test runs on the CPU in seconds."""

from __future__ import annotations

import importlib.util
import signal
from pathlib import Path
from types import ModuleType

import pytest
import torch

from soragen.config import Config, build_config

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """scripts/NAME.py imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(**sections) -> Config:
    """A config small enough for unit tests; sections override parts of it."""
    data = {
        "text_encoder": {"d_model": 32, "num_layers": 1, "num_heads": 2, "d_kv": 16, "d_ff": 64, "max_length": 32},
        "vae": {"channels": [8, 8, 16, 16], "temporal_channels": 32, "latent_channels": 4},
        "dit": {"width": 32, "depth": 1, "heads": 2},
        "sampler": {"steps": 3},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values) if isinstance(values, dict) else data.update({name: values})
    return build_config(data)


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_config().to_yaml())
    return path


def run_cli(args, capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from soragen.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(args)
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


@pytest.fixture
def cfg() -> Config:
    return tiny_config()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def interactive_sigint() -> None:
    """preexec_fn for a CLI child: SIGINT as at an interactive terminal, where Ctrl-C reaches it.

    A shell without job control (a script, `sh -c 'pytest ... &'`) starts a background job with
    SIGINT ignored, children inherit that, and Python then installs no KeyboardInterrupt handler,
    so a test of Ctrl-C would fail.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
