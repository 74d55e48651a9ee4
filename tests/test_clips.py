import json

import numpy as np
import pytest

from soragen.cli import main
from soragen.config import DataConfig
from soragen.data import shapes
from soragen.data.clips import ManifestSource, ShapesSource, read_frames, read_manifest, write_shapes_dataset
from soragen.errors import UserError


def test_dataset_is_lossless_and_manifest_matches(tmp_path):
    manifest = write_shapes_dataset(tmp_path, num=3, seconds=1.0, seed=4)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(records) == 3 and all(r["fps"] == 8 and r["frames"] == 8 for r in records)
    rng = np.random.default_rng(4)
    scene = shapes.sample_scene(rng)
    rng.random()  # the language draw
    caption = shapes.caption(scene, rng)
    assert records[0]["caption"] == caption
    assert np.array_equal(read_frames(tmp_path / records[0]["path"]), shapes.render(scene, 8))


def test_an_interrupted_dataset_is_continued_by_the_same_command(tmp_path, capsys):
    """Stopped after three clips (a killed run's temporary file beside them), the same command keeps those, renders
    the rest and writes the dataset a run without the stop writes; other flags are refused, naming the run's."""
    from conftest import run_cli

    def stop_after_three(i):
        if i == 2:
            (tmp_path / "d" / "videos" / ".000003.mp4.abcdefgh.partial").write_bytes(b"half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shapes_dataset(tmp_path / "d", num=5, seconds=1.0, seed=7, on_item=stop_after_three)
    assert sorted(p.name for p in (tmp_path / "d" / "videos").iterdir() if not p.name.startswith(".")) == [
        "000000.mp4", "000001.mp4", "000002.mp4"]
    kept = (tmp_path / "d" / "videos" / "000001.mp4").stat().st_mtime_ns
    args = ["dataset", "shapes", "--out", str(tmp_path / "d"), "--num", "5", "--seconds", "1", "--seed", "7"]
    code, _, err = run_cli(args[:-1] + ["8"], capsys)
    assert code == 2 and err.strip() == (
        f"error: --out {tmp_path / 'd'} holds a dataset interrupted while rendering with --num 5 --seconds 1.0 --seed 7 "
        "--chinese 0.0 --two-objects 0.5; run with those flags to finish it, or choose an empty or new folder")
    code, out, _ = run_cli(args, capsys)
    assert code == 0 and "continuing the dataset interrupted in" in out and "3 of 5 clips were rendered" in out
    assert (tmp_path / "d" / "videos" / "000001.mp4").stat().st_mtime_ns == kept
    assert sorted(p.name for p in (tmp_path / "d").rglob("*")) == ["000000.mp4", "000001.mp4", "000002.mp4", "000003.mp4",
                                                                    "000004.mp4", "manifest.jsonl", "videos"]
    fresh = write_shapes_dataset(tmp_path / "e", num=5, seconds=1.0, seed=7)
    assert (tmp_path / "d" / "manifest.jsonl").read_text() == fresh.read_text()
    for i in range(5):
        name = f"videos/{i:06d}.mp4"
        assert np.array_equal(read_frames(tmp_path / "d" / name), read_frames(tmp_path / "e" / name))


def test_manifest_source_cuts_and_resizes(tmp_path):
    write_shapes_dataset(tmp_path, num=2, seconds=1.0, seed=1)
    src = ManifestSource(DataConfig(kind="manifest", path=str(tmp_path)), (32, 32))
    clip = src.sample(np.random.default_rng(0), 5)
    assert clip.frames.shape == (5, 32, 32, 3) and clip.captions[0]


def test_shapes_source_never_held_out():
    src = ShapesSource(DataConfig(long_fraction=0.5, chinese_fraction=0.5))
    rng = np.random.default_rng(0)
    for _ in range(50):
        clip = src.sample(rng, 5)
        for text in clip.captions:
            specs, _ = shapes.parse_caption(text)
            assert not any(shapes.is_held_out(s) for s in specs)


def test_two_object_fraction_sets_the_share_of_two_object_scenes():
    counts = {}
    for share in (0.0, 0.8, 1.0):
        src = ShapesSource(DataConfig(two_object_fraction=share))
        rng = np.random.default_rng(3)
        counts[share] = [len(shapes.parse_caption(src.sample(rng, 1).captions[0])[0]) for _ in range(400)]
    assert set(counts[0.0]) == {1} and set(counts[1.0]) == {2}
    assert 0.75 < np.mean(np.array(counts[0.8]) == 2) < 0.85
    # at the default, a seed draws the scenes it drew before the setting existed (so older latent caches hold)
    rng = np.random.default_rng(5)
    assert [len(shapes.sample_scene(rng).objects) for _ in range(20)] == [2, 1, 1, 2, 1, 2, 1, 2, 1, 2, 1, 1, 2, 1, 2, 2, 2, 2, 1, 2]
    with pytest.raises(ValueError, match="between 0 and 1"):
        shapes.sample_scene(rng, two_objects=1.5)


def test_dataset_two_objects_share(tmp_path):
    manifest = write_shapes_dataset(tmp_path, num=6, seconds=0.5, seed=2, two_objects=1.0)
    captions = [json.loads(line)["caption"] for line in manifest.read_text().splitlines()]
    assert all(len(shapes.parse_caption(c)[0]) == 2 for c in captions)


def test_broken_manifest_line_named(tmp_path):
    (tmp_path / "manifest.jsonl").write_text('{"path": "a.mp4", "caption": "x"}\n{not json\n')
    with pytest.raises(UserError, match="line 2"):
        read_manifest(tmp_path)


def test_manifest_that_is_not_utf8_or_a_file_for_a_folder_is_one_line(tmp_path):
    """A manifest in another encoding was a UnicodeDecodeError traceback; data.path naming the manifest itself
    said to write one there. A caption holding U+2028 stays one record."""
    (tmp_path / "manifest.jsonl").write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(UserError, match=r"manifest .*manifest.jsonl is not valid UTF-8 \(byte 0\)"):
        read_manifest(tmp_path)
    with pytest.raises(UserError, match=r"is a file; give the folder that holds manifest.jsonl \(here "):
        read_manifest(tmp_path / "manifest.jsonl")
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"path": "a.mp4", "caption": "a\u2028b"}, ensure_ascii=False) + "\n")
    assert read_manifest(tmp_path)[0]["caption"] == "a\u2028b"


