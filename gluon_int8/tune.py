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
import random
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import mxnet as mx
import numpy as np
from mxnet.gluon import HybridBlock

from . import pipeline
from .api import Options, prepare, table_from_stats, validate
from .block import QuantizedBlock
from .collectors import HistogramCollector
from .data import iter_batches
from .op_table import RANGE_CARRYING
from .pipeline import Prepared
from .plan import presum_tensors
from .quantize_graph import GRANULARITIES, quantize_node_inputs
from .thresholds import THRESHOLDS
from .trace import count_inputs

log = logging.getLogger(__name__)

DEFAULT_MODES = ('entropy', 'naive', 'percentile', 'mse')
DEFAULT_GRANULARITIES = ('tensor', 'channel')
# options of quantize_net that tune passes through (mode/granularity are searched)
PASSED_OPTIONS = ('quantized_dtype', 'quantize_mode', 'exclude_layers', 'exclude_layers_match',
                  'exclude_operators', 'num_calib_batches', 'num_calib_examples', 'percentile',
                  'num_bins', 'self_check', 'bias_correction', 'for_onnx')
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
         rank_examples: int = 256, seed: Optional[int] = 0, executor: str = 'serial',
         address: Optional[str] = None, num_workers: Optional[int] = None,
         **quantize_kwargs) -> TuneResult:
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
    seed : int or None
        Python, numpy and MXNet are seeded with it before every ``eval_fn`` call, so a
        random ``eval_fn`` (e.g. sampling a validation subset) scores every trial alike,
        in this process or in a Ray worker. None: no seeding.
    executor : {'serial', 'ray'}
        ``'ray'`` runs independent trials (and the layer ranking) in parallel as Ray
        tasks, in waves of ``num_workers``; trials after the first one of a wave that
        reaches the target are dropped, so for the same seed the result equals the
        serial one (same trials, metrics and block), except that ``timeout`` is checked
        per wave. ``eval_fn`` and its data are shipped to the workers (cloudpickle), and
        workers need gluon-int8 installed. Calibration runs here, once.
    address, num_workers
        For ``executor='ray'``: the cluster to join (default: the running Ray, else a new
        local one) and the parallel trials per wave (default: the cluster's CPUs).
    **quantize_kwargs
        Passed to :func:`gluon_int8.quantize_net`: ``quantized_dtype``,
        ``quantize_mode``, ``exclude_layers``, ``exclude_layers_match``,
        ``exclude_operators``, ``num_calib_batches``, ``num_calib_examples``,
        ``percentile``, ``num_bins``, ``self_check``, ``bias_correction``, ``for_onnx``.

    Returns
    -------
    TuneResult
        The best block (highest metric; the first that reached the target), the
        baseline, the best metric, ``reached`` and the trial history.
    """
    checked = _validate(net, calib_data, eval_fn, max_drop, max_trials, timeout, modes,
                        granularities, rank_examples, quantize_kwargs)
    make_executor = _executor(executor, address, num_workers, seed)
    start = time.monotonic()
    _seeded(seed)
    baseline = _metric(eval_fn, net, 'the FP32 net')
    session = _Session(net, calib_data, eval_fn, checked, baseline, max_drop,
                       None if timeout is None else start + timeout, make_executor)
    log.info('tune: FP32 baseline %.5f, target >= %.5f (max_drop %g)', baseline,
             baseline - max_drop, max_drop)
    log.info(_HEADER, '#', 'stage', 'mode', 'weights', 'fp32', 'metric', 'drop', 'sec',
             'returned to FP32')
    session.try_configs(list(modes), list(granularities))
    if not session.reached() and not session.out_of_budget():
        session.fallback()
    best = session.best[1]
    result = TuneResult(session.best_block(final=True), baseline, best['metric'], baseline - max_drop,
                        session.reached(), session.trials, session.ranking)
    log.info('tune: %s after %d trials in %.1f s: metric %.5f (baseline %.5f), %d layers '
             'returned to FP32', 'reached the target' if result.reached else
             'did NOT reach the target', len(session.trials), time.monotonic() - start,
             result.best_metric, baseline, len(best['fp32_layers']))
    return result


def _executor(executor: str, address, num_workers, seed):
    """executor name -> a factory ``(builder, eval_fn) -> executor``."""
    if executor == 'serial':
        if address is not None or num_workers is not None:
            raise ValueError("address, num_workers: only for executor='ray'")
        return lambda builder, eval_fn: SerialExecutor(builder, eval_fn, seed)
    if executor == 'ray':
        if num_workers is not None and (isinstance(num_workers, bool)
                                        or not isinstance(num_workers, int) or num_workers < 1):
            raise ValueError('num_workers: got %r; expected a positive int or None'
                             % (num_workers,))
        from .distributed import RayExecutor  # pylint: disable=import-outside-toplevel
        return lambda builder, eval_fn: RayExecutor(builder, eval_fn, seed, address,
                                                    num_workers)
    raise ValueError("executor: got %r; expected 'serial' or 'ray'" % (executor,))


@dataclasses.dataclass(frozen=True)
class _Checked:
    """tune's validated options."""
    max_trials: int
    rank_examples: int
    opts: Options  # the quantize_net options passed through, validated, defaults filled in


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
    return _Checked(max_trials, rank_examples, validate(**quantize_kwargs))


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


class _Builder:
    """What a trial needs, without the user's net: the prepared (traced, fused, planned)
    network, the statistics of the one calibration pass and the ranking slice.
    Picklable, so trials can run as Ray tasks."""

    def __init__(self, prepared: Prepared, opts: Options, stats, batches, references):
        self.prepared, self.opts, self.stats = prepared, opts, stats
        self.batches, self.references = batches, references

    @property
    def fused(self):
        return self.prepared.plan.fused

    def build(self, mode: str, granularity: str, tuned: Mapping[str, str],
              final: bool = False) -> QuantizedBlock:
        """The INT8 block of one config from the stored statistics (no data pass).

        Self-checked on the first kept batch with ``self_check='fallback'`` (so a trial
        measures the block it would return) and for the ``final`` block."""
        prepared = pipeline.replan(self.prepared, tuned, granularity)
        layers = prepared.statistics_layers()
        missing = sorted(set(prepared.plan.calib_layers) - set(self.stats))
        if missing:
            raise RuntimeError('tune: calibration collected no statistics for %s' % missing)
        opts = dataclasses.replace(self.opts, mode=mode, granularity=granularity)
        table = table_from_stats({n: self.stats[n] for n in layers if n in self.stats}, opts,
                                 quantize_node_inputs(prepared.plan.qsym), prepared.data_names,
                                 prepared.traced.fingerprint(), prepared.tensor_names())
        check = final or self.opts.self_check == 'fallback'
        return pipeline.convert(prepared, table, self.batches[0],
                                self.opts.self_check if check else 'off',
                                self.opts.bias_correction)

    def output_sqnr(self, block: QuantizedBlock) -> float:
        """SQNR (dB) of ``block``'s outputs against the FP32 outputs on the kept slice."""
        signal = noise = 0.0
        for batch, refs in zip(self.batches, self.references):
            for out, ref in zip(_flat(block(*batch)), refs):
                diff = out.asnumpy().astype(np.float64) - ref
                noise += float(np.sum(diff * diff))
                signal += float(np.sum(ref * ref))
        return math.inf if noise == 0 else 10.0 * math.log10(signal / noise)


def _seeded(seed: Optional[int]) -> None:
    """Seed Python, numpy and MXNet before an eval_fn call, wherever it runs."""
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed)
        mx.random.seed(seed)


