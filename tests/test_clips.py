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


def test_broken_manifest_line_named(tmp_path):
    (tmp_path / "manifest.jsonl").write_text('{"path": "a.mp4", "caption": "x"}\n{not json\n')
    with pytest.raises(UserError, match="line 2"):
        read_manifest(tmp_path)


def test_dataset_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["dataset", "shapes", "--out", str(tmp_path / "d"), "--num", "2", "--seconds", "0.5"])
    assert e.value.code == 0
    assert len(read_manifest(tmp_path / "d")) == 2
    with pytest.raises(SystemExit) as e:
        main(["dataset", "shapes", "--out", str(tmp_path / "d"), "--num", "2"])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err
