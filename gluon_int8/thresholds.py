"""Threshold algorithms: pure numpy functions from layer statistics to a clipping threshold.

Every function takes a :class:`~gluon_int8.collectors.LayerStats` (exact min/max plus an
optional histogram of ``|x|``) and the number of positive integer levels of the target
type (127 for int8, 255 for uint8), and returns the threshold ``T > 0``: values are
clipped to ``[-T, T]`` (int8) or ``[0, T]`` (uint8) before rounding.

``THRESHOLDS`` maps each calibration mode name to its function. The histogram layout is
the one :class:`~gluon_int8.collectors.HistogramCollector` produces: ``hist[k]`` counts
``|x|`` in ``[k, k+1) * hist_max / len(hist)``.

The candidate thresholds of the histogram methods are the bin edges; every method is
vectorized over all candidates with cumulative sums, so the cost per layer is
``O(num_bins * levels)`` numpy work instead of one python loop per candidate.
"""
from typing import Callable, Dict, Tuple

import numpy as np

# A layer whose calibration output is all zeros still needs a positive range: any
# positive threshold maps 0 exactly to 0, so take one that keeps the scales finite.
MIN_THRESHOLD = 1e-5


def _edges(stats) -> np.ndarray:
    """Upper edges of every histogram bin (the candidate thresholds)."""
    num_bins = len(stats.hist)
    return np.arange(1, num_bins + 1, dtype=np.float64) * (stats.hist_max / num_bins)


def _require_hist(stats, mode: str) -> None:
    if stats.hist is None:
        raise ValueError('calibration mode %r needs a histogram, but the collected '
                         'statistics only hold min/max; use HistogramCollector' % mode)


def _nonzero_hist(stats) -> np.ndarray:
    """The histogram without the exact zeros: they cost no error at any threshold, and a
    ReLU's zero spike would otherwise dominate the KL and MSE searches."""
    hist = np.array(stats.hist, dtype=np.float64)
    hist[0] = max(hist[0] - stats.zeros, 0.0)
    return hist


def _floor(threshold: float) -> float:
    return float(max(threshold, MIN_THRESHOLD))


def _within_range(threshold: float, stats) -> float:
    """A candidate edge can lie past the observed peak (the histogram range grows by
    doubling); a threshold above the peak only wastes levels."""
    return _floor(min(threshold, max(abs(stats.min), abs(stats.max))))


def naive_threshold(stats, levels: int) -> float:
    """max |x| over all calibration data (MXNet's 'naive' mode)."""
    del levels  # the range does not depend on the target type
    return _floor(max(abs(stats.min), abs(stats.max)))


def percentile_threshold(stats, levels: int, percentile: float = 99.99) -> float:
    """The ``percentile``-th percentile of ``|x|``, interpolated linearly inside its bin.

    ``percentile=100`` gives back the exact max |x|.
    """
    del levels
    _require_hist(stats, 'percentile')
    if percentile >= 100.0:
        return naive_threshold(stats, 0)
    hist = np.asarray(stats.hist, dtype=np.float64)
    total = hist.sum()
    if total == 0 or stats.hist_max == 0:
        return naive_threshold(stats, 0)
    cdf = np.cumsum(hist)
    target = total * percentile / 100.0
    k = int(np.searchsorted(cdf, target, side='left'))
    below = cdf[k - 1] if k > 0 else 0.0
    width = stats.hist_max / len(hist)
    frac = (target - below) / hist[k] if hist[k] > 0 else 1.0
    threshold = (k + frac) * width
    return _floor(min(threshold, max(abs(stats.min), abs(stats.max))))


