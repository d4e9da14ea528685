"""The replay generator: completions read from a JSONL file, keyed by problem id.

Accepted rows (one JSON object per line):
  {"id": "p1", "completions": ["...", "..."]}                       several per row, or
  {"id": "p1", "text": "...", "finish_reason": "length", "n_tokens": 812}  one per row,
and the `samples.jsonl` that `opd eval` writes (`problem_id`, `text`), so an old run can be
re-scored with a newer scorer. `problem_id` may replace `id`. Problems of the bench that the
file does not cover are dropped with a warning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.generators import ChatPrompt, Completion, GenParams
from opdcli.errors import DataError


def _completion(item: Any, row: dict[str, Any]) -> Completion:
    if isinstance(item, str):
        return Completion(item, row.get("n_tokens"), row.get("finish_reason", "stop"))
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return Completion(item["text"], item.get("n_tokens"), item.get("finish_reason", "stop"))
    raise DataError("a replay completion must be a string or an object with a 'text' string")


def read_replay(path: str | Path) -> dict[str, list[Completion]]:
    """Completions per problem id, in file order."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"--completions '{path}' is not a file; pass a JSONL file of completions")
    table: dict[str, list[Completion]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        pid = row.get("id", row.get("problem_id")) if isinstance(row, dict) else None
        if pid is None:
            raise DataError(f"{path}:{lineno}: a replay row needs an 'id' (or 'problem_id') field")
        items = row["completions"] if "completions" in row else [row]
        try:
            table.setdefault(str(pid), []).extend(_completion(it, row) for it in items)
        except DataError as exc:
            raise DataError(f"{path}:{lineno}: {exc}") from None
    if not table:
        raise DataError(f"{path}: no completions found")
    return table


class ReplayGenerator:
    """Hands back stored completions; `params.n` is ignored (every stored sample is scored)."""

    name = "replay"

    def __init__(self, path: str | Path) -> None:
        self.path = str(Path(path).expanduser().resolve())
        self.table = read_replay(path)

    def covers(self, problem_id: str) -> bool:
        return problem_id in self.table

    def describe(self) -> dict[str, Any]:
        return {"generator": self.name, "completions": self.path,
                "problems": len(self.table), "samples": sum(len(v) for v in self.table.values())}

    def generate(self, prompts: list[ChatPrompt], params: GenParams) -> list[list[Completion]]:
        missing = [p.problem_id for p in prompts if p.problem_id not in self.table]
        if missing:
            raise DataError(f"{self.path}: no completions for problem id(s) {', '.join(missing[:5])}")
        return [list(self.table[p.problem_id]) for p in prompts]
