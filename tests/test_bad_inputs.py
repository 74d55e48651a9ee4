"""Rows of docs/bad-inputs.md not covered elsewhere: each bad input gets its documented answer."""

from __future__ import annotations

import json
import os

import pytest

from soragen.batch import read_prompt_file
from soragen.errors import UserError

from conftest import run_cli

FAST = ["--set", "video.seconds=1", "--set", "sampler.steps=2"]






def one_line_error(code, err) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_long_prompt_is_truncated_with_a_warning(tmp_path, tiny_yaml, capsys):
    out = tmp_path / "a.mp4"
    code, stdout, err = run_cli(["generate", "a red ball " * 1000, "-c", str(tiny_yaml), *FAST, "-o", str(out)], capsys)
    assert code == 0 and out.is_file() and stdout.startswith("wrote")
    assert "warning: prompt truncated to the text encoder's limit of 32 tokens" in err
    assert json.loads(out.with_suffix(".json").read_text())["prompt"] == ("a red ball " * 1000).strip()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fps", "61"], "error: --fps (video.fps) must be between 1 and 60, got 61"),
        (["--set", "video.model_fps=61"], "error: video.model_fps must be between 1 and 60, got 61"),
        (["--set", "video.model_fps=0"], "error: config key 'video.model_fps': Input should be greater than or equal to 1"),
        (["--height", "8"], "error: --height 8 (video.height) is not valid: it must be between 16 and 4096"),
        (["--width", "4112"], "error: --width 4112 (video.width) is not valid: it must be between 16 and 4096"),
        (["--height", "100"], "error: --height 100 (video.height) is not valid: it must be a multiple of 16; nearest: 96 or 112"),
        (["--seconds", "3601"], "error: --seconds 3601 is above the maximum of 3600 (video.max_seconds)"),
        (["--seconds", "3600.0000001"], "error: --seconds 3600.0000001 is above the maximum of 3600 (video.max_seconds)"),
        (["--seconds", "0.062", "--fps", "8"], "error: --seconds 0.062 at 8 fps gives no frame (seconds x fps, rounded); "
                                               "ask for at least 0.0625 s, half a frame"),
        (["--set", "dit.depth=abc"], "error: config key 'dit.depth': Input should be a valid integer"),
        (["--set", "video=3"], "error: config key 'video' is a section; set one of its keys"),
        (["--set", "video.max_seconds=-1"], "error: video.max_seconds must be a positive number of seconds, got -1.0"),
        (["--crf", "99"], "error: video.crf for mp4 must be between 0 (best) and 51 (worst), got 99"),
        (["--width", "4096", "--upscale", "16"], "error: --upscale 16 makes frames of 65536x1024; upscaled frames are at most"),
        (["--upscale", "0"], "error: --upscale (video.upscale) must be an integer between 1 and 16, got 0"),
        (["--steps", "0"], "error: config key 'sampler.steps': must be between 1 and 1000, got 0"),
        (["--set", "sampler.continuation_steps=1001"],
         "error: config key 'sampler.continuation_steps': must be between 1 and 1000, got 1001"),
        (["--guidance", "-1"], "error: config key 'sampler.guidance': must be a finite number >= 0, got -1.0"),
        (["--output-size", "100"], "error: config key 'video.output_size': must be WIDTHxHEIGHT in pixels"),
        (["--set", "video.output_size=0x10"],
         "error: config key 'video.output_size': must be WIDTHxHEIGHT in pixels, e.g. 640x360, not a number (got 16)"),
        (["--output-size", "101x100"], "error: video.output_size 101x100: mp4 needs an even width and height (yuv420p)"),
        (["--set", "text_encoder.pretrained=/nonexistent-t5"],
         "error: T5 text encoder folder not found: /nonexistent-t5 (text_encoder.pretrained)"),
        (["-c", "."], "error: config file . is a folder; give the file itself"),
        (["--set", "video.max_seconds=.inf"], "error: config key 'video.max_seconds': Input should be a finite number"),
        (["--set", "sampler.schedule_shift=.nan"], "error: config key 'sampler.schedule_shift': Input should be a finite"),
        (["--set", "sampler.frame_lag=.inf"], "error: config key 'sampler.frame_lag': Input should be a finite number"),
        (["--set", "dit.width=0"], "error: dit.width must be at least 1, got 0"),
        (["--set", "dit.mlp_ratio=0"], "error: dit.mlp_ratio must be positive"),
        (["--set", "vae.latent_channels=0"], "error: vae.latent_channels must be >= 1, got 0"),
        (["--set", "vae.channels=[0, 8, 16, 16]"], "error: vae.channels entries must be >= 1"),
        (["--set", "vae.temporal_blocks=-1"], "error: vae.temporal_blocks must be >= 0, got -1"),
        (["--negative-prompt", "bad\udcff"], "error: --negative-prompt (sampler.negative_prompt) holds a byte that is not UTF-8"),
    ],
)
def test_bad_values_are_one_line(tmp_path, tiny_yaml, capsys, args, message):
    code, _, err = run_cli(["generate", "x", "-c", str(tiny_yaml), "-o", str(tmp_path / "a.mp4"), *args], capsys)
    assert one_line_error(code, err).startswith(message)


