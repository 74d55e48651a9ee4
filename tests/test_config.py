import re
from pathlib import Path

import pytest

from soragen.config import Config, load_config, valid_keys
from soragen.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_frozen():
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    assert cfg == Config()
    with pytest.raises(Exception):
        cfg.seed = 3


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dit:\n  depth: 3\nsampler:\n  kind: ddpm\n")
    cfg = load_config(path, ["dit.width=64", "dit.patch_size=[1,1,1]", "sampler.negative_prompt=blurry"])
    assert cfg.dit.depth == 3 and cfg.dit.width == 64 and cfg.dit.patch_size == (1, 1, 1)
    assert cfg.sampler.kind == "ddpm" and cfg.sampler.negative_prompt == "blurry"
    # typed values (CLI flags) win over --set
    cfg = load_config(path, ["video.seconds=3"], {"video.seconds": 5.0})
    assert cfg.video.seconds == 5.0


def test_text_settings_take_the_words_as_written():
    # YAML would read these as a boolean, an integer and a date; a text setting keeps the text.
    cfg = load_config(None, ["sampler.negative_prompt=yes", "train.output_dir=2024", "data.kind=manifest", "data.path=2024-01-01"],
                      builtin_default=False)
    assert cfg.sampler.negative_prompt == "yes" and cfg.train.output_dir == "2024" and cfg.data.path == "2024-01-01"
    # YAML's comments and mappings are words there too; quoted text is YAML's
    for raw, words in (("blurry, #1 worst", "blurry, #1 worst"), ("blurry: low", "blurry: low"), ('"a # b"', "a # b")):
        assert load_config(None, [f"sampler.negative_prompt={raw}"], builtin_default=False).sampler.negative_prompt == words
    # null still clears an optional text setting; numbers and choices are still typed (and checked)
    assert load_config(None, ["model=null"], builtin_default=False).model is None
    with pytest.raises(UserError, match="sampler.steps"):
        load_config(None, ["sampler.steps=yes"], builtin_default=False)


def test_mixed_precision_no_is_the_word_no(tmp_path):
    # YAML reads the word no as false; scripts/train_default.sh passes --set train.mixed_precision=no on a CPU
    # without native bf16 products, and a config file may say `mixed_precision: no`.
    assert load_config(None, ["train.mixed_precision=no"], builtin_default=False).train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path, builtin_default=False).train.mixed_precision == "no"
    with pytest.raises(UserError, match="train.mixed_precision"):
        load_config(None, ["train.mixed_precision=yes"], builtin_default=False)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["dit.depth=4", "seed=7"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert cfg.digest() == load_config(path).digest()


def test_digest_is_that_of_before_settings_that_change_no_frame():
    """A batch re-renders an item whose config digest changed; settings added later keep the digest of a
    config that makes the same frames as before they existed, and whole windows (sampler.full_windows, the
    default now) change it."""
    import hashlib
    import json

    old = ["sampler.steps=7", "sampler.full_windows=false"]  # frames as before sampler.full_windows existed
    data = load_config(None, old, builtin_default=False).to_dict()
    del data["video"]["model_fps"], data["sampler"]["continuation_steps"], data["sampler"]["full_windows"]
    before = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]  # a config written before all three
    assert load_config(None, old, builtin_default=False).digest() == before
    assert load_config(None, old + ["sampler.continuation_steps=7"], builtin_default=False).digest() == before
    assert load_config(None, old + ["sampler.continuation_steps=3"], builtin_default=False).digest() != before
    assert load_config(None, ["sampler.steps=7"], builtin_default=False).digest() != before


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("dit.depthh=3", "did you mean 'dit.depth'"),
        ("sampler.stepz=3", "did you mean 'sampler.steps'"),
        ("vidoe.fps=3", "did you mean 'video'"),
        ("dit.depth=abc", "dit.depth"),
        ("dit.width=30", "divisible by dit.heads"),
        ("sampler.kind=euler", "'ddim' or 'ddpm'"),
        ("dit=3", "is a section"),
        ("seed.x=1", "is a value, not a section"),
        ("novalue", "key.path=value"),
        ("vae.spatial_compression=6", "power of two"),
        ("sampler.steps=yes", "config key 'sampler.steps': must be a number (YAML reads yes/no, on/off and true/false as booleans)"),
        ("sampler.guidance=off", "config key 'sampler.guidance': must be a number"),
        ("sampler.continuation_steps=true", "config key 'sampler.continuation_steps': must be a number"),
    ],
)
def test_bad_overrides_name_the_problem(override, fragment):
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides, fragment",
    [(["data.path=d"], "data.path applies to data.kind: manifest only"), (["data.long_fraction=1.5"], "data.long_fraction"),
     (["data.clips=0"], "config key 'data.clips': Input should be greater than or equal to 1 (got 0)"),
     (["train.stages=[]"], "config key 'train.stages': is empty; give one or more of vae, dit, decoder, e.g. [vae, dit]")],
)
def test_bad_data_settings_are_refused(overrides, fragment):
    with pytest.raises(UserError) as err:
        load_config(None, overrides)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_file_names_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dit:\n  dpeth: 3\n")
    with pytest.raises(UserError, match="unknown config key 'dit.dpeth'; did you mean 'dit.depth'"):
        load_config(path)


