"""Conjugate prompting's pure parts: the deterministic transforms (exact inverses, property-based), their
documented examples, the translation prompt and the spec."""
from __future__ import annotations

import re
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from steerserve.steering import conjugate as C


@given(st.text())
def test_leetspeak_round_trips_every_string(text):
    assert C.from_leetspeak(C.to_leetspeak(text)) == text


@given(st.text())
def test_piglatin_round_trips_every_string(text):
    assert C.from_piglatin(C.to_piglatin(text)) == text


@given(st.text(alphabet=st.characters(codec="ascii", exclude_characters="0134579\\")))
def test_leetspeak_escapes_nothing_without_digits_or_backslashes(text):
    encoded = C.to_leetspeak(text)
    assert "\\" not in encoded and not any(c in encoded for c in "aeiost")


@given(st.text(alphabet=st.sampled_from(list("abcdefghijklmnopqrstuvwxyzABCXYZ .,!?'\n"))))
def test_piglatin_moves_letters_and_keeps_everything_else(text):
    encoded = C.to_piglatin(text)
    words = re.findall("[A-Za-z]+", text)
    assert "\\" not in encoded and encoded.count("-") == len(words)  # nothing to escape; one hyphen per word
    assert Counter(encoded) == Counter(text) + Counter("-ay" * len(words))  # letters move, "-ay" is added


@pytest.mark.parametrize("plain, pig", [
    ("hello", "ello-hay"), ("string", "ing-stray"), ("apple", "apple-ay"), ("rhythm", "-rhythmay"),
    ("Hello, World!", "ello-Hay, orld-Way!"), ("well-known", "ell-way\\-own-knay"), ("way", "ay-way"),
])
def test_piglatin_examples(plain, pig):
    assert C.to_piglatin(plain) == pig and C.from_piglatin(pig) == plain


@pytest.mark.parametrize("plain, leet", [
    ("this is a test", "7h15 15 4 7357"), ("What is 7 plus 12?", "Wh47 15 \\7 plu5 \\12?"), ("a\\b", "4\\\\b"),
])
def test_leetspeak_examples(plain, leet):
    assert C.to_leetspeak(plain) == leet and C.from_leetspeak(leet) == plain


def test_translation_prompt_is_the_documented_one():
    assert C.translation_prompt("Hi there", "en", "fr") == (
        "Translate the following text from English into French. Reply with the translation only, without any "
        "notes or explanations.\n\nHi there")


@pytest.mark.parametrize("raw", [{"language": "en"}, {"language": "klingon"}, {"language": "fr", "extra": 1},
                                 {"language": "fr", "translator": ""}, {"language": "fr", "translate_back": "yes"}])
def test_spec_refuses(raw):
    with pytest.raises(ValidationError):
        C.ConjugateSpec.model_validate(raw)
