"""Stage 3, quantize graph: the fused FP32 graph -> an INT8 graph with calibration slots.

MXNet's C++ passes do the rewriting (``MXQuantizeSymbol`` inserts quantize, requantize
and dequantize nodes and names the layer outputs that need thresholds;
``MXSetCalibTableToQuantizedSymbol`` writes thresholds in). This module wraps them and
owns what the built-in Python layer gets wrong or leaves out:

* exclusion by exact name, glob/regex pattern and op type, matched against the fused
  node names *and* the original layer names inside each fused node (a user names
  ``conv0``, the fused graph calls it ``sg_mkldnn_conv_bn_act_0``);
* a warning for every exclusion that matches nothing;
* a per-layer summary: which layers run INT8, which stay FP32, and why;
* INT8 kernels that read int8 inputs only (MXNet 1.9.1's elementwise multiply) never get
  uint8: the quantize nodes feeding them are made int8, and where an input is uint8
  whatever the ranges (a conv with a fused ReLU) the op stays FP32 (:func:`quantize_graph`).
"""
import ctypes
import dataclasses
import fnmatch
import json
import logging
import re
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import mxnet as mx
import numpy as np
from mxnet.base import _LIB, check_call, c_array, c_str, c_str_array, mx_uint, py_str
from mxnet.base import SymbolHandle

from .fuse import fuse

log = logging.getLogger(__name__)

GRANULARITIES = {'tensor': 'tensor-wise', 'channel': 'channel-wise'}

# Ops that have an INT8 kernel in MXNet 1.9.1 with oneDNN. When one of them stays FP32
# without an exclusion, the pass chose so (unsupported attributes such as Concat on
# dim=-1, or FP32 neighbours under quantize_mode='smart'), not for lack of a kernel.
INT8_CAPABLE_OPS = frozenset([
    '_sg_mkldnn_conv', '_sg_mkldnn_fully_connected', 'Convolution', 'FullyConnected',
    'Pooling', 'Concat', 'Flatten', 'elemwise_add', 'elemwise_mul', 'Activation',
    'BatchNorm', 'Embedding'])


# INT8 kernels of MXNet 1.9.1 that read their data input(s) as int8. The type inference of
# _contrib_quantized_elemwise_mul only logs "only support int8 inputs" when given uint8,
# and the kernel then stops in a TBlob check ("data type do not match specified type.
# Expected: unsigned char v.s. given char"): hard-swish (x * hard_sigmoid(x), whose gate
# is >= 0 and so calibrates to uint8) hits it in MobileNetV3. _contrib_quantized_act
# declares an int8 output and never checks its input: fed the uint8 output of an INT8
# elemwise_add (SE blocks, where the gate's multiply keeps the add out of the conv's sum
# fusion) it reads values above 127 as negative and its ReLU zeroes them, silently.
# op -> how many of its first inputs are data (the rest are their min/max ranges)
INT8_INPUT_ONLY_OPS = {'_contrib_quantized_elemwise_mul': 2, '_contrib_quantized_act': 1}
# Nodes whose output type is their out_type attribute ('auto': uint8 when the calibrated
# min is >= 0); an int8 kernel reads their output correctly once out_type is 'int8'.
_RETYPABLE_OPS = frozenset(['_contrib_quantize_v2', '_contrib_requantize'])


@dataclasses.dataclass(frozen=True)
class Node:
    """One compute node of the fused graph and the original layers inside it."""
    name: str
    op: str
    inner_names: Tuple[str, ...]
    inner_ops: Tuple[str, ...]


@dataclasses.dataclass
class LayerInfo:
    """One row of the quantization summary."""
    name: str
    op: str
    dtype: str          # 'int8' or 'fp32'
    reason: str = ''    # why it stays FP32
    layers: Tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def graph_nodes(symbol: mx.sym.Symbol) -> List[Node]:
    """The compute (non-variable) nodes of ``symbol`` with their fused contents."""
    nodes = []
    for node in json.loads(symbol.tojson())['nodes']:
        if node['op'] == 'null':
            continue
        inner = [n for sub in node.get('subgraphs', []) for n in sub['nodes'] if n['op'] != 'null']
        nodes.append(Node(node['name'], node['op'], tuple(n['name'] for n in inner),
                          tuple(n['op'] for n in inner)))
    return nodes


