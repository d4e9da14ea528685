"""The rich progress bar of every long run (stderr)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class _Bar:
    def __init__(self, progress: Progress, task: Any) -> None:
        self.progress, self.task = progress, task

    def advance(self, metrics: dict[str, float]) -> None:
        parts = []
        for key, label in (("loss/total", "loss"), ("signal/teacher_kl", "kl"),
                           ("eval/heldout/accuracy", "acc"), ("rollout/response_len", "len")):
            if key in metrics:
                parts.append(f"{label} {metrics[key]:.3f}" if label != "len" else f"len {metrics[key]:.0f}")
        self.progress.update(self.task, advance=1, info="  ".join(parts))


class _Silent:
    def advance(self, metrics: dict[str, float]) -> None:
        del metrics


class _WorkBar:
    """Items done of a known total, with the token rate."""

    def __init__(self, progress: Progress, task: Any) -> None:
        self.progress, self.task, self.start, self.tokens = progress, task, time.perf_counter(), 0

    def advance(self, items: int, tokens: int = 0) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.progress.update(self.task, advance=items, info=f"{rate:,.0f} tokens/s" if self.tokens else "")


class _SilentWork:
    def advance(self, items: int, tokens: int = 0) -> None:
        del items, tokens


@contextmanager
def work_bar(total: int, label: str, show: bool = True) -> Iterator[Any]:
    """A bar over `total` items (prompts, samples) with tokens/s, on stderr. In a terminal it
    redraws in place; in a log file it writes the finished bar once (rich draws no live
    updates to a non-terminal), so a long job never floods its log."""
    if not show:
        yield _SilentWork()
        return
    progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console)
    with progress:
        yield _WorkBar(progress, progress.add_task(label, total=total, info=""))


@contextmanager
def progress_bar(total: int, start: int, label: str, show: bool = True) -> Iterator[Any]:
    """A bar with loss, kl, accuracy and length (no bar on ranks other than the main one)."""
    if not show:
        yield _Silent()
        return
    progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console)
    with progress:
        task = progress.add_task(label, total=total, completed=start, info="")
        yield _Bar(progress, task)
