"""Safe file names derived from prompts."""

from __future__ import annotations

import re
import unicodedata

MAX_STEM = 60


def slugify(text: str, max_length: int = MAX_STEM) -> str:
    """A file-name stem from free text: word characters (any script) and dashes only, bounded length.

    No path separators, no `..`, no control characters; never empty.
    """
    text = unicodedata.normalize("NFKC", text)
    slug = re.sub(r"[^\w]+", "-", text, flags=re.UNICODE).strip("-_").lower()
    slug = slug[:max_length].rstrip("-_")
    return slug or "video"