def _pattern_matches(pattern: str, name: str) -> bool:
    """Glob match, or regex search when the pattern is a valid regex."""
    if fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.search(pattern, name) is not None
    except re.error:
        return False


def resolve_exclusions(nodes: Sequence[Node], exclude_layers: Iterable[str] = (),
                       exclude_layers_match: Iterable[str] = (),
                       exclude_operators: Iterable[str] = ()) -> Dict[str, str]:
    """Map each excluded fused node name to the reason it is excluded.

    Every rule is matched against the node's own name (op type) and against the names
    (op types) of the original layers fused into it. A rule that matches nothing logs a
    warning naming it.
    """
    excluded: Dict[str, str] = {}
    rules = ([('exclude_layers', r, lambda n, r=r: r in (n.name,) + n.inner_names)
              for r in exclude_layers]
             + [('exclude_layers_match', r, lambda n, r=r: any(_pattern_matches(r, x) for x
                                                                in (n.name,) + n.inner_names))
                for r in exclude_layers_match]
             + [('exclude_operators', r, lambda n, r=r: r in (n.op,) + n.inner_ops)
                for r in exclude_operators])
    for option, rule, matches in rules:
        hits = [n.name for n in nodes if matches(n)]
        if not hits:
            log.warning('%s: %r matches no layer of the graph; nothing excluded for it',
                        option, rule)
        for name in hits:
            excluded.setdefault(name, 'user: %s=%r' % (option, rule))
    return excluded


def quantize_symbol(symbol: mx.sym.Symbol, excluded_names: Sequence[str],
                    offline_params: Sequence[str], quantized_dtype: str,
                    quantize_mode: str, granularity: str) -> Tuple[mx.sym.Symbol, List[str]]:
    """Run MXNet's quantization pass; return the INT8 symbol and the layer outputs
    (and graph inputs) that need calibrated thresholds."""
    out = SymbolHandle()
    num_calib = mx_uint()
    calib_names = ctypes.POINTER(ctypes.c_char_p)()
    offline = [c_str(name) for name in offline_params]
    check_call(_LIB.MXQuantizeSymbol(
        symbol.handle, ctypes.byref(out), ctypes.byref(ctypes.c_int(mx.cpu().device_typeid)),
        mx_uint(len(excluded_names)), c_str_array(list(excluded_names)),
        mx_uint(0), c_str_array([]),
        mx_uint(len(offline)), c_array(ctypes.c_char_p, offline),
        c_str(quantized_dtype), ctypes.c_bool(True), c_str(quantize_mode),
        c_str(GRANULARITIES[granularity]),
        ctypes.byref(num_calib), ctypes.byref(calib_names)))
    layers = [py_str(calib_names[i]) for i in range(num_calib.value)]
    return mx.sym.Symbol(out), layers