def test_malformed_yaml_gives_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dit:\n  depth: 3\n  width: [1, 2\n")
    with pytest.raises(UserError, match=r"malformed YAML at line \d+"):
        load_config(path)


def test_missing_file():
    with pytest.raises(UserError, match="config file not found"):
        load_config("does-not-exist.yaml")


def test_valid_keys_lists_sections_and_fields():
    keys = valid_keys()
    assert "dit" in keys and "dit.depth" in keys and "sampler.kind" in keys


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_preset_validates(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)


@pytest.mark.parametrize("override, fragment", [
    ("train.keep_checkpoints=-1", "'train.keep_checkpoints': Input should be greater than or equal to 1"),
    ("train.checkpoint_every=0", "'train.checkpoint_every': Input should be greater than or equal to 1"),
    ("train.log_every=0", "'train.log_every': Input should be greater than or equal to 1"),
    ("train.dit.batch_size=0", "'train.dit.batch_size': Input should be greater than or equal to 1"),
    ("train.vae.steps=-5", "'train.vae.steps': Input should be greater than or equal to 0"),
    ("train.vae.lr=-1", "'train.vae.lr': Input should be greater than or equal to 0"),
    ("train.threads=-1", "'train.threads': Input should be greater than or equal to 0"),
    ("train.dit.ema_decay=1.5", "'train.dit.ema_decay': Input should be less than or equal to 1"),
    ("train.dit.redraw_shapes=[circle,hexagon]", "'train.dit.redraw_shapes.1': Input should be 'circle', 'square' or"),
    ("train.dit.redraw_t=[500,30]", re.escape("'train.dit.redraw_t': must be [lo, hi] with 0 <= lo < hi <= 1000")),
    ("train.dit.redraw_shapes=[]", "'train.dit.redraw_shapes': Tuple should have at least 1 item"),
])
def test_training_settings_are_bounded(override, fragment):
    """Out of range, they crashed mid-run (a zero interval) or lost work (keep_checkpoints=-1 deleted them all)."""
    with pytest.raises(UserError, match=fragment):
        load_config(None, [override])


def test_a_half_frame_rounds_up():
    """Frames of a duration: seconds x fps with halves rounded up, the same way whatever the number's parity."""
    from soragen.config import frame_count

    assert [frame_count(s, 1) for s in (0.49, 0.5, 1.5, 2.5, 3.5)] == [0, 1, 2, 3, 4]
    assert frame_count(0.0625, 8) == 1 and frame_count(4.0, 8) == 32
