"""The pipeline in three steps around one dataclass: prepare -> calibrate -> convert.

::

    prepared = prepare(block, first_batch, opts)   # trace, fuse (guarded, verified), plan
    stats = calibrate(prepared, batches, collector)  # statistics of every tensor needed
    qnet = convert(prepared, table, first_batch)   # ranges in, rewrites, weights, block,
                                                   # self-check

:func:`gluon_int8.quantize_net` composes the three; :func:`gluon_int8.tune` prepares and
calibrates once and converts once per trial (with its own exclusions: :func:`replan`).
Statistics are gathered for every tensor any plan of the graph may need a range for (the
outputs of every INT8 layer too), so returning a layer to FP32 later never needs a second
pass over the data.
"""
import dataclasses
import logging
from typing import Dict, List, Mapping, Optional, Sequence

import mxnet as mx

from . import biascorr, selfcheck, weights
from .block import QuantizedBlock
from .calibrate import collect_statistics
from .collectors import Collector, LayerStats
from .fuse import fuse, tensor_names, traced_name, verify
from .errors import first_line
from .observe import release_memory
from .op_table import DETECTION_OPS
from .plan import (Plan, check_calibrated, finalize, plan_graph, presum_tensors,
                   ranges_in_graph, with_presums)
from .quantize_graph import (Node, graph_nodes, graph_outputs, quantize_offline_params,
                             resolve_exclusions, summarize)
from .report import fp32_reference
from .table import CalibrationTable
from .trace import TracedGraph, build_symbol_block, trace

log = logging.getLogger(__name__)

SELF_CHECKS = ('warn', 'fallback', 'off')
MAX_FALLBACKS = 10


@dataclasses.dataclass
class Prepared:
    """A traced, fused, verified and planned network: all that calibration and
    conversion need, without the user's block."""
    traced: TracedGraph
    nodes: List[Node]                 # compute nodes of the fused graph: the layers
    user_excluded: Dict[str, str]     # the user's exclusions, with their reasons
    plan: Plan
    quantized_dtype: str
    quantize_mode: str
    granularity: str
    presums: bool = False             # calibrate the convs' values before their sums

    @property
    def data_names(self) -> List[str]:
        return self.traced.data_names

    @property
    def params(self) -> Dict[str, mx.nd.NDArray]:
        return {**self.traced.aux_params, **self.traced.arg_params}

    @property
    def calibration_graph(self) -> mx.sym.Symbol:
        """The graph calibration runs: the fused FP32 graph; with :attr:`presums`, its
        convs' values before their sums as more outputs
        (:func:`gluon_int8.plan.with_presums`)."""
        return with_presums(self.plan.fused) if self.presums else self.plan.fused

    def statistics_layers(self) -> List[str]:
        """Tensors to calibrate: what the plan needs, every INT8 layer's output, and with
        :attr:`presums` the value before the sum of each INT8 conv+sum (for the ONNX
        export, whose runtimes quantize it: :func:`gluon_int8.plan.presum_tensors`)."""
        int8 = {n.name[len('quantized_'):] for n in graph_nodes(self.plan.qsym)
                if n.name.startswith('quantized_')}
        outputs = [out for node, idx, out in graph_outputs(self.plan.fused)
                   if idx == 0 and node in int8]
        presums = [t for node, t in presum_tensors(self.plan.fused).items()
                   if node in int8] if self.presums else []
        return list(dict.fromkeys(list(self.plan.calib_layers) + outputs + presums))

    def tensor_names(self) -> Dict[str, str]:
        """Each calibrated tensor's name in the traced graph."""
        return {**tensor_names(self.plan.fused),
                **{t: traced_name(t) for t in presum_tensors(self.plan.fused).values()}}


def prepare(block, first_batch: Optional[Sequence[mx.nd.NDArray]], quantized_dtype: str,
            quantize_mode: str, granularity: str, exclude_layers=(), exclude_layers_match=(),
            exclude_operators=(), bias_correction: bool = False,
            presums: bool = False) -> Prepared:
    """Trace, fuse (guarded), verify the fusion on the first batch, and plan the graph;
    with ``bias_correction`` every conv and FC has a bias (:func:`biascorr.with_biases`);
    with ``presums`` calibration reads the values before sums too (:class:`Prepared`)."""
    traced = trace(block, first_batch)
    if bias_correction:
        traced = biascorr.with_biases(traced)
    fused = fuse(traced.symbol)
    nodes = graph_nodes(fused)
    excluded = resolve_exclusions(nodes, exclude_layers, exclude_layers_match,
                                  exclude_operators)
    _warn_full_mode_detector(nodes, quantize_mode)
    plan = plan_graph(fused, excluded, list(traced.arg_params), traced.data_names,
                      quantized_dtype, quantize_mode, granularity)
    if first_batch is not None:
        verify(plan.fused, traced.symbol, traced.data_names,
               {**traced.aux_params, **traced.arg_params}, first_batch)
        release_memory()
    return Prepared(traced, graph_nodes(plan.fused), excluded, plan, quantized_dtype,
                    quantize_mode, granularity, presums)


