"""Scraped product text: strip HTML, and tell a real title from a page fragment.

Scraped catalogues (Amazon 2018 metadata above all) store pieces of the product page in text
fields: `<span class="a-size-medium a-color-secondary"` as a title, `<div class="aplus">` in
descriptions, `&amp;` entities everywhere. A language model must never read markup, so every
text field goes through `strip_html`, and titles that are page fragments are detected and either
cleaned (when real words remain) or replaced by a fallback.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from enum import Enum

# Signs that a title is a piece of page source rather than a name.
FRAGMENT = re.compile(
    r"<[a-zA-Z/!]"  # an opening or closing tag
    r"|/>|[\"']\s*>"  # the end of a tag whose start was cut off: `Magazines" />`
    r"|&lt;/?[a-zA-Z]"  # an escaped tag
    r"|\ba-(?:size|color|text|spacing|link)-"  # Amazon page CSS classes
    r"|\bclass\s*=|\bstyle\s*="
    r"|getTime\s*\(|\bvar\s+\w+\s*=|\bfunction\s*\(|\bdocument\.\w|\bwindow\.\w"
)
# What must not survive cleaning: any angle bracket, attribute syntax, CSS classes, JavaScript.
LEFTOVER = re.compile(
    r"[<>]|=\s*[\"']|\ba-(?:size|color|text|spacing|link)-"
    r"|getTime|\bvar\s+\w+\s*=|\bfunction\s*\(|\bdocument\.\w|\bwindow\.\w|[;{}]\s*$"
)
TAG = re.compile(r"<[^<>]*>")
CUT_TAG_END = re.compile(r"<[^<>]*$")  # `<span class="..."` with no `>`: the scrape stopped inside
CUT_TAG_START = re.compile(r"^[^<>]*>")  # `...Magazines" />`: the scrape started inside a tag
SCRIPT = re.compile(r"<(script|style)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
SPACE = re.compile(r"\s+")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z0-9])")
LETTERS = re.compile(r"[^\W\d_]{2}")
MAX_TITLE_CHARS = 200
FALLBACK_CHARS = 120
# Catalogue placeholders that carry no information.
PLACEHOLDER = re.compile(r"^\s*(SPID )?SHORT DESCRIPTION NOT AVAILABLE\s*$", re.IGNORECASE)


class TitleFix(Enum):
    """What `clean_title` did with a title."""

    KEPT = "kept"  # plain text (entities unescaped, whitespace collapsed)
    CLEANED = "cleaned"  # a page fragment whose markup was removed, leaving a plausible title
    REPLACED = "replaced"  # a page fragment with no title left: a fallback text was used
    EMPTY = "empty"  # a page fragment and no fallback text exists: the title is ""


def strip_html(text: str) -> str:
    """Plain text of an HTML snippet: no scripts, tags or entities; whitespace collapsed."""
    text = SCRIPT.sub(" ", text)
    text = CUT_TAG_END.sub(" ", TAG.sub(" ", text))
    # Entities are decoded after the tags go, then tags are removed again: `&lt;b&gt;` is markup too.
    text = TAG.sub(" ", html.unescape(text))
    return SPACE.sub(" ", text).strip()


def is_fragment(title: str) -> bool:
    """True when a title holds page source (tags, CSS classes, JavaScript), not just a name."""
    return bool(FRAGMENT.search(title))


def is_plausible_title(text: str) -> bool:
    """A name a reader could use: has letters, is not too long, holds no markup or code."""
    return (
        0 < len(text) < MAX_TITLE_CHARS
        and LETTERS.search(text) is not None
        and not LEFTOVER.search(text)
    )


def clean_title(title: str, fallbacks: Iterable[str] = ()) -> tuple[str, TitleFix]:
    """The title as plain text, and what was done to it.

    A fragment is cleaned when words remain after its markup is removed; otherwise the first
    plausible fallback (e.g. the description's first sentence, then the brand) stands in.
    """
    if not is_fragment(title):
        return strip_html(title), TitleFix.KEPT
    # Text before a stray `>` lay inside a tag (an attribute value), so it is not a title.
    cleaned = strip_html(CUT_TAG_START.sub(" ", title))
    if is_plausible_title(cleaned):
        return cleaned, TitleFix.CLEANED
    for text in fallbacks:
        candidate = first_sentence(text)
        if is_plausible_title(candidate) and not PLACEHOLDER.match(candidate):
            return candidate, TitleFix.REPLACED
    return "", TitleFix.EMPTY


def first_sentence(text: str, limit: int = FALLBACK_CHARS) -> str:
    """The first sentence or line of plain text, cut at a word boundary to `limit` characters.

    Very short pieces ("Inc.", "Vol. 3.") are joined with what follows, so an abbreviation
    does not become the whole sentence.
    """
    line = next((part for part in strip_lines(text) if part), "")
    sentence = ""
    for piece in SENTENCE_END.split(line):
        sentence = f"{sentence} {piece}".strip()
        if len(sentence) >= 20:
            break
    sentence = sentence.rstrip(" .!?;:,")
    if len(sentence) <= limit:
        return sentence
    return sentence[:limit].rsplit(" ", 1)[0].rstrip(" ,;:-")


def strip_lines(text: str) -> list[str]:
    """Plain-text lines of an HTML snippet (`<br>`, `<p>` and newlines end a line)."""
    text = re.sub(r"<\s*(br|/p|p|/div|div|li|hr)\b[^<>]*>", "\n", text, flags=re.IGNORECASE)
    return [strip_html(line) for line in text.splitlines()]


def join_text(parts: Iterable[object], sep: str = " ", limit: int | None = None) -> str:
    """Plain text of a list field (description, features): markup, placeholders and blanks
    removed, joined, and cut at a word boundary to `limit` characters."""
    texts = [strip_html(str(p)) for p in parts if p is not None]
    text = sep.join(t for t in texts if t and not PLACEHOLDER.match(t))
    if limit is None or len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:-") + " ..."
