"""Run a function over many items in killable worker processes with a hard per-item deadline.

math-verify's own timeouts use `signal.alarm` and some inputs hang forever while sympy prints
(eval.md §2.1), so answers are checked in separate processes: each worker takes one item at a
time over a pipe; when an item runs past its deadline the worker is killed (SIGKILL) and
replaced, and the item is reported as `("timeout", None)`. A worker that dies or raises gives
`("error", message)`. Workers are forked on Linux (cheap; they inherit imported modules).
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

Outcome = tuple[str, Any]
"""("ok", value) | ("timeout", None) | ("error", message)."""


def _worker(fn: Callable[[Any], Any], conn: Connection) -> None:
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        try:
            conn.send(("ok", fn(item)))
        except Exception as exc:  # report, keep serving
            conn.send(("error", f"{type(exc).__name__}: {exc}"[:500]))


class _Slot:
    def __init__(self, ctx: Any, fn: Callable[[Any], Any]) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(fn, child), daemon=True)
        self.proc.start()
        child.close()
        self.index: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()


def _context() -> Any:
    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def run_isolated(fn: Callable[[Any], Any], items: Sequence[Any], timeout: float,
                 workers: int = 2) -> list[Outcome]:
    """`fn(item)` for every item, each under a wall-clock deadline of `timeout` seconds."""
    results: list[Outcome | None] = [None] * len(items)
    if not items:
        return []
    ctx = _context()
    slots = [_Slot(ctx, fn) for _ in range(max(1, min(workers, len(items))))]
    todo = list(range(len(items)))[::-1]
    try:
        while todo or any(s.index is not None for s in slots):
            for i, slot in enumerate(slots):
                if slot.index is None and todo:
                    slot.index = todo.pop()
                    slot.deadline = time.monotonic() + timeout
                    try:
                        slot.conn.send(items[slot.index])
                    except (BrokenPipeError, OSError):
                        results[slot.index] = ("error", "worker process died")
                        slot.kill()
                        slots[i] = _Slot(ctx, fn)
            busy = [s for s in slots if s.index is not None]
            if not busy:
                continue
            now = time.monotonic()
            ready = wait([s.conn for s in busy], timeout=max(0.0, min(s.deadline for s in busy) - now))
            for i, slot in enumerate(slots):
                if slot.index is None:
                    continue
                if slot.conn in ready:
                    try:
                        results[slot.index] = slot.conn.recv()
                        slot.index = None
                        continue
                    except (EOFError, OSError):
                        results[slot.index] = ("error", "worker process died")
                elif time.monotonic() < slot.deadline:
                    continue
                else:
                    results[slot.index] = ("timeout", None)
                slot.kill()
                slots[i] = _Slot(ctx, fn)
    finally:
        for slot in slots:
            if slot.index is None:
                try:
                    slot.conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
            slot.kill()
    return [r if r is not None else ("error", "not run") for r in results]
