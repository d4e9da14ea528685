"""Prompt sources: the toy task, JSONL / JSON / parquet files, or a Hugging Face dataset.

Every source becomes a `PromptSource` that hands out batches of `Prompt`s forever (shuffled
epochs for finite sources), reproducibly from a seed and a position, so a resumed run continues
the same stream. A prompt field may be a string (one user turn) or a list of chat messages.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opdcli.config import DataConfig
from opdcli.errors import ConfigError, DataError
from opdcli.toy.forms import FormsTask
from opdcli.toy.task import ToyTask


@dataclass(frozen=True)
class Prompt:
    """One prompt, as chat messages, with optional reference answer and solution."""

    prompt_id: str
    messages: tuple[dict[str, str], ...]
    answer: str | None = None
    solution: str | None = None
    template_kwargs: tuple[tuple[str, Any], ...] = ()
    """Extra chat-template variables (data.chat_template_kwargs), e.g. (("enable_thinking", False),)."""
    teacher: str | None = None
    """The model.teachers tag that scores this prompt (data.teacher_field); None: model.teacher."""


def render(tokenizer: Any, prompt: Prompt) -> str:
    """The prompt text the model sees: its chat template with the generation prompt and the
    prompt's template variables (each of which the template must read)."""
    kwargs = dict(prompt.template_kwargs)
    if kwargs:
        check_template_reads(tokenizer, kwargs)
    return tokenizer.apply_chat_template(
        list(prompt.messages), add_generation_prompt=True, tokenize=False, **kwargs
    )


def template_source(tokenizer: Any) -> str:
    """The tokenizer's default chat template text ('' when it has none)."""
    try:
        return str(tokenizer.get_chat_template())
    except (ValueError, AttributeError):
        return str(getattr(tokenizer, "chat_template", "") or "")


def check_template_reads(tokenizer: Any, kwargs: dict[str, Any]) -> None:
    """Refuse a data.chat_template_kwargs key the chat template never reads (it would change nothing)."""
    text = template_source(tokenizer)
    unread = [k for k in kwargs if k not in text]
    if unread:
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise ConfigError(f"data.chat_template_kwargs.{unread[0]} cannot take effect: the chat template of "
                          f"'{name}' never reads '{unread[0]}'; remove it (or use a model whose template does, "
                          "e.g. enable_thinking for Qwen3)")


def toy_task(cfg: DataConfig) -> ToyTask | FormsTask:
    t = cfg.toy
    if t.world == "forms":
        return FormsTask(n_ops=t.n_ops, max_operand=t.max_operand, style=t.style, canonical_steps=t.canonical_steps)
    return ToyTask(n_ops=t.n_ops, max_operand=t.max_operand, ops=t.ops)


def _messages(text: str, system: str | None) -> tuple[dict[str, str], ...]:
    head = ({"role": "system", "content": system},) if system else ()
    return head + ({"role": "user", "content": text},)


def _template_kwargs(cfg: DataConfig) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(cfg.chat_template_kwargs.items()))


def _toy_prompt(index: str, problem: Any, cfg: DataConfig) -> Prompt:
    return Prompt(index, _messages(problem.prompt, cfg.system_prompt), problem.answer, problem.solution,
                  _template_kwargs(cfg))


def read_rows(source: str, split: str) -> list[dict[str, Any]]:
    """Rows of a local .jsonl / .json / .parquet file or of `hf:<name>[:<config>]`."""
    if source.startswith("hf:"):
        return _read_hub(source[3:], split)
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(
            f"data source '{source}' is not a file; pass a .jsonl, .json or .parquet file, "
            "hf:<dataset>, or toy"
        )
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not valid JSON ({exc}); fix the file or convert it to JSONL") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        return data
    if suffix == ".parquet":
        import pandas as pd

        try:
            return pd.read_parquet(path).to_dict(orient="records")
        except Exception as exc:  # pyarrow raises many types for a bad file
            raise DataError(f"{path}: cannot read parquet ({type(exc).__name__}: {exc})") from None
    raise DataError(f"data source '{source}' has unknown extension '{suffix}'; use .jsonl, .json or .parquet")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); fix or remove the line") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; pass a JSONL file") from None
    return rows


def _read_hub(spec: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"hf:{spec} needs the 'datasets' package: pip install datasets") from None
    name, _, subset = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, subset or None, split=split)
    except Exception as exc:  # network, missing split, bad name: all one message
        raise DataError(f"cannot load dataset hf:{spec} split '{split}': {str(exc).splitlines()[0]}") from None
    return [dict(row) for row in ds]


