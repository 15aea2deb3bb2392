"""Optional text cleaning (off by default): strip HTML tags, URLs, collapse whitespace."""

import html
import re

CLEAN_STEPS = ("html", "urls", "whitespace")

_TAG = re.compile(r"<[^>]{0,200}>")  # bounded so a stray '<' cannot swallow a whole document
_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def parse_clean_steps(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    steps = tuple(s.strip() for s in value.split(",") if s.strip())
    if steps == ("all",):
        return CLEAN_STEPS
    unknown = [s for s in steps if s not in CLEAN_STEPS]
    if unknown:
        raise ValueError(f"--clean: unknown step {unknown[0]!r}; choose from {', '.join(CLEAN_STEPS)} or 'all'")
    return steps


def clean_text(text: str, steps: tuple[str, ...]) -> str:
    """Apply the cleaning steps in a fixed order (html, urls, whitespace) whatever order they were given in."""
    if "html" in steps:
        # Tags become spaces so "a<br />b" does not glue two words together.
        text = html.unescape(_TAG.sub(" ", text))
    if "urls" in steps:
        text = _URL.sub(" ", text)
    if "whitespace" in steps:
        text = _SPACE.sub(" ", text).strip()
    return text
