"""Accuracy-aware tuning: quantize, measure, and give layers back to FP32 until the
metric is within budget.

In the spirit of Intel Neural Compressor's MXNet strategies (try calibration configs
first, then fall back op by op) and OpenVINO's accuracy control (rank layers by how
much they cost, revert the worst until the drop is acceptable)::

    baseline = eval_fn(net)                          target = baseline - max_drop
    1. configs:   every mode x granularity, thresholds from ONE calibration pass
                  (a HistogramCollector serves entropy/percentile/mse, and its exact
                  min/max serve naive); stop at the first config that reaches target
    2. ranking:   for the best config, each INT8 layer's *unit* alone goes FP32 and the
                  SQNR of the network outputs against FP32 is measured on a slice of the
                  calibration data (no eval_fn call); best SQNR first
    3. fallback:  units go FP32 in rank order, cumulatively, one eval_fn trial each,
                  until eval_fn(qnet) >= target

A layer's *unit* is the layer plus every layer its output tensor reaches through its
consumers, following range-carrying ops (pooling, flatten, concat, reshape) up to the
next computing layer. Returning one layer alone rarely helps: MXNet quantizes a tensor
where it is produced (requantize) *and* where an INT8 consumer reads it (quantize),
and pooling or flatten carry its range on, so an outlier tensor is clipped until every
node touching it runs FP32.

Every trial is one ``eval_fn`` call on a quantized block; ``max_trials`` and
``timeout`` bound them (the first trial always runs, so there is a block to return).
Each trial is logged as a table row and kept in :attr:`TuneResult.trials`.
"""
import dataclasses
import itertools
import json
import logging
import math
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
from mxnet.gluon import HybridBlock

from . import fuse as fuse_stage
from .api import Options, quantize_net, table_from_stats, validate
from .block import QuantizedBlock
from .calibrate import collect_statistics
from .collectors import HistogramCollector
from .data import iter_batches
from .quantize_graph import (GRANULARITIES, graph_nodes, quantize_node_inputs, quantize_symbol,
                             resolve_exclusions)
from .thresholds import THRESHOLDS
from .trace import count_inputs, trace

log = logging.getLogger(__name__)

DEFAULT_MODES = ('entropy', 'naive', 'percentile', 'mse')
DEFAULT_GRANULARITIES = ('tensor', 'channel')
# options of quantize_net that tune passes through (mode/granularity are searched)
PASSED_OPTIONS = ('quantized_dtype', 'quantize_mode', 'exclude_layers', 'exclude_layers_match',
                  'exclude_operators', 'num_calib_batches', 'num_calib_examples', 'percentile',
                  'num_bins')
# fused-graph ops whose INT8 version carries its input's range to its output
RANGE_CARRYING_OPS = ('Pooling', 'Flatten', 'Concat', 'concat', 'Reshape', 'reshape',
                      'transpose', 'expand_dims', 'squeeze', 'slice', 'SliceChannel')
_HEADER = '%3s  %-8s %-10s %-7s %4s  %10s %9s %6s  %s'


