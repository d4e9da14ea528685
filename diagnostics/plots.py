"""Small matplotlib helpers (Agg backend, no display needed) shared by the analyses.

Each analysis draws its own panels through these helpers and saves one PNG per figure.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 80


@contextmanager
def figure(path: Path, panels: int, title: str, *, cols: int = 2) -> Iterator[list]:
    """A figure of `panels` axes in a grid; saved to `path` and closed on exit."""
    cols = min(cols, panels)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.5 * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[panels:]:
        ax.set_visible(False)
    try:
        yield flat[:panels]
        fig.suptitle(title)
        # fixed margins: tight_layout would cost as much as rendering the figure
        fig.subplots_adjust(left=0.32 / cols, right=0.97, bottom=0.45 / (3.5 * rows),
                            top=1 - 0.55 / (3.5 * rows), wspace=0.35, hspace=0.55)
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)


def lines(ax, x: Sequence[float], series: dict[str, Sequence[float]], *, xlabel: str,
          ylabel: str, title: str = "", ref: float | None = None) -> None:
    """One line (with markers) per series; an optional horizontal reference line."""
    for label, y in series.items():
        ax.plot(x, y, marker="o", markersize=3, label=label)
    if ref is not None:
        ax.axhline(ref, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def hist(ax, values: np.ndarray, *, bins: int | np.ndarray = 30, xlabel: str, title: str = "",
         vline: float | None = None) -> None:
    """A histogram of `values` (a note in the panel when empty)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size:
        ax.hist(values, bins=bins, color="tab:blue", alpha=0.8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    if vline is not None:
        ax.axvline(vline, color="tab:red", linewidth=1, linestyle="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def bin_centers(n: int) -> np.ndarray:
    """Centres of n equal relative-position bins on [0, 1]."""
    return (np.arange(n) + 0.5) / n
