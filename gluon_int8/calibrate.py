"""Stage 4, calibrate: run the fused FP32 graph over data and stream its tensors to a collector.

The tensors the quantized graph needs thresholds for are the outputs of one static graph
(:class:`gluon_int8.observe.Watcher`): one forward pass per batch, in sub-batches when
a batch's tensors would take more than :data:`gluon_int8.observe.MAX_BYTES`. Each tensor
is read where MXNet wrote it, its min and max computed once (in cache-sized chunks,
checking for NaN/Inf) and handed with its place in the batch to the collector
(:meth:`~gluon_int8.collectors.Collector.collect_part`), which keeps running statistics.
Once a sub-batch's forward pass has finished, its tensors go to a pool of as many
threads as the forward pass uses (:func:`stat_threads`), where the collector takes
layers in parallel (the built-in ones do); all are read before the next pass reuses the
memory. The statistics do not overlap the forward pass: on 2 cores, taking each tensor
as soon as it was ready made both slower (oneDNN's OpenMP threads wait for each other
when the statistics take their cores): ResNet50, 64 images, 6.3-6.9 s overlapped
against 5.9-6.1 s one after the other (README, "Calibration speed").
Graph inputs that need a range (the ``data`` quantize node) are collected straight from
the batch. The statistics then go through a threshold function
(:mod:`gluon_int8.thresholds`) into a :class:`~gluon_int8.table.CalibrationTable`.

The statistics are those the op hooks of earlier versions gave, bit for bit, where a
batch is read whole. Where it is split, tensors whose kernel rounds differently with
the batch size (oneDNN's fully connected layer) differ by float rounding: thresholds
within one histogram bin (``tests/test_calibrate.py``).
"""
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, List, Optional, Sequence

import mxnet as mx
import numpy as np

from .collectors import Collector, LayerStats, Part
from .data import Batch
from .observe import MAX_BYTES, Watcher, batch_errors, sub_batches
from .quantize_graph import graph_outputs
from .table import CalibrationTable
from .thresholds import get_threshold_fn, naive_threshold

log = logging.getLogger(__name__)

CHUNK = 1 << 18  # elements per min/max step: 1 MB of float32 stays in cache


def min_max(flat: np.ndarray):
    """(min, max) of a 1-d array, read in cache-sized chunks (one pass over memory where
    ``min()`` then ``max()`` would make two); NaN propagates as in numpy."""
    if flat.size <= CHUNK:
        return flat.min(), flat.max()
    los, his = [], []
    for start in range(0, flat.size, CHUNK):
        chunk = flat[start:start + CHUNK]
        los.append(chunk.min())
        his.append(chunk.max())
    return np.min(los), np.max(his)


class _StatsSink:
    """Feeds the collector after checking each tensor for NaN/Inf (naming the layer)."""

    def __init__(self, collector: Collector):
        self.collector = collector
        self.batch_index = 0

    def __call__(self, layer: str, op_name: str, arr: np.ndarray, part: Part) -> None:
        lo, hi = min_max(arr.reshape(-1))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError('calib_data: layer %r produced NaN or Inf on calibration batch '
                             '%d; check the input data and the weights feeding that layer'
                             % (layer, self.batch_index))
        self.collector.collect_part(layer, op_name, arr, lo, hi, part)


def _producers(symbol: mx.sym.Symbol, names: Sequence[str]) -> Dict[str, str]:
    """Output name -> the op that produces it (what collectors are told)."""
    ops = {node['name']: node['op'] for node in json.loads(symbol.tojson())['nodes']}
    wanted = set(names)
    return {out: ops[node] for node, _, out in graph_outputs(symbol) if out in wanted}


def collect_statistics(symbol: mx.sym.Symbol, data_names: Sequence[str], arg_params, aux_params,
                       layers: Sequence[str], batches: Iterable[Batch], collector: Collector,
                       progress: bool = False, total: Optional[int] = None,
                       max_bytes: int = MAX_BYTES, threads: Optional[int] = None
                       ) -> Dict[str, LayerStats]:
    """Run ``symbol`` (FP32) over ``batches`` and return the collector's statistics,
    read on ``threads`` threads (default :func:`stat_threads`) where the collector allows."""
    sink = _StatsSink(collector)
    inputs = [(i, n) for i, n in enumerate(data_names) if n in set(layers)]
    outputs = [n for n in layers if n not in set(data_names)]
    watcher = Watcher(symbol, outputs, data_names, {**aux_params, **arg_params},
                      max_bytes=max_bytes)
    ops = _producers(symbol, outputs)
    threads = (threads or stat_threads()) if collector.layers_in_parallel else 1
    pool = ThreadPoolExecutor(threads) if threads > 1 else None  # None: this thread
    try:
        for batch in _progress(batches, progress, total):
            for i, name in inputs:
                arr = batch[i].asnumpy()
                sink(name, 'input', arr, Part(0, arr.size))
            _collect_batch(watcher, batch, sink, ops, pool)
            sink.batch_index += 1
    finally:
        if pool is not None:
            pool.shutdown()
    stats = collector.finalize()
    missing = sorted(set(layers) - set(stats))
    if missing:
        raise RuntimeError('calibration saw no output of layers %s' % missing)
    log.info('calibrated %d layer outputs over %d batches', len(layers), sink.batch_index)
    return stats


