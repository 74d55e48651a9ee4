"""Output formats (mp4, webm, gif, frames), --output-size and the writers' atomicity, read back from real files."""

import json

import imageio.v2 as imageio
import numpy as np
import pytest

from soragen.config import load_config
from soragen.errors import UserError
from soragen.pipeline import FrameResampler, Pipeline, VideoPlan, frame_runs
from soragen.video_io import FORMATS, SUFFIXES, fit_frames, fit_size, open_writer

from conftest import run_cli, tiny_config


def small(**video):
    return tiny_config(video={"seconds": 1, **video}, sampler={"steps": 2})


@pytest.fixture(scope="module")
def models():
    """One set of tiny models; each test makes a Pipeline with its own settings around them."""
    return Pipeline.from_config(small())


def generate(models, path, **video):
    cfg = small(**video)
    pipe = Pipeline(cfg, models.text_encoder, models.vae, models.dit, models.model_name)
    return pipe.generate("a red ball", path, overwrite=True)


def read_frames(path):
    """Frames [T, H, W, 3] of any output: a video file, or a folder of PNGs."""
    if path.is_dir():
        return np.stack([imageio.imread(p) for p in sorted(path.glob("frame_*.png"))])
    reader = imageio.get_reader(path)
    frames = np.stack([f[..., :3] for f in reader])
    reader.close()
    return frames


def no_temporaries(folder):
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_writes_a_readable_video(tmp_path, models, fmt):
    out = tmp_path / f"a{SUFFIXES[fmt]}"
    sidecar = generate(models, out, format=fmt)
    frames = read_frames(out)
    assert frames.shape == (8, 64, 64, 3)
    assert sidecar["video"]["format"] == fmt and sidecar["video"]["frames"] == 8
    assert json.loads(out.with_name("a.json").read_text())["video"]["path"] == out.name
    assert no_temporaries(tmp_path)


def test_lossless_frames_match_the_mp4_source(tmp_path, models):
    """The PNG frames are exactly what the writer got; the MP4 decodes close to them."""
    generate(models, tmp_path / "f", format="frames")
    generate(models, tmp_path / "a.mp4")
    png = read_frames(tmp_path / "f")
    mp4 = read_frames(tmp_path / "a.mp4")
    luma = lambda x: x.astype(float) @ [0.299, 0.587, 0.114]  # noqa: E731  (yuv420p keeps luma at full size)
    assert np.abs(luma(png) - luma(mp4)).mean() < 6


def test_other_frame_rates_are_resampled_from_the_models_frames(tmp_path, models):
    """An output rate above or below the model's writes the model frame current at each output frame's time
    (held or skipped), so one second stays one second of the model's motion."""
    generate(models, tmp_path / "own", format="frames", model_fps=8)
    fast = generate(models, tmp_path / "fast", format="frames", fps=24, model_fps=8)
    generate(models, tmp_path / "slow", format="frames", fps=4, model_fps=8)
    own, x3, half = (read_frames(tmp_path / name) for name in ("own", "fast", "slow"))
    assert len(own) == 8
    np.testing.assert_array_equal(x3, np.repeat(own, 3, axis=0))  # each model frame held for three
    np.testing.assert_array_equal(half, own[[0, 2, 4, 6]])
    assert {k: fast["video"][k] for k in ("frames", "fps", "model_fps", "seconds")} == {
        "frames": 24, "fps": 24, "model_fps": 8, "seconds": 1.0}


def test_windows_that_give_no_output_frame(tmp_path, models):
    """At 1 fps from a 30-fps model most decoded windows hold no output frame; the video is still whole."""
    sidecar = generate(models, tmp_path / "sparse", format="frames", fps=1, model_fps=30, seconds=3,
                       output_size="100x60")
    assert len(read_frames(tmp_path / "sparse")) == 3 and sidecar["video"]["frames"] == 3


def test_frame_resampler_across_chunks():
    """Model frames arrive window by window; each output frame is given once, as soon as its frame has come."""
    plan = VideoPlan(num_frames=10, latent_frames=3, latent_height=8, latent_width=8, model_frames=4, fps=20,
                     model_fps=8)
    resampler = FrameResampler(plan)
    got = [resampler.take(1), resampler.take(2), resampler.take(1)]  # model frames 0 | 1, 2 | 3
    assert got == [[0, 0, 0], [0, 0, 1, 1, 1], [0, 0]]  # model frame floor(j * 8 / 20), within its chunk
    assert frame_runs([0, 0, 1, 1, 1]) == [(0, 1), (0, 2), (1, 2), (1, 2)]
    assert frame_runs([0, 1, 2, 4]) == [(0, 3), (4, 5)]


