"""File names as SPEC §2 defines them: UTF-8, 1–1024 bytes, no NUL or control characters,
one flat namespace in which ``/`` is an ordinary character."""

from __future__ import annotations

import unicodedata
from urllib.parse import unquote

from dstore.errors import BadName

MAX_NAME_BYTES = 1024
# characters that change how a name is shown without showing themselves: bidirectional
# controls (a listing could show "gpj.exe" as "exe.jpg") and zero-width ones (two names
# that look the same)
INVISIBLE = frozenset(
    "\u061c\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
    "\u2060\u2066\u2067\u2068\u2069\ufeff"
)
FILES_PREFIX = "/v1/files/"


def validate_name(name: str) -> str:
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadName("name is not valid UTF-8") from exc
    if not 1 <= len(encoded) <= MAX_NAME_BYTES:
        raise BadName(f"name must be 1 to {MAX_NAME_BYTES} bytes of UTF-8, not {len(encoded)}")
    for ch in name:
        if unicodedata.category(ch) == "Cc":
            raise BadName(f"name contains control character U+{ord(ch):04X}")
        if ch in INVISIBLE:
            raise BadName(f"name contains invisible formatting character U+{ord(ch):04X}")
    return name


def name_from_raw_path(raw_path: str) -> str:
    """The file name in a request's raw path (before any normalisation, so that names
    like ``a/../b`` or ``a//b`` arrive exactly as sent, percent-decoded once)."""
    path = raw_path.split("?", 1)[0]
    if not path.startswith(FILES_PREFIX):
        raise BadName("not a file path")
    try:
        name = unquote(path[len(FILES_PREFIX) :], encoding="utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise BadName("name is not valid UTF-8") from exc
    return validate_name(name)
