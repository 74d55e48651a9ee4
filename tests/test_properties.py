"""Property-based tests: any text given as config or prompt file gives a result or a UserError, never a crash."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soragen.batch import RawItem, read_prompt_file
from soragen.config import Config, load_config, valid_keys
from soragen.errors import UserError

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Values as a user might type them after `key=`: YAML scalars, lists, mappings, junk.
VALUES = st.one_of(
    st.text(max_size=30),
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "true", "null", "~", "[1,2,3]", "[]", "{}", "{a: 1}", "[1, 2", "64x64", "1e999", "-0", ".nan",
                     "!!python/object:os.system", "&a [*a]", "'", "\x00", "ddim", "mp4", "[vae]"]),
)


def load_or_user_error(overrides: list[str]) -> None:
    try:
        assert isinstance(load_config(None, overrides), Config)
    except UserError as e:
        assert str(e) and "\n" not in str(e)


@SETTINGS
@given(st.text())
def test_any_override_text_gives_a_config_or_a_user_error(text):
    load_or_user_error([text])


@SETTINGS
@given(st.sampled_from(valid_keys()), VALUES)
def test_any_value_for_any_key_gives_a_config_or_a_user_error(key, value):
    load_or_user_error([f"{key}={value}"])


@SETTINGS
@given(st.text())
def test_any_config_file_gives_a_config_or_a_user_error(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            assert isinstance(load_config(path), Config)
        except UserError as e:
            assert "\n" not in str(e)


NAMES = st.sampled_from(sorted({part for key in valid_keys() for part in key.split(".")}))
YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10) | st.dates(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(NAMES | st.integers() | st.booleans(), inner, max_size=4),
    max_leaves=12,
)


@SETTINGS
@given(st.dictionaries(NAMES | st.integers() | st.none(), YAML_VALUES, max_size=5))
def test_any_yaml_mapping_gives_a_config_or_a_user_error(data):
    import yaml

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8", errors="surrogatepass")
        try:
            assert isinstance(load_config(path), Config)
        except UserError as e:
            assert "\n" not in str(e)


# Prompt files: arbitrary bytes, and bytes built from pieces that prompt files are made of.
PIECES = st.sampled_from([
    b"\xef\xbb\xbf", b"\r\n", b"\n", b"\r", b"#", b",", b'"', b"{", b"}", b"[", b"]", b":", b"- ", b"prompt", b"seconds",
    b"seed", b'{"prompt": "a"}', b"prompt,seconds\n", b"a red ball", b"\xff", b"\x00", b"null", b"1e999", b"-1", b"  ",
])
FILE_BYTES = st.one_of(st.binary(max_size=300), st.lists(PIECES, max_size=40).map(b"".join))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv", ".yaml"])
@SETTINGS
@given(data=FILE_BYTES)
def test_any_prompt_file_gives_items_or_a_user_error(suffix, data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"p{suffix}"
        path.write_bytes(data)
        try:
            items = read_prompt_file(path)
        except UserError as e:
            assert "\n" not in str(e)
            return
        assert items and all(isinstance(i, RawItem) for i in items)
        for item in items:  # each item is either usable or a failure with its reason
            assert (item.fields is None) == (item.error is not None)
            if item.fields is not None:
                assert isinstance(item.fields.get("prompt"), str) and item.fields["prompt"].strip()