def test_mp4_is_the_default_and_byte_identical(tmp_path, models):
    generate(models, tmp_path / "default.mp4")
    generate(models, tmp_path / "explicit.mp4", format="mp4", output_size=None)
    assert (tmp_path / "default.mp4").read_bytes() == (tmp_path / "explicit.mp4").read_bytes()


def test_output_size_pads_to_keep_the_aspect_ratio(tmp_path, models):
    """64x64 frames into 128x64: unchanged in the middle (scale 1), black pillarbox bars on both sides."""
    generate(models, tmp_path / "plain", format="frames")
    generate(models, tmp_path / "wide", format="frames", output_size="128x64")
    plain, wide = read_frames(tmp_path / "plain"), read_frames(tmp_path / "wide")
    assert wide.shape == (8, 64, 128, 3)
    assert (wide[:, :, :32] == 0).all() and (wide[:, :, 96:] == 0).all()
    assert (wide[:, :, 32:96] == plain).all()


def test_output_size_with_upscale(tmp_path, models):
    """--upscale enlarges first (nearest); an integer multiple of that stays nearest neighbour, others resample."""
    generate(models, tmp_path / "x4", format="frames", upscale=4)
    generate(models, tmp_path / "x2_256", format="frames", upscale=2, output_size="256x256")
    assert (read_frames(tmp_path / "x4") == read_frames(tmp_path / "x2_256")).all()
    sidecar = generate(models, tmp_path / "b.mp4", upscale=2, output_size="96x72")
    assert read_frames(tmp_path / "b.mp4").shape == (8, 72, 96, 3)
    assert (sidecar["video"]["width"], sidecar["video"]["height"]) == (96, 72)


@pytest.mark.parametrize(
    "size, box, fitted",
    [((64, 64), (128, 64), (64, 64)), ((64, 32), (100, 100), (100, 50)), ((32, 64), (90, 90), (45, 90)),
     ((640, 360), (640, 360), (640, 360)), ((3, 1), (2, 2), (2, 1))],
)
def test_fit_size(size, box, fitted):
    assert fit_size(size, box) == fitted


def test_fit_frames_centres_the_picture():
    frames = np.full((2, 4, 8, 3), 200, dtype=np.uint8)  # (T, H=4, W=8, 3)
    out = fit_frames(frames, (8, 8))  # letterbox: 2 black rows above and below
    assert out.shape == (2, 8, 8, 3)
    assert (out[:, :2] == 0).all() and (out[:, 6:] == 0).all() and (out[:, 2:6] == 200).all()
    assert fit_frames(frames, None) is frames


@pytest.mark.parametrize("fmt", FORMATS)
def test_aborted_writer_leaves_nothing(tmp_path, fmt):
    """An interrupted write (Ctrl-C, an error) removes its partial output; nothing appears under the final name."""
    final = tmp_path / f"v{SUFFIXES[fmt]}"
    with pytest.raises(KeyboardInterrupt):
        with open_writer(final, fmt, 32, 32, 8, 18) as writer:
            writer.write(np.zeros((3, 32, 32, 3), dtype=np.uint8))
            assert not final.exists()
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_frames_overwrite_replaces_the_folder(tmp_path):
    final = tmp_path / "shots"
    for n in (3, 2):
        with open_writer(final, "frames", 16, 16, 8) as writer:
            writer.write(np.zeros((n, 16, 16, 3), dtype=np.uint8))
    assert sorted(p.name for p in final.iterdir()) == ["frame_000000.png", "frame_000001.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["shots"]


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"video.format": "avi"}, "'mp4', 'webm', 'gif' or 'frames'"),
        ({"video.output_size": "640by360"}, "must be WIDTHxHEIGHT"),
        ({"video.output_size": "641x360"}, "even width and height"),
        ({"video.output_size": "0x360"}, "between 2 and 8192"),
        ({"video.crf": 60}, "between 0 (best) and 51"),
        ({"video.format": "webm", "video.crf": 64}, "between 0 (best) and 63"),
    ],
)
def test_bad_output_settings_are_user_errors(values, fragment):
    with pytest.raises(UserError) as err:
        load_config(None, [], values)
    assert fragment in str(err.value)


def test_odd_output_size_is_fine_for_gif_and_frames():
    assert load_config(None, [], {"video.format": "gif", "video.output_size": "641x361"}).video.output_size == (641, 361)
    assert load_config(None, ["video.output_size=[100, 50]"]).video.output_size == (100, 50)


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(small().to_yaml())
    return path




