"""Seeded, meaning-preserving text perturbations for a robustness check (CheckList / nlpaug style).

Each text gets its own numpy Generator seeded from (seed, perturbation, CRC-32 of the text), so its perturbed
form depends only on (text, name, rate, seed): not on its position in the batch, the other texts, or any global
random state. nlpaug is not used: it seeds only through the global `random` / `numpy.random` state
(`nlpaug.util.Randomness.seed`), and its last release was in 2022.

Character edits touch only Latin-script alphabetic words of at least 4 letters: short words such as "not" or "no"
are never edited (CheckList's rule), nor are words in other scripts. Words are found with a regex over the original
string and the edits spliced back, so everything else (punctuation, spacing, digits, the other words) is kept byte
for byte. punctuation_removal ignores `rate`.
"""

from __future__ import annotations

import functools
import numbers
import re
import unicodedata
import zlib
from typing import Callable

import numpy as np

PERTURBATIONS: tuple[str, ...] = ("keyboard_typo", "char_delete", "char_insert", "char_swap", "case_change",
                                  "punctuation_removal", "extra_whitespace")

_WORD = re.compile(r"[^\W\d_]+")  # letter runs, any script; also numerals such as "²", which isalpha() rules out
_MIN_LETTERS = 4
_LONG_WORD = re.compile(rf"[^\W\d_]{{{_MIN_LETTERS},}}")  # a run of fewer letters has no such substring
_ASCII_LETTER = re.compile("[A-Za-z]")
_LOWERCASE = "abcdefghijklmnopqrstuvwxyz"

# QWERTY neighbours (same row and the rows above/below).
_QWERTY = {
    "q": "wa", "w": "qeas", "e": "wrds", "r": "etdf", "t": "ryfg", "y": "tugh", "u": "yihj", "i": "uojk", "o": "ipkl",
    "p": "ol", "a": "qwsz", "s": "awedxz", "d": "serfcx", "f": "drtgvc", "g": "ftyhbv", "h": "gyujnb", "j": "huikmn",
    "k": "jiolm", "l": "kop", "z": "asx", "x": "zsdc", "c": "xdfv", "v": "cfgb", "b": "vghn", "n": "bhjm", "m": "njk",
}
# Keyed by the exact character (ASCII only), so the replacement keeps the case and e.g. the Kelvin sign, whose
# lower() is "k", is never mistaken for a key.
KEYBOARD_NEIGHBOURS: dict[str, str] = {**_QWERTY, **{k.upper(): v.upper() for k, v in _QWERTY.items()}}