def quantize_graph(symbol: mx.sym.Symbol, excluded: Mapping[str, str],
                   offline_params: Sequence[str], quantized_dtype: str, quantize_mode: str,
                   granularity: str) -> Tuple[mx.sym.Symbol, List[str], Dict[str, str]]:
    """:func:`quantize_symbol`, safe for the kernels in :data:`INT8_INPUT_ONLY_OPS`.

    The quantize/requantize nodes feeding such a kernel emit int8. An input that is uint8
    whatever the calibration says (a oneDNN conv with a fused ReLU, or uint8 passed on by
    pooling) keeps that op FP32, and the pass runs again without it. Returns the INT8
    symbol, the outputs needing thresholds and ``excluded`` plus those ops, each with
    its reason.
    """
    reasons = dict(excluded)
    data = [a for a in symbol.list_arguments() if a not in set(offline_params)]
    while True:
        qsym, layers = quantize_symbol(symbol, sorted(reasons), offline_params,
                                       quantized_dtype, quantize_mode, granularity)
        if not any(n.op in INT8_INPUT_ONLY_OPS for n in graph_nodes(qsym)):
            return qsym, layers, reasons  # nothing to check: no probe pass
        qsym = _int8_into_int8_only_ops(qsym)
        conflicts = uint8_into_int8_only_ops(qsym, layers, data)
        if not conflicts:
            return qsym, layers, reasons
        if set(conflicts) <= set(reasons):
            raise RuntimeError('quantize: layers %s still get uint8 inputs after they were '
                               'excluded' % sorted(conflicts))
        for name, reason in conflicts.items():
            log.info('%s stays FP32: %s', name, reason)
        reasons.update(conflicts)


def _int8_into_int8_only_ops(qsym: mx.sym.Symbol) -> mx.sym.Symbol:
    """``qsym`` with out_type='int8' on every quantize/requantize node feeding an op of
    :data:`INT8_INPUT_ONLY_OPS` (other consumers of that node read int8 as well)."""
    graph = json.loads(qsym.tojson())
    nodes, changed = graph['nodes'], False
    for node in nodes:
        if node['op'] not in INT8_INPUT_ONLY_OPS:
            continue
        for src, _, _ in node['inputs'][:INT8_INPUT_ONLY_OPS[node['op']]]:
            attrs = nodes[src].setdefault('attrs', {})
            if nodes[src]['op'] in _RETYPABLE_OPS and attrs.get('out_type') != 'int8':
                attrs['out_type'] = 'int8'
                changed = True
    return mx.sym.load_json(json.dumps(graph)) if changed else qsym


def uint8_into_int8_only_ops(qsym: mx.sym.Symbol, calib_layers: Sequence[str],
                             data_names: Sequence[str]) -> Dict[str, str]:
    """Fused node name -> reason, for every op of :data:`INT8_INPUT_ONLY_OPS` in ``qsym``
    that would get a uint8 input.

    Worst case: every calibrated range is set non-negative (so every 'auto' node turns
    uint8), the post-quantization fusion runs, and MXNet's own type inference says what
    each op receives.
    """
    copy = mx.sym.load_json(qsym.tojson())  # the C++ pass writes ranges into shared nodes
    probe = fuse(set_calib_table(copy, {name: (0.0, 1.0) for name in calib_layers}))
    internals = probe.get_internals()
    _, out_types, _ = internals.infer_type_partial(**{n: 'float32' for n in data_names})
    dtype = dict(zip(internals.list_outputs(), out_types))
    output_name = {(node, idx): out for node, idx, out in graph_outputs(probe)}
    nodes = json.loads(probe.tojson())['nodes']
    conflicts = {}
    for node in nodes:
        if node['op'] not in INT8_INPUT_ONLY_OPS:
            continue
        for src, idx, _ in node['inputs'][:INT8_INPUT_ONLY_OPS[node['op']]]:
            if dtype.get(output_name[(nodes[src]['name'], idx)]) is np.uint8:
                name = node['name'][len('quantized_'):]
                conflicts.setdefault(name, (
                    'MXNet 1.9.1 INT8 %s reads int8 inputs only; input %s (op %s) can be uint8'
                    % (node['op'], nodes[src]['name'], nodes[src]['op'])))
    return conflicts


def graph_outputs(symbol: mx.sym.Symbol) -> List[Tuple[str, int, str]]:
    """``(node name, output index, output name)`` of every output in ``symbol``.

    Op hooks report an output by its name when the op names its outputs, else as
    ``<node>_<index>``; calibration tables use the output name.
    """
    internals = symbol.get_internals()
    seen: Dict[str, int] = {}
    rows = []
    for i, out_name in enumerate(internals.list_outputs()):
        node = internals[i].name
        seen[node] = seen.get(node, -1) + 1
        rows.append((node, seen[node], out_name))
    return rows