def replan(prepared: Prepared, excluded: Mapping[str, str],
           granularity: Optional[str] = None) -> Prepared:
    """The same network planned again with ``excluded`` FP32 (layer -> reason) on top of
    the user's exclusions, and perhaps another weight granularity."""
    reasons = dict(excluded)
    reasons.update(prepared.user_excluded)  # a user's exclusion keeps the user's reason
    granularity = granularity or prepared.granularity
    plan = plan_graph(prepared.plan.fused, reasons, list(prepared.traced.arg_params),
                      prepared.data_names, prepared.quantized_dtype, prepared.quantize_mode,
                      granularity)
    return dataclasses.replace(prepared, plan=plan, nodes=graph_nodes(plan.fused),
                               granularity=granularity)


def _warn_full_mode_detector(nodes: Sequence[Node], quantize_mode: str) -> None:
    """quantize_mode='full' on a detector quantizes the concat that joins decoded ids,
    scores and boxes before NMS: our trained Fashion-MNIST SSD then scores mAP 0."""
    found = sorted({n.op for n in nodes if n.op in DETECTION_OPS})
    if quantize_mode == 'full' and found:
        log.warning("quantize_mode='full' on a graph with %s: the concat of decoded boxes, "
                    "scores and ids before NMS gets quantized and the detections break; "
                    "use quantize_mode='smart' (the zoo presets of detectors do)",
                    ', '.join(found))


def calibrate(prepared: Prepared, batches, collector: Collector, progress: bool = False,
              total: Optional[int] = None, layers: Optional[Sequence[str]] = None
              ) -> Dict[str, LayerStats]:
    """Statistics of ``layers`` (default: :meth:`Prepared.statistics_layers`) over the
    batches, from :attr:`Prepared.calibration_graph`."""
    traced = prepared.traced
    stats = collect_statistics(prepared.calibration_graph, traced.data_names,
                               traced.arg_params, traced.aux_params,
                               layers or prepared.statistics_layers(), batches, collector,
                               progress, total)
    release_memory()
    return stats


def convert(prepared: Prepared, table: Optional[CalibrationTable],
            batch: Optional[Sequence[mx.nd.NDArray]] = None,
            self_check: str = 'warn', bias_correction: bool = False) -> QuantizedBlock:
    """The INT8 block of a prepared network and its calibration table (None: ranges
    computed at runtime), checked against FP32 on ``batch`` (see :mod:`selfcheck`), its
    biases corrected on ``batch`` with ``bias_correction`` (see :mod:`biascorr`).

    With ``self_check='fallback'`` the first layer (in graph order) the check finds
    defective returns to FP32 and the block is built and checked again, up to
    :data:`MAX_FALLBACKS` times; with ``'warn'`` each defective layer gets a warning.
    Unless the check is ``'off'``, a block that fails when called (batch 1 twice, then
    the whole batch) never returns: the layer whose return to FP32 stops the failure is
    found by bisection and returns to FP32.
    """
    for _ in range(MAX_FALLBACKS):
        built, problems = _build(prepared, table, batch if bias_correction else None)
        if problems:  # the plan missed a case: those layers go FP32, and again
            log.warning('INT8 layers that the op table does not call correct with their '
                        'calibrated dtypes stay FP32: %s', problems)
            prepared = replan(prepared, {**prepared.plan.reasons, **problems})
            continue
        qnet, qsym, values = built
        if batch is not None:  # what the ONNX export writes as the input shapes
            qnet.input_shapes = [tuple(b.shape[1:]) for b in batch]
        if batch is None or self_check == 'off':
            return qnet
        crash = _crashes(qnet, batch)
        if crash:
            layer = _crashing_layer(prepared, table, batch, qnet)
            reason = 'self-check: the INT8 graph fails on a repeated batch-1 call (%s)' % crash
            log.warning('%s returns to FP32: %s', layer, reason)
            prepared = replan(prepared, {**prepared.plan.reasons, layer: reason})
            continue
        defects = _self_check(qnet, qsym, values, prepared, batch)
        release_memory()
        if not defects:
            return qnet
        if self_check == 'warn':
            for check in defects:
                log.warning('%s: %s', check.layer, check.describe())
            return qnet
        # the first defect in graph order only: the layers after it read its output, and
        # may look defective only through it
        first = defects[0]
        log.warning('%s returns to FP32: %s', first.layer, first.describe())
        prepared = replan(prepared, {**prepared.plan.reasons, first.layer: first.describe()})
    raise RuntimeError('convert: still defective after %d rounds' % MAX_FALLBACKS)