def test_cli_generate_gif_with_output_size(tmp_path, tiny_yaml, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(["generate", "a red ball", "-c", str(tiny_yaml), "--format", "gif", "--output-size", "100x60"], capsys)
    assert code == 0, out
    path = tmp_path / "outputs" / "a-red-ball_seed0.gif"
    assert read_frames(path).shape == (8, 60, 100, 3)
    assert "gif" in out and json.loads(path.with_suffix(".json").read_text())["config"]["video"]["output_size"] == [100, 60]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--format", "webm", "-o", "a.mp4"], "does not end in .webm"),
        (["-o", "a.gif"], "or pass --format gif"),
        (["--format", "frames", "-o", "a.mp4"], "writes a folder"),
        (["--format", "mov"], "'mp4', 'webm', 'gif' or 'frames'"),
        (["--output-size", "wide"], "WIDTHxHEIGHT"),
        (["-o", "/"], "output '/' has no name of its own; give the file's name, e.g. /video.mp4"),
        (["-o", ""], "output '.' has no name of its own"),
        (["-o", "out/.mp4"], "output 'out/.mp4' is an extension with no name before it; give the file a name, e.g. out/video.mp4"),
        (["--format", "frames", "-o", ".GIF"], "give the folder a name, e.g. video"),
        (["--format", "frames", "-o", "..", "--overwrite"], "give the folder's name, e.g. ../video"),
        (["-o", "d/" + "b" * 240 + ".mp4"], "is 244 bytes; at most 237 fit this file system"),
        (["-o", "d/" + "b" * 233 + ".mp4"], "error: sidecar name " + "b" * 40 + "... is 238 bytes; at most 237 fit"),
        (["-o", "side.mp4"], "the sidecar side.json of side.mp4 would go where a folder is"),
        (["-o", "dang/a.mp4"], "cannot create output folder dang: dang is a broken symbolic link (to nowhere); remove it"),
    ],
)
def test_cli_output_mistakes_are_one_line(tmp_path, tiny_yaml, capsys, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "side.json").mkdir()
    (tmp_path / "dang").symlink_to("nowhere")
    code, _, err = run_cli(["generate", "x", "-c", str(tiny_yaml), *args], capsys)
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert fragment in err
    assert not any(p.name != "tiny.yaml" for p in tmp_path.rglob("*") if p.is_file())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dang", "side.json", "tiny.yaml"]  # no folder made either


def test_frames_overwrite_replaces_only_a_frames_folder(tmp_path, tiny_yaml, capsys, monkeypatch):
    """--overwrite with --format frames replaces an earlier frames output, never a folder of other files (it
    deleted a folder of photos); a symbolic link to a frames folder is replaced by the new folder, its target kept."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"mine")
    args = ["generate", "x", "-c", str(tiny_yaml), "--seconds", "0.5", "--format", "frames", "--overwrite"]
    code, _, err = run_cli(args + ["-o", "photos"], capsys)
    assert code == 2 and err.strip() == ("error: output folder photos holds holiday.jpg, which no frames output writes; "
                                         "--overwrite replaces only a folder of frame_NNNNNN.png; choose another --output")
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["holiday.jpg"]
    assert run_cli(args + ["-o", "shots"], capsys)[0] == 0 and run_cli(args + ["-o", "shots"], capsys)[0] == 0
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    assert run_cli(args + ["-o", "link"], capsys)[0] == 0
    assert (tmp_path / "link").is_dir() and not (tmp_path / "link").is_symlink() and (tmp_path / "real").is_dir()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_frames_folder_that_gains_a_file_while_rendering_is_not_replaced(tmp_path):
    """--overwrite was checked before rendering; a file put into the old folder since is kept, with the old frames."""
    final = tmp_path / "shots"
    with open_writer(final, "frames", 16, 16, 8) as writer:
        writer.write(np.zeros((2, 16, 16, 3), dtype=np.uint8))
    with pytest.raises(UserError, match="holds notes.txt, which no frames output writes"):
        with open_writer(final, "frames", 16, 16, 8) as writer:
            writer.write(np.zeros((3, 16, 16, 3), dtype=np.uint8))
            (final / "notes.txt").write_text("mine")
    assert sorted(p.name for p in final.iterdir()) == ["frame_000000.png", "frame_000001.png", "notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["shots"]


def test_a_gif_above_50_fps_warns_that_it_plays_slower(tmp_path, tiny_yaml, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["generate", "x", "-c", str(tiny_yaml), "--seconds", "0.5", "--fps", "60", "--format", "gif",
                            "-o", "g.gif"], capsys)
    assert code == 0 and "at 60 fps this GIF plays slower than real time; use --fps 50 or less" in err
    code, _, err = run_cli(["generate", "x", "-c", str(tiny_yaml), "--seconds", "0.5", "--fps", "50", "--format", "gif",
                            "-o", "h.gif"], capsys)
    assert code == 0 and "GIF" not in err