def quantize_node_inputs(qsym: mx.sym.Symbol) -> List[str]:
    """Names of the outputs that feed a quantize node (FP32 -> INT8 boundaries)."""
    output_name = {(node, idx): out for node, idx, out in graph_outputs(qsym)}
    nodes = json.loads(qsym.tojson())['nodes']
    names = []
    for node in nodes:
        if node['op'] == '_contrib_quantize_v2':
            src, index, _ = node['inputs'][0]
            names.append(output_name[(nodes[src]['name'], index)])
    return names


def set_calib_table(qsym: mx.sym.Symbol, ranges: Mapping[str, Tuple[float, float]]) -> mx.sym.Symbol:
    """Write the (min, max) range of every calibrated layer output into ``qsym``."""
    names = list(ranges)
    calibrated = SymbolHandle()
    check_call(_LIB.MXSetCalibTableToQuantizedSymbol(
        qsym.handle, mx_uint(len(names)), c_str_array(names),
        c_array(ctypes.c_float, [ranges[n][0] for n in names]),
        c_array(ctypes.c_float, [ranges[n][1] for n in names]),
        ctypes.byref(calibrated)))
    return mx.sym.Symbol(calibrated)


def quantize_offline_params(qsym: mx.sym.Symbol,
                            arg_params: Mapping[str, mx.nd.NDArray]) -> Dict[str, mx.nd.NDArray]:
    """The argument values ``qsym`` needs: FP32 params as they are, plus int8 copies
    (with their min/max) of the params the pass marked ``<name>_quantize``."""
    suffix = '_quantize'
    values = {}
    for name in qsym.list_arguments():
        if name in arg_params:
            values[name] = arg_params[name]
        elif name.endswith(suffix) and name[:-len(suffix)] in arg_params:
            param = arg_params[name[:-len(suffix)]]
            values[name], values[name + '_min'], values[name + '_max'] = _quantize_int8(param)
    return values


# oneDNN kernels read an int8 (uint8) tensor with range r at scale 127.5 / r (255.5 / r):
# MXNet's kInt8Range and kUint8Range; MXNet's quantize op writes int8 at 127 / r.
INT8_READ_RANGE, UINT8_READ_RANGE, _INT8_WRITE_RANGE = 127.5, 255.5, 127.0


def _quantize_int8(param: mx.nd.NDArray):
    """Symmetric int8 quantization of one parameter over its own range.

    The values are written at ``127 / r``; the stored range is widened by 127.5/127 so
    that the kernel, which reads at ``127.5 / range``, gets exactly ``127 / r`` back.
    MXNet's own quantizer stores ``r`` and every FC output comes out 0.4% too small.
    """
    peak = mx.nd.max(mx.nd.abs(param))
    q, _, _ = mx.nd.contrib.quantize(param, -peak, peak, out_type='int8')
    stored = peak * (INT8_READ_RANGE / _INT8_WRITE_RANGE)
    return q, -stored, stored


def summarize(nodes: Sequence[Node], qsym: mx.sym.Symbol,
              excluded: Mapping[str, str]) -> List[LayerInfo]:
    """One :class:`LayerInfo` per compute node of the fused graph."""
    quantized = {n.name for n in graph_nodes(qsym)}
    rows = []
    for node in nodes:
        if 'quantized_' + node.name in quantized:
            rows.append(LayerInfo(node.name, node.op, 'int8', '', node.inner_names))
        else:
            reason = excluded.get(node.name) or (
                'left FP32 by the quantization pass (op %s: unsupported attributes or FP32 '
                'neighbours)' % node.op if node.op in INT8_CAPABLE_OPS
                else 'no INT8 kernel for op %s' % node.op)
            rows.append(LayerInfo(node.name, node.op, 'fp32', reason, node.inner_names))
    return rows
