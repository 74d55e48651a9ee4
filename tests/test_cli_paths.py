"""Output paths and values a user can get wrong: one line, exit code 2, nothing written; outputs others can read."""

import os
import stat

import pytest

from conftest import run_cli


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_folder_where_the_video_goes_and_file_where_frames_go(tmp_path, tiny_yaml, capsys):
    (tmp_path / "d.mp4").mkdir()
    for overwrite in ([], ["--overwrite"]):  # without --overwrite too: passing it would not help
        code, _, err = run_cli(["generate", "x", "-c", str(tiny_yaml), "-o", str(tmp_path / "d.mp4")] + overwrite, capsys)
        assert code == 2 and "is a folder, not the file this format writes" in one_error_line(err)
    (tmp_path / "f").write_text("keep me")
    code, _, err = run_cli(["generate", "x", "-c", str(tiny_yaml), "--format", "frames", "-o", str(tmp_path / "f"),
                            "--overwrite"], capsys)
    assert code == 2 and "is a file, not the folder this format writes" in one_error_line(err)
    code, _, err = run_cli(["generate", "x", "-c", str(tiny_yaml), "-o", str(tmp_path / "f" / "a.mp4")], capsys)
    assert code == 2 and "is a file, so it cannot hold the output" in one_error_line(err)
    assert (tmp_path / "f").read_text() == "keep me" and not any((tmp_path / "d.mp4").iterdir())


def test_a_quoted_tilde_means_the_home_folder(tmp_path, tiny_yaml, capsys, monkeypatch):
    """`-o "~/a.mp4"` and `--config "~/tiny.yaml"` (quoted: the shell leaves the ~) mean the home folder, as --model
    does; they made a folder named ~ in the working directory."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "tiny.yaml").write_bytes(tiny_yaml.read_bytes())
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    code, _, err = run_cli(["generate", "x", "-c", "~/tiny.yaml", "--seconds", "0.5", "-o", "~/a.mp4"], capsys)
    assert code == 0, err
    assert (home / "a.mp4").is_file() and (home / "a.json").is_file() and not any(work.iterdir())


def test_a_sidecar_shared_by_two_formats_is_named(tmp_path, tiny_yaml, capsys):
    """a.mp4 and a.webm would share a.json: the refusal says whose sidecar it is, and a.mp4's is kept."""
    base = ["generate", "x", "-c", str(tiny_yaml), "--seconds", "1"]
    assert run_cli(base + ["-o", str(tmp_path / "a.mp4")], capsys)[0] == 0
    sidecar = (tmp_path / "a.json").read_bytes()
    code, _, err = run_cli(base + ["--format", "webm", "-o", str(tmp_path / "a.webm")], capsys)
    line = one_error_line(err)
    assert code == 2 and f"the sidecar {tmp_path / 'a.json'} of a.webm already exists (written for a.mp4)" in line
    assert (tmp_path / "a.json").read_bytes() == sidecar and not (tmp_path / "a.webm").exists()


@pytest.mark.parametrize("seed", ["-1", "9223372036854775808", "18446744073709551616"])
def test_seed_out_of_range(tmp_path, tiny_yaml, capsys, seed):
    code, _, err = run_cli(["generate", "x", "-c", str(tiny_yaml), "--seed", seed, "-o", str(tmp_path / "a.mp4")], capsys)
    assert code == 2 and "must be between 0 and 9223372036854775807" in one_error_line(err)
    assert err.count("got") == 1 and not (tmp_path / "a.mp4").exists()


