"""Ctrl-C and SIGTERM stop a run at the next step boundary, where a checkpoint is consistent.

The first signal only sets a flag (the handler writes one line and returns), so the interrupt
can never be swallowed by a finaliser or a callback the way an asynchronous KeyboardInterrupt
can; the loop reads the flag before each step and then raises KeyboardInterrupt itself, which
the loops turn into a checkpoint and exit code 130. A second signal raises at once (stop now).
Under torchrun every rank reads the flag through one all-reduce, so all ranks stop at the
same step even when the signal reached them at different moments.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

from opdcli.dist import Dist

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """Context manager: `with StopOnSignal(d) as stop: ... stop.check()` at each step boundary."""

    def __init__(self, d: Dist) -> None:
        self.d = d
        self.requested: int = 0  # the first signal's number, 0 while none came
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt  # the second signal: stop now
        self.requested = signum
        # os.write is safe inside a handler (print may re-enter a stream the loop is writing)
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step "
                    "(press Ctrl-C again to stop now)\n".encode())

    def check(self) -> None:
        """Raise KeyboardInterrupt on every rank when any rank got a stop signal."""
        if self.d.max(1 if self.requested else 0):
            raise KeyboardInterrupt
