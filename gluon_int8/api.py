"""``quantize_net``: the one-call INT8 pipeline, and the validation of its options.

The pipeline, one stage per module, in three steps (:mod:`gluon_int8.pipeline`)::

    prepare:   trace (trace.py) -> fuse, guarded and verified (fuse.py)
               -> quantize graph (quantize_graph.py), planned by the op table (plan.py)
    calibrate: statistics (calibrate.py, collectors.py) -> thresholds (thresholds.py)
               -> calibration table (table.py)
    convert:   ranges and rewrites into the graph (plan.py) -> block (block.py)
               -> self-check against FP32 (selfcheck.py)

Options are validated here, once, before any work is done.
"""
import dataclasses
import itertools
import logging
import os
from typing import Mapping, Optional, Sequence, Union

from mxnet.gluon import HybridBlock

from . import pipeline
from .block import QuantizedBlock
from .calibrate import make_table
from .collectors import DEFAULT_NUM_BINS, Collector, HistogramCollector, MinMaxCollector
from .data import iter_batches
from .pipeline import SELF_CHECKS, Prepared
from .quantize_graph import GRANULARITIES, quantize_node_inputs
from .table import (CalibrationTable, check_ranges, check_reuse, check_table_argument,
                    optional_table, table_source, warn_tiny_ranges)
from .thresholds import THRESHOLDS
from .trace import count_inputs

log = logging.getLogger(__name__)

MODES = tuple(THRESHOLDS) + ('none',)
QUANTIZED_DTYPES = ('auto', 'int8', 'uint8')
QUANTIZE_MODES = ('full', 'smart')


@dataclasses.dataclass(frozen=True)
class Options:
    """The validated options of one ``quantize_net`` call."""
    mode: Union[str, Collector]
    quantized_dtype: str
    granularity: str
    quantize_mode: str
    exclude_layers: Union[tuple, dict]        # rules, or rule -> reason
    exclude_layers_match: Union[tuple, dict]
    exclude_operators: Union[tuple, dict]
    num_calib_batches: Optional[int]
    num_calib_examples: Optional[int]
    percentile: float
    num_bins: int
    self_check: str = 'warn'
    allow_table_mismatch: bool = False
    bias_correction: bool = False
    for_onnx: bool = False

    @property
    def mode_name(self) -> str:
        return 'custom' if isinstance(self.mode, Collector) else self.mode

    def new_collector(self) -> Collector:
        if isinstance(self.mode, Collector):
            return self.mode
        if self.mode == 'naive':
            return MinMaxCollector()
        return HistogramCollector(num_bins=self.num_bins)

    def threshold_options(self) -> dict:
        return {'percentile': self.percentile} if self.mode == 'percentile' else {}


