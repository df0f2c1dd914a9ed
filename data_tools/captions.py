"""Caption normalisation: fix mojibake (ftfy), collapse whitespace, cap the length.

Raises `CaptionError` with a reason for captions that cannot be used:
empty_caption, caption_not_utf8, caption_too_long.
"""

from __future__ import annotations

import ftfy

from vlp.core.errors import RowFailure


class CaptionError(RowFailure):
    """A failure of this stage; `reason` is one of the codes in the module docstring."""


def _has_undecodable_bytes(text: str) -> bool:
    # Readers decode with surrogateescape: bytes that were not UTF-8 show up as lone surrogates.
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def cut_at_word(text: str, max_chars: int) -> str:
    """Shorten to at most max_chars, at a word boundary where there is one."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    space = head.rfind(" ")
    return head[:space] if space > max_chars // 2 else head


def normalise_caption(raw: str | None, max_chars: int = 512, reject_chars: int = 10_000) -> str:
    if raw is None or not raw.strip():
        raise CaptionError("empty_caption")
    if _has_undecodable_bytes(raw):
        raise CaptionError("caption_not_utf8", "caption bytes are not valid UTF-8")
    if len(raw) > reject_chars:
        raise CaptionError("caption_too_long", f"{len(raw)} characters > {reject_chars}")
    text = " ".join(ftfy.fix_text(raw).split())
    if not text:
        raise CaptionError("empty_caption", "only whitespace or control characters")
    return cut_at_word(text, max_chars)
