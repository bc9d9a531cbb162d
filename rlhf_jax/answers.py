"""Final answers read out of model text and compared: the parsing under the answer-checking
reward functions (`rlhf_jax.rewards`) and `rlhf-jax eval`. Pure host Python.

Three extractors, from strictest to loosest:
- `strict_answer`: GSM8K's `#### N` line (also a format check: the model must write it).
- `boxed_answer`: the last `\\boxed{...}` (MATH-style answers; nested braces allowed).
- `lenient_answer`: the last number anywhere in the text.

`same_answer` compares two answers as exact rationals when both parse as numbers
(`normalise_number`), so "1,000", "$1000", "1000.0" and "1000." are all the same answer, and as
stripped strings otherwise.
"""

from __future__ import annotations

import re
from fractions import Fraction

# U+2212 MINUS SIGN (and the small and fullwidth hyphen-minus) read as "-": a model that writes
# "−5" means -5. Dashes are not minus signs ("5 — 7 less" is not -7).
_MINUSES = str.maketrans({"\u2212": "-", "\ufe63": "-", "\uff0d": "-"})

# verl's GSM8K reward (verl/utils/reward_score/gsm8k.py, method "strict") reads `#### ` (four
# hashes, one space) followed by `-?[0-9.,]+`, takes the LAST such match, and drops commas (its
# pattern admits no "$": "#### $40" is no answer). We follow that convention, with three
# differences, each on purpose:
# - the whole text is searched (verl looks at its last 300 characters only, to bound regex
#   time; a long answer line after `####` would then lose its `####`),
# - the match must contain a digit (verl's pattern also matches "#### ." or "#### ,", an
#   answer line with no number in it, which we count as no answer),
# - a Unicode minus sign counts as "-".
# Why the last `####` counts when there are several: the model's final statement is its answer
# (a model that restates or corrects itself ends with the answer it means), and it is the
# convention verl applies.
_STRICT = re.compile(r"#### (-?[.,]*[0-9][0-9.,]*)")  # (written so that matching is linear)

# A number: thousands groups ("1,234,567") or plain digits, an optional decimal part, or a bare
# decimal (".5"); a "-" counts only where it is not a hyphen between words or a range ("3-5").
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+|\d+")
_PLAIN = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_RATIO = re.compile(r"([-+]{0,2})(\d+)/(\d+)")
_FRAC = re.compile(r"(-?)\\[dt]?frac\{(-?\d+)\}\{(\d+)\}")
_BOXED = "\\boxed{"


def strict_answer(text: str) -> str | None:
    """The answer on the last `#### N` line (verl's GSM8K convention, see above), commas
    dropped, or None when there is no such line (or nothing numeric after `#### `)."""
    found = _STRICT.findall(text.translate(_MINUSES))
    if not found:
        return None
    return found[-1].replace(",", "")


def lenient_answer(text: str) -> str | None:
    """The last number in the text (commas dropped), or None when there is none."""
    found = _NUMBER.findall(text.translate(_MINUSES))
    return found[-1].replace(",", "") if found else None


def boxed_answer(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` (nested braces kept whole, surrounding spaces
    stripped), or None when there is none or the last one is never closed (a response cut off
    inside its answer has not given one)."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(_BOXED)
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i].strip()
    return None


def normalise_number(s: str | None) -> Fraction | None:
    """`s` as an exact rational, or None when it is not a number. Accepts thousands commas,
    "$" (also LaTeX's "\\$"), a trailing "." or ".0", a sign (also a Unicode minus), simple
    fractions "3/4" and LaTeX `\\frac{3}{4}` (also `\\dfrac`, `\\tfrac`, a leading "-")."""
    if s is None:
        return None
    t = s.translate(_MINUSES).strip().replace("{,}", ",").replace("\\$", "$")
    t = t.replace("$", "").replace(",", "").replace(" ", "")
    if t.startswith("{") and t.endswith("}"):
        t = t[1:-1]
    if m := _FRAC.fullmatch(t):
        sign, num, den = m.groups()
        t = f"{sign}{num}/{den}"
    if m := _RATIO.fullmatch(t):
        sign, num, den = m.groups()
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if sign.count("-") % 2 else value
    if _PLAIN.fullmatch(t):
        return Fraction(t.rstrip(".") if t.endswith(".") else t)
    return None


def same_answer(a: str | None, b: str | None) -> bool:
    """Whether two answers agree: equal as numbers when both parse (`normalise_number`), else
    equal as stripped strings. No answer (None) never agrees with anything."""
    if a is None or b is None:
        return False
    x, y = normalise_number(a), normalise_number(b)
    if x is not None and y is not None:
        return x == y
    return a.strip() == b.strip()


def reference_answer(gsm8k_solution: str) -> str:
    """The reference answer of a GSM8K solution: what follows its last `####`, stripped, commas
    dropped ("... #### 1,200" -> "1200"). A ValueError when it has no `####` or nothing after."""
    head, sep, tail = gsm8k_solution.rpartition("####")
    answer = tail.strip().replace(",", "")
    if not sep or not answer:
        what = "no '####' line" if not sep else "nothing after its last '####'"
        raise ValueError(f"a GSM8K solution has {what}: {gsm8k_solution[-80:]!r}")
    return answer
