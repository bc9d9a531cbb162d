"""Answer extraction and comparison (rlhf_jax.answers) on hand-written cases, adversarial ones
included: several `####`, thousands commas, negatives, decimals, no answer, a Unicode minus."""

from fractions import Fraction

import pytest

from rlhf_jax.answers import (
    boxed_answer,
    lenient_answer,
    normalise_number,
    reference_answer,
    same_answer,
    strict_answer,
)


@pytest.mark.parametrize(
    "text,want",
    [
        ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
        ("#### 1,234", "1234"),
        ("#### -12", "-12"),
        ("#### \u22125", "-5"),  # U+2212 MINUS SIGN
        ("#### 2.50", "2.50"),
        ("#### 72.", "72."),
        # several `####` lines: the last one is the answer (a model correcting itself)
        ("#### 5\nwait, that is wrong.\n#### 6", "6"),
        ("#### 5 and then #### 8 more text", "8"),
        ("no answer line, the answer is 7", None),
        ("#### ", None),
        ("####", None),
        ("#### .", None),  # an answer line with no digit in it
        ("#### $40", None),  # verl's pattern needs the number right after "#### "
        ("####42", None),  # and exactly one space (verl's convention)
        ("", None),
    ],
)
def test_strict_answer(text, want):
    assert strict_answer(text) == want


@pytest.mark.parametrize(
    "text,want",
    [
        ("3 apples and 4 pears make 7", "7"),
        ("the total is 1,234,567 dollars.", "1234567"),
        ("it drops to -4 degrees", "-4"),
        ("it drops to \u22124 degrees", "-4"),
        ("pi is about 3.14.", "3.14"),
        ("costs $2.50 each", "2.50"),
        ("ages 3-5", "5"),  # a range: the hyphen is no minus sign
        ("costs 5 \u2014 7 less", "7"),  # an em dash is no minus sign
        ("it drops to \uff0d4", "-4"),  # fullwidth hyphen-minus
        ("half is .5", ".5"),
        ("no numbers here", None),
        ("#### 9\nthen 10", "10"),
        ("", None),
    ],
)
def test_lenient_answer(text, want):
    assert lenient_answer(text) == want


@pytest.mark.parametrize(
    "text,want",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{ 2 }", "2"),
        ("\\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
        ("\\boxed{\\text{a {b} c}} done", "\\text{a {b} c}"),
        ("\\boxed{5} and finally \\boxed{\\frac{1}{", None),  # the last box is cut off
        ("no box 42", None),
        ("\\boxed{}", ""),
    ],
)
def test_boxed_answer(text, want):
    assert boxed_answer(text) == want


@pytest.mark.parametrize(
    "s,want",
    [
        ("72", Fraction(72)),
        ("1,234", Fraction(1234)),
        ("$1,000", Fraction(1000)),
        ("\\$5", Fraction(5)),
        ("72.0", Fraction(72)),
        ("72.", Fraction(72)),
        ("-3", Fraction(-3)),
        ("\u22123", Fraction(-3)),
        ("0.1", Fraction(1, 10)),
        (".25", Fraction(1, 4)),
        ("3/4", Fraction(3, 4)),
        ("-3/4", Fraction(-3, 4)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("\\dfrac{6}{8}", Fraction(3, 4)),
        ("-\\frac{3}{4}", Fraction(-3, 4)),
        ("\\frac{-3}{4}", Fraction(-3, 4)),
        ("-\\frac{-3}{4}", Fraction(3, 4)),
        ("1{,}000", Fraction(1000)),
        (" 42 ", Fraction(42)),
        ("3/0", None),
        ("abc", None),
        ("", None),
        (".", None),
        ("-", None),
        ("1.2.3", None),
        ("nan", None),
        ("inf", None),
        (None, None),
    ],
)
def test_normalise_number(s, want):
    assert normalise_number(s) == want


@pytest.mark.parametrize(
    "a,b,want",
    [
        ("1000", "1,000", True),
        ("72.0", "72", True),
        ("0.75", "3/4", True),
        ("\\frac{3}{4}", "0.75", True),
        ("-5", "\u22125", True),
        ("0.1", "0.10000001", False),  # exact, not within a tolerance
        ("7", "8", False),
        (" yes ", "yes", True),  # not numbers: stripped strings
        ("yes", "no", False),
        (None, "7", False),
        ("7", None, False),
        (None, None, False),
    ],
)
def test_same_answer(a, b, want):
    assert same_answer(a, b) is want


def test_reference_answer():
    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n48+24 = <<48+24=72>>72\n#### 72"
    assert reference_answer(solution) == "72"
    assert reference_answer("... #### 1,200 ") == "1200"
    assert reference_answer("#### 1\n#### -3") == "-3"
    with pytest.raises(ValueError, match="no '####' line"):
        reference_answer("the answer is 5")
    with pytest.raises(ValueError, match="nothing after its last '####'"):
        reference_answer("#### 5\n####  ")


def test_reference_answers_match_strict_answers_of_the_same_text():
    # a GSM8K reference solution scored as a completion earns its own reference answer
    for solution in ["so 3\n#### 3", "#### 1,234", "x\n#### -7"]:
        assert same_answer(strict_answer(solution), reference_answer(solution))


def test_a_long_answer_line_without_digits_is_no_answer_and_fast():
    # ".,.,..." after "#### " many times over: no digit, no answer (and no slow backtracking)
    text = ("#### " + ".," * 20_000 + "\n") * 5
    assert strict_answer(text) is None and lenient_answer(text) is None
