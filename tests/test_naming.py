"""File names from prompts and user-given names: one safe path component, bounded, unique."""

from hypothesis import given, settings
from hypothesis import strategies as st

from soragen.naming import MAX_STEM_BYTES, safe_stem, slugify, unique_stems


def is_safe(stem: str) -> bool:
    return (
        stem not in ("", ".", "..")
        and not stem.startswith(".")
        and "/" not in stem and "\\" not in stem and "\x00" not in stem
        and all(ch.isprintable() for ch in stem)
        and len(stem.encode("utf-8")) <= MAX_STEM_BYTES
    )


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_gives_a_safe_stem(text):
    assert is_safe(slugify(text))
    assert is_safe(safe_stem(text))


def test_known_names():
    assert slugify("A red ball, bouncing!") == "a-red-ball-bouncing"
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert safe_stem("../../etc/passwd") == "etc-passwd"
    assert safe_stem("My_Clip 01\n\t") == "My_Clip-01"
    assert safe_stem("..") == "video" and slugify("\x00\x1b") == "video"
    assert slugify("一位时尚的女士") == "一位时尚的女士"
    assert safe_stem("CON") == "CON-" and slugify("nul") == "nul-"
    assert len(slugify("长" * 500).encode()) <= MAX_STEM_BYTES


def test_unique_stems_ignores_case_and_keeps_order():
    assert unique_stems(["a", "A", "a", "b", "a-2"]) == ["a", "A-2", "a-3", "b", "a-2-2"]
    assert unique_stems(["index"], taken=["INDEX"]) == ["index-2"]