def test_dataset_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["dataset", "shapes", "--out", str(tmp_path / "d"), "--num", "2", "--seconds", "0.5"])
    assert e.value.code == 0
    assert len(read_manifest(tmp_path / "d")) == 2
    with pytest.raises(SystemExit) as e:
        main(["dataset", "shapes", "--out", str(tmp_path / "d"), "--num", "2"])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "mine.mp4").write_bytes(b"keep")
    with pytest.raises(SystemExit) as e:
        main(["dataset", "shapes", "--out", str(tmp_path / "e"), "--num", "1"])
    assert e.value.code == 2 and "is not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "e").iterdir()] == ["mine.mp4"]


def test_manifest_videos_that_cannot_be_read(tmp_path):
    """A record's video missing, empty or not a video: one line naming the file and its manifest."""
    from soragen.config import load_config
    from soragen.data.clips import data_fps

    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(b"\x00\xff" * 64)
    for name, fragment in [("gone.mp4", "not found"), ("empty.mp4", "cannot be decoded as a video"),
                           ("junk.mp4", "cannot be decoded as a video")]:
        (tmp_path / "manifest.jsonl").write_text(json.dumps({"path": name, "caption": "a red ball", "fps": 8}) + "\n")
        cfg = load_config(None, ["data.kind=manifest", f"data.path={tmp_path}"])
        with pytest.raises(UserError, match=f"{name} \\(in .*manifest.jsonl\\) {fragment}"):
            ManifestSource(cfg.data, (64, 64)).sample(np.random.default_rng(0), 5)
    with pytest.raises(UserError, match="data.path is not set"):
        data_fps(load_config(None, ["data.kind=manifest"]).data)


@pytest.mark.parametrize("rates, expected", [([8, 8.0], 8), ([12.0], 12), ([29.97], None), ([8, 12], None),
                                             (["8"], None), ([True], None), ([None], None)])
def test_a_manifests_frame_rate(tmp_path, rates, expected):
    """Records written by another tool often give the rate as a float; 8.0 is 8 fps, 29.97 is no whole rate."""
    from soragen.config import load_config
    from soragen.data.clips import data_fps

    records = [{"path": f"{i}.mp4", "caption": "a red ball"} | ({} if r is None else {"fps": r}) for i, r in enumerate(rates)]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert data_fps(load_config(None, ["data.kind=manifest", f"data.path={tmp_path}"]).data) == expected
