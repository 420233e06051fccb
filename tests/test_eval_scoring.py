"""Scorers of the eval harness on hand-written tricky outputs."""

import pytest

from retrieval_attention.eval.scoring import (
    first_int_match,
    kv_word_match,
    normalize_output,
    number_exact,
    numbers_in,
    same_output,
    string_match_all,
    string_match_part,
)


def test_normalize_output():
    assert normalize_output(None) == ""
    assert normalize_output("  a\x00b\tc \n") == "a\nb\nc"  # RULER: control characters -> newlines
    assert normalize_output("７２８４５１９") == "7284519"  # full-width digits (NFKC)
    assert normalize_output("7,284,519 and 1\u00a0234\u00a0567") == "7284519 and 1234567"
    assert normalize_output("7\u202f284\u202f519") == "7284519"
    # lists are not merged: a space after the comma, or a group that is not three digits
    assert normalize_output("1234567, 2345678") == "1234567, 2345678"
    assert normalize_output("1234567,2345678") == "1234567,2345678"
    assert numbers_in("**7,284,519**.") == ["7284519"]


@pytest.mark.parametrize(
    "output, score",
    [
        (" 7284519.", 1.0),
        ("The special magic number for abandon-patience is: **7284519**", 1.0),
        ("7,284,519", 1.0),
        ("７２８４５１９", 1.0),
        ("The number is 7284519. In 1998 it was 7284519 too.", 1.0),  # repeats and short numbers are fine
        ("72845190", 0.0),  # extended
        ("728451", 0.0),  # truncated
        ("7284518", 0.0),  # wrong digit
        ("7284519 or 1234567", 0.0),  # competing candidate of the same length
        ("seven million two hundred eighty-four thousand five hundred nineteen", 0.0),
        ("", 0.0),
        ("7 284 519", 0.0),  # plain spaces are not thousands separators (could be three numbers)
    ],
)
def test_number_exact(output, score):
    assert number_exact(output, ["7284519"]) == score


def test_number_exact_several_values():
    assert number_exact("1111111 and 2222222", ["1111111", "2222222"]) == 1.0
    assert number_exact("1111111", ["1111111", "2222222"]) == 0.5
    assert number_exact("1111111, 3333333", ["1111111", "2222222"]) == 0.0


def test_string_match_all_and_part():
    answers = ["1111111", "2222222", "3333333", "4444444"]
    assert string_match_all("1111111, 2,222,222 and 3333333.", answers) == 0.75
    assert string_match_all("none here", answers) == 0.0
    # RULER is case-insensitive substring matching
    assert string_match_all("they are: abcde, FGHIJ", ["ABCDE", "fghij"]) == 1.0
    assert string_match_all("apple", ["apple", "pear"]) == 0.5
    assert string_match_part("pear!", ["apple", "pear"]) == 1.0
    assert string_match_part("plum", ["apple", "pear"]) == 0.0
    with pytest.raises(ValueError):
        string_match_all("x", [])


@pytest.mark.parametrize(
    "output, score",
    [
        (" 3409875124.", 1.0),
        ("3,409,875,124", 1.0),
        ("The sequence of digits is 3409875124. Remember it.", 1.0),
        ("34098751240", 0.0),
        ("1 and 3409875124", 0.0),  # ∞-Bench: only the first integer counts
        ("", 0.0),
    ],
)
def test_first_int_match(output, score):
    assert first_int_match(output, ["3409875124"]) == score


def test_first_int_match_keeps_leading_zeros():
    assert first_int_match("0000654411", ["0000654411"]) == 1.0
    assert first_int_match("654411", ["0000654411"]) == 0.0


KEY = "bb4d2b46-8fdf-423b-b25c-9e6b64e3b8d7"
VALUE = "ca75a11a-6306-42a2-be62-648d87f767c8"


@pytest.mark.parametrize(
    "output, score",
    [
        (VALUE, 1.0),
        (f' "{VALUE}".', 1.0),
        (f"The value is `{VALUE}`", 1.0),
        (f"**{VALUE}**", 1.0),
        (f"{{{KEY}: {VALUE}}}", 1.0),
        (f"({VALUE.upper()})", 1.0),
        (VALUE[:-1], 0.0),  # truncated
        (VALUE + "0", 0.0),  # extended
        (KEY, 0.0),  # the key instead of the value
        ("", 0.0),
    ],
)
def test_kv_word_match(output, score):
    assert kv_word_match(output, [VALUE]) == score


def test_same_output():
    assert same_output(" 123\n", "123")
    assert same_output("a  b", "a b")
    assert not same_output("123", "124")
    assert same_output(None, "")
