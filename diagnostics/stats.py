"""Mergeable streaming statistics: per-bin moments, correlation moments, a token sample.

Every accumulator here adds numpy arrays of one record at a time, merges with another of its
kind (worker processes each fill their own and the parent merges them), and never keeps the
records themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Options:
    """Settings shared by every analysis (the CLI sets `bins`)."""

    bins: int = 10
    """Relative-position bins (position / response length)."""
    abs_bin: int = 64
    """Tokens per absolute-position bin."""
    ks: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    """Candidate-set sizes of the K-sensitivity analysis (those up to the stored K are used)."""
    k_main: int = 16
    """K of the margin, release, overlap and divergence analyses (the stored K if smaller)."""
    drift_theta: float = 0.7
    """Prune-OPD drift event: top-K overlap below this."""
    w_drop: float = 0.01
    """Prune-OPD reliability lost per drift event."""
    horizon: int = 8
    """TOPD near-future window in tokens."""
    rho: float = 0.2
    """TOPD high-loss fraction (top rho of the sampled-token loss)."""
    topd_delta: float = 0.1
    """TOPD divergence threshold in nats (the method's default delta)."""
    sample_size: int = 262144
    """Tokens kept in the uniform token sample used for global quantiles (TOPD)."""


def positions(n: int, opts: Options, memo: dict) -> dict[str, np.ndarray]:
    """Relative bin, absolute bin and half (0 early, 1 late) of each of n scored tokens.

    "<kind>_n" holds the token count per bin of each kind (np.bincount), reused by every curve.
    """
    if "positions" not in memo:
        i = np.arange(n)
        pos = {"rel": np.minimum(i * opts.bins // max(n, 1), opts.bins - 1),
               "abs": i // opts.abs_bin, "late": (2 * i >= n).astype(np.int64)}
        pos |= {f"{k}_n": np.bincount(v) for k, v in list(pos.items())}
        memo["positions"] = pos
    return memo["positions"]


@dataclass
class BinMoments:
    """Count, sum and sum of squares of values per integer bin; bins grow on demand."""

    count: np.ndarray = field(default_factory=lambda: np.zeros(0))
    s1: np.ndarray = field(default_factory=lambda: np.zeros(0))
    s2: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def ensure(self, size: int) -> BinMoments:
        """Grow to at least `size` bins (empty bins have count 0); returns self."""
        if size > self.count.size:
            pad = size - self.count.size
            self.count = np.pad(self.count, (0, pad))
            self.s1 = np.pad(self.s1, (0, pad))
            self.s2 = np.pad(self.s2, (0, pad))
        return self

    def add(self, bins: np.ndarray, values: np.ndarray, counts: np.ndarray | None = None) -> None:
        """Add values by bin; `counts` may pass np.bincount(bins), shared by several curves."""
        if bins.size == 0:
            return
        if counts is None:
            counts = np.bincount(bins)
        n = counts.size
        self.ensure(n)
        self.count[:n] += counts
        self.s1[:n] += np.bincount(bins, weights=values, minlength=n)
        self.s2[:n] += np.bincount(bins, weights=values * values, minlength=n)

    def merge(self, other: BinMoments) -> None:
        self.ensure(other.count.size)
        n = other.count.size
        self.count[:n] += other.count
        self.s1[:n] += other.s1
        self.s2[:n] += other.s2

    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.s1 / self.count, np.nan)

    def std(self) -> np.ndarray:
        """Population standard deviation per bin (NaN for empty bins)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            var = self.s2 / self.count - (self.s1 / self.count) ** 2
        return np.where(self.count > 0, np.sqrt(np.maximum(var, 0.0)), np.nan)


@dataclass
class CorrMoments:
    """Sums for a pooled Pearson correlation of (x, y) pairs per group (early / late)."""

    groups: int = 2
    sums: np.ndarray = field(default_factory=lambda: np.zeros((2, 6)))

    def add(self, group: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        cols = (np.ones_like(x), x, y, x * x, y * y, x * y)
        for j, col in enumerate(cols):
            self.sums[:, j] += np.bincount(group, weights=col, minlength=self.groups)

    def merge(self, other: CorrMoments) -> None:
        self.sums += other.sums

    def corr(self) -> np.ndarray:
        n, sx, sy, sxx, syy, sxy = self.sums.T
        with np.errstate(invalid="ignore", divide="ignore"):
            cov = sxy / n - sx * sy / n**2
            vx = sxx / n - (sx / n) ** 2
            vy = syy / n - (sy / n) ** 2
            r = cov / np.sqrt(vx * vy)
        return np.where((n > 1) & (vx > 0) & (vy > 0), r, np.nan)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two short vectors (NaN when either is constant or too short)."""
    if x.size < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return float((dx * dy).sum() / denom) if denom > 0 else float("nan")


@dataclass
class TokenSample:
    """A uniform sample of at most `size` tokens (bottom-k by random priority; mergeable).

    Each token gets a priority from a generator seeded by its record's (file, offset) key, so
    the sample does not depend on how the input was split between processes. Exact (every
    token kept) while the input has at most `size` tokens.
    """

    size: int
    columns: tuple[str, ...]
    priority: np.ndarray = field(default_factory=lambda: np.zeros(0))
    data: dict[str, np.ndarray] = field(default_factory=dict)
    _pending: list[tuple[np.ndarray, dict[str, np.ndarray]]] = field(default_factory=list)
    _pending_n: int = 0
    _cut: float = float("inf")

    def add(self, key: tuple[int, int], values: dict[str, np.ndarray]) -> None:
        n = next(iter(values.values())).size
        if n == 0:
            return
        prio = np.random.default_rng(key).random(n)
        if self._cut < 1.0:
            keep = prio < self._cut
            if not keep.any():
                return
            prio, values = prio[keep], {k: v[keep] for k, v in values.items()}
        self._pending.append((prio, values))
        self._pending_n += prio.size
        if self._pending_n >= self.size:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        prio = np.concatenate([self.priority, *[p for p, _ in self._pending]])
        data = {c: np.concatenate([self.data.get(c, np.zeros(0)), *[v[c] for _, v in self._pending]])
                for c in self.columns}
        self._pending, self._pending_n = [], 0
        if prio.size > self.size:
            keep = np.argpartition(prio, self.size - 1)[: self.size]
            prio, data = prio[keep], {c: v[keep] for c, v in data.items()}
        self.priority, self.data = prio, data
        self._cut = float(prio.max()) if prio.size >= self.size else float("inf")

    def merge(self, other: TokenSample) -> None:
        other._flush()
        if other.priority.size == 0:
            return
        self._pending.append((other.priority, other.data))
        self._pending_n += other.priority.size
        self._flush()

    def columns_dict(self) -> dict[str, np.ndarray]:
        self._flush()
        return {c: self.data.get(c, np.zeros(0)) for c in self.columns}

    def __getstate__(self) -> dict:
        self._flush()
        return self.__dict__.copy()


def column_arrays(cols: dict, step: int | None = None) -> dict[str, np.ndarray]:
    """Per-record float64 columns (array("d") buffers) as numpy, optionally one step's rows."""
    c = {n: np.frombuffer(col, dtype=np.float64) if len(col) else np.zeros(0) for n, col in cols.items()}
    if step is not None:
        c = {n: v[c["step"] == step] for n, v in c.items()}
    return c


def quantile(x: np.ndarray, q: float) -> float:
    """Linear-interpolation quantile (NaN for an empty array)."""
    return float(np.quantile(x, q)) if x.size else float("nan")


def histogram_rows(values: np.ndarray, bins: int | np.ndarray, name: str) -> list[dict]:
    """CSV rows `{name}_lo, {name}_hi, count` of a histogram of `values`."""
    if values.size == 0:
        return []
    counts, edges = np.histogram(values, bins=bins)
    return [{f"{name}_lo": float(lo), f"{name}_hi": float(hi), "count": int(c)}
            for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True)]
