"""Tier 1: the threshold algorithms and collectors, in numpy, against hand-computed cases."""
import numpy as np
import pytest

from gluon_int8.collectors import HistogramCollector, LayerStats, MinMaxCollector
from gluon_int8.thresholds import (KL_MSE_GUARD, MIN_THRESHOLD, THRESHOLDS, entropy_threshold,
                                   kl_threshold, get_threshold_fn,
                                   kl_curve, mse_curve, mse_threshold, naive_threshold,
                                   percentile_threshold)


def stats_of(values, num_bins=2048):
    collector = HistogramCollector(num_bins=num_bins, max_samples=None)
    collector.collect('x', 'op', np.asarray(values, dtype=np.float32))
    return collector.finalize()['x']


def brute_force_kl(hist, levels, eps=1e-4):
    """Loop-per-candidate reference of the TensorRT KL search (independent oracle):
    empty bins of P and Q count eps, P is normalized by all counts, Q by the kept ones."""
    hist = np.asarray(hist, dtype=np.float64)
    out = []
    for i in range(levels, len(hist) + 1):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        sliced = hist[:i]
        q = np.zeros(i)
        bounds = (np.arange(levels + 1) * i) // levels
        for g in range(levels):
            lo, hi = bounds[g], bounds[g + 1]
            nz = p[lo:hi] > 0
            if nz.sum():
                q[lo:hi][nz] = sliced[lo:hi].sum() / nz.sum()
        pn = np.where(p > 0, p, eps) / hist.sum()
        qn = np.where(q > 0, q, eps) / sliced.sum()
        out.append(float(np.sum(pn * np.log(pn / qn))))
    return np.array(out)


def test_naive_is_max_abs():
    assert naive_threshold(LayerStats(-3.0, 2.0), 127) == 3.0
    assert naive_threshold(LayerStats(0.0, 0.5), 255) == 0.5


def test_all_zero_layer_gets_a_positive_threshold():
    stats = stats_of(np.zeros(100))
    for mode, fn in THRESHOLDS.items():
        assert fn(stats, 127) == MIN_THRESHOLD, mode


def test_percentile_100_is_max_and_50_interpolates():
    values = np.array([0.5, 1.5, 2.5, 3.5, -7.25])
    stats = stats_of(values)
    assert percentile_threshold(stats, 127, percentile=100) == 7.25
    flat = LayerStats(0.0, 4.0, np.array([1.0, 1.0, 1.0, 1.0]), 4.0)
    # cdf = 1,2,3,4: the 50th percentile (count 2) is the upper edge of bin 1
    assert percentile_threshold(flat, 127, percentile=50) == pytest.approx(2.0)
    assert percentile_threshold(flat, 127, percentile=62.5) == pytest.approx(2.5)


def test_kl_curve_matches_brute_force_loop():
    rng = np.random.RandomState(0)
    hist = rng.poisson(5.0, size=400).astype(np.float64) * (rng.rand(400) > 0.3)
    hist[350:] = 0
    hist[399] = 3  # outliers far out, with an empty gap before them
    stats = LayerStats(0.0, 1.0, hist, 1.0)
    for levels in (127, 255):
        _, fast = kl_curve(stats, levels)
        slow = brute_force_kl(hist, levels)
        np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-12)


def _error_ratio(stats, levels, threshold):
    """Expected squared error at ``threshold`` over the least one."""
    thresholds, curve = mse_curve(stats, levels)
    return curve[np.searchsorted(thresholds, threshold - 1e-12)] / curve.min()


def test_kl_clips_outliers_and_the_guard_keeps_them_when_they_dominate_the_error():
    rng = np.random.RandomState(1)
    stats = stats_of(np.concatenate([rng.randn(200000), [60.0, -80.0]]))
    kl = kl_threshold(stats, 127)
    assert 2.0 < kl < 20.0  # KL keeps the gaussian bulk, clips the outliers
    # clipping 60 and -80 to ~5 costs (55^2 + 75^2) / 200002 = 0.043 per value, more
    # than twice what a grid coarse enough to hold them costs
    assert _error_ratio(stats, 127, kl) > 2.0
    assert entropy_threshold(stats, 127) == mse_threshold(stats, 127)
    assert 20.0 < entropy_threshold(stats, 127) <= 80.0


