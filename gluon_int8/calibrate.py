"""Stage 4, calibrate: run the fused FP32 graph over data with collectors as op hooks.

The hook (``register_op_hook``) sees every op output of the FP32 graph; only the outputs
the quantized graph needs thresholds for are copied out (once, as numpy) and handed to
the collector, which keeps running statistics. Graph inputs that need a range (the
``data`` quantize node) are collected straight from the batch. The statistics then go
through a threshold function (:mod:`gluon_int8.thresholds`) into a
:class:`~gluon_int8.table.CalibrationTable`.

:class:`OpHook`, :func:`hooked_block` and :func:`run_hooked` are shared with the
per-layer report (:mod:`gluon_int8.report`), which hooks two graphs the same way.
"""
import logging
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import mxnet as mx
import numpy as np

from . import mxnet_private
from .collectors import Collector, LayerStats
from .data import Batch
from .errors import first_line
from .quantize_graph import graph_outputs
from .table import CalibrationTable
from .thresholds import get_threshold_fn, naive_threshold
from .trace import build_symbol_block

log = logging.getLogger(__name__)


def hook_names(symbol: mx.sym.Symbol, layers: Iterable[str]) -> Dict[str, str]:
    """Map every name an op hook may report for a wanted output to that output's name."""
    wanted = set(layers)
    mapping = {}
    for node, idx, out_name in graph_outputs(symbol):
        if out_name in wanted:
            mapping[out_name] = mapping['%s_%d' % (node, idx)] = out_name
    return mapping


class OpHook:
    """An op-hook callback: each wanted output is copied out once, as numpy (the graph
    reuses its memory right after), and handed to ``sink(key, op_name, array)``.

    ``mapping`` maps the names hooks report to the caller's keys. Errors cannot cross
    MXNet's C callback: the first one is kept and :func:`run_hooked` raises it.
    """

    def __init__(self, mapping: Dict[str, object], sink: Callable = None):
        self.mapping = mapping
        self.sink = sink
        self.error: Optional[Exception] = None

    def __call__(self, name, op_name, handle):
        key = self.mapping.get(mxnet_private.hook_str(name))
        if key is None or self.error is not None:
            return
        try:
            arr = mxnet_private.hook_array(handle).asnumpy()
            self.sink(key, mxnet_private.hook_str(op_name), arr)
        except Exception as err:  # noqa: BLE001 - must not escape into the C callback
            self.error = err


def hooked_block(symbol: mx.sym.Symbol, data_names: Sequence[str], values, hook: OpHook):
    """A plain hybridized SymbolBlock (no static_alloc: a static CachedOp bulks ops and
    reports only some outputs) running ``symbol`` with ``hook`` on every op output."""
    block = build_symbol_block(symbol, data_names, values, {})
    block.hybridize()
    block.register_op_hook(hook, monitor_all=False)
    return block


def run_hooked(block, hook: OpHook, batch: Batch, param: str, index: int) -> None:
    """One forward pass of a hooked block; a batch the network cannot take is reported
    as batch ``index`` of the user's ``param``; an error inside the hook is raised."""
    hook.error = None
    try:
        with warnings.catch_warnings():
            # gluon warns on every call that op hooks are "experimental" with
            # static_alloc, even when it is off
            warnings.simplefilter('ignore', UserWarning)
            outputs = block(*batch)
        for out in outputs if isinstance(outputs, (list, tuple)) else [outputs]:
            out.wait_to_read()
    except mx.base.MXNetError as err:
        raise ValueError('%s: batch %d with shapes %s does not fit the network: %s'
                         % (param, index, [tuple(b.shape) for b in batch],
                            first_line(err))) from err
    if hook.error is not None:
        raise hook.error


class _StatsSink:
    """Feeds the collector after checking each output for NaN/Inf (naming the layer)."""

    def __init__(self, collector: Collector):
        self.collector = collector
        self.batch_index = 0

    def __call__(self, layer: str, op_name: str, arr: np.ndarray) -> None:
        lo, hi = arr.min(), arr.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError('calib_data: layer %r produced NaN or Inf on calibration batch '
                             '%d; check the input data and the weights feeding that layer'
                             % (layer, self.batch_index))
        self.collector.collect_range(layer, op_name, arr, lo, hi)


def collect_statistics(symbol: mx.sym.Symbol, data_names: Sequence[str], arg_params, aux_params,
                       layers: Sequence[str], batches: Iterable[Batch], collector: Collector,
                       progress: bool = False, total: Optional[int] = None) -> Dict[str, LayerStats]:
    """Run ``symbol`` (FP32) over ``batches`` and return the collector's statistics."""
    sink = _StatsSink(collector)
    hook = OpHook(hook_names(symbol, layers), sink)
    block = hooked_block(symbol, data_names, {**aux_params, **arg_params}, hook)
    input_layers = [(i, n) for i, n in enumerate(data_names) if n in set(layers)]
    for batch in _progress(batches, progress, total):
        for i, name in input_layers:
            sink(name, 'input', batch[i].asnumpy())
        run_hooked(block, hook, batch, 'calib_data', sink.batch_index)
        sink.batch_index += 1
    stats = collector.finalize()
    missing = sorted(set(layers) - set(stats))
    if missing:
        raise RuntimeError('calibration saw no output of layers %s' % missing)
    log.info('calibrated %d layer outputs over %d batches', len(layers), sink.batch_index)
    return stats


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


__all__: List[str] = ['collect_statistics', 'make_table', 'hook_names', 'OpHook', 'hooked_block',
                      'run_hooked']
