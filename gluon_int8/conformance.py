"""Conformance probes: one tiny graph per op-table entry, INT8 kernel against an exact oracle.

For an entry (pattern, input dtypes), a probe

1. builds a tiny network whose quantized graph holds the pattern's INT8 node with exactly
   those input dtypes: each data input is a network input, quantized by its own
   quantize node (``u8``: values >= 0, ``s8``: signed);
2. feeds it values that lie exactly on the int8/uint8 grid of their ranges (random codes,
   over the full code range, where saturation shows), so the quantize nodes are exact;
3. gives every calibrated output 70% of its observed range (as the clipping calibration
   modes do), so the kernel must saturate;
4. compares the INT8 output with an oracle: the FP32 graph run on the same inputs with
   the weights the kernel actually uses (MXNet rounds conv weights per output channel at
   ``127.5 / max|w|``; FC weights are the int8 values gluon-int8 stores), saturated at the
   output range. A correct kernel then differs from the oracle only by the rounding of its
   output: at most about one step of the output grid;
5. calls the INT8 graph twice at batch 4 and twice at batch 1 (a kernel must give the same
   answer every time, and some fail only on a repeated call).

Everything is seeded from the entry's key and no MXNet random state is touched.
``gluon-int8 op-table`` prints the measured table (``--python``: as the literal
:data:`gluon_int8.op_table.RECORDED` takes).
"""
import json
import logging
import time
import zlib
from typing import Callable, Dict, List, Sequence, Tuple

import mxnet as mx
import numpy as np
from mxnet.gluon import nn

from . import op_table
from .fuse import fuse
from .op_table import (BIAS_STEPS, CRASH, OK, SIGNED_SLOPE, TOLERANCE_STEPS, WRONG, Entry,
                       Result)
from .plan import Rewrites, finalize
from .quantize_graph import graph_outputs, quantize_offline_params, quantize_symbol
from .trace import build_symbol_block, trace

log = logging.getLogger(__name__)

CODE_RANGE = {'u8': (0, 255), 's8': (-127, 127)}
LEVELS = {'u8': 255.5, 's8': 127.5}
SHORT = {'int8': 's8', 'uint8': 'u8', 'float32': 'f32', 'int32': 's32'}
BATCH = 4
IMAGE = (16, 8, 8)
VECTOR = (64,)


class _Probe(nn.HybridBlock):
    """A network of one or two inputs around one op (``fn``)."""

    def __init__(self, fn: Callable, num_inputs: int, **children):
        super().__init__(prefix='probe_')
        self.fn, self.num_inputs = fn, num_inputs
        with self.name_scope():
            for name, child in children.items():
                setattr(self, name, child)

    def hybrid_forward(self, F, x, *rest):  # pylint: disable=arguments-differ
        return self.fn(self, F, x, *rest)


class _Probe2(_Probe):
    def hybrid_forward(self, F, x, y):  # pylint: disable=arguments-differ
        return self.fn(self, F, x, y)


def _set_params(block: nn.HybridBlock, rng: np.random.RandomState) -> None:
    """Initialize without MXNet's random state: weights uniform in [-1, 1], BN statistics
    away from identity."""
    block.initialize(mx.init.Zero())
    for name, param in block.collect_params().items():
        if name.endswith(('running_var', 'gamma')):
            value = rng.uniform(0.5, 2.0, param.shape)
        elif name.endswith(('running_mean', 'beta', 'bias')):
            value = rng.uniform(-0.5, 0.5, param.shape)
        else:
            value = rng.uniform(-1.0, 1.0, param.shape)
        param.set_data(mx.nd.array(value))


def _conv():
    return nn.Conv2D(16, 3, padding=1, use_bias=False, in_channels=IMAGE[0])


def _gconv():
    return nn.Conv2D(16, 3, padding=1, groups=4, use_bias=False, in_channels=IMAGE[0])


def _dwconv():
    return nn.Conv2D(IMAGE[0], 3, padding=1, groups=IMAGE[0], use_bias=False,
                     in_channels=IMAGE[0])


def _dense():
    return nn.Dense(32, use_bias=False, in_units=VECTOR[0])