def test_entropy_takes_the_least_error_threshold_only_past_the_guard():
    rng = np.random.RandomState(0)
    heavy = stats_of(rng.lognormal(0, 1, 200000))  # a heavy tail KL clips hard
    kl, mse = kl_threshold(heavy, 127), mse_threshold(heavy, 127)
    assert kl < 25.0 < mse < heavy.max and _error_ratio(heavy, 127, kl) > 5.0
    assert entropy_threshold(heavy, 127) == mse
    half = stats_of(np.maximum(rng.randn(200000), 0))  # ReLU of a gaussian: no real tail
    assert mse_threshold(half, 127) < kl_threshold(half, 127)
    assert _error_ratio(half, 127, kl_threshold(half, 127)) <= KL_MSE_GUARD
    assert entropy_threshold(half, 127) == kl_threshold(half, 127)
    expo = stats_of(rng.exponential(size=200000))  # past the guard, but KL is the larger
    assert _error_ratio(expo, 127, kl_threshold(expo, 127)) > KL_MSE_GUARD
    assert entropy_threshold(expo, 127) == kl_threshold(expo, 127) > mse_threshold(expo, 127)


def test_entropy_keeps_uniform_range():
    values = np.linspace(0, 1, 100001)
    threshold = entropy_threshold(stats_of(values), 255)
    assert 0.95 <= threshold <= 1.0


def test_mse_single_spike_hand_computed():
    # all mass in bin 10 of 100 over [0, 1]: the best threshold just covers that bin
    hist = np.zeros(100)
    hist[10] = 1000
    stats = LayerStats(0.0, 0.105, hist, 1.0)
    thresholds, curve = mse_curve(stats, 255)
    assert thresholds[int(np.argmin(curve))] == pytest.approx(0.11)
    assert mse_threshold(stats, 255) == pytest.approx(0.105)  # clamped to the observed peak
    # below it, clipping error (0.105 - T)^2; at it, rounding error (T/255)^2/12
    assert curve[9] == pytest.approx((0.105 - 0.10) ** 2)
    assert curve[10] == pytest.approx((0.11 / 255) ** 2 / 12)


def test_mse_curve_is_minimal_at_returned_threshold():
    rng = np.random.RandomState(2)
    stats = stats_of(np.concatenate([rng.laplace(size=100000), [40.0]]))
    thresholds, curve = mse_curve(stats, 127)
    best = mse_threshold(stats, 127)
    assert curve[np.searchsorted(thresholds, best)] == curve.min()
    assert best < 40.0


def test_unknown_mode_lists_valid_ones():
    with pytest.raises(ValueError, match="'kl'.*entropy.*mse.*naive.*percentile"):
        get_threshold_fn('kl')


def test_histogram_growth_is_exact():
    rng = np.random.RandomState(3)
    first = rng.randint(0, 512, size=5000) / 512.0             # max < 1
    second = rng.randint(0, 4 * 512, size=5000) / 512.0        # max < 4: range doubles twice
    first[0], second[0] = 1.0, 4.0
    collector = HistogramCollector(num_bins=256, max_samples=None)
    collector.collect('x', 'op', first.astype(np.float32))
    collector.collect('x', 'op', -second.astype(np.float32))
    stats = collector.finalize()['x']
    assert stats.hist_max == 4.0 and (stats.min, stats.max) == (-4.0, 1.0)
    # documented semantics: the first batch is binned over [0, 1] (its max in the last
    # bin), then every 4 bins merge into one of [0, 4]; the second batch goes to [0, 4]
    first_bins = np.minimum(np.floor(first * 256), 255) // 4
    second_bins = np.minimum(np.floor(second * 256 / 4.0), 255)
    expected = np.bincount(np.concatenate([first_bins, second_bins]).astype(int), minlength=256)
    np.testing.assert_array_equal(stats.hist, expected)


