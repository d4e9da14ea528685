"""Multiple-choice answers: the chosen letter after the thinking part.

In order: the last `\\boxed{X}` (also `\\boxed{\\text{X}}`, `\\boxed{(X)}`), else the last
"Answer: X" / "answer is (X)", else a final line that is only a letter (`C`, `(C)`, `**C**`).
Letters outside the row's choices do not count. The correct letter is stored in the row (after
the recorded shuffle).
"""

from __future__ import annotations

import re
from typing import Any

from benchmarks.data import LETTERS
from benchmarks.scorers import ScoreResult, is_unfinished
from opdcli.grading import last_boxed, strip_thinking

_BOX_LETTER = re.compile(r"^\s*(?:\\text\{)?\s*\(?([A-J])\)?\s*\}?\s*$")
_ANSWER = re.compile(r"(?i:answer)\s*(?:(?i:is))?\s*[:：]?\s*\**\s*\(?\s*([A-J])\b\)?")
_LAST_LINE = re.compile(r"^[\s*_(\[]*([A-J])[\s*_)\].]*$")


def extract_letter(text: str, n_choices: int = 4) -> str | None:
    valid = LETTERS[:n_choices]
    body = strip_thinking(text)
    box = last_boxed(body)
    if box is not None and (m := _BOX_LETTER.match(box)) and m.group(1) in valid:
        return m.group(1)
    hits = [m.group(1) for m in _ANSWER.finditer(body)]
    hits = [h for h in hits if h in valid]
    if hits:
        return hits[-1]
    lines = [line for line in body.strip().splitlines() if line.strip()]
    if lines and (m := _LAST_LINE.match(lines[-1])) and m.group(1) in valid:
        return m.group(1)
    return None


def score_mcq(text: str, row: dict[str, Any]) -> ScoreResult:
    if is_unfinished(text):
        return ScoreResult(False, None, "unfinished")
    letter = extract_letter(text, len(row.get("choices", "ABCD")))
    if letter is None:
        return ScoreResult(False, None, "no_answer")
    return ScoreResult(letter == row["answer"], letter)
