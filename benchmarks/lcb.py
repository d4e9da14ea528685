"""LiveCodeBench rows: shard selection, safe decoding of the tests, prompt text, code extraction.

Upstream rows (`livecodebench/code_generation_lite`, raw shards `test.jsonl` ... `test6.jsonl`)
carry `public_test_cases` as a JSON string and `private_test_cases` either as a JSON string or
as base64(zlib(pickle(json string))). Unpickling downloaded data can execute code, so
`decode_tests` first tries JSON, and otherwise unpickles with `SafeUnpickler`, whose
`find_class` admits only the builtins `str`, `list` and `dict` (the payload is a plain string;
plain strings, lists and dicts need no class lookup at all). Anything else raises.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import re
import zlib
from typing import Any

from opdcli.errors import DataError
from opdcli.grading import strip_thinking

_SAFE_GLOBALS = {("builtins", "str"), ("builtins", "list"), ("builtins", "dict")}
_RELEASE = re.compile(r"^release_v(\d+)$")
_SINGLE = re.compile(r"^v(\d+)$")
_RANGE = re.compile(r"^v(\d+)_v(\d+)$")

STDIN_INSTRUCTIONS = (
    "Read the inputs from stdin solve the problem and write the answer to stdout (do not directly "
    "test on the sample inputs). Enclose your code within delimiters as follows. Ensure that when "
    "the python program runs, it reads the inputs, runs the algorithm and writes output to STDOUT.\n"
    "```python\n# YOUR CODE HERE\n```"
)
STARTER_INSTRUCTIONS = (
    "You will use the following starter code to write the solution to the problem and enclose "
    "your code within delimiters.\n```python\n{starter}\n```"
)


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global except builtins str, list and dict."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from benchmark data")


def shard_files(release: str) -> list[str]:
    """Raw shard names of a release tag: release_vN, vN or vA_vB."""
    def name(i: int) -> str:
        return "test.jsonl" if i == 1 else f"test{i}.jsonl"

    if m := _RELEASE.match(release):
        return [name(i) for i in range(1, int(m.group(1)) + 1)]
    if m := _SINGLE.match(release):
        return [name(int(m.group(1)))]
    if (m := _RANGE.match(release)) and int(m.group(1)) <= int(m.group(2)):
        return [name(i) for i in range(int(m.group(1)), int(m.group(2)) + 1)]
    raise DataError(f"unknown LiveCodeBench release '{release}'; use release_vN, vN or vA_vB (e.g. release_v6, v5, v4_v6)")


def decode_tests(value: Any, where: str) -> list[dict[str, str]]:
    """Test cases from a JSON string, a list, or base64(zlib(pickle(json)))."""
    if isinstance(value, list):
        data: Any = value
    elif not isinstance(value, str) or not value.strip():
        return []
    else:
        try:
            data = json.loads(value)
        except json.JSONDecodeError:
            try:
                raw = zlib.decompress(base64.b64decode(value, validate=False))
                data = SafeUnpickler(io.BytesIO(raw)).load()
            except (ValueError, zlib.error, pickle.UnpicklingError, EOFError) as exc:
                raise DataError(f"{where}: test cases are neither JSON nor base64/zlib/pickle ({exc})") from None
            if isinstance(data, str | bytes):
                data = json.loads(data)
    if not isinstance(data, list) or not all(isinstance(t, dict) for t in data):
        raise DataError(f"{where}: test cases must decode to a list of objects")
    return [{"input": str(t.get("input", "")), "output": str(t.get("output", "")),
             "testtype": str(t.get("testtype", "stdin"))} for t in data]


def normalise_row(row: dict[str, Any], index: int) -> dict[str, Any]:
    """Our JSONL row for one upstream LiveCodeBench row."""
    where = f"livecodebench row {index}"
    for key in ("question_content", "public_test_cases"):
        if key not in row:
            raise DataError(f"{where}: missing field '{key}' (fields: {', '.join(map(str, row))})")
    meta = row.get("metadata") or "{}"
    try:
        meta = json.loads(meta) if isinstance(meta, str) else dict(meta)
    except json.JSONDecodeError:
        raise DataError(f"{where}: metadata is not a JSON object") from None
    tests = decode_tests(row["public_test_cases"], where) + decode_tests(row.get("private_test_cases"), where)
    if not tests:
        raise DataError(f"{where}: no test cases")
    return {
        "id": str(row.get("question_id", index)),
        "title": str(row.get("question_title", "")),
        "question": str(row["question_content"]),
        "platform": str(row.get("platform", "")),
        "contest_date": str(row.get("contest_date", ""))[:19],
        "difficulty": str(row.get("difficulty", "")),
        "starter_code": str(row.get("starter_code") or ""),
        "func_name": meta.get("func_name"),
        "tests": tests,
    }


def in_window(row: dict[str, Any], start: str | None, end: str | None) -> bool:
    """contest_date within [start, end] (ISO dates, both inclusive, either may be None)."""
    day = row.get("contest_date", "")[:10]
    return (start is None or day >= start) and (end is None or day <= end)


def instructions(row: dict[str, Any]) -> str:
    starter = row.get("starter_code") or ""
    return STARTER_INSTRUCTIONS.format(starter=starter) if starter.strip() else STDIN_INSTRUCTIONS


def extract_code(text: str) -> str | None:
    """The last fenced code block after the thinking part, or None (LCB's rule)."""
    lines = strip_thinking(text).split("\n")
    fences = [i for i, line in enumerate(lines) if "```" in line]
    if len(fences) < 2:
        return None
    code = "\n".join(lines[fences[-2] + 1 : fences[-1]])
    return code if code.strip() else None