def _choice(param: str, value, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError('%s: got %r; expected one of %s' % (param, value, list(allowed)))
    return value


def _names(param: str, value):
    """A tuple of rules, or for a dict (rule -> the reason the layer table shows) the dict."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, str)
                                          for k, v in value.items()):
        return dict(value)
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) for v in value):
        raise TypeError('%s: got %r; expected a list of str, or a dict of str -> str (the '
                        'reason to show)' % (param, value))
    return tuple(value)


def _count(param: str, value) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError('%s: got %r; expected a positive int or None' % (param, value))
    return value


def _mode(value) -> Union[str, Collector]:
    if isinstance(value, type) and issubclass(value, Collector):
        return value()
    if isinstance(value, Collector):
        return value
    if not isinstance(value, str) or value not in MODES:
        raise ValueError('mode: got %r; expected one of %s, or a Collector subclass or '
                         'instance' % (value, list(MODES)))
    return value


def validate(mode='entropy', quantized_dtype='auto', granularity='tensor', quantize_mode='full',
             exclude_layers=None, exclude_layers_match=None, exclude_operators=None,
             num_calib_batches=None, num_calib_examples=None, percentile=99.99,
             num_bins=DEFAULT_NUM_BINS, self_check='warn',
             allow_table_mismatch=False, bias_correction=False, for_onnx=False) -> Options:
    """Check every option once; errors name the parameter, the value and what is allowed."""
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) \
            or not 0 < percentile <= 100:
        raise ValueError('percentile: got %r; expected a number in (0, 100]' % (percentile,))
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 256 \
            or num_bins & (num_bins - 1):
        raise ValueError('num_bins: got %r; expected a power of two >= 256 (1024, 2048, ...): '
                         'the histograms double their range by merging pairs of bins'
                         % (num_bins,))
    for param, value in (('allow_table_mismatch', allow_table_mismatch),
                         ('bias_correction', bias_correction), ('for_onnx', for_onnx)):
        if not isinstance(value, bool):
            raise TypeError('%s: got %r; expected True or False' % (param, value))
    if bias_correction and mode == 'none':
        raise ValueError("bias_correction: got True with mode='none'; correcting biases needs "
                         'calibrated ranges: pass another mode, or bias_correction=False')
    return Options(_mode(mode), _choice('quantized_dtype', quantized_dtype, QUANTIZED_DTYPES),
                   _choice('granularity', granularity, tuple(GRANULARITIES)),
                   _choice('quantize_mode', quantize_mode, QUANTIZE_MODES),
                   _names('exclude_layers', exclude_layers),
                   _names('exclude_layers_match', exclude_layers_match),
                   _names('exclude_operators', exclude_operators),
                   _count('num_calib_batches', num_calib_batches),
                   _count('num_calib_examples', num_calib_examples), float(percentile), num_bins,
                   _choice('self_check', self_check, SELF_CHECKS), allow_table_mismatch,
                   bias_correction, for_onnx)


def quantize_net(block: HybridBlock, calib_data=None, mode='entropy', *,
                 quantized_dtype: str = 'auto', granularity: str = 'tensor',
                 quantize_mode: str = 'full', exclude_layers=None, exclude_layers_match=None,
                 exclude_operators=None, num_calib_batches: Optional[int] = None,
                 num_calib_examples: Optional[int] = None, percentile: float = 99.99,
                 num_bins: int = DEFAULT_NUM_BINS, calib_table=None, self_check: str = 'warn',
                 progress: bool = False, allow_table_mismatch: bool = False,
                 bias_correction: bool = False, for_onnx: bool = False) -> QuantizedBlock:
    """Quantize a Gluon HybridBlock to INT8 and return a drop-in ``QuantizedBlock``.

    Parameters
    ----------
    block : HybridBlock
        The trained FP32 network, hybridized or not. It is not modified, except that
        parameters still waiting for deferred initialization get initialized by one
        forward pass on the first calibration batch.
    calib_data : DataLoader, iterable of batches, mx.io.DataIter or array
        Calibration data; tuples contribute their first ``num_inputs`` arrays (labels
        are dropped). Not needed for ``mode='none'`` or with a saved ``calib_table``.
    mode : str or Collector
        ``'naive'`` (min/max), ``'entropy'`` (KL, TensorRT-style), ``'percentile'``,
        ``'mse'``, ``'none'`` (ranges computed at runtime), or a :class:`Collector`
        subclass/instance whose min/max become the ranges.
    quantized_dtype : {'auto', 'int8', 'uint8'}
        ``'auto'``: uint8 where the calibrated min is >= 0, else int8.
    granularity : {'tensor', 'channel'}
        Weight scales per tensor or per output channel.
    quantize_mode : {'full', 'smart'}
        MXNet's pass mode: quantize every op that has an INT8 kernel, or only where it pays.
    exclude_layers, exclude_layers_match, exclude_operators : list of str, or dict
        Layers kept FP32: exact names, glob/regex patterns, op types; matched against the
        fused node names and the original layer names inside them. A dict maps each rule
        to the reason the layer table shows (a list's reason names the option and rule).
    num_calib_batches, num_calib_examples : int
        Stop calibration after this many batches / examples.
    percentile : float
        For ``mode='percentile'``: percentile of |x| used as threshold.
    num_bins : int
        Histogram bins for the histogram-based modes: a power of two >= 256.
    calib_table : str, os.PathLike or CalibrationTable
        With ``calib_data``: a path (str or path-like) where the table is saved; a
        ``CalibrationTable`` object together with data is a ``ValueError`` (calibrate,
        or quantize from the table?). Without data: the table, or its path, to quantize
        from. A table is checked against this network and call: layers, valid ranges,
        negative ranges with ``quantized_dtype='uint8'`` (always refused), and its
        network fingerprint, mode and quantized_dtype (refused unless
        ``allow_table_mismatch``).
    self_check : {'warn', 'fallback', 'off'}
        Before returning, every INT8 layer is compared with its FP32 op on its own INT8
        inputs from the first calibration batch (:mod:`gluon_int8.selfcheck`). A layer
        far beyond its 8-bit rounding is a kernel defect: ``'warn'`` names it in a
        warning, ``'fallback'`` returns it to FP32 (the layer table says why), ``'off'``
        skips the check. Without calibration data there is nothing to check.
    progress : bool
        Show a tqdm progress bar over the calibration batches.
    allow_table_mismatch : bool
        Quantize from a ``calib_table`` of another network (other fingerprint: other
        graph or weights), another mode or quantized_dtype, or without a fingerprint,
        with a warning instead of a ``ValueError``.
    bias_correction : bool
        Take the mean shift that 8-bit weights and inputs put into each output channel of
        every INT8 conv and FC, measured on the first calibration batch, out of its bias
        (:mod:`gluon_int8.biascorr`; NNCF's fast bias correction). Needs calibration data
        (with a saved ``calib_table``, pass the data too: ``ValueError`` otherwise).
    for_onnx : bool
        Also calibrate what ``qnet.export(prefix, format='onnx')`` needs beyond MXNet: the
        value of each INT8 conv before the residual sum MXNet fuses into it, which ONNX
        runtimes compute as a tensor of its own (conv, then add) and quantize. Without it
        the ONNX export keeps those convs in float (with a warning). It costs a copy of
        each such conv in the calibration pass: ResNet50's calibration forward pass took
        about 1.5x as long (5.2-5.5 s against 3.5-3.6, 64 images; README, "Calibration
        speed"); networks without residual sums pay nothing.

    Raises
    ------
    gluon_int8.fuse.FusionError
        When MXNet's oneDNN fusion changes what the network computes (checked on the
        first batch): no model is returned.
    """
    if not isinstance(block, HybridBlock):
        raise TypeError('block: expected a gluon HybridBlock, got %s; only HybridBlocks '
                        'can be traced into a graph' % type(block).__name__)
    opts = validate(mode, quantized_dtype, granularity, quantize_mode, exclude_layers,
                    exclude_layers_match, exclude_operators, num_calib_batches,
                    num_calib_examples, percentile, num_bins, self_check,
                    allow_table_mismatch, bias_correction, for_onnx)
    calib_table = check_table_argument(calib_table, calib_data is not None)
    if opts.bias_correction and calib_data is None:
        raise ValueError('bias_correction: got True without calib_data; the biases are '
                         'corrected on the first calibration batch: pass calib_data (with '
                         'a saved calib_table too, if any), or bias_correction=False')
    batches = _batches(block, calib_data, opts, calib_table)
    first = next(batches) if batches is not None else None
    if first is not None:
        batches = itertools.chain([first], batches)
    prepared = prepare(block, first, opts)
    table = _calibration_table(prepared, batches, opts, calib_table, progress,
                               _length(calib_data, opts))
    return pipeline.convert(prepared, table, first, opts.self_check, opts.bias_correction)


def prepare(block: HybridBlock, first, opts: Options) -> Prepared:
    """:func:`gluon_int8.pipeline.prepare` with the options of one call."""
    return pipeline.prepare(block, first, opts.quantized_dtype, opts.quantize_mode,
                            opts.granularity, opts.exclude_layers, opts.exclude_layers_match,
                            opts.exclude_operators, opts.bias_correction, opts.for_onnx)


def _batches(block, calib_data, opts: Options, calib_table):
    """The batch stream, or None when no data is needed (or a table replaces it)."""
    if calib_data is None:
        if opts.mode != 'none' and calib_table is None:
            raise ValueError('calib_data: got None, but mode=%r needs calibration data; pass '
                             'calib_data, a saved calib_table, or mode=\'none\''
                             % (opts.mode_name,))
        return None
    if opts.mode == 'none':
        log.warning("mode='none' computes ranges at runtime: calib_data is not used")
        return None
    return iter_batches(calib_data, count_inputs(block), opts.num_calib_batches,
                        opts.num_calib_examples)


def _length(calib_data, opts: Options) -> Optional[int]:
    """Number of calibration batches for the progress bar, when it can be known."""
    known = (len(calib_data) if hasattr(calib_data, '__len__')
             and not isinstance(calib_data, (str, bytes, os.PathLike))
             and not hasattr(calib_data, 'shape') else None)
    if opts.num_calib_batches is not None:
        return min(known, opts.num_calib_batches) if known is not None else opts.num_calib_batches
    return known


def _calibration_table(prepared: Prepared, batches, opts: Options, calib_table, progress,
                       total) -> Optional[CalibrationTable]:
    """Calibrate from data (saving the table if a path was given), or load a table."""
    if opts.mode == 'none' and batches is None and calib_table is None:
        return None
    quantize_inputs = quantize_node_inputs(prepared.plan.qsym)
    if batches is None:
        table = optional_table(calib_table)
        check_reuse(table, prepared.plan.calib_layers, quantize_inputs,
                    prepared.traced.fingerprint(), opts.mode_name, opts.quantized_dtype,
                    opts.allow_table_mismatch, table_source(calib_table))
        return table
    stats = pipeline.calibrate(prepared, batches, opts.new_collector(), progress, total)
    table = table_from_stats(stats, opts, quantize_inputs, prepared.data_names,
                             prepared.traced.fingerprint(), prepared.tensor_names())
    if calib_table is not None:  # a path: check_table_argument refused a table with data
        table.save(calib_table)
        log.info('saved calibration table to %s', calib_table)
    return table


def table_from_stats(stats, opts: Options, quantize_inputs, input_layers,
                     fingerprint: Optional[str] = None,
                     tensors: Optional[Mapping[str, str]] = None) -> CalibrationTable:
    """Statistics -> calibration table, the one way ``quantize_net`` and ``tune`` (which
    builds many tables from one calibration pass) both take; ``fingerprint`` binds it to
    the network calibrated (:func:`gluon_int8.table.fingerprint`); ``tensors`` names each
    layer's tensor in the traced graph (:meth:`gluon_int8.pipeline.Prepared.tensor_names`)."""
    table = make_table(stats, opts.mode_name, opts.quantized_dtype, quantize_inputs,
                       input_layers, **opts.threshold_options())
    table.fingerprint = fingerprint
    table.tensors = {n: t for n, t in (tensors or {}).items() if n in table.ranges}
    check_ranges(table, 'calibration')
    warn_tiny_ranges(table)
    return table