def _relu(F, x):
    return F.Activation(x, act_type='relu')


# the activation of a conv pattern's form (op_table.act_form): ReLU, the plan's leaky
# ReLU, ReLU6 as a clip
_ACTS = {'': _relu, 's': lambda F, x: F.LeakyReLU(x, act_type='leaky', slope=SIGNED_SLOPE),
         'clip': lambda F, x: F.clip(x, 0.0, 6.0)}


def _pool(kind: str):
    pool_type, global_pool = kind.split(':')[1], kind.endswith(':global')
    return lambda s, F, x: F.flatten(F.Pooling(x, kernel=(3, 3), stride=(2, 2), pad=(1, 1),
                                               pool_type=pool_type, global_pool=global_pool))


# pattern -> (build(num_inputs) -> (block), input shape, INT8 op of the target node)
def _network(pattern: str, num_inputs: int):
    # .w7, .ch, .wide, .full: the same network (.full: measure() writes its input's range
    # at the threshold)
    base, _, form = pattern.removesuffix('.full').partition('.')
    act = _ACTS.get(form, _relu)
    conv = _conv
    if base.startswith('gconv'):  # the same probe with a grouped conv
        base, conv = base[1:], _gconv
    elif base.startswith('dwconv'):  # ... with a depthwise conv
        base, conv = base[2:], _dwconv
    one = {
        'conv': (lambda s, F, x: F.flatten(s.c(x)), {'c': conv}, IMAGE, '_sg_mkldnn_conv'),
        'conv+act': (lambda s, F, x: F.flatten(act(F, s.c(x))), {'c': conv}, IMAGE,
                     '_sg_mkldnn_conv'),
        'fc': (lambda s, F, x: s.d(x), {'d': _dense}, VECTOR, '_sg_mkldnn_fully_connected'),
        'fc+act': (lambda s, F, x: F.flatten(_relu(F, s.d(x))), {'d': _dense}, VECTOR,
                   '_sg_mkldnn_fully_connected'),
        'batchnorm': (lambda s, F, x: F.flatten(s.bn(x)),
                      {'bn': lambda: nn.BatchNorm(in_channels=IMAGE[0])}, IMAGE,
                      '_contrib_quantized_batch_norm'),
        'act:relu': (lambda s, F, x: F.flatten(_relu(F, x)), {}, IMAGE,
                     '_contrib_quantized_act'),
        'flatten': (lambda s, F, x: F.flatten(x), {}, IMAGE, '_contrib_quantized_flatten'),
    }
    two = {
        'conv+sum': (lambda s, F, x, y: F.flatten(s.c(x) + y), {'c': conv}, IMAGE,
                     '_sg_mkldnn_conv'),
        'conv+sum+act': (lambda s, F, x, y: F.flatten(act(F, s.c(x) + y)), {'c': conv},
                         IMAGE, '_sg_mkldnn_conv'),
        'add': (lambda s, F, x, y: F.flatten(x + y), {}, IMAGE,
                '_contrib_quantized_elemwise_add'),
        'mul': (lambda s, F, x, y: F.flatten(x * y), {}, IMAGE,
                '_contrib_quantized_elemwise_mul'),
        'concat': (lambda s, F, x, y: F.flatten(F.concat(x, y, dim=1)), {}, IMAGE,
                   '_contrib_quantized_concat'),
    }
    if base.startswith('pool:'):
        return _pool(base), {}, IMAGE, '_contrib_quantized_pooling'
    return (two if num_inputs == 2 else one)[base]


def network(entry: Entry):
    """The probe of ``entry``: (forward function, its children's constructors, the
    per-example input shape, the op of the node under test)."""
    if entry.pattern.startswith('layout:'):
        return _layout_network(entry)
    return _network(entry.pattern, len(_inputs(entry)))


def _inputs(entry: Entry) -> Tuple[str, ...]:
    """The dtypes of the probe's network inputs (concat of one dtype: two inputs; a
    layout op reads a conv's output: the network input is signed)."""
    if entry.pattern.startswith('layout:'):
        return ('s8',)
    return entry.inputs * 2 if entry.pattern == 'concat' and len(entry.inputs) == 1 \
        else entry.inputs


