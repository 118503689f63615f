"""Activation range estimators for post-training quantization (min-max, percentile, entropy, MSE).

Two passes over the calibration data: the first records each tensor's ``min``/``max``; the second
fills a histogram of ``B`` bins over ``[lo, hi]`` = ``[min(min, 0), max(max, 0)]``.  From the
histogram ``h`` with bin centres ``c``:

- ``minmax``: ``[min, max]``.
- ``percentile p``: the tails holding ``(100 - p)%`` of the values are cut (both tails for a
  signed tensor, split evenly; only the upper one for a non-negative tensor).
- ``entropy``: TensorRT's KL-divergence search (for a non-negative tensor the spike at 0 is
  ignored, as pytorch-quantization does), as in ``onnxruntime.quantization.calibrate``
  (``HistogramCollector.get_entropy_threshold``), vectorised: for each candidate range ``T`` the
  reference ``p`` (histogram inside ``T`` with the outliers folded into the end bins) is merged into
  ``L`` quantization levels and expanded back to ``q``; the range with the smallest ``KL(p || q)``
  wins.  ``L = 256`` over ``[0, T]`` for a non-negative tensor, ``[-T, T]`` otherwise.
- ``mse``: the range ``alpha * [lo, hi]`` (``alpha`` in ``(0, 1]``) that minimises the expected
  squared error ``sum_i h_i (qdq(c_i) - c_i)^2`` of quantize-dequantize with that range.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

METHODS = ("minmax", "percentile", "entropy", "mse")


@dataclasses.dataclass(frozen=True)
class TensorRange:
    """A calibrated real range ``[lo, hi]`` of one tensor (``lo <= 0 <= hi`` not required)."""

    lo: float
    hi: float

    def union(self, other: TensorRange) -> TensorRange:
        return TensorRange(min(self.lo, other.lo), max(self.hi, other.hi))


class MinMax:
    """Running min/max per tensor."""

    def __init__(self) -> None:
        self.lo: dict[str, float] = {}
        self.hi: dict[str, float] = {}

    def add(self, name: str, x: np.ndarray) -> None:
        if x.size == 0:
            return
        lo, hi = float(np.min(x)), float(np.max(x))
        self.lo[name] = min(lo, self.lo.get(name, lo))
        self.hi[name] = max(hi, self.hi.get(name, hi))

    def ranges(self) -> dict[str, TensorRange]:
        return {n: TensorRange(self.lo[n], self.hi[n]) for n in self.lo}


class Histograms:
    """Fixed-range histograms, one per tensor, over the min-max range found first."""

    def __init__(self, minmax: Mapping[str, TensorRange], bins: int) -> None:
        self.bins = bins
        self.edges: dict[str, tuple[float, float]] = {}
        self.counts: dict[str, np.ndarray] = {}
        for name, r in minmax.items():
            lo, hi = min(r.lo, 0.0), max(r.hi, 0.0)
            if hi <= lo:
                hi = lo + 1e-8
            self.edges[name] = (lo, hi)
            self.counts[name] = np.zeros(bins, np.int64)

    def add(self, name: str, x: np.ndarray) -> None:
        if name not in self.counts or x.size == 0:
            return
        h, _ = np.histogram(x.ravel(), bins=self.bins, range=self.edges[name])
        self.counts[name] += h


def _centres(lo: float, hi: float, bins: int) -> np.ndarray:
    w = (hi - lo) / bins
    return lo + w * (np.arange(bins) + 0.5)


def percentile_range(counts: np.ndarray, lo: float, hi: float, mm: TensorRange, percentile: float) -> TensorRange:
    total = counts.sum()
    if total == 0:
        return mm
    edges = np.linspace(lo, hi, len(counts) + 1)
    cdf = np.cumsum(counts) / total
    cut = (100.0 - percentile) / 100.0
    if mm.lo >= 0:
        right = float(edges[min(np.searchsorted(cdf, 1.0 - cut) + 1, len(edges) - 1)])
        return TensorRange(mm.lo, min(mm.hi, right))
    left = float(edges[np.searchsorted(cdf, cut / 2)])
    right = float(edges[min(np.searchsorted(cdf, 1.0 - cut / 2) + 1, len(edges) - 1)])
    return TensorRange(max(mm.lo, left), min(mm.hi, right))


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """onnxruntime's smooth_distribution: move ``eps`` mass onto empty bins."""
    is_zero = p == 0
    n_zeros = int(is_zero.sum())
    n_nonzeros = p.size - n_zeros
    if not n_nonzeros:
        return None
    eps1 = eps * n_zeros / n_nonzeros
    out = p.astype(np.float64) + eps * is_zero + (-eps1) * (~is_zero)
    return out if (out > 0).all() else None