def test_outputs_follow_the_umask(tmp_path, tiny_yaml, capsys):
    """Videos and sidecars are written under temporary names; the finished files get the usual mode, not 0600."""
    code, _, _ = run_cli(["generate", "x", "-c", str(tiny_yaml), "--seconds", "1", "-o", str(tmp_path / "a.mp4")], capsys)
    assert code == 0
    expected = 0o666 & ~current_umask()
    for name in ("a.mp4", "a.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


def test_eval_keeps_an_earlier_evaluation(tmp_path, tiny_yaml, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\n")
    args = ["eval", "--prompts", str(prompts), "--out", str(tmp_path / "ev"), "-c", str(tiny_yaml), "--seconds", "1"]
    assert run_cli(args, capsys)[0] == 0
    before = (tmp_path / "ev" / "eval.json").read_bytes()
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "already holds an evaluation" in one_error_line(err)
    assert (tmp_path / "ev" / "eval.json").read_bytes() == before
    assert run_cli(args + ["--overwrite"], capsys)[0] == 0
    (tmp_path / "file").write_text("")
    code, _, err = run_cli(args[:3] + ["--out", str(tmp_path / "file")] + args[5:], capsys)
    assert code == 2 and "is a file" in one_error_line(err)
    code, _, err = run_cli(args[:3] + ["--out", str(tmp_path / "gif")] + args[5:] + ["--set", "video.format=gif"], capsys)
    assert code == 2 and "eval writes and scores mp4 videos" in one_error_line(err)


def test_eval_reuses_the_videos_an_interrupted_evaluation_finished(tmp_path, tiny_yaml, capsys, monkeypatch):
    """Without eval.json (interrupted), a rerun scores the videos finished for the same prompt, seed and config
    instead of making them again; other settings, or --overwrite, make every video."""
    import json

    from soragen.pipeline import Pipeline

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\na blue box moving up\n")
    ev = tmp_path / "ev"
    args = ["eval", "--prompts", str(prompts), "--out", str(ev), "-c", str(tiny_yaml), "--seconds", "1"]
    assert run_cli(args, capsys)[0] == 0
    first = json.loads((ev / "eval.json").read_text())
    (ev / "eval.json").unlink()  # interrupted: during the second video, after the first was finished
    (ev / "001_seed0.json").unlink()
    (ev / "001_seed0.mp4").unlink()
    sidecar = json.loads((ev / "000_seed0.json").read_text())
    del sidecar["eval_video"]  # as an older soragen wrote it: known by its prompt and seed
    (ev / "000_seed0.json").write_text(json.dumps(sidecar))
    made = []
    generate = Pipeline.generate
    monkeypatch.setattr(Pipeline, "generate", lambda self, prompt, *a, **k: made.append(prompt) or generate(self, prompt, *a, **k))
    code, out, _ = run_cli(args, capsys)
    assert code == 0 and made == ["a blue box moving up"] and "1 of 2 videos were finished" in out
    again = json.loads((ev / "eval.json").read_text())
    assert again["reused"] == 1 and again["results"][0]["score"] == first["results"][0]["score"]
    (ev / "eval.json").unlink()
    assert run_cli(args + ["--steps", "2"], capsys)[0] == 0 and len(made) == 3  # another config: both made
    assert run_cli(args + ["--steps", "2", "--overwrite"], capsys)[0] == 0 and len(made) == 5


def test_eval_makes_again_the_videos_of_a_model_trained_on_since(tmp_path, tiny_yaml, capsys, monkeypatch):
    """An interrupted evaluation of a model folder whose weights changed since (a run's model/, trained on in
    place): its videos are made again, not scored as the new model's."""
    from safetensors.torch import load_file

    from soragen.config import load_config
    from soragen.model_io import WEIGHTS, save_file_atomic, save_model
    from soragen.pipeline import Pipeline
    from soragen.sampler import make_scheduler

    cfg = load_config(tiny_yaml)
    pipe = Pipeline.from_config(cfg)
    model = tmp_path / "m"
    save_model(model, cfg, pipe.text_encoder, pipe.vae, pipe.dit, make_scheduler(cfg.sampler))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\n")
    ev = tmp_path / "ev"
    args = ["eval", "--prompts", str(prompts), "--out", str(ev), "--model", str(model), "--seconds", "1"]
    assert run_cli(args, capsys)[0] == 0
    (ev / "eval.json").unlink()  # interrupted after its video
    made = []
    generate = Pipeline.generate
    monkeypatch.setattr(Pipeline, "generate", lambda self, prompt, *a, **k: made.append(prompt) or generate(self, prompt, *a, **k))
    assert run_cli(args, capsys)[0] == 0 and made == []  # the same weights: scored again
    (ev / "eval.json").unlink()
    weights = model / "transformer" / WEIGHTS
    save_file_atomic({k: v + 0.01 for k, v in load_file(str(weights)).items()}, weights)
    code, out, _ = run_cli(args, capsys)
    assert code == 0 and made == ["a red circle moving left"] and "were finished by an earlier" not in out


def test_eval_refuses_a_folder_named_like_its_report_and_huge_seeds(tmp_path, tiny_yaml, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\n")
    (tmp_path / "ev" / "eval.json").mkdir(parents=True)
    (tmp_path / "ev" / "eval.json" / "notes.txt").write_text("mine")
    args = ["eval", "--prompts", str(prompts), "--out", str(tmp_path / "ev"), "-c", str(tiny_yaml), "--seconds", "1"]
    for extra in ([], ["--overwrite"]):
        code, _, err = run_cli(args + extra, capsys)
        assert code == 2 and "eval.json is a folder, where the evaluation's report goes" in one_error_line(err)
    assert (tmp_path / "ev" / "eval.json" / "notes.txt").read_text() == "mine"
    code, _, err = run_cli(args[:4] + [str(tmp_path / "new")] + args[5:] + ["--seeds", "100000000"], capsys)
    assert code == 2 and "--seeds must be between 1 and 1000" in one_error_line(err)
    assert not (tmp_path / "new").exists()


def test_failed_commands_leave_no_folders_they_made(tmp_path, tiny_yaml, capsys):
    """A model that does not load: generate and eval leave no output folders behind (nor the folders above)."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "soragen.yaml").write_text("seed: 1\n")
    (broken / "model_index.json").write_text("{}")
    code, _, err = run_cli(["generate", "a red ball", "--model", str(broken), "-o", str(tmp_path / "a" / "b" / "v.mp4")], capsys)
    assert code == 2 and not (tmp_path / "a").exists()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\n")
    code, _, err = run_cli(["eval", "--prompts", str(prompts), "--model", str(broken), "--out", str(tmp_path / "c" / "d")],
                           capsys)
    assert code == 2 and not (tmp_path / "c").exists()


def test_eval_never_replaces_files_no_evaluation_wrote(tmp_path, tiny_yaml, capsys, monkeypatch):
    """A user's own 000_seed0.mp4 in --out stops the evaluation before any video, the file untouched; --overwrite
    replaces it. An --overwrite run removes the old eval.json first: interrupted, it leaves no report that
    describes other videos; a stop before a video's sidecar is written removes that video."""
    import soragen.video_io

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\n")
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "000_seed0.mp4").write_bytes(b"mine")
    args = ["eval", "--prompts", str(prompts), "--out", str(ev), "-c", str(tiny_yaml), "--seconds", "1"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and one_error_line(err) == (
        f"error: {ev / '000_seed0.mp4'} is in the way: no soragen eval recorded it as its own (a file of yours, or a "
        "video a killed evaluation left without its sidecar); move it away, choose another --out, or pass --overwrite "
        "to make every video again")
    assert (ev / "000_seed0.mp4").read_bytes() == b"mine" and not (ev / "000_seed0.json").exists()
    assert run_cli(args + ["--overwrite"], capsys)[0] == 0 and (ev / "000_seed0.mp4").read_bytes() != b"mine"
    assert (ev / "eval.json").is_file()

    def stopped(path, data):  # a stop between the video's rename and its sidecar
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(soragen.video_io, "write_json", stopped)
        assert run_cli(args + ["--overwrite", "--steps", "2"], capsys)[0] == 130
    assert not (ev / "eval.json").exists() and not (ev / "000_seed0.mp4").exists()  # no video without its sidecar
    assert run_cli(args + ["--steps", "2"], capsys)[0] == 0  # the files of an earlier evaluation are its own


def test_an_overwriting_evaluation_of_fewer_prompts_removes_the_earlier_ones_extra_videos(tmp_path, tiny_yaml, capsys):
    """eval.json and the folder's videos describe the same evaluation: --overwrite with one prompt instead of two
    removes the second video an earlier evaluation made, and keeps files no evaluation wrote."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\na blue box moving up\n")
    ev = tmp_path / "ev"
    args = ["eval", "--prompts", str(prompts), "--out", str(ev), "-c", str(tiny_yaml), "--seconds", "1"]
    assert run_cli(args, capsys)[0] == 0
    (ev / "005_seed0.mp4").write_bytes(b"mine")
    prompts.write_text("a red circle moving left\n")
    assert run_cli(args + ["--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in ev.iterdir()) == ["000_seed0.json", "000_seed0.mp4", "005_seed0.mp4", "eval.json"]


@pytest.mark.parametrize("settings, made", [
    (["video.width=128"], "128x64 frames written at 128x64"),
    (["video.output_size=128x72"], "64x64 frames written at 128x72"),
    (["video.output_size=32x32"], "64x64 frames written at 32x32"),
])
def test_eval_refuses_frames_the_detector_cannot_read_before_any_video(tmp_path, tiny_yaml, capsys, settings, made):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\n")
    args = ["eval", "--prompts", str(prompts), "--out", str(tmp_path / "ev"), "-c", str(tiny_yaml), "--seconds", "1"]
    code, _, err = run_cli(args + [arg for s in settings for arg in ("--set", s)], capsys)
    assert code == 2 and made in one_error_line(err) and "multiple of 64" in err
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("extra, message", [
    (["--seconds", "0"], "--seconds must be between 0.125 (one frame at 8 fps) and 600"),
    (["--seconds", "100000"], "--seconds must be between 0.125 (one frame at 8 fps) and 600"),
    (["--seconds", "nan"], "--seconds must be between 0.125 (one frame at 8 fps) and 600"),
    (["--seconds", "0.05"], "--seconds must be between 0.125 (one frame at 8 fps) and 600, got 0.05"),
    (["--chinese", "2"], "--chinese is a share of the captions, between 0 and 1"),
    (["--two-objects", "-0.5"], "--two-objects is a share of the scenes, between 0 and 1"),
    (["--num", "0"], "--num must be between 1 and 10,000,000, got 0"),
    (["--seed", "-1"], "--seed must be between 0 and 9223372036854775807, got -1"),
])
def test_dataset_request_checked_first(tmp_path, capsys, extra, message):
    args = ["dataset", "shapes", "--out", str(tmp_path / "ds"), "--num", "2"] + extra
    code, _, err = run_cli(args, capsys)
    assert code == 2 and message in one_error_line(err)  # one line: no progress bar before it
    assert not (tmp_path / "ds").exists()


def test_dataset_under_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, _, err = run_cli(["dataset", "shapes", "--out", str(tmp_path / "file" / "ds"), "--num", "1"], capsys)
    assert code == 2 and f"{tmp_path / 'file'} is a file, so it cannot hold" in one_error_line(err)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where no folder can be made")
def test_file_system_errors_are_one_line(capsys):
    """A path the system refuses is named in one line, without a traceback."""
    code, _, err = run_cli(["train", "--set", "train.output_dir=/proc/soragen-run"], capsys)
    assert code == 2 and "cannot use /proc/soragen-run" in one_error_line(err) and "Traceback" not in err


def test_a_broken_symbolic_link_for_a_folder_is_named(tmp_path, capsys):
    """`dataset --out` or `train.output_dir` under a link to nowhere said only "File exists"."""
    (tmp_path / "dang").symlink_to("nowhere")
    expected = f"cannot use {tmp_path / 'dang'}: {tmp_path / 'dang'} is a broken symbolic link (to nowhere); remove it"
    code, _, err = run_cli(["dataset", "shapes", "--out", str(tmp_path / "dang"), "--num", "1"], capsys)
    assert code == 2 and expected in one_error_line(err)
    code, _, err = run_cli(["train", "--set", f"train.output_dir={tmp_path / 'dang' / 'run'}"], capsys)
    assert code == 2 and expected in one_error_line(err)


def test_train_output_dir_is_a_file(tmp_path, capsys):
    (tmp_path / "run").write_text("")
    code, _, err = run_cli(["train", "--set", f"train.output_dir={tmp_path / 'run'}"], capsys)
    assert code == 2 and "is a file; give a folder for the run" in one_error_line(err)


def test_train_starts_again_after_a_failed_start(tmp_path, capsys):
    """A start with no data writes nothing; one that fails before its first step (here: no trained VAE) leaves no
    run folder either, and one that does hold only config.yaml (an older soragen's) is not refused as a resume."""
    run = tmp_path / "run"
    args = ["train", "--set", f"train.output_dir={run}", "--set", "data.kind=manifest", "--set", "train.stages=[dit]"]
    code, _, err = run_cli(args + ["--set", f"data.path={tmp_path / 'missing'}"], capsys)
    assert code == 2 and "has no manifest.jsonl" in err and not run.exists()
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.jsonl").write_text('{"path": "a.mp4", "caption": "a red circle moving left", "fps": 8}\n')
    code, _, err = run_cli(args + ["--set", f"data.path={data}"], capsys)
    assert code == 2 and "no trained VAE" in err and not run.exists()
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    code, _, err = run_cli(args + ["--set", f"data.path={data}"], capsys)
    assert code == 2 and "is not empty" not in err and "no trained VAE" in err


def test_eval_seeds_past_the_largest_seed(tmp_path, tiny_yaml, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\n")
    code, _, err = run_cli(["eval", "--prompts", str(prompts), "--out", str(tmp_path / "ev"), "-c", str(tiny_yaml),
                            "--seed", "9223372036854775807", "--seeds", "2"], capsys)
    assert code == 2 and "goes past the largest seed" in one_error_line(err) and not (tmp_path / "ev").exists()


def test_pydantic_messages_keep_the_value(tmp_path, tiny_yaml, capsys):
    code, _, err = run_cli(["generate", "x", "-c", str(tiny_yaml), "--set", "dit.depth=1.5"], capsys)
    assert code == 2 and one_error_line(err).endswith("(got 1.5)")