def mse_curve(stats, levels: int) -> Tuple[np.ndarray, np.ndarray]:
    """Expected squared quantization error per element for every candidate threshold.

    For threshold ``T`` and step ``d = T / levels``, a value below ``T`` costs the uniform
    rounding error ``d**2 / 12`` and a value ``c`` above it costs the clipping error
    ``(c - T)**2`` (``c`` = its bin centre). Suffix sums of ``h``, ``h c`` and ``h c**2``
    give every candidate at once.
    """
    _require_hist(stats, 'mse')
    hist = _nonzero_hist(stats)
    num_bins = len(hist)
    width = stats.hist_max / num_bins
    centres = (np.arange(num_bins) + 0.5) * width
    thresholds = _edges(stats)

    def suffix(values):  # suffix[i] = sum over bins >= i+1 (bins above candidate i)
        return np.concatenate([np.cumsum(values[::-1])[::-1][1:], [0.0]])

    above_n, above_c, above_c2 = suffix(hist), suffix(hist * centres), suffix(hist * centres ** 2)
    below_n = hist.sum() - above_n
    clip = above_c2 - 2 * thresholds * above_c + thresholds ** 2 * above_n
    rounding = below_n * (thresholds / levels) ** 2 / 12.0
    total = max(hist.sum(), 1.0)
    return thresholds, (clip + rounding) / total


def mse_threshold(stats, levels: int) -> float:
    """The candidate threshold with the smallest expected quantization MSE."""
    _require_hist(stats, 'mse')
    if stats.hist_max == 0 or np.sum(stats.hist) <= stats.zeros:
        return naive_threshold(stats, levels)
    thresholds, curve = mse_curve(stats, levels)
    return _within_range(thresholds[int(np.argmin(curve))], stats)


def kl_curve(stats, levels: int, eps: float = 1e-4) -> Tuple[np.ndarray, np.ndarray]:
    """KL divergence between the clipped and the quantized distribution per candidate.

    The TensorRT method (Szymon Migacz, "8-bit Inference with TensorRT", GTC 2017)::

        for each candidate i (threshold = upper edge of bin i-1):
            P = hist[0:i], with all counts of bins >= i added to P[i-1] (clipping)
            Q = hist[0:i] merged into `levels` groups, each group's count spread
                evenly over the bins of the group where P is non-zero
            divergence[i] = KL(P / sum P || Q / sum Q)

    Smoothing, as in TensorRT and MXNet: an empty bin of P or Q counts ``eps``, so a
    clipped outlier landing on a bin where Q is empty costs a large but finite amount.

    Instead of building P and Q per candidate, the sums over the group boundaries come
    from cumulative sums of ``h``, ``h log h`` and ``[h > 0]``: a ``(candidates, levels)``
    matrix of work instead of ``(candidates, bins)``.
    """
    _require_hist(stats, 'entropy')
    hist = _nonzero_hist(stats)
    num_bins = len(hist)
    total = hist.sum()
    cand = np.arange(min(levels, num_bins), num_bins + 1)     # i = number of bins kept
    thresholds = cand * (stats.hist_max / num_bins)

    cum = np.concatenate([[0.0], np.cumsum(hist)])            # cum[k] = sum h[<k]
    cum_nonzero = np.concatenate([[0.0], np.cumsum(hist > 0)])
    hlogh = hist * np.log(np.where(hist > 0, hist, 1.0))
    cum_hlogh = np.concatenate([[0.0], np.cumsum(hlogh)])

    kept = cum[cand]                                          # sum Q = mass below threshold
    outliers = total - kept                                   # clipped onto bin i-1
    edge = hist[cand - 1] + outliers                          # P[i-1]
    # sum over P>0 of P log P: the untouched bins plus the edge bin with the outliers
    p_log_p = cum_hlogh[cand - 1] + edge * np.log(np.where(edge > 0, edge, 1.0))

    bounds = (np.arange(levels + 1)[None, :] * cand[:, None]) // levels   # (C, L+1)
    group_sum = np.diff(cum[bounds], axis=1)                  # Q mass per group
    group_nz = np.diff(cum_nonzero[bounds], axis=1)           # bins of the group with P>0
    group_nz[:, -1] += (edge > 0) * 1.0 - (hist[cand - 1] > 0)
    p_mass = group_sum.copy()
    p_mass[:, -1] += outliers                                 # P mass per group

    q_level = np.divide(group_sum, group_nz, out=np.zeros_like(group_sum), where=group_nz > 0)
    log_q = np.log(np.where(q_level > 0, q_level, eps))       # starved groups: Q = eps
    p_log_q = (p_mass * log_q).sum(axis=1)
    empty_bins = cand - group_nz.sum(axis=1)                  # P = Q = eps there
    with np.errstate(divide='ignore', invalid='ignore'):
        divergence = ((p_log_p - p_log_q) / total - np.log(total) + np.log(kept)
                      + empty_bins * eps / total * np.log(kept / total))
    divergence[kept <= 0] = np.inf
    return thresholds, divergence