def perturb(texts: list[str], name: str, rate: float, seed: int) -> list[str]:
    """Apply perturbation `name` to each text, touching a fraction `rate` of its eligible words (at least one).

    punctuation_removal ignores `rate`: it removes every Unicode punctuation character (category P*).
    """
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; known: {', '.join(PERTURBATIONS)}")
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate <= 1:
        raise ValueError(f"perturbation {name!r}: rate must be a number in [0, 1], got {rate!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"perturbation {name!r}: seed must be a non-negative integer, got {seed!r}")
    if name == "punctuation_removal":  # needs no randomness
        return [text.translate(_PUNCTUATION) for text in texts]
    index = PERTURBATIONS.index(name)
    apply = _APPLY[name]
    out = []
    for text in texts:
        if not text:
            out.append(text)
            continue
        # surrogatepass: a lone surrogate must not crash the check (any valid str encodes as plain UTF-8).
        rng = np.random.default_rng([int(seed), index, zlib.crc32(text.encode("utf-8", "surrogatepass"))])
        out.append(apply(text, rate, rng))
    return out


def _n_chosen(rate: float, n_eligible: int) -> int:
    if n_eligible == 0 or rate == 0:
        return 0
    return min(n_eligible, max(1, round(rate * n_eligible)))


def _choose(rng: np.random.Generator, n: int, k: int) -> list[int]:
    """k distinct indices below n, in increasing order (permutation: a third of the cost of choice(replace=False))."""
    return sorted(rng.permutation(n)[:k].tolist())


def _splice(text: str, edits: list[tuple[int, int, str]]) -> str:
    """Replace the (start, end) spans, given in increasing order, by their new strings."""
    parts, last = [], 0
    for start, end, new in edits:
        parts.append(text[last:start])
        parts.append(new)
        last = end
    parts.append(text[last:])
    return "".join(parts)


def _is_latin(word: str) -> bool:
    """Latin letters only (a regex letter run that is ASCII is all letters; this also rules out numerals like "²")."""
    return word.isascii() or all(_latin_letter(ch) for ch in word)


@functools.cache
def _latin_letter(ch: str) -> bool:
    return "LATIN" in unicodedata.name(ch, "")


def _next_to_mark(text: str, start: int, end: int) -> bool:
    # A combining mark (NFD accents, Indic vowel signs) is not a letter to the regex and splits a word; editing the
    # fragment beside it would move or orphan the mark. (All marks are at U+0300 or above: skip the lookup below.)
    return ((start > 0 and text[start - 1] >= "\u0300" and unicodedata.category(text[start - 1])[0] == "M")
            or (end < len(text) and text[end] >= "\u0300" and unicodedata.category(text[end])[0] == "M"))


# Each character edit: which words it can change, the positions it can change in such a word, and the edit at one of
# them, given a uniform draw in [0, 1) for anything else it has to choose.
def _typo_positions(word: str) -> list[int]:
    return [i for i in range(1, len(word)) if word[i] in KEYBOARD_NEIGHBOURS]


def _typo(word: str, i: int, u: float) -> str:
    options = KEYBOARD_NEIGHBOURS[word[i]]
    return word[:i] + options[int(u * len(options))] + word[i + 1:]


def _delete_positions(word: str) -> list[int]:
    return list(range(1, len(word) - 1))


def _delete(word: str, i: int, u: float) -> str:
    return word[:i] + word[i + 1:]


def _insert_positions(word: str) -> list[int]:
    return list(range(1, len(word)))  # insert before word[i]: never before the first or after the last letter


def _insert(word: str, i: int, u: float) -> str:
    return word[:i] + _LOWERCASE[int(u * 26)] + word[i:]


def _swap_positions(word: str) -> list[int]:
    # Pairs (i, i+1) of inner letters whose letters differ, so that the swap changes the word.
    return [i for i in range(1, len(word) - 2) if word[i] != word[i + 1]]


def _swap(word: str, i: int, u: float) -> str:
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def _char_edit(can_edit: Callable[[str], bool] | None, positions: Callable[[str], list[int]],
               edit: Callable[[str, int, float], str]):
    def apply(text: str, rate: float, rng: np.random.Generator) -> str:
        eligible = []
        for match in _LONG_WORD.finditer(text):
            word = match.group()
            start, end = match.span()
            if _is_latin(word) and not _next_to_mark(text, start, end) and (can_edit is None or can_edit(word)):
                eligible.append((start, end))
        k = _n_chosen(rate, len(eligible))
        if k == 0:
            return text
        chosen = _choose(rng, len(eligible), k)
        draws = rng.random((k, 2)).tolist()  # per word: which position, then what to put there
        edits = []
        for j, (u_position, u_value) in zip(chosen, draws):
            start, end = eligible[j]
            word = text[start:end]
            candidates = positions(word)
            edits.append((start, end, edit(word, candidates[int(u_position * len(candidates))], u_value)))
        return _splice(text, edits)

    return apply


def _case_change(text: str, rate: float, rng: np.random.Generator) -> str:
    eligible = []
    for match in _WORD.finditer(text):
        word = match.group()
        if not word.isalpha():
            continue
        new = word.title() if word.isupper() else word.upper()
        # Skip words the change would not alter (caseless scripts, "I") or whose lower() it would alter ("ß" -> "SS").
        if new == word or new.lower() != word.lower():
            continue
        start, end = match.span()
        # lower() of a capital sigma depends on the letters around it (final sigma), so check it in place.
        if ("Σ" in word or "Σ" in new) and _splice(text, [(start, end, new)]).lower() != text.lower():
            continue
        eligible.append((start, end, new))
    k = _n_chosen(rate, len(eligible))
    if k == 0:
        return text
    chosen = _choose(rng, len(eligible), k)
    return _splice(text, [eligible[j] for j in chosen])


class _PunctuationTable(dict):
    """A str.translate table over all of Unicode, filled as characters are met: punctuation maps to None."""

    def __missing__(self, codepoint: int) -> int | None:
        value = None if unicodedata.category(chr(codepoint))[0] == "P" else codepoint
        self[codepoint] = value
        return value


_PUNCTUATION = _PunctuationTable()


def _extra_whitespace(text: str, rate: float, rng: np.random.Generator) -> str:
    parts = text.split(" ")
    separators = [" "] * (len(parts) - 1)  # separators[j] is the j-th existing space
    k = _n_chosen(rate, len(separators))
    if k:
        for j, extra in zip(_choose(rng, len(separators), k), rng.integers(1, 3, size=k).tolist()):
            separators[j] = " " * (1 + extra)  # one or two extra spaces
    pieces = [parts[0]]
    for separator, part in zip(separators, parts[1:]):
        pieces.append(separator)
        pieces.append(part)
    lead, trail = (rng.random(2) < rate / 2).tolist()
    return (" " if lead else "") + "".join(pieces) + (" " if trail else "")


_APPLY: dict[str, Callable[[str, float, np.random.Generator], str]] = {
    "keyboard_typo": _char_edit(lambda word: _ASCII_LETTER.search(word, 1) is not None, _typo_positions, _typo),
    "char_delete": _char_edit(None, _delete_positions, _delete),
    "char_insert": _char_edit(None, _insert_positions, _insert),
    "char_swap": _char_edit(lambda word: len(set(word[1:-1])) > 1, _swap_positions, _swap),
    "case_change": _case_change,
    "extra_whitespace": _extra_whitespace,
}
