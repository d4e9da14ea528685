"""Chat messages for one normalised row: the spec's template with `{field}` placeholders.

Placeholders name row fields (`{problem}`, `{question}`) or derived ones: `{choices}` and
`{letters}` for multiple choice, `{instructions}` for code. Braces that name nothing, such as
`\\boxed{}`, are left alone.
"""

from __future__ import annotations

import re
from typing import Any

from benchmarks import lcb
from benchmarks.data import LETTERS
from benchmarks.registry import BenchSpec

_FIELD = re.compile(r"\{(\w+)\}")


def fields(spec: BenchSpec, row: dict[str, Any]) -> dict[str, str]:
    values = {k: v for k, v in row.items() if isinstance(v, str)}
    if spec.kind == "mcq":
        choices = row["choices"]
        values["choices"] = "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(choices))
        values["letters"] = LETTERS[: len(choices)]
    if spec.kind == "code":
        values["instructions"] = lcb.instructions(row)
    return values


def fill(template: str, values: dict[str, str]) -> str:
    return _FIELD.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def build_messages(spec: BenchSpec, row: dict[str, Any]) -> list[dict[str, str]]:
    """System (if the spec has one) and user message for `row`."""
    head = [{"role": "system", "content": spec.system.strip()}] if spec.system else []
    return head + [{"role": "user", "content": fill(spec.prompt, fields(spec, row))}]
