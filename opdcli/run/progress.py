"""The rich progress bar of every long run (stderr)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