def test_sampling_keeps_exact_min_max_and_bounded_state():
    collector = HistogramCollector(num_bins=256, max_samples=1000)
    for step in range(20):
        batch = np.random.RandomState(step).rand(100003).astype(np.float32)
        batch[12345] = 50.0 + step  # never on the sampling stride
        collector.collect('x', 'op', batch)
    stats = collector.finalize()['x']
    assert stats.max == 69.0 and stats.min >= 0
    assert stats.hist.shape == (256,)
    assert stats.hist.sum() == pytest.approx(20 * 100003, rel=0.01)


def test_minmax_collector_runs_over_batches():
    collector = MinMaxCollector()
    collector.collect('a', 'op', np.array([1.0, 2.0]))
    collector.collect('a', 'op', np.array([-1.0, 0.5]))
    stats = collector.finalize()['a']
    assert (stats.min, stats.max, stats.hist) == (-1.0, 2.0, None)


@pytest.mark.parametrize('kind', ['relu', 'gaussian', 'laplace'])
def test_entropy_agrees_with_mxnet_builtin_search(kind):
    """Our vectorized search lands within 15% of MXNet's C++ search on the same data,
    including ReLU outputs whose zero spike must not drag the threshold down."""
    from mxnet.contrib.quantization import _get_optimal_threshold
    rng = np.random.RandomState(4)
    values = {'relu': np.maximum(rng.randn(200000), 0), 'gaussian': rng.randn(200000),
              'laplace': rng.laplace(size=200000)}[kind].astype(np.float32)
    peak = float(np.abs(values).max())
    hist, edges = np.histogram(values, bins=8001, range=(-peak, peak))
    reference = float(_get_optimal_threshold((hist, edges, values.min(), values.max(), peak),
                                             'auto')[2])
    levels = 255 if values.min() >= 0 else 127
    ours = kl_threshold(stats_of(values), levels, tie_margin=0.0)  # the plain argmin
    assert ours == pytest.approx(reference, rel=0.15)
    assert ours < peak


def test_entropy_tie_margin_takes_the_largest_near_minimal_threshold():
    rng = np.random.RandomState(7)
    stats = stats_of(np.maximum(rng.laplace(size=200000), 0).astype(np.float32))
    thresholds, divergence = kl_curve(stats, 255)
    plain = kl_threshold(stats, 255, tie_margin=0.0)
    tied = kl_threshold(stats, 255)  # default 5% margin
    assert plain <= tied <= stats.max
    chosen = divergence[np.searchsorted(thresholds, tied - 1e-9)]
    assert chosen <= divergence.min() * 1.05
    assert not (divergence[thresholds > tied + 1e-9] <= divergence.min() * 1.05).any()


def test_thresholds_never_exceed_the_observed_peak():
    # two batches: the histogram range doubles past the peak, candidates go beyond it
    collector = HistogramCollector(num_bins=2048, max_samples=None)
    rng = np.random.RandomState(5)
    collector.collect('x', 'op', rng.uniform(0, 1.0, 10000).astype(np.float32))
    collector.collect('x', 'op', rng.uniform(0, 1.3, 10000).astype(np.float32))
    stats = collector.finalize()['x']
    assert stats.hist_max > 1.9 > stats.max
    for mode, fn in THRESHOLDS.items():
        assert fn(stats, 255) <= stats.max, mode


def test_network_inputs_keep_their_full_range():
    """A normalized image: background pixels all at one negative value, a spike that the
    KL search would clip to; the network input keeps min/max, other layers take the
    mode's symmetric threshold."""
    from gluon_int8.calibrate import make_table
    rng = np.random.RandomState(6)
    pixels = np.where(rng.rand(100000) < 0.6, -0.81, rng.uniform(-0.81, 2.02, 100000))
    stats = stats_of(pixels.astype(np.float32))
    table = make_table({'data': stats, 'conv_output': stats}, 'entropy', 'auto',
                       input_layers=['data'])
    assert table.ranges['data'] == pytest.approx((-pixels.max(), pixels.max()), rel=1e-6)
    threshold = entropy_threshold(stats, 127)
    assert table.ranges['conv_output'] == pytest.approx((-threshold, threshold))
    assert kl_threshold(stats, 127) < 1.0  # plain KL would have clipped the input
