"""Final-answer extraction and exact-match grading shared by training and evaluation.

The last `\\boxed{...}` (balanced braces) after any `</think>` is the answer. Integer and plain
numeric answers compare numerically; anything else compares as whitespace-stripped text.
`opd train`'s held-out accuracy and `opd eval --bench toy-arith` both call `grade`.
"""

from __future__ import annotations


def strip_thinking(text: str) -> str:
    """Drop everything up to the last `</think>` (a reasoning model's hidden part)."""
    marker = "</think>"
    return text.rsplit(marker, 1)[1] if marker in text else text


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` with balanced braces, or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j].strip()
        start = text.rfind("\\boxed{", 0, start)  # unbalanced: try an earlier one
    return None


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").replace(" ", ""))
    except ValueError:
        return None


def grade(response: str, answer: str) -> bool:
    """True when the response's final boxed answer equals `answer`."""
    got = last_boxed(strip_thinking(response))
    if got is None:
        return False
    a, b = _as_number(got), _as_number(str(answer))
    if a is not None and b is not None:
        return a == b
    return got.replace(" ", "") == str(answer).replace(" ", "")
