"""A single downward mean shift by profiled RSS-BIC (methods.md §3.3).

"Prefix Teach, Suffix Fade" (arXiv 2605.13643) selects one change point in a trajectory's
segment margins x_1..x_n by comparing a one-mean Gaussian model with a two-mean model whose
split tau is profiled out (minimised over), with the variance profiled out as well:

    RSS_0     = sum_j (x_j - mean(x))^2
    RSS_1(t)  = RSS of x_1..x_t about its mean + RSS of x_{t+1}..x_n about its mean
    BIC_0     = n ln(RSS_0 / n) + k0 ln n
    BIC_1(t)  = n ln(RSS_1(t) / n) + k1 ln n,        t in [tau_min, n - tau_min]
    gain      = BIC_0 - min_t BIC_1(t),   tau* = argmin_t BIC_1(t)
    accept    = gain > g_min and mean(x_{tau*+1..n}) < mean(x_1..tau*)   (downward only)

The paper quotes only the gain statistic; the penalties k0 = 1, k1 = 3, the threshold
g_min = 10, the edge margin tau_min = 2, the minimum length n_min = 4 and the RSS floor 1e-12
are our choices (methods.md §3.3). All RSS_1(t) come from prefix sums of x and x^2 in O(n).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RSS_FLOOR = 1e-12
"""Lower bound of every residual sum of squares (a noise-free series would give ln 0)."""


@dataclass(frozen=True)
class ChangePoint:
    """The outcome of `profiled_rss_bic` on one series of n segment values.

    release_segment: tau*, the number of leading segments kept; equivalently the 0-based index
        of the first released segment. It is the best split even when not accepted, and n
        when no split was searched (n < n_min or no admissible tau).
    bic_improvement: gain = BIC_0 - min_tau BIC_1(tau) (0 when no split was searched).
    accepted: whether the suffix from segment `release_segment` on is released.
    mean_before / mean_after: means of x[:tau*] and x[tau*:] (both the overall mean, or 0 for
        an empty series, when no split was searched).
    """

    release_segment: int
    bic_improvement: float
    accepted: bool
    mean_before: float
    mean_after: float


def _no_split(x: np.ndarray) -> ChangePoint:
    mean = float(x.mean()) if x.size else 0.0
    return ChangePoint(int(x.size), 0.0, False, mean, mean)


def profiled_rss_bic(x: Sequence[float] | np.ndarray, *, k0: float = 1, k1: float = 3,
                     tau_min: int = 2, g_min: float = 10.0, n_min: int = 4,
                     downward: bool = True) -> ChangePoint:
    """Profiled RSS-BIC single change point of `x` (see the module docstring).

    Args:
        x: segment values x_1..x_n (finite).
        k0, k1: BIC parameter counts of the one-mean and the two-mean model.
        tau_min: fewest segments on either side of a split.
        g_min: the gain must exceed this to accept.
        n_min: series shorter than this are never released.
        downward: accept only a drop of the mean (else any shift).
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    n = int(x.size)
    taus = np.arange(max(1, tau_min), n - max(1, tau_min) + 1)
    if n < n_min or taus.size == 0:
        return _no_split(x)
    s1 = np.concatenate(([0.0], np.cumsum(x)))
    s2 = np.concatenate(([0.0], np.cumsum(x * x)))
    rss0 = max(s2[n] - s1[n] ** 2 / n, RSS_FLOOR)
    n_left, n_right = taus.astype(np.float64), (n - taus).astype(np.float64)
    sum_left, sum_right = s1[taus], s1[n] - s1[taus]
    rss_left = s2[taus] - sum_left**2 / n_left
    rss_right = (s2[n] - s2[taus]) - sum_right**2 / n_right
    rss1 = np.maximum(rss_left + rss_right, RSS_FLOOR)
    log_n = math.log(n)
    bic0 = n * math.log(rss0 / n) + k0 * log_n
    bic1 = n * np.log(rss1 / n) + k1 * log_n
    best = int(np.argmin(bic1))
    tau = int(taus[best])
    gain = float(bic0 - bic1[best])
    before, after = float(sum_left[best] / n_left[best]), float(sum_right[best] / n_right[best])
    accepted = gain > g_min and (after < before if downward else True)
    return ChangePoint(tau, gain, bool(accepted), before, after)