# layout op -> what the probe does to the conv's (N, 16, 8, 8) output
_LAYOUTS = {
    'Reshape': lambda F, y: F.reshape(y, shape=(0, 4, -1)),
    'SwapAxis': lambda F, y: F.swapaxes(y, 1, 2),
    'transpose': lambda F, y: F.transpose(y, axes=(0, 2, 3, 1)),
    'SliceChannel': lambda F, y: F.split(y, num_outputs=2, axis=1)[1],
    'expand_dims': lambda F, y: F.expand_dims(y, axis=1),
    # with a step: what fuse.canonicalize puts before a strided 1x1 conv
    'slice': lambda F, y: F.slice(y, begin=(None,) * 4, end=(None,) * 4, step=(1, 1, 2, 2)),
}


def _layout_network(entry: Entry):
    """conv (+ReLU for a u8 input: it emits uint8) -> the layout op -> flatten."""
    op = entry.pattern.split(':', 1)[1]
    relu = entry.inputs == ('u8',)

    def fn(s, F, x):
        y = s.c(x)
        return F.flatten(_LAYOUTS[op](F, _relu(F, y) if relu else y))
    return fn, {'c': _conv}, IMAGE, op


def _grid(rng, shape, dtype: str, threshold: float, full: bool = False) -> np.ndarray:
    """Values on the grid of ``dtype`` at ``threshold``, as the graph quantizes them: a
    uint8 input's range is written wider by op_table.uint8_range_factor (unless ``full``:
    at its threshold), so its codes are every factor-th code of the full grid."""
    lo, hi = CODE_RANGE[dtype]
    every = int(op_table.uint8_range_factor()) if dtype == 'u8' and not full else 1
    codes = rng.randint(lo // every, hi // every + 1, size=shape) * every
    return (codes * (threshold / LEVELS[dtype])).astype(np.float32)


def _conv_weight_as_used(weight: np.ndarray, half_step: bool = False) -> np.ndarray:
    """MXNet's per-channel rounding of a calibrated conv's weights (GetWeightScales):
    scale 127.5 / max|w_c|, round to nearest even, saturate at +-127. ``half_step``: the
    scale halved, as oneDNN's reorder does for s8 sources without VNNI (its 0.5
    ``scale_adjust``, so that the +128 shift of the source cannot saturate)."""
    peak = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)
    scale = ((0.5 if half_step else 1.0) * 127.5 / peak).reshape((-1,) + (1,) * (weight.ndim - 1))
    return (np.clip(np.rint(weight * scale), -127, 127) / scale).astype(np.float32)


def _weights_as_used(entry: Entry, arg_params, values, half_step: bool = False
                     ) -> Dict[str, mx.nd.NDArray]:
    """The weights the kernel computes with (``half_step``: conv weights on a grid of half
    the resolution, which oneDNN uses for s8 sources on CPUs without VNNI)."""
    used = {}
    for name, value in arg_params.items():
        stored = values.get(name + '_quantize')
        if stored is not None:  # offline int8 FC weights: q * range / 127.5
            rng = max(abs(values[name + '_quantize_min'].asscalar()),
                      abs(values[name + '_quantize_max'].asscalar()))
            used[name] = mx.nd.array(stored.asnumpy().astype(np.float64) * rng / 127.5)
        elif name.endswith('weight') and (value.ndim == 4 or entry.pattern.endswith('.ch')):
            used[name] = mx.nd.array(_conv_weight_as_used(value.asnumpy(), half_step))
        else:
            used[name] = value
    return used


# calibrated outputs get these fractions of their observed range, as the clipping modes
# (entropy, percentile, mse) give them: a kernel must saturate what exceeds its range.
# The second graph differs from the first only in its output ranges and runs after it in
# the same process: a kernel must not reuse what it cached for the first.
CLIPPED_RANGES = (0.7, 0.5)