# KL curves are often flat around their minimum, with near-equal minima far apart: the
# first conv of our Fashion-MNIST Inception chose 1.22 from one 160-image calibration set
# and 2.11 from another (max 3.96), and top-1 moved by 1.3 points. Among candidates
# within this relative margin of the minimum, the largest threshold is taken: clipping
# costs accuracy more than coarser steps do.
KL_TIE_MARGIN = 0.05


def kl_threshold(stats, levels: int, tie_margin: float = KL_TIE_MARGIN) -> float:
    """The largest candidate whose KL divergence is within ``tie_margin`` of the smallest."""
    _require_hist(stats, 'entropy')
    if stats.hist_max == 0 or np.sum(stats.hist) <= stats.zeros:
        return naive_threshold(stats, levels)
    thresholds, divergence = kl_curve(stats, levels)
    finite = np.isfinite(divergence)
    if not finite.any():
        return naive_threshold(stats, levels)
    best = divergence[finite].min()
    near = np.flatnonzero(finite & (divergence <= best + tie_margin * abs(best)))
    return _within_range(thresholds[near[-1]], stats)


# entropy mode: the KL threshold stands unless its expected squared error is more than
# this factor above the least one (measured on the trained families and the tiny nets of
# the correctness issue: 1.2, 2 and 4 gave the same top-1 within 0.1 point; 1.2 the best)
KL_MSE_GUARD = 1.2


def entropy_threshold(stats, levels: int, tie_margin: float = KL_TIE_MARGIN) -> float:
    """The KL threshold (:func:`kl_threshold`), unless clipping there costs more than
    :data:`KL_MSE_GUARD` times the least expected squared error: then the threshold of
    least error (:func:`mse_threshold`), when it is larger.

    KL prefers a fine grid for the bulk of the distribution and will clip a tail to get
    it; where the tail carries much of the signal's energy that loses more than it gains.
    Measured: the ReLU outputs of the correctness issue's tiny networks were clipped to
    0.37-0.5 of their range (INT8 cosine 0.989 and 0.998 against FP32; 0.9998 and 0.9999
    guarded), and with the int8 activations of CPUs without VNNI (127 levels) plain KL lost
    0.2-1.0 points of top-1 on every trained Fashion-MNIST family, the guarded one at most
    0.14 (10k test images). The guard weighs squared error, so rare large values whose
    clipping dominates that error (a heavy tail, a handful of outliers) are kept, as
    :func:`mse_threshold` would keep them; a threshold KL places above the least-error
    one always stands.
    """
    threshold = kl_threshold(stats, levels, tie_margin)
    if stats.hist_max == 0 or np.sum(stats.hist) <= stats.zeros:
        return threshold
    thresholds, curve = mse_curve(stats, levels)
    at = curve[min(int(np.searchsorted(thresholds, threshold - 1e-12)), len(curve) - 1)]
    if at <= KL_MSE_GUARD * curve.min():
        return threshold
    return max(threshold, mse_threshold(stats, levels))


ThresholdFn = Callable[..., float]

THRESHOLDS: Dict[str, ThresholdFn] = {
    'naive': naive_threshold,
    'entropy': entropy_threshold,
    'percentile': percentile_threshold,
    'mse': mse_threshold,
}


def get_threshold_fn(mode: str) -> ThresholdFn:
    """The threshold function for ``mode``; an unknown name lists the valid ones."""
    if mode not in THRESHOLDS:
        raise ValueError('mode: unknown calibration mode %r; expected one of %s'
                         % (mode, sorted(THRESHOLDS)))
    return THRESHOLDS[mode]
