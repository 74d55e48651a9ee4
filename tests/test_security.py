"""Audit by reading the source: no unsafe deserialisation or remote code; names from prompts stay in their folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from soragen.naming import safe_stem, slugify

SRC = Path(__file__).resolve().parents[1] / "src" / "soragen"
SOURCES = sorted(SRC.rglob("*.py"))


def calls(pattern: str) -> list[tuple[str, str]]:
    """(file:line, line) of every source line matching `pattern`."""
    return [(f"{path.relative_to(SRC)}:{n}", line.strip()) for path in SOURCES
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if re.search(pattern, line)]


def test_sources_found():
    assert len(SOURCES) > 10


def test_torch_load_only_with_weights_only():
    unsafe = [hit for hit in calls(r"torch\.load\(") if "weights_only=True" not in hit[1]]
    assert unsafe == []


def test_no_pickle():
    assert calls(r"\bimport pickle\b|\bpickle\.|\bcPickle\b|\bdill\b|joblib\.load") == []


def test_yaml_only_safe_load():
    assert calls(r"yaml\.(load|unsafe_load|full_load|load_all|unsafe_load_all)\(|yaml\.(Unsafe|Full)?Loader\b") == []


def test_no_remote_code():
    assert calls(r"trust_remote_code\s*=\s*True") == []


def test_no_eval_or_exec():
    assert calls(r"(?<![.\w])(eval|exec)\(") == []


@pytest.mark.parametrize("text", ["../../etc/passwd", "\x00/..\\evil", "..", ".", "/", "~/.ssh/id_rsa", "a/../../b",
                                  "C:\\Windows\\system32", "CON", ".hidden", "\n", "名字/../x", "x" * 1000])
def test_names_from_prompts_stay_inside_the_output_folder(tmp_path, text):
    for stem in (slugify(text), safe_stem(text)):
        path = (tmp_path / f"{stem}_seed0.mp4").resolve()
        assert path.parent == tmp_path.resolve(), stem
        assert os.sep not in stem and "/" not in stem and "\\" not in stem and "\x00" not in stem
        assert not stem.startswith(".") and stem not in ("", ".", "..")
        assert len(stem.encode("utf-8")) <= 120


def test_default_output_stays_in_outputs(tmp_path, monkeypatch):
    from soragen.cli import default_output

    monkeypatch.chdir(tmp_path)
    path = default_output("../../etc/passwd", 0)
    assert path.parent == Path("outputs") and path.name == "etc-passwd_seed0.mp4"
