"""Regression guard: the shipped built-in model still follows prompts, judged by the Shapes World detector."""

import pytest

from soragen.model_io import builtin_installed

pytestmark = pytest.mark.skipif(not builtin_installed(), reason="the built-in model is not in this checkout")

# One prompt per motion, none of them held out.
PROMPTS = [
    "a large red circle moving right",
    "a large blue square moving left",
    "a large yellow circle moving up",
    "a large cyan circle moving down",
    "a large magenta square bouncing",
]


@pytest.fixture(scope="module")
def pipe():
    from soragen.config import load_config
    from soragen.pipeline import Pipeline

    cfg = load_config()  # no config: the built-in model is the default
    assert cfg.model == "builtin"
    return Pipeline.from_config(cfg)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_builtin_follows_prompt(pipe, prompt, tmp_path):
    from soragen.data.clips import read_frames
    from soragen.evaluation.detector import score_video

    pipe.generate(prompt, tmp_path / "v.mp4")
    frames = read_frames(tmp_path / "v.mp4")
    assert frames.shape[1:] == (256, 256, 3)  # native 64x64, upscaled 4x by default
    obj = score_video(frames, prompt, fps=8)["objects"][0]
    assert obj["colour"], f"wrong colour for '{prompt}': {obj}"
    assert obj["shape"], f"wrong shape for '{prompt}': {obj}"
    assert obj["direction"], f"wrong motion for '{prompt}': {obj}"


def test_info_describes_builtin(capsys):
    from soragen.cli import main

    with pytest.raises(SystemExit) as e:
        main(["info"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "builtin" in out and "Shapes World" in out
