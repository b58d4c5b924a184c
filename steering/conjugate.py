"""Conjugate prompting (Kotha et al. 2024, docs/methods/conjugate.md): y = s⁻¹(M(s(P))). Spec, the translation prompt, and
the two deterministic transforms with their exact inverses.

s is either a translation into another language by a translator model (the prompt below, on the served model
by default), or one of two character-level transforms that need no model call:

- leetspeak: lower-case a e i o s t become 4 3 1 0 5 7. So that the inverse is exact on every input, characters
  the inverse would misread are escaped with a backslash: the digits 4 3 1 0 5 7 and the backslash itself.
  `from_leetspeak(to_leetspeak(s)) == s` for every string s. Applied to a model's free-form answer, the
  inverse reads every unescaped 4 3 1 0 5 7 as a letter (a number in the answer turns into letters).
- piglatin (hyphenated, invertible): a word is a maximal run of ASCII letters. A word that starts with a
  consonant cluster C (everything before its first vowel a e i o u, either case) and continues with R becomes
  `R-Cay` ("hello" -> "ello-hay", "string" -> "ing-stray", "rhythm" -> "-rhythmay"); a word that starts with a
  vowel becomes `word-ay` ("apple" -> "apple-ay"). Case is kept as it is. Literal hyphens and backslashes are
  escaped with a backslash, so `from_piglatin(to_piglatin(s)) == s` for every string s.

This is a known safety bypass (translation moves a prompt away from the fine-tuning distribution); the server
lets a tenant use it only when an admin has allowed it.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, StrictBool

from .schema import Strict

DETERMINISTIC = ("leetspeak", "piglatin")
SOURCE_LANGUAGE = "en"

# The languages a translation can target (ISO 639-1 code -> the name used in the translation prompt).
LANGUAGES: dict[str, str] = {
    "ar": "Arabic", "bn": "Bengali", "cs": "Czech", "da": "Danish", "de": "German", "el": "Greek", "en": "English",
    "es": "Spanish", "fi": "Finnish", "fr": "French", "he": "Hebrew", "hi": "Hindi", "hu": "Hungarian",
    "id": "Indonesian", "it": "Italian", "ja": "Japanese", "ko": "Korean", "ml": "Malayalam", "nl": "Dutch",
    "no": "Norwegian", "pl": "Polish", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sv": "Swedish",
    "sw": "Swahili", "th": "Thai", "tr": "Turkish", "uk": "Ukrainian", "vi": "Vietnamese", "zh": "Chinese",
}

TARGETS = tuple(code for code in LANGUAGES if code != SOURCE_LANGUAGE) + DETERMINISTIC
Target = Literal.__getitem__(TARGETS)  # the JSON schema lists them

# The one translation prompt, sent to the translator model as a user message (through its chat template when
# it has one, as plain text followed by a blank line otherwise), greedy.
TRANSLATION_PROMPT = ("Translate the following text from {source} into {target}. Reply with the translation only, "
                      "without any notes or explanations.\n\n{text}")


class ConjugateSpec(Strict):
    language: Target = Field(description="Target: a language code or one of the deterministic transforms "  # type: ignore[valid-type]
                                         "'leetspeak', 'piglatin'.")
    translator: str = Field("self", min_length=1, max_length=256,
                            description="The model that translates: 'self' (the served model) or a served model's name.")
    translate_back: StrictBool = Field(True, description="Translate the answer back into English.")


def translation_prompt(text: str, source: str, target: str) -> str:
    """The translator's instruction for `text` from language code `source` to `target`."""
    return TRANSLATION_PROMPT.format(source=LANGUAGES[source], target=LANGUAGES[target], text=text)


# --- leetspeak -----------------------------------------------------------------------------------------------------

_LEET = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"}
_UNLEET = {v: k for k, v in _LEET.items()}
_LEET_ESCAPED = set(_UNLEET) | {"\\"}


def to_leetspeak(text: str) -> str:
    return "".join("\\" + c if c in _LEET_ESCAPED else _LEET.get(c, c) for c in text)


def from_leetspeak(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        out.append(_UNLEET.get(c, c))
        i += 1
    return "".join(out)


# --- pig latin -----------------------------------------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z]+")
_VOWEL = re.compile(r"[AEIOUaeiou]")
_PIG_WORD = re.compile(r"([A-Za-z]*)-([A-Za-z]*)ay(?![A-Za-z])")


def _pig(word: str) -> str:
    vowel = _VOWEL.search(word)
    cut = vowel.start() if vowel else len(word)
    return f"{word[cut:]}-{word[:cut]}ay"


def to_piglatin(text: str) -> str:
    out, pos = [], 0
    for m in _WORD.finditer(text):
        out.append(_escape_pig(text[pos:m.start()]))
        out.append(_pig(m.group()))
        pos = m.end()
    out.append(_escape_pig(text[pos:]))
    return "".join(out)


def _escape_pig(text: str) -> str:
    return re.sub(r"([-\\])", r"\\\1", text)


def from_piglatin(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        at_word_start = i == 0 or not (text[i - 1].isascii() and text[i - 1].isalpha())
        m = _PIG_WORD.match(text, i) if at_word_start else None
        if m and (m.group(1) or m.group(2)):
            out.append(m.group(2) + m.group(1))
            i = m.end()
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


TRANSFORMS = {"leetspeak": (to_leetspeak, from_leetspeak), "piglatin": (to_piglatin, from_piglatin)}


def transform(language: Literal["leetspeak", "piglatin"], text: str, inverse: bool = False) -> str:
    forward, backward = TRANSFORMS[language]
    return (backward if inverse else forward)(text)