def _ranges(entry: Entry, fused, traced, layers, inputs, dtypes, thresholds, fraction: float
            ) -> Dict[str, tuple]:
    """Exact ranges for the network inputs (a ``.full`` pattern's uint8 input written at
    its threshold, codes up to 255); every other calibrated output gets
    ``fraction`` of its observed range, except that a ``.wide`` pattern gets the product
    of its input ranges (then nothing can exceed it)."""
    internals = fused.get_internals()
    block = build_symbol_block(internals, traced.data_names, traced.arg_params,
                               traced.aux_params)
    observed = dict(zip(internals.list_outputs(), [o.asnumpy() for o in block(*inputs)]))
    ranges = {}
    for name in layers:
        if name in traced.data_names:
            i = traced.data_names.index(name)
            t = thresholds[i]
            if entry.pattern.endswith('.full'):  # widened by the factor: written at t
                t /= op_table.uint8_range_factor()
            ranges[name] = (0.0, t) if dtypes[i] != 's8' else (-t, t)
        else:
            value = observed[name]
            t = max(float(np.abs(value).max()) * fraction, 1e-3)
            if entry.pattern.endswith('.wide'):
                t = float(np.prod(thresholds))
            ranges[name] = (0.0, t) if value.min() >= 0 else (-t, t)
    return ranges


def _target(qsym, op: str) -> Tuple[str, List[str]]:
    """The target node's name and the names of its outputs."""
    nodes = [n for n in json.loads(qsym.tojson())['nodes'] if n['op'] == op]
    if len(nodes) != 1:
        raise RuntimeError('conformance: expected one %s node, found %d' % (op, len(nodes)))
    name = nodes[0]['name']
    return name, [out for node, _, out in graph_outputs(qsym) if node == name]


def _output_dtype(qsym, data_names, output: str) -> str:
    internals = qsym.get_internals()
    _, types, _ = internals.infer_type_partial(**{n: 'float32' for n in data_names})
    found = dict(zip(internals.list_outputs(), types))[output]
    return SHORT.get(np.dtype(found).name, np.dtype(found).name)


def _run_twice(block, inputs) -> List[np.ndarray]:
    """Outputs at batch 4 twice and batch 1 twice; raises MXNetError from the kernel."""
    outs = []
    for batch in (inputs, inputs, [x[:1] for x in inputs], [x[:1] for x in inputs]):
        out = block(*batch)
        outs.append([o.asnumpy() for o in (out if isinstance(out, (list, tuple)) else [out])])
    return outs


def _step(outputs: List[np.ndarray], out_dtype: str, reference: np.ndarray):
    """One step of the target's output grid (its range / 127.5 for s8, / 255.5 for u8),
    and the reference saturated at that range; for a float output (dequantize fused)
    one int8 step of the reference's range, and the reference as it is."""
    if out_dtype in ('s8', 'u8') and len(outputs) >= 3:
        rng = max(abs(float(outputs[1].ravel()[0])), abs(float(outputs[2].ravel()[0])))
        return (rng / (127.5 if out_dtype == 's8' else 255.5),
                np.clip(reference, -rng if out_dtype == 's8' else 0.0, rng))
    return max(float(np.abs(reference).max()), 1e-6) / 127.5, reference


def measure(entry: Entry) -> Result:
    """Run the conformance probe of one entry on this machine."""
    rng = np.random.RandomState(zlib.crc32(entry.key.encode()))
    dtypes = _inputs(entry)
    fn, children, shape, op = network(entry)
    block = (_Probe2 if len(dtypes) == 2 else _Probe)(fn, len(dtypes),
                                                      **{k: f() for k, f in children.items()})
    _set_params(block, rng)
    thresholds = [2.0, 1.5][:len(dtypes)]
    full = entry.pattern.endswith('.full')
    inputs = [mx.nd.array(_grid(rng, (BATCH,) + shape, d, t, full))
              for d, t in zip(dtypes, thresholds)]
    traced = trace(block, inputs)
    fused = fuse(traced.symbol)
    granularity = 'channel' if entry.pattern.endswith('.ch') else 'tensor'
    qsym, layers = quantize_symbol(fused, [], list(traced.arg_params), 'auto', 'full',
                                   granularity)
    target, _ = _target(qsym, op)
    rewrites = Rewrites(requantize=frozenset([target] if entry.pattern.endswith('.rq') else []),
                        layout=frozenset([target] if entry.pattern.startswith('layout:') else []))
    found = [_measure_graph(entry, finalize(qsym, _ranges(entry, fused, traced, layers, inputs,
                                                          dtypes, thresholds, fraction),
                                            rewrites), op, fused, traced, inputs)
             for fraction in CLIPPED_RANGES]
    if entry.pattern == 'add':
        found.append(_stale_primitive(entry, rng))
    failed = [r for r in found if r.verdict != OK]
    return failed[0] if failed else max(found, key=lambda r: r.error_steps)