def entropy_range(counts: np.ndarray, lo: float, hi: float, mm: TensorRange, levels: int = 256) -> TensorRange:
    """KL search over symmetric windows (two-sided tensors) or upper cut-offs (non-negative)."""
    bins = len(counts)
    one_sided = mm.lo >= 0
    edges = np.linspace(lo, hi, bins + 1)
    if one_sided:
        zero = int(np.searchsorted(edges, 0.0, side="right") - 1)
        zero = max(zero, 0)
        hist = counts[zero:].astype(np.float64)
        if len(hist) > 1:
            hist[0] = hist[1]  # ignore the spike at 0 that ReLU outputs pile up in (as pytorch-quantization)
        base = zero
    else:
        # re-centre: a symmetric window around the zero bin
        zero = int(np.clip(np.searchsorted(edges, 0.0, side="right") - 1, 0, bins - 1))
        half = max(zero, bins - zero)
        padded = np.zeros(2 * half, np.float64)
        padded[half - zero : half - zero + bins] = counts
        hist = padded
        base = zero - half
    n = len(hist)
    if hist.sum() == 0 or n < 2:
        return mm
    # window length in bins: i (one-sided, [0, T]) or 2i (two-sided, [-T, T]); L = levels over it
    half_n = n if one_sided else n // 2
    first = min(levels if one_sided else levels // 2, half_n)
    best = (np.inf, None)
    step = max(1, (half_n - first) // 512)  # at most ~512 candidates
    for i in range(first, half_n + 1, step):
        s, e = (0, i) if one_sided else (n // 2 - i, n // 2 + i)
        sliced = hist[s:e]
        p = sliced.copy()
        p[0] += hist[:s].sum()
        p[-1] += hist[e:].sum()
        nonzero = (sliced != 0).astype(np.float64)
        m = len(sliced)
        nlev = min(levels, m)
        group = np.minimum((np.arange(m) * nlev) // m, nlev - 1)
        qsum = np.bincount(group, weights=sliced, minlength=nlev)
        qnz = np.bincount(group, weights=nonzero, minlength=nlev)
        q = np.where(nonzero > 0, qsum[group] / np.maximum(qnz[group], 1), 0.0)
        ps, qs = _smooth(p), _smooth(q)
        if ps is None or qs is None:
            continue
        ps, qs = ps / ps.sum(), qs / qs.sum()
        kl = float(np.sum(ps * np.log(ps / qs)))
        if kl < best[0]:
            best = (kl, (s, e))
    if best[1] is None:
        return mm
    s, e = best[1]
    width = (hi - lo) / bins
    t_lo = lo + (base + s) * width
    t_hi = lo + (base + e) * width
    return TensorRange(max(mm.lo, t_lo if not one_sided else mm.lo), min(mm.hi, t_hi))


def qdq_values(x: np.ndarray, lo: float, hi: float, levels: int) -> np.ndarray:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (levels - 1) if hi > lo else 1.0
    zp = np.round(-lo / scale)
    q = np.clip(np.round(x / scale) + zp, 0, levels - 1)
    return (q - zp) * scale


def mse_range(counts: np.ndarray, lo: float, hi: float, mm: TensorRange, levels: int = 256) -> TensorRange:
    total = counts.sum()
    if total == 0:
        return mm
    c = _centres(lo, hi, len(counts))
    w = counts.astype(np.float64)
    best_err, best = math.inf, mm
    for alpha in np.linspace(0.2, 1.0, 81):
        r_lo, r_hi = mm.lo * alpha if mm.lo < 0 else mm.lo, mm.hi * alpha if mm.hi > 0 else mm.hi
        err = float(np.sum(w * (qdq_values(c, r_lo, r_hi, levels) - c) ** 2))
        if err < best_err * (1 - 1e-9):
            best_err, best = err, TensorRange(float(r_lo), float(r_hi))
    return best
