"""Regression guard: the shipped built-in model still follows prompts, judged by the Shapes World detector."""

import pytest

from soragen.model_io import builtin_installed

pytestmark = pytest.mark.skipif(not builtin_installed(), reason="the built-in model is not in this checkout")

# One prompt per motion, none of them held out; generated once each with the default seed.
PROMPTS = [
    "a large red circle moving right",
    "a large blue square moving left",
    "a large yellow circle moving up",
    "a large cyan circle moving down",
    "a large magenta square bouncing",
]
SQUARES = [p for p in PROMPTS if "square" in p]


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    """The detector's verdict on the first object of each prompt's default video."""
    from soragen.config import load_config
    from soragen.data.clips import read_frames
    from soragen.evaluation.detector import score_video
    from soragen.pipeline import Pipeline

    cfg = load_config()  # no config: the built-in model is the default
    assert cfg.model == "builtin"
    pipe = Pipeline.from_config(cfg)
    out = {}
    for i, prompt in enumerate(PROMPTS):
        path = tmp_path_factory.mktemp("builtin") / f"{i}.mp4"
        pipe.generate(prompt, path)
        frames = read_frames(path)
        assert frames.shape[1:] == (256, 256, 3)  # native 64x64, upscaled 4x by default
        out[prompt] = score_video(frames, prompt, fps=8)["objects"][0]
    return out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_builtin_follows_prompt(scores, prompt):
    obj = scores[prompt]
    assert obj["colour"], f"wrong colour for '{prompt}': {obj}"
    assert obj["direction"], f"wrong motion for '{prompt}': {obj}"
    if prompt not in SQUARES:
        assert obj["shape"], f"wrong shape for '{prompt}': {obj}"


@pytest.mark.xfail(strict=True, reason="the shipped model draws squares with round corners (issue 3); "
                   "when this passes, fold the squares into test_builtin_follows_prompt")
@pytest.mark.parametrize("prompt", SQUARES)
def test_builtin_draws_squares(scores, prompt):
    assert scores[prompt]["shape"], f"'{prompt}' came out as a {scores[prompt]}"


def test_info_describes_builtin(capsys):
    from soragen.cli import main

    with pytest.raises(SystemExit) as e:
        main(["info"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "builtin" in out and "Shapes World" in out