def test_wrong_type_in_config_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("video:\n  fps: fast\n")
    code, _, err = run_cli(["generate", "x", "-c", str(path)], capsys)
    assert one_line_error(code, err) == (
        "error: config key 'video.fps': Input should be a valid integer, unable to parse string as an integer (got 'fast')"
    )


def test_output_folder_is_a_file(tmp_path, tiny_yaml, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(["generate", "x", "-c", str(tiny_yaml), "-o", str(blocker / "a.mp4")], capsys)
    assert one_line_error(code, err) == (
        f"error: {blocker} is a file, so it cannot hold the output {blocker / 'a.mp4'}; choose another --output")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_output_folder(tmp_path, tiny_yaml, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    code, _, err = run_cli(["generate", "x", "-c", str(tiny_yaml), "-o", str(folder / "a.mp4")], capsys)
    assert one_line_error(code, err) == f"error: output folder {folder} is not writable; choose another --output"


def test_prompt_file_with_bom_crlf_blank_and_comment_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbfa red ball\r\n\r\n# a comment\r\n   \r\na blue star\r\n")
    assert [(i.where, i.fields) for i in read_prompt_file(path)] == [
        ("line 1", {"prompt": "a red ball"}), ("line 5", {"prompt": "a blue star"})]
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n\r\n# note\r\n{"prompt": "b"}\r\n')
    assert [i.fields["prompt"] for i in read_prompt_file(path)] == ["a", "b"]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv", ".yaml"])
def test_prompt_file_invalid_utf8(tmp_path, suffix):
    path = tmp_path / f"p{suffix}"
    path.write_bytes(b"prompt\na red ball\n\xff\xfe\n")
    with pytest.raises(UserError, match=rf"^prompt file {path} is not valid UTF-8 \(byte 18\)$"):
        read_prompt_file(path)


def test_broken_jsonl_line_names_its_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b",\n{"prompt": "c"}\n')
    items = read_prompt_file(path)
    assert [i.where for i in items] == ["line 1", "line 3", "line 4"]
    assert items[1].fields is None and items[1].error.startswith("invalid JSON: ")
    assert items[0].error is None and items[2].error is None


@pytest.mark.parametrize("setting, message", [
    ("video.fps=24", "error: eval scores videos at the model's own frame rate; video.fps is 24, leave it at 8"),
    ("video.format=gif", "error: eval writes and scores mp4 videos; video.format is 'gif', leave it at 'mp4'"),
])
def test_eval_refuses_videos_it_cannot_score(tmp_path, tiny_yaml, capsys, setting, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\n")
    code, _, err = run_cli(["eval", "--prompts", str(prompts), "-c", str(tiny_yaml), "--set", "video.model_fps=8",
                            "--set", setting, "--out", str(tmp_path / "e")], capsys)
    assert one_line_error(code, err).startswith(message)
    assert not (tmp_path / "e").exists()


def test_a_prompt_with_bytes_that_are_not_utf8_is_one_line(tmp_path, tiny_yaml, capsys):
    """A Latin-1 terminal or $(cat file) hands Python bytes it keeps as lone surrogates; no tokenizer encodes them."""
    code, _, err = run_cli(["generate", "a ball\udcff", "-c", str(tiny_yaml), "-o", str(tmp_path / "a.mp4")], capsys)
    assert one_line_error(code, err) == "error: the prompt holds a byte that is not UTF-8 at character 7 ('a ball' before " \
        "it); pass the text in UTF-8"
    assert not (tmp_path / "a.mp4").exists()


def test_a_config_key_given_twice_is_named(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("dit:\n  depth: 3\nvideo:\n  fps: 8\ndit:\n  width: 64\n")
    code, _, err = run_cli(["info", "-c", str(path)], capsys)
    assert one_line_error(code, err) == (f"error: config file {path} gives the key 'dit' twice in one mapping (line 5); "
                                         "give each key once (merge the two sections)")
