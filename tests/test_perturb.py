"""The robustness check's seeded text perturbations: determinism, per-text independence, what each edit may touch."""

from __future__ import annotations

import math
import re
import string
import unicodedata
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuneflow.perturb import KEYBOARD_NEIGHBOURS, PERTURBATIONS, perturb

CHAR_EDITS = ("keyboard_typo", "char_delete", "char_insert", "char_swap")
LONG = "The soundtrack was painfully repetitive, although the cinematography remained beautiful."
SHORT_ONLY = "it is not bad"

_SUBJECTS = ["The movie", "This film", "Her performance", "The soundtrack", "The screenplay", "Every scene",
             "The ending", "His direction", "The dialogue", "The cinematography"]
_PREDICATES = ["was surprisingly moving", "felt painfully repetitive", "is not bad at all", "never quite works",
               "remains oddly beautiful"]
CORPUS = [f"{s} {p}, and I'd watch it again{'!' if i % 3 else '.'}" for i, (s, p) in
          enumerate((s, p) for s in _SUBJECTS for p in _PREDICATES)]  # 50 sentences


def _is_punctuation(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")


def _geometric_neighbours() -> dict[str, set[str]]:
    """Keys next to each other on a staggered QWERTY board: same row +-1, or a row above/below less than a key away."""
    rows, offsets = ("qwertyuiop", "asdfghjkl", "zxcvbnm"), (0.0, 0.25, 0.75)
    where = {key: (r, c + offsets[r]) for r, row in enumerate(rows) for c, key in enumerate(row)}
    return {a: {b for b, (rb, xb) in where.items() if b != a and (
        (rb == ra and abs(xb - xa) == 1) or (abs(rb - ra) == 1 and abs(xb - xa) < 1))} for a, (ra, xa) in where.items()}


def test_the_perturbation_names():
    assert PERTURBATIONS == ("keyboard_typo", "char_delete", "char_insert", "char_swap", "case_change",
                             "punctuation_removal", "extra_whitespace")


@pytest.mark.parametrize("name", PERTURBATIONS)
def test_same_inputs_give_identical_outputs(name):
    assert perturb(CORPUS, name, 0.3, 7) == perturb(list(CORPUS), name, 0.3, 7)


@pytest.mark.parametrize("name", PERTURBATIONS)
def test_a_texts_perturbation_does_not_depend_on_its_position_or_the_other_texts(name):
    alone = [perturb([text], name, 0.3, 7)[0] for text in CORPUS]
    assert perturb(CORPUS, name, 0.3, 7) == alone
    assert perturb(CORPUS[::-1], name, 0.3, 7) == alone[::-1]
    assert perturb([CORPUS[5], LONG, CORPUS[5]], name, 0.3, 7) == [alone[5], perturb([LONG], name, 0.3, 7)[0], alone[5]]


@pytest.mark.parametrize("name", [name for name in PERTURBATIONS if name != "punctuation_removal"])
def test_a_different_seed_changes_some_outputs(name):
    first, second = perturb(CORPUS, name, 0.3, 0), perturb(CORPUS, name, 0.3, 1)
    assert sum(a != b for a, b in zip(first, second)) >= 5


def test_each_text_gets_its_own_generator_seeded_by_seed_perturbation_and_text(monkeypatch):
    seeds, default_rng = [], np.random.default_rng

    def recording(entropy):
        seeds.append(entropy)
        return default_rng(entropy)

    monkeypatch.setattr(np.random, "default_rng", recording)
    crcs = [zlib.crc32("Bonjour, café!".encode("utf-8")), zlib.crc32(LONG.encode("utf-8"))]
    for index, name in enumerate(PERTURBATIONS):
        seeds.clear()
        perturb(["Bonjour, café!", LONG], name, 0.5, 11)
        assert seeds == ([] if name == "punctuation_removal" else [[11, index, crc] for crc in crcs])


@pytest.mark.parametrize("name", CHAR_EDITS)
@pytest.mark.parametrize("seed", range(5))
def test_char_edits_change_long_words_and_leave_short_word_text_alone(name, seed):
    assert perturb([LONG], name, 0.3, seed)[0] != LONG
    assert perturb([LONG], name, 0.01, seed)[0] != LONG  # at least one eligible word, however small the rate
    assert perturb([SHORT_ONLY], name, 1.0, seed)[0] == SHORT_ONLY


def _changed_tokens(text: str, out: str) -> list[tuple[int, str, str]]:
    before, after = text.split(" "), out.split(" ")
    assert len(before) == len(after)
    return [(i, a, b) for i, (a, b) in enumerate(zip(before, after)) if a != b]


@pytest.mark.parametrize("name", CHAR_EDITS)
def test_char_edits_touch_only_long_latin_words_and_keep_everything_else(name):
    text = "It is not bad: the soundtrack (42 tracks) is painfully repetitive — Привет, отличный фильм!"
    for seed in range(20):
        out = perturb([text], name, 1.0, seed)[0]
        assert out.startswith("It is not bad: the ")
        for _, old, _ in _changed_tokens(text, out):
            assert old in ("soundtrack", "tracks)", "painfully", "repetitive")
        assert out.endswith(" — Привет, отличный фильм!")
        assert [c for c in out if not c.isalpha()] == [c for c in text if not c.isalpha()]


@pytest.mark.parametrize("name", CHAR_EDITS)
def test_char_edits_leave_word_fragments_beside_combining_marks_alone(name):
    text = unicodedata.normalize("NFD", "Résumé décidément")  # fragments "sume", "cide", "ment" touch a mark
    assert [perturb([text], name, 1.0, seed)[0] for seed in range(10)] == [text] * 10


@pytest.mark.parametrize("name", CHAR_EDITS)
def test_rate_is_the_fraction_of_eligible_words_edited(name):
    text = "apple banana cherry damson elderberry feijoa grapefruit huckleberry imbe jackfruit it is no"
    for seed in range(10):
        out = perturb([text], name, 0.5, seed)[0]
        assert len(_changed_tokens(text, out)) == 5
        assert len(_changed_tokens(text, perturb([text], name, 1.0, seed)[0])) == 10


@pytest.mark.parametrize("name", [name for name in PERTURBATIONS if name != "punctuation_removal"])
def test_rate_zero_changes_nothing(name):
    assert perturb(CORPUS, name, 0.0, 3) == CORPUS


@pytest.mark.parametrize("name", PERTURBATIONS)
def test_empty_text_stays_empty(name):
    assert perturb(["", LONG, ""], name, 0.5, 0)[::2] == ["", ""]
    assert perturb([], name, 0.5, 0) == []


def test_the_neighbour_map_is_the_qwerty_board():
    expected = _geometric_neighbours()
    assert {key: set(value) for key, value in KEYBOARD_NEIGHBOURS.items() if key.islower()} == expected
    assert {key: set(value) for key, value in KEYBOARD_NEIGHBOURS.items() if key.isupper()} == {
        key.upper(): {n.upper() for n in value} for key, value in expected.items()}


def test_keyboard_typos_are_keyboard_neighbours_of_the_same_case_never_the_first_letter():
    neighbours = _geometric_neighbours()
    texts = CORPUS + [LONG, "SHOUTING LOUDLY ABOUT Terrible Movies"]
    seen_upper = False
    for seed in range(10):
        for text, out in zip(texts, perturb(texts, "keyboard_typo", 0.5, seed)):
            changed = _changed_tokens(text, out)
            assert changed
            for _, old, new in changed:
                diffs = [j for j, (a, b) in enumerate(zip(old, new)) if a != b]
                assert len(old) == len(new) and len(diffs) == 1 and diffs[0] > 0
                a, b = old[diffs[0]], new[diffs[0]]
                assert b.lower() in neighbours[a.lower()]
                assert a.isupper() == b.isupper()
                seen_upper |= a.isupper()
    assert seen_upper


def test_char_delete_removes_one_inner_letter_per_edited_word():
    for seed in range(10):
        for text, out in zip(CORPUS + [LONG], perturb(CORPUS + [LONG], "char_delete", 0.5, seed)):
            changed = _changed_tokens(text, out)
            assert changed and len(out) == len(text) - len(changed)
            for _, old, new in changed:
                assert old[0] == new[0] and old[-1] == new[-1]
                assert any(old[:j] + old[j + 1:] == new for j in range(1, len(old) - 1))


def test_char_insert_adds_one_lowercase_letter_inside_each_edited_word():
    for seed in range(10):
        for text, out in zip(CORPUS + [LONG], perturb(CORPUS + [LONG], "char_insert", 0.5, seed)):
            changed = _changed_tokens(text, out)
            assert changed and len(out) == len(text) + len(changed)
            for _, old, new in changed:
                word = re.match(r"[A-Za-z]+", old).group()
                assert any(new == old[:j] + c + old[j:] for j in range(1, len(word)) for c in string.ascii_lowercase)


def test_char_swap_swaps_two_different_adjacent_inner_letters():
    for seed in range(10):
        for text, out in zip(CORPUS + [LONG], perturb(CORPUS + [LONG], "char_swap", 0.5, seed)):
            changed = _changed_tokens(text, out)
            assert changed and len(out) == len(text)
            for _, old, new in changed:
                word = re.match(r"[A-Za-z]+", old).group()
                diffs = [j for j, (a, b) in enumerate(zip(old, new)) if a != b]
                assert len(diffs) == 2 and diffs[1] == diffs[0] + 1
                assert 1 <= diffs[0] and diffs[1] <= len(word) - 2
                assert (new[diffs[0]], new[diffs[1]]) == (old[diffs[1]], old[diffs[0]])
    assert perturb(["beet feet"], "char_swap", 1.0, 0) == ["beet feet"]  # no inner pair that differs: unchanged


def test_case_change_upper_cases_or_title_cases_chosen_words_and_keeps_lower():
    text = "the movie was GREAT and I loved it"
    out = perturb([text], "case_change", 1.0, 0)[0]
    assert out == "THE MOVIE WAS Great AND I LOVED IT"  # "I" cannot change
    for seed in range(10):
        for text, out in zip(CORPUS, perturb(CORPUS, "case_change", 0.3, seed)):
            assert out != text and out.lower() == text.lower()
            for _, old, new in _changed_tokens(text, out):
                assert new.isupper() or new.istitle()


@pytest.mark.parametrize("text", ["Straße", "ΟΔΟΣ'α", "ας'β", "ΣΑΣ", "ǅemal", "İstanbul"])
def test_case_change_keeps_lower_where_case_mappings_are_not_one_to_one(text):
    for seed in range(5):
        assert perturb([text], "case_change", 1.0, seed)[0].lower() == text.lower()


def test_case_change_leaves_numerals_that_have_case_alone():
    assert perturb(["x² ⅻ Ⅷ"], "case_change", 1.0, 0) == ["x² ⅻ Ⅷ"]


def test_punctuation_removal_removes_all_punctuation_and_keeps_letters_digits_and_symbols():
    text = "«Café», naïve—Привет! ¿Qué? 日本語。 Price: $5 + 3 = 8… (٣ apples) 'quoted' \"x\" a_b @home #tag"
    out = perturb([text], "punctuation_removal", 0.0, 0)[0]
    assert not any(_is_punctuation(c) for c in out)
    assert out == "".join(c for c in text if not _is_punctuation(c))
    assert [c for c in out if c.isalnum()] == [c for c in text if c.isalnum()]
    for word in ("Café", "naïve", "Привет", "Qué", "日本語", "٣", "$5", "+", "="):
        assert word in out
    assert perturb([text], "punctuation_removal", 1.0, 9) == [out]  # rate and seed are ignored


def test_extra_whitespace_adds_spaces_without_changing_the_words():
    text = "one two three four five six seven eight nine ten eleven"  # ten spaces
    for seed in range(10):
        out = perturb([text], "extra_whitespace", 0.5, seed)[0]
        assert out.split() == text.split() and out != text
        gaps = [len(gap) for gap in re.findall(" +", out.strip(" "))]
        assert len(gaps) == 10 and sum(g > 1 for g in gaps) == 5 and max(gaps) <= 3
    for text, out in zip(CORPUS, perturb(CORPUS, "extra_whitespace", 0.1, 0)):
        assert out.split() == text.split() and out != text


def test_unknown_perturbation_raises_naming_it_and_the_known_ones():
    with pytest.raises(ValueError) as error:
        perturb(["text"], "back_translation", 0.1, 0)
    assert "back_translation" in str(error.value)
    assert all(name in str(error.value) for name in PERTURBATIONS)


@pytest.mark.parametrize("rate", [-0.1, 1.5, math.nan, "0.1", None])
def test_a_rate_outside_zero_to_one_raises(rate):
    with pytest.raises(ValueError, match="rate"):
        perturb(["text"], "char_delete", rate, 0)


def test_a_negative_seed_raises():
    with pytest.raises(ValueError, match="seed"):
        perturb(["text"], "char_delete", 0.1, -1)


_TRICKY = st.text(alphabet=st.sampled_from(list("abcdeXYZ ßΣσς'.,-!\u0301İıǅ²9_Пр日\t\n")), max_size=40)


@settings(deadline=None, max_examples=300)
@given(text=st.one_of(st.text(), _TRICKY), other=st.text(max_size=20), name=st.sampled_from(PERTURBATIONS),
       rate=st.floats(0, 1), seed=st.integers(0, 2**63))
def test_any_text_gives_a_deterministic_str_that_keeps_what_its_perturbation_keeps(text, other, name, rate, seed):
    (out,) = perturb([text], name, rate, seed)
    assert isinstance(out, str)
    assert perturb([other, text], name, rate, seed)[1] == out
    if name == "case_change":
        assert out.lower() == text.lower()
    elif name == "extra_whitespace":
        assert out.split() == text.split()
    elif name == "punctuation_removal":
        assert out == "".join(c for c in text if not _is_punctuation(c))
    else:  # the character edits change letters only
        assert [c for c in out if not c.isalpha()] == [c for c in text if not c.isalpha()]
    if rate == 0 and name != "punctuation_removal":
        assert out == text