@dataclasses.dataclass
class TuneResult:
    """The best block found and how it was found.

    ``trials`` has one dict per eval_fn call on a quantized block: ``trial``, ``stage``
    (``'config'`` or ``'fallback'``), ``mode``, ``granularity``, ``fp32_layers`` (the
    layers tuning returned to FP32), ``metric``, ``drop`` (baseline - metric),
    ``reached``, ``seconds``. ``ranking`` has one dict per ranked layer: ``layer``,
    ``unit``, ``output_sqnr_db`` (network outputs vs FP32 with that unit FP32).
    """
    block: QuantizedBlock
    baseline: float
    best_metric: float
    target: float
    reached: bool
    trials: List[dict]
    ranking: List[dict] = dataclasses.field(default_factory=list)

    @property
    def best_trial(self) -> dict:
        """The trial that produced :attr:`block`."""
        return max(self.trials, key=lambda t: (t['metric'], -t['trial']))

    def table(self) -> str:
        """The trials as a plain-text table."""
        return '\n'.join([_HEADER % ('#', 'stage', 'mode', 'weights', 'fp32', 'metric',
                                     'drop', 'sec', 'returned to FP32')]
                         + [_row_text(t) for t in self.trials])

    def to_dict(self) -> dict:
        """Everything but the block, as JSON-ready values."""
        return {'baseline': self.baseline, 'best_metric': self.best_metric,
                'target': self.target, 'reached': self.reached,
                'best_trial': self.best_trial['trial'], 'trials': self.trials,
                'ranking': self.ranking}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def _row_text(t: dict) -> str:
    return _HEADER % (t['trial'], t['stage'], t['mode'], t['granularity'],
                      len(t['fp32_layers']), '%.5f' % t['metric'], '%+.5f' % t['drop'],
                      '%.1f' % t['seconds'], ', '.join(t['fp32_layers']) or '-')


def tune(net: HybridBlock, calib_data, eval_fn: Callable[[HybridBlock], float],
         max_drop: float = 0.005, max_trials: int = 50, timeout: Optional[float] = None, *,
         modes: Sequence[str] = DEFAULT_MODES,
         granularities: Sequence[str] = DEFAULT_GRANULARITIES,
         rank_examples: int = 256, **quantize_kwargs) -> TuneResult:
    """Quantize ``net`` so that ``eval_fn`` drops at most ``max_drop`` below FP32.

    Parameters
    ----------
    net : HybridBlock
        The trained FP32 network (not modified).
    calib_data
        Calibration data, in any form :func:`gluon_int8.quantize_net` takes. It is read
        once; the first ``rank_examples`` examples are kept to rank the layers.
    eval_fn : callable
        ``eval_fn(block) -> float``, higher is better (e.g. top-1 accuracy on a
        validation set). Called once on ``net`` for the baseline, then once per trial.
    max_drop : float
        Accepted drop of the metric below the FP32 baseline (absolute, in the metric's
        units: 0.005 is half a point of accuracy in [0, 1]).
    max_trials : int
        At most this many ``eval_fn`` calls on quantized blocks.
    timeout : float or None
        Seconds; no new trial starts after that (the first trial always runs).
    modes, granularities
        The calibration modes and weight granularities tried, in this order.
    rank_examples : int
        Calibration examples used to rank the layers by sensitivity.
    **quantize_kwargs
        Passed to :func:`gluon_int8.quantize_net`: ``quantized_dtype``,
        ``quantize_mode``, ``exclude_layers``, ``exclude_layers_match``,
        ``exclude_operators``, ``num_calib_batches``, ``num_calib_examples``,
        ``percentile``, ``num_bins``.

    Returns
    -------
    TuneResult
        The best block (highest metric; the first that reached the target), the
        baseline, the best metric, ``reached`` and the trial history.
    """
    checked = _validate(net, calib_data, eval_fn, max_drop, max_trials, timeout, modes,
                        granularities, rank_examples, quantize_kwargs)
    start = time.monotonic()
    baseline = _metric(eval_fn, net, 'the FP32 net')
    session = _Session(net, calib_data, eval_fn, checked, baseline, max_drop,
                       None if timeout is None else start + timeout)
    log.info('tune: FP32 baseline %.5f, target >= %.5f (max_drop %g)', baseline,
             baseline - max_drop, max_drop)
    log.info(_HEADER, '#', 'stage', 'mode', 'weights', 'fp32', 'metric', 'drop', 'sec',
             'returned to FP32')
    session.try_configs(list(modes), list(granularities))
    if not session.reached() and not session.out_of_budget():
        session.fallback()
    best_block, best = session.best
    result = TuneResult(best_block, baseline, best['metric'], baseline - max_drop,
                        session.reached(), session.trials, session.ranking)
    log.info('tune: %s after %d trials in %.1f s: metric %.5f (baseline %.5f), %d layers '
             'returned to FP32', 'reached the target' if result.reached else
             'did NOT reach the target', len(session.trials), time.monotonic() - start,
             result.best_metric, baseline, len(best['fp32_layers']))
    return result


