"""Peak memory of one block of work: CUDA's allocator peak on GPU; on CPU the process's peak
resident set (VmHWM), reset before the block through /proc/self/clear_refs (Linux) after the
allocator has handed freed memory back (malloc_trim), so that the figure is what the block
itself added."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from pathlib import Path

import torch


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss_bytes() -> int:
    return _status("VmRSS")


def _trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def peak(device: torch.device, out: dict[str, float], key: str) -> Iterator[None]:
    """out[key] = the block's peak memory above what was in use when it started (bytes)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield
        torch.cuda.synchronize(device)
        out[key] = float(torch.cuda.max_memory_allocated(device) - base)
        return
    _trim()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = rss_bytes()
    yield
    out[key] = float(_status("VmHWM") - base)

