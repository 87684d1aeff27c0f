"""Text folding and stable hashing shared by ingest (dedup) and the data gate (leakage)."""

from __future__ import annotations

import hashlib
import re
import unicodedata

_WHITESPACE = re.compile(r"\s+")


def fold(text: str) -> str:
    """Unicode NFKC, casefold, collapse whitespace. Nothing that changes meaning ("not good" stays)."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def stable_hash(text: str) -> str:
    """Process-independent digest (never Python's salted hash())."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def split_position(text: str, salt: str) -> float:
    """Where a text falls in [0, 1) for the stable split: a pure function of its folded text and the salt."""
    digest = hashlib.blake2b(f"{salt}\0{fold(text)}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