@dataclasses.dataclass(frozen=True)
class _Checked:
    """tune's validated options."""
    max_trials: int
    rank_examples: int
    options: Mapping[str, object]   # the quantize_net options passed through
    opts: Options                   # the same, validated, with the defaults filled in


def _validate(net, calib_data, eval_fn, max_drop, max_trials, timeout, modes, granularities,
              rank_examples, quantize_kwargs) -> _Checked:
    """Check tune's arguments once; errors name the parameter, the value and what is allowed."""
    if not isinstance(net, HybridBlock):
        raise TypeError('net: expected a gluon HybridBlock, got %s' % type(net).__name__)
    if calib_data is None:
        raise ValueError('calib_data: got None; tune needs calibration data')
    if not callable(eval_fn):
        raise TypeError('eval_fn: got %r; expected a callable eval_fn(block) -> float'
                        % (eval_fn,))
    _check_budget(max_drop, max_trials, timeout, rank_examples)
    _check_choices('modes', modes, tuple(THRESHOLDS))
    _check_choices('granularities', granularities, tuple(GRANULARITIES))
    unknown = sorted(set(quantize_kwargs) - set(PASSED_OPTIONS))
    if unknown:
        raise TypeError('quantize_kwargs: got %s; tune passes on only %s (modes= and '
                        'granularities= replace mode= and granularity=)'
                        % (unknown, list(PASSED_OPTIONS)))
    return _Checked(max_trials, rank_examples, dict(quantize_kwargs), validate(**quantize_kwargs))


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _check_budget(max_drop, max_trials, timeout, rank_examples) -> None:
    if not _is_number(max_drop) or not math.isfinite(max_drop):
        raise ValueError('max_drop: got %r; expected a finite number' % (max_drop,))
    for param, value in (('max_trials', max_trials), ('rank_examples', rank_examples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError('%s: got %r; expected a positive int' % (param, value))
    if timeout is not None and (not _is_number(timeout) or not timeout > 0):
        raise ValueError('timeout: got %r; expected a positive number of seconds or None'
                         % (timeout,))


def _check_choices(param: str, values, allowed: Sequence[str]) -> None:
    if isinstance(values, str) or not isinstance(values, (list, tuple)) or not values \
            or not all(isinstance(v, str) and v in allowed for v in values):
        raise ValueError('%s: got %r; expected a non-empty list drawn from %s'
                         % (param, values, list(allowed)))


def _metric(eval_fn, block, what: str) -> float:
    value = eval_fn(block)
    try:
        metric = float(value)
    except (TypeError, ValueError) as err:
        raise TypeError('eval_fn: returned %r for %s; expected a number' % (value, what)) from err
    if not math.isfinite(metric):
        raise ValueError('eval_fn: returned %r for %s; expected a finite number' % (value, what))
    return metric


def _flat(outputs) -> list:
    """The NDArrays of a (nested) network output, in order."""
    if isinstance(outputs, (list, tuple)):
        return [leaf for out in outputs for leaf in _flat(out)]
    return [outputs]


class _Session:
    """One tuning run: the traced graph, the statistics, the trials and the best block."""

    def __init__(self, net, calib_data, eval_fn, checked: _Checked, baseline: float,
                 max_drop: float, deadline: Optional[float]):
        self.net, self.eval_fn, self.checked = net, eval_fn, checked
        self.baseline, self.target, self.deadline = baseline, baseline - max_drop, deadline
        self.trials: List[dict] = []
        self.ranking: List[dict] = []
        self.best = None  # (block, trial dict)
        self._calibrate(calib_data)

    # -- calibration, once ------------------------------------------------------------

    def _calibrate(self, calib_data) -> None:
        """One pass over the data: histograms of every layer output any trial may need,
        and the first ``rank_examples`` examples kept for ranking."""
        opts = self.checked.opts
        batches = iter_batches(calib_data, count_inputs(self.net), opts.num_calib_batches,
                               opts.num_calib_examples)
        first = next(batches)
        self.traced = trace(self.net, first)
        self.fused = fuse_stage.fuse(self.traced.symbol)
        nodes = graph_nodes(self.fused)
        self.user_excluded = resolve_exclusions(nodes, opts.exclude_layers,
                                                opts.exclude_layers_match,
                                                opts.exclude_operators)
        self.slice: list = []
        self.stats = collect_statistics(
            self.fused, self.traced.data_names, self.traced.arg_params,
            self.traced.aux_params, self._all_outputs(), self._keep_slice(first, batches),
            HistogramCollector(num_bins=opts.num_bins))
        self.references = [[o.asnumpy().astype(np.float64) for o in _flat(self.net(*b))]
                           for b in self.slice]

    def _all_outputs(self) -> List[str]:
        """Graph inputs and every output of every compute node of the fused graph."""
        internals = self.fused.get_internals()
        inputs = set(self.fused.list_inputs())
        names = [out for i, out in enumerate(internals.list_outputs())
                 if internals[i].name not in inputs]
        return list(self.traced.data_names) + names

    def _keep_slice(self, first, batches):
        """Pass the batches through, keeping the first ``rank_examples`` examples."""
        kept = 0
        for batch in itertools.chain([first], batches):
            if kept < self.checked.rank_examples:
                self.slice.append(batch)
                kept += batch[0].shape[0]
            yield batch

    # -- trials -------------------------------------------------------------------------

    def reached(self) -> bool:
        return self.best is not None and self.best[1]['metric'] >= self.target

    def out_of_budget(self) -> bool:
        if len(self.trials) >= self.checked.max_trials:
            return True
        return self.deadline is not None and time.monotonic() > self.deadline

    def build(self, mode: str, granularity: str, tuned: Mapping[str, str]) -> QuantizedBlock:
        """The INT8 block of one config from the stored statistics (no data pass)."""
        reasons = dict(tuned)
        reasons.update(self.user_excluded)  # a user's exclusion keeps the user's reason
        opts = self.checked.opts
        qsym, layers = quantize_symbol(self.fused, sorted(reasons), list(self.traced.arg_params),
                                       opts.quantized_dtype, opts.quantize_mode, granularity)
        missing = sorted(set(layers) - set(self.stats))
        if missing:
            raise RuntimeError('tune: calibration collected no statistics for %s' % missing)
        table = table_from_stats({n: self.stats[n] for n in layers},
                                 dataclasses.replace(opts, mode=mode, granularity=granularity),
                                 quantize_node_inputs(qsym), self.traced.data_names)
        options = dict(self.checked.options, exclude_layers=sorted(reasons),
                       exclude_layers_match=None, exclude_operators=None)
        qnet = quantize_net(self.net, calib_table=table, mode=mode, granularity=granularity,
                            **options)
        for row in qnet.layers:
            if row.name in reasons:
                row.reason = reasons[row.name]
        return qnet

    def trial(self, stage: str, mode: str, granularity: str,
              tuned: Mapping[str, str]) -> Optional[dict]:
        """One eval_fn call on one config; None when the budget is spent."""
        if self.trials and self.out_of_budget():
            return None
        start = time.monotonic()
        block = self.build(mode, granularity, tuned)
        metric = _metric(self.eval_fn, block, 'trial %d' % (len(self.trials) + 1))
        row = {'trial': len(self.trials) + 1, 'stage': stage, 'mode': mode,
               'granularity': granularity, 'fp32_layers': sorted(tuned),
               'metric': metric, 'drop': self.baseline - metric,
               'reached': metric >= self.target, 'seconds': time.monotonic() - start}
        self.trials.append(row)
        log.info(_row_text(row))
        if self.best is None or metric > self.best[1]['metric']:
            self.best = (block, row)
        return row

    # -- stage 1: configs -----------------------------------------------------------------

    def try_configs(self, modes: List[str], granularities: List[str]) -> None:
        for mode in modes:
            for granularity in granularities:
                row = self.trial('config', mode, granularity, {})
                if row is None or row['reached']:
                    return

    # -- stages 2 and 3: ranking and fallback --------------------------------------------

    def fallback(self) -> None:
        base_block, base = self.best
        mode, granularity = base['mode'], base['granularity']
        self.ranking = self.rank(base_block, mode, granularity)
        tuned: Dict[str, str] = {}
        for rank, entry in enumerate(self.ranking, 1):
            new = [n for n in entry['unit'] if n not in tuned]
            if not new:
                continue
            for name in new:
                tuned[name] = ('tuning: rank %d' % rank if name == entry['layer'] else
                               'tuning: rank %d (unit of %s)' % (rank, entry['layer']))
            row = self.trial('fallback', mode, granularity, tuned)
            if row is None or row['reached']:
                return

    def rank(self, base_block: QuantizedBlock, mode: str, granularity: str) -> List[dict]:
        """INT8 layers by the network-output SQNR reached when their unit alone is FP32."""
        units = _units(self.fused, set(base_block.int8_layers))
        base_sqnr = self.output_sqnr(base_block)
        ranking = []
        for layer in base_block.int8_layers:
            if self.deadline is not None and time.monotonic() > self.deadline:
                log.warning('tune: timeout while ranking; ranked %d of %d layers',
                            len(ranking), len(base_block.int8_layers))
                break
            block = self.build(mode, granularity, {n: 'tuning' for n in units[layer]})
            ranking.append({'layer': layer, 'unit': units[layer],
                            'output_sqnr_db': self.output_sqnr(block)})
        ranking.sort(key=lambda r: -r['output_sqnr_db'])
        best = ', '.join('%s (%.2f dB)' % (r['layer'], r['output_sqnr_db']) for r in ranking[:5])
        log.info('tune: output SQNR %.2f dB with every layer INT8; best units to return to '
                 'FP32: %s', base_sqnr, best)
        return ranking

    def output_sqnr(self, block: QuantizedBlock) -> float:
        """SQNR (dB) of ``block``'s outputs against the FP32 outputs on the kept slice."""
        signal = noise = 0.0
        for batch, refs in zip(self.slice, self.references):
            for out, ref in zip(_flat(block(*batch)), refs):
                diff = out.asnumpy().astype(np.float64) - ref
                noise += float(np.sum(diff * diff))
                signal += float(np.sum(ref * ref))
        return math.inf if noise == 0 else 10.0 * math.log10(signal / noise)


def _units(fused, int8_layers) -> Dict[str, List[str]]:
    """Each INT8 layer -> itself plus the INT8 layers its output reaches, through
    range-carrying ops, up to (and including) the next computing layers."""
    graph = json.loads(fused.tojson())
    nodes = graph['nodes']
    consumers: Dict[str, List[str]] = {}
    for node in nodes:
        if node['op'] == 'null':
            continue
        for src, _, _ in node['inputs']:
            if nodes[src]['op'] != 'null':
                consumers.setdefault(nodes[src]['name'], []).append(node['name'])
    ops = {n['name']: n['op'] for n in nodes}
    units = {}
    for layer in int8_layers:
        unit, todo = [layer], list(consumers.get(layer, []))
        while todo:
            name = todo.pop(0)
            if name in unit:
                continue
            unit.append(name)
            if ops[name] in RANGE_CARRYING_OPS:
                todo.extend(consumers.get(name, []))
        units[layer] = [n for n in unit if n == layer or n in int8_layers]
    return units