def stat_threads() -> int:
    """Threads for statistics: as many as MXNet's forward pass uses (``OMP_NUM_THREADS``),
    else the CPUs this process may run on."""
    cpus = len(os.sched_getaffinity(0))
    omp = os.environ.get('OMP_NUM_THREADS', '')
    return max(1, min(int(omp), cpus)) if omp.isdigit() else cpus


def _collect_batch(watcher: Watcher, batch: Batch, sink: _StatsSink, ops: Dict[str, str],
                   pool: Optional[ThreadPoolExecutor]):
    """One batch, in the watcher's sub-batches: the forward pass of a sub-batch, then the
    statistics of its tensors, on the pool's threads or this one; results taken in graph
    order (an error names the first layer in the graph that has one), all before the
    next pass reuses the memory."""
    examples = batch[0].shape[0]
    with batch_errors('calib_data', sink.batch_index, batch):
        for start, inputs in sub_batches(batch, watcher.sub_batch(batch)):
            part_examples = inputs[0].shape[0]
            views = list(watcher.read(inputs))  # the whole forward pass first
            jobs = []
            for name, view in views:
                if part_examples == examples:  # whole (also tensors not laid out by example)
                    part = Part(0, view.size)
                else:  # the watcher splits only tensors laid out example by example
                    per_example = view.size // part_examples
                    part = Part(start * per_example, examples * per_example)
                if pool is None:
                    sink(name, ops[name], view, part)
                else:
                    jobs.append(pool.submit(sink, name, ops[name], view, part))
            for job in jobs:
                job.result()


def _progress(batches, enabled: bool, total: Optional[int]):
    if not enabled:
        return batches
    from tqdm import tqdm
    return tqdm(batches, total=total, desc='calibrating', unit='batch')


def make_table(stats: Dict[str, LayerStats], mode: str, quantized_dtype: str,
               quantize_inputs: Sequence[str] = (), input_layers: Sequence[str] = (),
               **threshold_options) -> CalibrationTable:
    """Thresholds for every layer -> a calibration table.

    A layer whose calibrated min is >= 0 gets the range ``(0, T)``, any other
    ``(-T, T)``. As in MXNet, ``quantized_dtype`` decides the type of the quantize nodes
    only: a oneDNN conv with a fused ReLU emits uint8 whatever it is, and needs a
    non-negative range. The search uses 255 levels where the layer can run uint8, else 127.
    With ``quantized_dtype='uint8'`` the outputs feeding quantize nodes
    (``quantize_inputs``) get ``(0, T)`` too: negative values are clipped there (logged).
    ``mode`` may be ``'custom'`` for a user collector: its min/max are the ranges.

    The network's own inputs (``input_layers``) always get their full min/max range:
    they are bounded signals, often with a spike (an image background normalized to one
    negative value) that the KL search would wrongly clip to, and clipping inputs is
    what costs accuracy most (8.7 points of top-1 on our Fashion-MNIST ResNet).
    """
    forced_unsigned = set(quantize_inputs) if quantized_dtype == 'uint8' else set()
    threshold = naive_threshold if mode == 'custom' else get_threshold_fn(mode)
    ranges, observed = {}, {}
    for name, st in stats.items():
        unsigned = st.min >= 0 or name in forced_unsigned
        levels = 255 if unsigned and quantized_dtype != 'int8' else 127
        t = (naive_threshold(st, levels) if name in input_layers
             else threshold(st, levels, **threshold_options))
        ranges[name] = (0.0, t) if unsigned else (-t, t)
        observed[name] = (float(st.min), float(st.max))
    clipped = sorted(n for n, st in stats.items() if st.min < 0 and n in forced_unsigned)
    if clipped:
        log.warning("quantized_dtype='uint8' clips the negative values of %d layer outputs "
                    "at their quantize nodes: %s", len(clipped), clipped)
    return CalibrationTable(ranges, mode, quantized_dtype, observed)


__all__: List[str] = ['collect_statistics', 'make_table', 'min_max']
