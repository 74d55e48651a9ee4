"""Regression guard: the shipped built-in model still follows prompts, judged by the Shapes World detector."""

import pytest

from soragen.model_io import builtin_installed

pytestmark = pytest.mark.skipif(not builtin_installed(), reason="the built-in model is not in this checkout")

# One prompt per motion, none of them held out. Each is generated with seeds 0, 1 and 2 and an
# attribute must be right in at least two of the three: a regression moves many videos, while one
# seed's verdict may flip with the last bits of a CPU's arithmetic.
PROMPTS = [
    "a large red circle moving right",
    "a large blue square moving left",
    "a large yellow circle moving up",
    "a large cyan circle moving down",
    "a large magenta square bouncing",
]
DRAWN_ROUND = ["a large blue square moving left"]  # its sides come out wavy: read as a circle (issue 3)
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    """The detector's verdicts on the first object of each prompt's video, one per seed (as `soragen eval`)."""
    from soragen.config import load_config
    from soragen.data.clips import read_frames
    from soragen.evaluation.run import evaluate

    cfg = load_config()  # no config: the built-in model is the default
    assert cfg.model == "builtin" and cfg.seed == SEEDS[0]
    folder = tmp_path_factory.mktemp("builtin")
    report = evaluate(cfg, PROMPTS, folder, seeds=len(SEEDS))
    out = {prompt: [] for prompt in PROMPTS}
    for record in report["results"]:
        assert read_frames(folder / record["video"]).shape[1:] == (256, 256, 3)  # native 64x64, upscaled 4x
        out[record["prompt"]].append(record["score"]["objects"][0])
    return out


def mostly_right(verdicts: list[dict], attribute: str) -> bool:
    return sum(bool(v[attribute]) for v in verdicts) >= 2


@pytest.mark.parametrize("prompt", PROMPTS)
def test_builtin_follows_prompt(scores, prompt):
    verdicts = scores[prompt]
    assert mostly_right(verdicts, "colour"), f"wrong colour for '{prompt}': {verdicts}"
    assert mostly_right(verdicts, "direction"), f"wrong motion for '{prompt}': {verdicts}"
    if prompt not in DRAWN_ROUND:
        assert mostly_right(verdicts, "shape"), f"wrong shape for '{prompt}': {verdicts}"


@pytest.mark.xfail(strict=True, reason="the shipped model draws most squares with wavy or slanted sides (issue 3); "
                   "when this passes, fold the square into test_builtin_follows_prompt")
@pytest.mark.parametrize("prompt", DRAWN_ROUND)
def test_builtin_draws_squares(scores, prompt):
    assert mostly_right(scores[prompt], "shape"), f"'{prompt}' came out as {scores[prompt]}"


def test_info_describes_builtin(capsys):
    from soragen.cli import main

    with pytest.raises(SystemExit) as e:
        main(["info"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "builtin" in out and "Shapes World" in out
