"""Answer parsing and scoring (pure functions, stdlib only).

Every scorer takes the model's raw output and the list of expected answers and returns a score in
``[0, 1]``. Outputs first go through :func:`normalize_output`:

* RULER's post-processing (control characters become newlines, surrounding whitespace is stripped);
* Unicode NFKC (full-width digits and letters become ASCII);
* thousands separators inside numbers are removed (``7,284,519`` / ``7 284 519`` with thin or
  no-break spaces / ``7_284_519`` become ``7284519``); a comma followed by a space, or by a group that
  is not exactly three digits, is kept, so lists such as ``1234567, 2345678`` stay two numbers.

Scorers:

* :func:`string_match_all` - RULER's metric for all its synthetic tasks: the fraction of expected items
  found (case-insensitive substring) in the output.
* :func:`string_match_part` - RULER's QA metric: 1 if any expected item is found.
* :func:`number_exact` - the single needle: the numbers in the output that have as many digits as the
  needle's value must all be exactly that value (a wrong value, a truncated or extended number, or a second
  competing candidate scores 0).
* :func:`first_int_match` - ∞-Bench ``passkey``/``number_string``: the first integer of the output.
* :func:`kv_word_match` - ∞-Bench ``kv_retrieval``: the value is one of the output's words after
  punctuation is replaced by spaces (∞-Bench's characters plus markdown backticks, asterisks, brackets).
"""

from __future__ import annotations

import re
import unicodedata

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# a separator between digit groups: the next group has exactly three digits
_THOUSANDS = re.compile(r"(?<=\d)[,_\u00a0\u2009\u202f'](?=\d{3}(?!\d))")
_MARKUP = re.compile(r"[*`]")
_INT = re.compile(r"\d+")
# ∞-Bench's kv_retrieval split characters, plus markdown / bracket characters models like to wrap values in
_KV_SPLIT = "\n:\"'.,?!{}`*()[]<>;|"


def normalize_output(text: str | None) -> str:
    """RULER post-processing + NFKC + thousands separators removed (see the module docstring)."""
    if not text:
        return ""
    text = _THOUSANDS.sub("", str(text))  # before NFKC, which turns no-break/thin spaces into plain spaces
    text = unicodedata.normalize("NFKC", text)
    text = _CONTROL.sub("\n", text).strip()
    return _THOUSANDS.sub("", text)  # again for separators NFKC produced (full-width commas, digits)


def numbers_in(text: str) -> list[str]:
    """The integers (digit runs) in the normalised output, in order, markdown emphasis removed."""
    return _INT.findall(_MARKUP.sub("", normalize_output(text)))


def string_match_all(output: str, answers: list[str]) -> float:
    """RULER ``string_match_all``: fraction of ``answers`` contained (case-insensitive) in ``output``."""
    if not answers:
        raise ValueError("string_match_all needs at least one expected answer")
    pred = normalize_output(output).lower()
    return sum(1.0 for a in answers if str(a).lower() in pred) / len(answers)


def string_match_part(output: str, answers: list[str]) -> float:
    """RULER ``string_match_part``: 1 if any of ``answers`` is contained (case-insensitive) in ``output``."""
    if not answers:
        raise ValueError("string_match_part needs at least one expected answer")
    pred = normalize_output(output).lower()
    return 1.0 if any(str(a).lower() in pred for a in answers) else 0.0


def number_exact(output: str, answers: list[str]) -> float:
    """1 if the output states the expected number and no other number of the same length, else 0.

    With several expected numbers (all must be stated), the score is the fraction stated, and any
    same-length number that is not expected makes the score 0.
    """
    if not answers:
        raise ValueError("number_exact needs at least one expected answer")
    expected = {str(a) for a in answers}
    lengths = {len(a) for a in expected}
    candidates = {n for n in numbers_in(output) if len(n) in lengths}
    if not candidates or candidates - expected:
        return 0.0
    return len(candidates & expected) / len(expected)


def first_int_match(output: str, answers: list[str]) -> float:
    """∞-Bench ``get_score_one_number_string``/``passkey``: the first integer of the output is the answer."""
    if not answers:
        raise ValueError("first_int_match needs an expected answer")
    nums = numbers_in(output)
    return 1.0 if nums and nums[0] == str(answers[0]) else 0.0


def kv_word_match(output: str, answers: list[str]) -> float:
    """∞-Bench ``get_score_one_kv_retrieval``: the expected value is one of the output's words."""
    if not answers:
        raise ValueError("kv_word_match needs an expected answer")
    pred = normalize_output(output)
    for c in _KV_SPLIT:
        pred = pred.replace(c, " ")
    words = {w.lower() for w in pred.split()}
    return 1.0 if str(answers[0]).lower() in words else 0.0


SCORERS = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "number_exact": number_exact,
    "first_int_match": first_int_match,
    "kv_word_match": kv_word_match,
}


def same_output(a: str | None, b: str | None) -> bool:
    """Agreement of two methods' answers: identical text after whitespace normalisation."""
    return " ".join((a or "").split()) == " ".join((b or "").split())