def _stale_primitive(entry: Entry, rng) -> Result:
    """MXNet's INT8 add caches its oneDNN primitive under a key that includes its output
    range *as read from the output buffers before they are written*: two adds that
    differ only in their calibrated output range, meeting output buffers with the same
    old contents (fresh zeroed memory, reused memory), share the first one's scale. Two
    calls with zeroed output buffers show it deterministically."""
    dtypes = ['uint8' if d == 'u8' else 'int8' for d in entry.inputs]
    shape, thresholds = (BATCH,) + IMAGE, (2.0, 1.5)
    real, args = 0.0, []
    for d, dtype, t in zip(entry.inputs, dtypes, thresholds):
        values = _grid(rng, shape, d, t)
        real = real + values
        args.append(mx.nd.array(np.rint(values * LEVELS[d] / t), dtype=dtype))
    ranges = [mx.nd.array([0.0 if d == 'u8' else -t]) for d, t in zip(entry.inputs, thresholds)]
    ranges = [r for pair in zip(ranges, [mx.nd.array([t]) for t in thresholds]) for r in pair]
    out_dtype = 'uint8' if dtypes == ['uint8', 'uint8'] else 'int8'
    levels = 255.5 if out_dtype == 'uint8' else 127.5
    error = 0.0
    for fraction in CLIPPED_RANGES:
        top = float(np.abs(real).max()) * fraction
        low = 0.0 if out_dtype == 'uint8' else -top
        out = [mx.nd.zeros(shape, dtype=out_dtype), mx.nd.zeros((1,)), mx.nd.zeros((1,))]
        mx.nd.contrib.quantized_elemwise_add(*args, *ranges, min_calib_range=low,
                                             max_calib_range=top, out=out)
        got = out[0].asnumpy() * (max(abs(out[1].asscalar()), abs(out[2].asscalar())) / levels)
        error = max(error, float(np.abs(got - np.clip(real, low, top)).max()) / (top / levels))
    if error <= TOLERANCE_STEPS:
        return Result(OK, round(error, 2), SHORT[out_dtype])
    return Result(WRONG, round(error, 2), SHORT[out_dtype],
                  'reuses the oneDNN primitive it cached for another output range')


def _measure_graph(entry: Entry, qsym, op: str, fused, traced, inputs) -> Result:
    """Run one calibrated INT8 probe graph and compare it with its oracle."""
    seven = entry.pattern.endswith('.w7')
    values = quantize_offline_params(qsym, traced.arg_params,
                                     seven_bit=list(traced.arg_params) if seven else ())
    target, target_outputs = _target(qsym, op)
    out_dtype = _output_dtype(qsym, traced.data_names, target_outputs[0])
    observe = target_outputs[1:3]
    if entry.pattern.startswith('layout:'):  # it carries the range of the conv it reads
        _, conv_outputs = _target(qsym, '_sg_mkldnn_conv')
        out_dtype = _output_dtype(qsym, traced.data_names, conv_outputs[0])
        observe = conv_outputs[1:3]
    elif out_dtype == 's32':  # an int32 output: read the range of the requantize after it
        _, observe = _target(qsym, '_contrib_requantize')
        out_dtype = _output_dtype(qsym, traced.data_names, observe[0])
        observe = observe[1:3]
    internals = qsym.get_internals()
    # BlockGrad: a CachedOp builds a backward graph even for inference, and MXNet's INT8
    # add and activation have no gradient; a non-zero gradient reaching them from the
    # dequantize node would stop the probe before it runs
    probe = mx.sym.Group([mx.sym.BlockGrad(o) for o in [qsym] + [internals[o] for o in observe]])
    int8 = build_symbol_block(probe, traced.data_names, values, traced.aux_params)
    try:
        runs = _run_twice(int8, inputs)
    except mx.base.MXNetError as err:
        return Result(CRASH, None, '-', _first_line(err))
    error, step, bias = _error(entry, fused, traced, values, inputs, runs[0], out_dtype)
    repeatable = (np.array_equal(runs[0][0], runs[1][0])
                  and np.array_equal(runs[2][0], runs[3][0])
                  and np.allclose(runs[2][0], runs[0][0][:1], rtol=0, atol=1e-5 + step))
    if not repeatable:
        return Result(WRONG, round(error, 2), out_dtype, 'differs between calls or batch sizes')
    if error > TOLERANCE_STEPS:
        return Result(WRONG, round(error, 2), out_dtype)
    if abs(bias) > BIAS_STEPS:
        return Result(WRONG, round(error, 2), out_dtype,
                      'biased: every value %.2f steps off on average (truncation)' % bias)
    return Result(OK, round(error, 2), out_dtype)