def _crashes(qnet: QuantizedBlock, batch) -> Optional[str]:
    """Run the block as a user will: batch 1, again batch 1, then the whole batch. The
    first line of MXNet's error if a kernel fails (MXNet 1.9.1's INT8 FC fails on its
    second batch-1 call in some graphs), else None.

    The block is hybridized again after: the memory its calls planned for the whole
    batch goes back (ResNet50, batch 32: 200 MB that the self-check would add to), and a
    user's first call plans for the user's batch."""
    try:
        for inputs in ([b[:1] for b in batch], [b[:1] for b in batch], batch):
            out = qnet(*inputs)
            for o in out if isinstance(out, (list, tuple)) else [out]:
                o.wait_to_read()
    except mx.base.MXNetError as err:
        return first_line(err)
    finally:
        qnet.hybridize(static_alloc=True, static_shape=True)
        release_memory()
    return None


def _crashing_layer(prepared: Prepared, table, batch, qnet: QuantizedBlock) -> str:
    """The INT8 layer whose return to FP32 stops the crash: with every INT8 layer from
    position k on returned to FP32, the block runs for small k and crashes for k = all;
    bisection finds the last k that runs, and layer k is the one."""
    layers = qnet.int8_layers

    def runs(k: int) -> bool:
        reasons = {**prepared.plan.reasons, **{n: 'bisecting a crash' for n in layers[k:]}}
        built, problems = _build(replan(prepared, reasons), table)
        return not problems and _crashes(built[0], batch) is None

    good, bad = 0, len(layers)  # runs(good) (nothing INT8 is assumed to run), not runs(bad)
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if runs(middle) else (good, middle)
    return layers[good]


def _build(prepared: Prepared, table: Optional[CalibrationTable],
           correct_on: Optional[Sequence[mx.nd.NDArray]] = None):
    """((block, INT8 graph, its values), {}), or (None, problems): the INT8 layers that
    break the op table once the ranges are set. ``correct_on``: the batch the biases are
    corrected on (None: not corrected)."""
    plan, traced = prepared.plan, prepared.traced
    ranges = {}
    if table is not None:  # None: ranges computed at runtime (mode='none')
        table.check_layers(plan.calib_layers)
        ranges = ranges_in_graph({n: table.ranges[n] for n in plan.calib_layers}, plan)
    qsym = finalize(plan.qsym, ranges, plan.rewrites)
    problems = check_calibrated(qsym, traced.data_names, plan.rewrites)
    if problems:
        return None, problems
    values = quantize_offline_params(qsym, traced.arg_params, plan.rewrites.seven_bit)
    if correct_on is not None and table is not None:
        found = biascorr.shifts(qsym, plan.fused, prepared.params, values,
                                traced.data_names, correct_on, table.ranges)
        values = quantize_offline_params(qsym, biascorr.corrected(traced.arg_params, found),
                                         plan.rewrites.seven_bit)
    int8_names = weights.int8_weight_names(qsym, values)
    values, int8_store = weights.round_weights(values, int8_names)
    layers = summarize(graph_nodes(plan.fused), qsym, plan.reasons, plan.notes,
                       plan.rewrites.drops | {'quantized_' + n for n in plan.rewrites.layout})
    qnet = build_symbol_block(qsym, traced.data_names, values, traced.aux_params,
                              cls=QuantizedBlock, calib_table=table, layers=layers,
                              out_format=traced.out_format, int8_weights=int8_store,
                              fp32_graph=fp32_reference(plan.fused, traced.arg_params, values))
    qnet.hybridize(static_alloc=True, static_shape=True)
    log.info('%d layers run INT8, %d stay FP32', len(qnet.int8_layers), len(qnet.fp32_layers))
    return (qnet, qsym, {**traced.aux_params, **values}), {}


def _self_check(qnet: QuantizedBlock, qsym, values, prepared: Prepared,
                batch) -> List[selfcheck.NodeCheck]:
    """Run the self-check on ``qnet``; keep the results on it; return the defects."""
    checks = selfcheck.check(qsym, values, values, prepared.plan.fused, values,
                             prepared.data_names, batch, prepared.plan.rewrites)
    qnet.self_check = checks
    worst = max((c.error_steps for c in checks), default=0.0)
    log.info('self-check: %d INT8 layers against their FP32 ops, worst %.2f output steps',
             len(checks), worst)
    return [c for c in checks if c.defect]
