"""Calibration reads tensors from one static graph: the same statistics and tables as the
op hooks it replaced, bit for bit where a batch is read whole, within one histogram bin
where batches are split; parts of a batch give a collector the batch's statistics."""
import ctypes
import math
import os
import threading
import warnings

import mxnet as mx
import numpy as np
import pytest
from mxnet.base import NDArrayHandle, py_str
from mxnet.gluon import nn

import gluon_int8
from gluon_int8 import pipeline
from gluon_int8.api import table_from_stats, validate
from gluon_int8.calibrate import collect_statistics, min_max, stat_threads
from gluon_int8.collectors import Collector, HistogramCollector, MinMaxCollector, Part
from gluon_int8.observe import Watcher, in_budget, sub_batches
from gluon_int8.quantize_graph import graph_outputs, quantize_node_inputs
from gluon_int8.trace import build_symbol_block
from conftest import (ConcatBlock, ConvBNSum, DenseBlock, DepthwiseBlock, GatedReLU, PoolBlock,
                      TwoInputs, make_net)

MODES = ('entropy', 'naive', 'percentile', 'mse')


class WideDense(nn.HybridBlock):
    """A conv and a 4096-input FC: oneDNN's FC sums round differently with the batch size
    (on this AVX2 CPU its outputs for batches of 2 and 8 differ in the last bits)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = nn.Conv2D(64, 3, padding=1, activation='relu')
        self.fc = nn.Dense(64)

    def hybrid_forward(self, F, x):
        return self.fc(self.conv(x))


# -- the oracle: calibration as it was, through op hooks ----------------------------------

def hook_statistics(prepared, batches, collector):
    """Statistics through ``register_op_hook`` on an un-static CachedOp, each wanted
    output copied out as numpy when its op ran: the mechanism calibration replaced."""
    layers = prepared.statistics_layers()
    wanted = {}
    for node, idx, out in graph_outputs(prepared.calibration_graph):
        if out in layers:
            wanted[out] = wanted['%s_%d' % (node, idx)] = out
    errors = []

    def hook(name, op_name, handle):
        key = wanted.get(py_str(name))
        if key is not None:
            try:
                arr = mx.nd.NDArray(ctypes.cast(handle, NDArrayHandle), writable=False).asnumpy()
                collector.collect_range(key, py_str(op_name), arr, arr.min(), arr.max())
            except Exception as err:  # noqa: BLE001 - must not escape into the C callback
                errors.append(err)

    block = build_symbol_block(prepared.calibration_graph, prepared.data_names, prepared.params, {})
    block.hybridize()
    block.register_op_hook(hook, monitor_all=False)
    for batch in batches:
        for i, name in enumerate(prepared.data_names):
            if name in layers:
                arr = batch[i].asnumpy()
                collector.collect_range(name, 'input', arr, arr.min(), arr.max())
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', UserWarning)
            out = block(*batch)
        for o in out if isinstance(out, (list, tuple)) else [out]:
            o.wait_to_read()
    assert not errors
    return collector.finalize()


def new_statistics(prepared, batches, collector, max_bytes=None, threads=1):
    traced = prepared.traced
    options = {'threads': threads} if max_bytes is None else {'max_bytes': max_bytes,
                                                               'threads': threads}
    return collect_statistics(prepared.calibration_graph, traced.data_names, traced.arg_params,
                              traced.aux_params, prepared.statistics_layers(), batches,
                              collector, **options)


def table(prepared, stats, mode):
    opts = validate(mode, 'auto', 'channel', 'smart', None, None, None, None, None, 99.99, 1024,
                    'warn', False)
    return table_from_stats(stats, opts, quantize_node_inputs(prepared.plan.qsym),
                            prepared.data_names)


def prepared_case(cls, shape, batches=3, batch_size=8):
    net, _ = make_net(cls, *[(2,) + s for s in shape])
    rng = np.random.RandomState(1)
    data = [tuple(mx.nd.array(rng.uniform(-1, 1, (batch_size,) + s).astype(np.float32))
                  for s in shape) for _ in range(batches)]
    return pipeline.prepare(net, data[0], 'auto', 'smart', 'channel'), data


def same_stats(a, b):
    return (a.min == b.min and a.max == b.max and a.hist_max == b.hist_max
            and a.zeros == b.zeros and np.array_equal(a.hist, b.hist))


CASES = [(ConvBNSum, [(3, 12, 12)]), (ConcatBlock, [(3, 12, 12)]),
         (DepthwiseBlock, [(3, 12, 12)]), (PoolBlock, [(3, 16, 16)]),
         (GatedReLU, [(3, 12, 12)]), (DenseBlock, [(20,)]),
         (TwoInputs, [(3, 10, 10), (3, 10, 10)]), (WideDense, [(3, 8, 8)])]


@pytest.mark.parametrize('cls, shape', CASES, ids=[c.__name__ for c, _ in CASES])
def test_tables_equal_the_op_hook_tables_bit_for_bit(cls, shape):
    """Read on one thread or on three (layers in parallel): the same bits."""
    prepared, data = prepared_case(cls, shape)
    old = hook_statistics(prepared, data, HistogramCollector())
    for threads in (1, 3):
        new = new_statistics(prepared, data, HistogramCollector(), threads=threads)
        assert sorted(old) == sorted(new) == sorted(prepared.statistics_layers())
        assert [n for n in old if not same_stats(old[n], new[n])] == [], threads
        for mode in MODES:
            assert table(prepared, old, mode).ranges == table(prepared, new, mode).ranges, \
                (mode, threads)


@pytest.mark.parametrize('cls, shape', CASES, ids=[c.__name__ for c, _ in CASES])
def test_split_batches_stay_within_one_bin_and_are_exact_but_for_the_fc(cls, shape):
    """Batches of 8 read in parts of 2 (a budget of 2 examples' tensors): identical, but
    for oneDNN's fully connected layer, whose sums round differently with the batch size
    (its outputs then differ in the last bits): its thresholds within one bin."""
    prepared, data = prepared_case(cls, shape)
    old = hook_statistics(prepared, data, HistogramCollector())
    budget = _bytes_per_example(prepared, data[0]) * 2
    names = [n for n in prepared.statistics_layers() if n not in prepared.data_names]
    if names:
        watcher = Watcher(prepared.calibration_graph, names, prepared.data_names, prepared.params,
                          max_bytes=budget)
        assert watcher.sub_batch(data[0]) == 2
    new = new_statistics(prepared, data, HistogramCollector(), max_bytes=budget, threads=3)
    differ = [n for n in old if not same_stats(old[n], new[n])]
    assert all('fully_connected' in n for n in differ), differ
    for name in differ:
        assert new[name].min == pytest.approx(old[name].min, rel=1e-5, abs=1e-6)
        assert new[name].max == pytest.approx(old[name].max, rel=1e-5, abs=1e-6)
    for mode in MODES:
        before, after = table(prepared, old, mode).ranges, table(prepared, new, mode).ranges
        for name, (lo, hi) in before.items():
            bin_width = old[name].hist_max / len(old[name].hist)
            if name in differ:
                assert after[name][1] == pytest.approx(hi, abs=bin_width), (mode, name)
                assert after[name][0] == pytest.approx(lo, abs=bin_width), (mode, name)
            else:
                assert after[name] == (lo, hi), (mode, name)


def _bytes_per_example(prepared, batch):
    fused = prepared.calibration_graph.get_internals()
    shapes = dict(zip(fused.list_outputs(), fused.infer_shape(
        **{n: b.shape for n, b in zip(prepared.data_names, batch)})[1]))
    layers = [n for n in prepared.statistics_layers() if n not in prepared.data_names]
    return sum(4 * int(np.prod(shapes[n])) for n in layers) // batch[0].shape[0]


def test_a_batch_is_split_evenly_within_the_budget():
    prepared, data = prepared_case(ConvBNSum, [(3, 12, 12)], batches=1, batch_size=12)
    names = [n for n in prepared.statistics_layers() if n not in prepared.data_names]
    per_example = _bytes_per_example(prepared, data[0])
    sizes = {}
    for examples in (12, 5, 4, 1):
        watcher = Watcher(prepared.calibration_graph, names, prepared.data_names, prepared.params,
                          max_bytes=per_example * examples)
        sizes[examples] = watcher.sub_batch(data[0])
    # 12 fits whole; 5 -> a divisor of 12 close to 5 (4); 4 -> 4; 1 -> 1
    assert sizes == {12: 12, 5: 4, 4: 4, 1: 1}
    watcher = Watcher(prepared.calibration_graph, names, prepared.data_names, prepared.params,
                      max_bytes=per_example * 7)
    assert watcher.sub_batch(data[0]) == 6  # no divisor close to 7: 2 parts of 6
    assert [s for s, _ in sub_batches(data[0], 5)] == [0, 5, 10]


def test_tensors_not_laid_out_by_example_keep_batches_whole():
    """A tensor that mixes the examples (a sum over the batch axis) cannot be read in
    parts: the batch is read whole, whatever the budget."""
    data = mx.sym.var('data')
    conv = mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), no_bias=True, name='c')
    pooled = mx.sym.sum(conv, axis=0, name='s')
    params = {'c_weight': mx.nd.ones((4, 3, 3, 3))}
    watcher = Watcher(pooled, ['c_output', 's_output'], ['data'], params, max_bytes=1)
    assert watcher.sub_batch([mx.nd.ones((6, 3, 8, 8))]) == 6
    watcher = Watcher(pooled, ['c_output'], ['data'], params, max_bytes=1)
    assert watcher.sub_batch([mx.nd.ones((6, 3, 8, 8))]) == 1


def test_parts_give_the_histogram_of_the_whole_batch():
    rng = np.random.RandomState(0)
    batches = [rng.standard_normal((6, 1001)).astype(np.float32) * (1 + k) for k in range(3)]
    whole = HistogramCollector(num_bins=256, max_samples=700)
    parts = HistogramCollector(num_bins=256, max_samples=700)
    for batch in batches:
        whole.collect('x', 'op', batch)
        start = 0
        for size in (1, 3, 2):  # uneven parts, the stride running across their borders
            piece = batch[start:start + size]
            parts.collect_part('x', 'op', piece, piece.min(), piece.max(),
                               Part(start * 1001, batch.size))
            start += size
    a, b = whole.finalize()['x'], parts.finalize()['x']
    assert same_stats(a, b)
    assert a.hist.sum() == pytest.approx(3 * 6006, rel=0.01)  # 700-ish samples of 6006


def test_parts_out_of_order_or_unfinished_are_refused():
    collector = HistogramCollector(num_bins=256)
    part = np.ones(10, dtype=np.float32)
    collector.collect_part('x', 'op', part, 1.0, 1.0, Part(0, 30))
    with pytest.raises(RuntimeError, match="layer 'x' got a part starting at element 20"):
        collector.collect_part('x', 'op', part, 1.0, 1.0, Part(20, 30))
    with pytest.raises(RuntimeError, match=r"finalize: layers \['x'\] have a batch"):
        collector.finalize()


def test_minmax_collector_takes_parts_and_user_collectors_get_copies():
    collector = MinMaxCollector()
    collector.collect_part('x', 'op', np.zeros(2), -1.0, 3.0, Part(0, 4))
    collector.collect_part('x', 'op', np.zeros(2), -2.0, 1.0, Part(2, 4))
    assert (collector.finalize()['x'].min, collector.finalize()['x'].max) == (-2.0, 3.0)

    class Keeps(Collector):
        def collect(self, name, op_name, arr):
            self.kept = arr

        def finalize(self):
            return {}

    keeps = Keeps()
    view = np.arange(4.0)
    view.flags.writeable = False
    keeps.collect_part('x', 'op', view, 0.0, 3.0, Part(0, 4))
    assert keeps.kept is not view and keeps.kept.flags.writeable
    np.testing.assert_array_equal(keeps.kept, view)


def test_a_user_collector_is_called_on_one_thread_the_built_in_ones_on_many():
    prepared, data = prepared_case(ConcatBlock, [(3, 12, 12)])

    class Threads(MinMaxCollector):
        layers_in_parallel = False

        def __init__(self):
            super().__init__()
            self.threads = set()

        def collect_range(self, name, op_name, arr, lo, hi):
            self.threads.add(threading.get_ident())
            super().collect_range(name, op_name, arr, lo, hi)

    user = Threads()
    new_statistics(prepared, data, user, threads=3)
    assert user.threads == {threading.get_ident()}
    built_in = type('BuiltIn', (Threads,), {'layers_in_parallel': True})()
    stats = new_statistics(prepared, data, built_in, threads=3)
    assert len(built_in.threads) > 1
    assert stats == new_statistics(prepared, data, MinMaxCollector(), threads=1)


def test_stat_threads_follow_omp_num_threads(monkeypatch):
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    assert stat_threads() == 1
    monkeypatch.setenv('OMP_NUM_THREADS', '999')
    assert stat_threads() == cpus
    monkeypatch.delenv('OMP_NUM_THREADS')
    assert stat_threads() == cpus


def test_zeros_are_exact_zeros():
    arr = np.array([0.0, -0.0, 1e-30, -1e-30, 2.0, 0.0], dtype=np.float32)
    collector = HistogramCollector(num_bins=256, max_samples=None)
    collector.collect('x', 'op', arr)
    stats = collector.finalize()['x']
    assert stats.zeros == 3 and stats.hist[0] == 5


@pytest.mark.parametrize('size', [5, 1 << 18, (1 << 18) * 3 + 7])
def test_min_max_in_chunks_is_numpys(size):
    arr = np.random.RandomState(size % 97).standard_normal(size).astype(np.float32)
    assert min_max(arr) == (arr.min(), arr.max())
    arr[size // 2] = np.nan
    lo, hi = min_max(arr)
    assert math.isnan(lo) and math.isnan(hi)


def test_inf_in_a_later_part_names_the_layer_and_the_batch():
    conv = mx.sym.Convolution(mx.sym.var('data'), num_filter=2, kernel=(1, 1), no_bias=True,
                              name='c')
    batches = [(mx.nd.ones((4, 3, 5, 5)),) for _ in range(3)]
    batches[2][0][3] = 3e38  # finite, but the sum of three overflows: example 3 of batch 2
    with pytest.raises(ValueError, match=r"layer 'c_output' produced NaN or Inf on calibration "
                                         r"batch 2"):
        collect_statistics(conv, ['data'], {'c_weight': mx.nd.ones((2, 3, 1, 1))}, {},
                           ['data', 'c_output'], batches, HistogramCollector(),
                           max_bytes=1, threads=2)  # parts of one example, two threads


def test_wrong_shapes_in_a_later_batch_name_the_batch():
    prepared, data = prepared_case(ConvBNSum, [(3, 12, 12)], batches=2, batch_size=4)
    data.append((mx.nd.ones((4, 5, 12, 12)),))
    with pytest.raises(ValueError, match=r'calib_data: batch 2 with shapes \[\(4, 5, 12, 12\)\] '
                                         'does not fit the network'):
        new_statistics(prepared, data, HistogramCollector())


def test_in_budget_groups_in_order_and_counts_a_shared_key_once():
    sizes = {'a': 4, 'b': 5, 'c': 2, 'd': 9, 'e': 1}
    assert in_budget('abcde', sizes.get, 8) == [['a'], ['b', 'c'], ['d'], ['e']]
    # items of one key read the same tensor: only the first of a group counts
    items = [('x', 6), ('x', 6), ('y', 2), ('x', 6)]
    assert in_budget(items, lambda i: i[1], 8, key=lambda i: i[0]) == [items]
    # a new group counts its key again
    assert in_budget(items, lambda i: i[1], 7, key=lambda i: i[0]) == [items[:2], items[2:3],
                                                                     items[3:]]