def bias_steps(got: np.ndarray, reference: np.ndarray, step: float) -> float:
    """The mean error towards zero, in steps: 0 for a kernel that rounds to nearest,
    -0.5 for one that truncates (every value shrinks by half a step on average). Only
    values more than a step from zero count."""
    big = np.abs(reference) > step
    if not big.any():
        return 0.0
    return float(np.mean((got[big] - reference[big]) * np.sign(reference[big]))) / step


def _error(entry: Entry, fused, traced, values, inputs, outputs, out_dtype
           ) -> Tuple[float, float, float]:
    """Max |kernel - oracle| in output steps, the step, and the mean error towards zero
    in steps (:func:`bias_steps`). A conv with an s8 source is compared with both weight
    grids oneDNN may use for it (8-bit, or half resolution without VNNI): the closer one
    is the kernel's."""
    convs = any(v.ndim == 4 for k, v in traced.arg_params.items() if k.endswith('weight'))
    grids = [False, True] if convs else [False]
    found = []
    for half_step in grids:
        oracle = build_symbol_block(fused, traced.data_names,
                                    _weights_as_used(entry, traced.arg_params, values,
                                                     half_step), traced.aux_params)
        step, reference = _step(outputs, out_dtype, oracle(*inputs).asnumpy().astype(np.float64))
        found.append((float(np.abs(outputs[0] - reference).max()) / step, step,
                      bias_steps(outputs[0], reference, step)))
    return min(found)


def _first_line(err: Exception) -> str:
    lines = [l.strip() for l in str(err).strip().splitlines()
             if l.strip() and not l.startswith(('Traceback', 'Stack trace', '  File'))]
    return lines[0][:200] if lines else type(err).__name__


def measure_all(entries: Sequence[Entry] = op_table.ENTRIES) -> Dict[str, Result]:
    """Every entry's result on this machine."""
    start = time.monotonic()
    found = {entry.key: measure(entry) for entry in entries}
    log.info('measured %d INT8 op-table entries in %.1f s', len(found),
             time.monotonic() - start)
    return found


def markdown(found: Dict[str, Result]) -> str:
    """The table as Markdown: op x input dtypes -> output dtype, result."""
    lines = ['| op | inputs | output | result | max error (output steps) |',
             '|---|---|---|---|---|']
    for entry in op_table.ENTRIES:
        r = found[entry.key]
        error = '-' if r.error_steps is None else '%.2f' % r.error_steps
        verdict = r.verdict if not r.detail else '%s: %s' % (r.verdict, r.detail)
        lines.append('| %s | %s | %s | %s | %s |' % (entry.pattern, ', '.join(entry.inputs),
                                                     r.output, verdict, error))
    return '\n'.join(lines)


def python_literal(found: Dict[str, Result]) -> str:
    """The column as the Python literal op_table.RECORDED holds."""
    rows = ['    %r: {' % op_table.machine()]
    for entry in op_table.ENTRIES:
        r = found[entry.key]
        rows.append('        %r: Result(%r, %r, %r%s),' % (
            entry.key, r.verdict, r.error_steps, r.output,
            ', %r' % r.detail if r.detail else ''))
    rows.append('    },')
    return '\n'.join(rows)