def run_trial(builder: _Builder, eval_fn, seed: Optional[int], spec: tuple, keep: bool):
    """One trial: build the spec's block, score it. Returns (metric, seconds, block or
    None). The one function the serial and the Ray executors both run."""
    start = time.monotonic()
    trial, mode, granularity, tuned = spec
    block = builder.build(mode, granularity, tuned)
    _seeded(seed)
    metric = _metric(eval_fn, block, 'trial %d' % trial)
    return metric, time.monotonic() - start, block if keep else None


def rank_unit(builder: _Builder, eval_fn, seed: Optional[int], spec: tuple, keep: bool):
    """Output SQNR with one unit FP32 (no eval_fn call); same signature as run_trial."""
    del eval_fn, seed, keep
    mode, granularity, unit = spec
    return builder.output_sqnr(builder.build(mode, granularity, {n: 'tuning' for n in unit}))


class SerialExecutor:
    """Runs the work items one after the other in this process."""
    width = 1

    def __init__(self, builder: _Builder, eval_fn, seed: Optional[int]):
        self.args = (builder, eval_fn, seed)

    def map(self, fn, specs: Sequence[tuple]) -> list:
        return [fn(*self.args, spec, True) for spec in specs]


class _Session:
    """One tuning run: the statistics, the trials and the best block."""

    def __init__(self, net, calib_data, eval_fn, checked: _Checked, baseline: float,
                 max_drop: float, deadline: Optional[float], executor):
        self.checked = checked
        self.baseline, self.target, self.deadline = baseline, baseline - max_drop, deadline
        self.trials: List[dict] = []
        self.ranking: List[dict] = []
        self.best = None  # (block or None, trial dict)
        self.tuned: Dict[int, Dict[str, str]] = {}  # trial -> the layers it returned to FP32
        self.builder = self._calibrate(net, calib_data)
        self.executor = executor(self.builder, eval_fn)

    # -- calibration, once ------------------------------------------------------------

    def _calibrate(self, net, calib_data) -> _Builder:
        """One pass over the data: histograms of every layer output any trial may need,
        and the first ``rank_examples`` examples kept for ranking."""
        opts = self.checked.opts
        batches = iter_batches(calib_data, count_inputs(net), opts.num_calib_batches,
                               opts.num_calib_examples)
        first = next(batches)
        prepared = prepare(net, first, opts)
        kept: list = []
        stats = pipeline.calibrate(prepared, self._keep_slice(itertools.chain([first], batches),
                                                              kept),
                                   HistogramCollector(num_bins=opts.num_bins),
                                   layers=_all_outputs(prepared))
        references = [[o.asnumpy().astype(np.float64) for o in _flat(net(*b))] for b in kept]
        return _Builder(prepared, opts, stats, kept, references)

    def _keep_slice(self, batches, kept: list):
        """Pass the batches through, keeping the first ``rank_examples`` examples."""
        count = 0
        for batch in batches:
            if count < self.checked.rank_examples:
                kept.append(batch)
                count += batch[0].shape[0]
            yield batch

    # -- trials -------------------------------------------------------------------------

    def reached(self) -> bool:
        return self.best is not None and self.best[1]['metric'] >= self.target

    def out_of_budget(self) -> bool:
        if len(self.trials) >= self.checked.max_trials:
            return True
        return self.deadline is not None and time.monotonic() > self.deadline

    def run(self, stage: str, candidates: Sequence[tuple]) -> bool:
        """Trials of ``candidates`` ((mode, granularity, FP32 layers) each) in order, in
        waves as wide as the executor, until one reaches the target (True) or the budget
        is spent. A wave's trials after the first that reached are dropped, so the
        recorded trials are those a serial run records."""
        done = 0
        while done < len(candidates):
            if self.trials and self.out_of_budget():
                return False
            room = self.checked.max_trials - len(self.trials)
            wave = candidates[done:done + min(self.executor.width, room)]
            specs = [(len(self.trials) + i + 1, mode, granularity, dict(tuned))
                     for i, (mode, granularity, tuned) in enumerate(wave)]
            for spec, result in zip(specs, self.executor.map(run_trial, specs)):
                if self._record(stage, spec, *result)['reached']:
                    return True
            done += len(wave)
        return False

    def _record(self, stage: str, spec: tuple, metric: float, seconds: float, block) -> dict:
        trial, mode, granularity, tuned = spec
        row = {'trial': trial, 'stage': stage, 'mode': mode, 'granularity': granularity,
               'fp32_layers': sorted(tuned), 'metric': metric,
               'drop': self.baseline - metric, 'reached': metric >= self.target,
               'seconds': seconds}
        self.trials.append(row)
        self.tuned[trial] = tuned
        log.info(_row_text(row))
        if self.best is None or metric > self.best[1]['metric']:
            self.best = (block, row)
        return row

    def best_block(self, final: bool = False) -> QuantizedBlock:
        """The best trial's block (built here when its trial ran elsewhere, or to be
        self-checked as the ``final`` one)."""
        block, row = self.best
        if block is None or (final and self.checked.opts.self_check == 'warn'):
            block = self.builder.build(row['mode'], row['granularity'], self.tuned[row['trial']],
                                       final)
        return block

    # -- stage 1: configs -----------------------------------------------------------------

    def try_configs(self, modes: List[str], granularities: List[str]) -> None:
        self.run('config', [(m, g, {}) for m in modes for g in granularities])

    # -- stages 2 and 3: ranking and fallback --------------------------------------------

    def fallback(self) -> None:
        base = self.best[1]
        mode, granularity = base['mode'], base['granularity']
        self.ranking = self.rank(mode, granularity)
        candidates, tuned = [], {}
        for rank, entry in enumerate(self.ranking, 1):
            new = [n for n in entry['unit'] if n not in tuned]
            if not new:
                continue
            for name in new:
                tuned[name] = ('tuning: rank %d' % rank if name == entry['layer'] else
                               'tuning: rank %d (unit of %s)' % (rank, entry['layer']))
            candidates.append((mode, granularity, dict(tuned)))
        self.run('fallback', candidates)

    def rank(self, mode: str, granularity: str) -> List[dict]:
        """INT8 layers by the network-output SQNR reached when their unit alone is FP32."""
        base_block = self.best_block()
        int8_layers = base_block.int8_layers
        units = _units(self.builder.fused, set(int8_layers))
        ranking = []
        for start in range(0, len(int8_layers), self.executor.width):
            if self.deadline is not None and time.monotonic() > self.deadline:
                log.warning('tune: timeout while ranking; ranked %d of %d layers',
                            len(ranking), len(int8_layers))
                break
            layers = int8_layers[start:start + self.executor.width]
            sqnrs = self.executor.map(rank_unit, [(mode, granularity, units[layer])
                                                  for layer in layers])
            ranking.extend({'layer': layer, 'unit': units[layer], 'output_sqnr_db': sqnr}
                           for layer, sqnr in zip(layers, sqnrs))
        ranking.sort(key=lambda r: -r['output_sqnr_db'])
        best = ', '.join('%s (%.2f dB)' % (r['layer'], r['output_sqnr_db']) for r in ranking[:5])
        log.info('tune: output SQNR %.2f dB with every layer INT8; best units to return to '
                 'FP32: %s', self.builder.output_sqnr(base_block), best)
        return ranking


def _all_outputs(prepared: Prepared) -> List[str]:
    """Graph inputs, every output of every compute node of the fused graph, and with
    :attr:`~gluon_int8.pipeline.Prepared.presums` the values before its sums
    (:func:`gluon_int8.plan.presum_tensors`)."""
    fused = prepared.plan.fused
    internals = fused.get_internals()
    inputs = set(fused.list_inputs())
    names = [out for i, out in enumerate(internals.list_outputs())
             if internals[i].name not in inputs]
    presums = list(presum_tensors(fused).values()) if prepared.presums else []
    return list(prepared.data_names) + names + presums


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
            if ops[name] in RANGE_CARRYING:
                todo.extend(consumers.get(name, []))
        units[layer] = [n for n in unit if n == layer or n in int8_layers]
    return units
