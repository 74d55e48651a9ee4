"""Safe file names derived from prompts and user-given names.

Every name made here is a single path component: no path separators, no `..`, no
control characters, no leading dot, bounded in characters and in UTF-8 bytes (most
file systems cap a name at 255 bytes), and never a name Windows reserves.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

MAX_STEM = 60  # characters of a stem derived from free text
MAX_STEM_BYTES = 120  # UTF-8 bytes of a stem: room for suffixes like "_seed4294967295-12.poster.png"
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)}


def _bound(stem: str, max_length: int, max_bytes: int) -> str:
    stem = stem[:max_length]
    while len(stem.encode("utf-8")) > max_bytes:
        stem = stem[:-1]
    return stem


def slugify(text: str, max_length: int = MAX_STEM, max_bytes: int = MAX_STEM_BYTES) -> str:
    """A lower-case file-name stem from free text: word characters (any script) and dashes only, bounded length.

    No path separators, no `..`, no control characters; never empty.
    """
    text = unicodedata.normalize("NFKC", text)
    slug = re.sub(r"[^\w]+", "-", text, flags=re.UNICODE).strip("-_").lower()
    slug = _bound(slug, max_length, max_bytes).rstrip("-_")
    if slug in _WINDOWS_RESERVED:
        slug += "-"
    return slug or "video"


def safe_stem(name: str, max_length: int = MAX_STEM, max_bytes: int = MAX_STEM_BYTES) -> str:
    """A file-name stem from a name the user chose: like `slugify`, but case and underscores are kept."""
    text = unicodedata.normalize("NFKC", name)
    stem = re.sub(r"[^\w-]+", "-", text, flags=re.UNICODE).strip("-_.")
    stem = _bound(stem, max_length, max_bytes).rstrip("-_")
    if stem.lower() in _WINDOWS_RESERVED:
        stem += "-"
    return stem or "video"


def unique_stems(stems: Iterable[str], taken: Iterable[str] = ()) -> list[str]:
    """Make stems unique (ignoring case, for case-insensitive file systems): repeats get -2, -3, ... in order."""
    used = {s.casefold() for s in taken}
    out = []
    for stem in stems:
        candidate, n = stem, 2
        while candidate.casefold() in used:
            candidate = f"{stem}-{n}"
            n += 1
        used.add(candidate.casefold())
        out.append(candidate)
    return out