_MISSING = object()


def field_value(row: dict[str, Any], name: str, default: Any = None) -> Any:
    """row[name], where a dotted name walks into nested records (e.g. reward_model.ground_truth,
    as DAPO-Math-17k stores its answers); a field of that exact name wins over the walk."""
    if name in row:
        return row[name]
    node: Any = row
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def rows_to_prompts(rows: list[dict[str, Any]], cfg: DataConfig, where: str) -> list[Prompt]:
    prompts = []
    for i, row in enumerate(rows):
        if field_value(row, cfg.prompt_field, _MISSING) is _MISSING:
            raise DataError(
                f"{where}: row {i} has no field '{cfg.prompt_field}' (fields: {', '.join(map(str, row))}); "
                "set data.prompt_field"
            )
        value = field_value(row, cfg.prompt_field)
        if isinstance(value, str):
            messages = _messages(value, cfg.system_prompt)
        elif isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
            messages = tuple({"role": str(m["role"]), "content": str(m["content"])} for m in value)
        else:
            raise DataError(f"{where}: row {i} field '{cfg.prompt_field}' must be a string or a list of chat messages")
        answer = field_value(row, cfg.answer_field)
        solution = field_value(row, cfg.solution_field)
        teacher = field_value(row, cfg.teacher_field)
        if teacher is not None and (not isinstance(teacher, str) or not teacher):
            raise DataError(f"{where}: row {i} field '{cfg.teacher_field}' must be a teacher's tag (a non-empty "
                            f"string, a key of model.teachers), got {teacher!r}")
        pid = str(row.get("id", i))
        prompts.append(Prompt(pid, messages, None if answer is None else str(answer),
                              None if solution is None else str(solution), _template_kwargs(cfg), teacher))
    if cfg.max_prompts is not None:
        prompts = prompts[: cfg.max_prompts]
    if not prompts:
        raise DataError(f"{where}: the dataset is empty; pass a file with at least one prompt")
    return prompts


class PromptSource:
    """An endless, seeded, resumable stream of prompts."""

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        self.cfg, self.seed, self.position = cfg, seed, 0
        self._items: list[Prompt] | None = None
        if cfg.source == "toy":
            task = toy_task(cfg)
            self._exclude = {p.question for p in task.heldout(cfg.toy.split_seed, cfg.toy.heldout_size)}
            self._task = task
        else:
            self._items = rows_to_prompts(read_rows(cfg.source, cfg.split), cfg, cfg.source)
        self._iter = self._make_iter()

    def _make_iter(self) -> Iterator[Prompt]:
        if self._items is None:
            for i, problem in enumerate(self._task.stream(self.seed, self._exclude)):
                yield _toy_prompt(f"toy-{i}", problem, self.cfg)
        else:
            epoch = 0
            while True:
                order = list(range(len(self._items)))
                random.Random(self.seed * 7919 + epoch).shuffle(order)
                for j in order:
                    yield self._items[j]
                epoch += 1

    def teacher_tags(self) -> set[str] | None:
        """The teachers' tags the prompts name (data.teacher_field); None for the toy stream,
        whose prompts name none."""
        if self._items is None:
            return None
        return {p.teacher for p in self._items if p.teacher is not None}

    def next_batch(self, n: int) -> list[Prompt]:
        self.position += n
        return [next(self._iter) for _ in range(n)]

    def skip_to(self, position: int) -> None:
        """Resume: restart the stream and drop the first `position` prompts."""
        self._iter, self.position = self._make_iter(), 0
        for _ in range(position):
            next(self._iter)
        self.position = position


def heldout_prompts(cfg: DataConfig, size: int) -> list[Prompt] | None:
    """Held-out prompts with answers, or None when the source has none."""
    if cfg.eval_source is None and cfg.source == "toy":
        problems = toy_task(cfg).heldout(cfg.toy.split_seed, cfg.toy.heldout_size)[:size]
        return [_toy_prompt(f"heldout-{i}", p, cfg) for i, p in enumerate(problems)]
    if cfg.eval_source is None:
        return None
    prompts = rows_to_prompts(read_rows(cfg.eval_source, "test"), cfg, cfg.eval_source)[:size]
    if any(p.answer is None for p in prompts):
        raise DataError(f"{cfg.eval_source}: every held-out row needs an '{cfg.answer_field}' field")
    return prompts
