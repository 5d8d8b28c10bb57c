"""Stage 3, quantize graph: the fused FP32 graph -> an INT8 graph with calibration slots.

MXNet's C++ passes do the rewriting (``MXQuantizeSymbol`` inserts quantize, requantize
and dequantize nodes and names the layer outputs that need thresholds;
``MXSetCalibTableToQuantizedSymbol`` writes thresholds in). This module wraps them and
owns what the built-in Python layer gets wrong or leaves out:

* exclusion by exact name, glob/regex pattern and op type, matched against the fused
  node names *and* the original layer names inside each fused node (a user names
  ``conv0``, the fused graph calls it ``sg_mkldnn_conv_bn_act_0``);
* a warning for every exclusion that matches nothing;
* a per-layer summary: which layers run INT8, which stay FP32, and why, and what the plan
  (:mod:`gluon_int8.plan`, which makes every INT8 kernel correct) changed for a layer.
"""
import dataclasses
import fnmatch
import json
import logging
import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import mxnet as mx
from . import mxnet_private, op_table
from .op_table import INT8_CAPABLE

log = logging.getLogger(__name__)

GRANULARITIES = {'tensor': 'tensor-wise', 'channel': 'channel-wise'}



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
    note: str = ''      # what was changed so that its INT8 kernel is correct

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, row: dict) -> 'LayerInfo':
        return cls(row['name'], row['op'], row['dtype'], row.get('reason', ''),
                   tuple(row.get('layers', ())), row.get('note', ''))


class LayerTable:
    """The per-layer summary of a quantized model (its ``layers``, :class:`LayerInfo`
    rows), as QuantizedBlock and an ONNX model on its runtime both show it."""
    layers: List[LayerInfo]

    @property
    def int8_layers(self) -> List[str]:
        """Names of the fused layers that run INT8."""
        return [row.name for row in self.layers if row.dtype == 'int8']

    @property
    def fp32_layers(self) -> Dict[str, str]:
        """Fused layers that stay FP32, mapped to the reason why."""
        return {row.name: row.reason for row in self.layers if row.dtype == 'fp32'}

    def layer_table(self) -> str:
        """The per-layer summary as a plain-text table."""
        width = max([len(r.name) for r in self.layers] + [5])
        lines = ['%-*s  %-28s %-5s %s' % (width, 'layer', 'op', 'dtype', 'why FP32')]
        lines += ['%-*s  %-28s %-5s %s' % (width, r.name, r.op, r.dtype, r.reason)
                  for r in self.layers]
        return '\n'.join(lines)


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


def reasons_of(rules) -> Dict[str, str]:
    """Exclusion rules as rule -> reason: a dict as it is, a str or a list of them with
    no reason ('')."""
    if isinstance(rules, Mapping):
        return dict(rules)
    return dict.fromkeys([rules] if isinstance(rules, str) else rules or (), '')


def resolve_exclusions(nodes: Sequence[Node], exclude_layers: Iterable[str] = (),
                       exclude_layers_match: Iterable[str] = (),
                       exclude_operators: Iterable[str] = ()) -> Dict[str, str]:
    """Map each excluded fused node name to the reason it is excluded.

    Every rule is matched against the node's own name (op type) and against the names
    (op types) of the original layers fused into it. A rule that matches nothing logs a
    warning naming it. Rules given as a dict carry their reason (``rule -> reason``);
    the reason then reads ``'<reason> (<option>=<rule>)'``, else ``'user: <option>=<rule>'``.
    """
    excluded: Dict[str, str] = {}
    rules = ([('exclude_layers', r, why, lambda n, r=r: r in (n.name,) + n.inner_names)
              for r, why in reasons_of(exclude_layers).items()]
             + [('exclude_layers_match', r, why, lambda n, r=r: any(
                 _pattern_matches(r, x) for x in (n.name,) + n.inner_names))
                for r, why in reasons_of(exclude_layers_match).items()]
             + [('exclude_operators', r, why, lambda n, r=r: r in (n.op,) + n.inner_ops)
                for r, why in reasons_of(exclude_operators).items()])
    for option, rule, why, matches in rules:
        hits = [n.name for n in nodes if matches(n)]
        if not hits:
            log.warning('%s: %r matches no layer of the graph; nothing excluded for it',
                        option, rule)
        for name in hits:
            excluded.setdefault(name, '%s (%s=%r)' % (why, option, rule) if why
                                else 'user: %s=%r' % (option, rule))
    return excluded


def quantize_symbol(symbol: mx.sym.Symbol, excluded_names: Sequence[str],
                    offline_params: Sequence[str], quantized_dtype: str,
                    quantize_mode: str, granularity: str) -> Tuple[mx.sym.Symbol, List[str]]:
    """Run MXNet's quantization pass; return the INT8 symbol and the layer outputs
    (and graph inputs) that need calibrated thresholds."""
    return mxnet_private.quantize_symbol(symbol, excluded_names, offline_params,
                                         quantized_dtype, quantize_mode,
                                         GRANULARITIES[granularity])


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


def quantize_node_inputs(qsym: mx.sym.Symbol, out_type: Optional[str] = None) -> List[str]:
    """Names of the outputs that feed a quantize node (FP32 -> INT8 boundaries); with
    ``out_type``, only those of the quantize nodes that emit it."""
    output_name = {(node, idx): out for node, idx, out in graph_outputs(qsym)}
    nodes = json.loads(qsym.tojson())['nodes']
    names = []
    for node in nodes:
        if node['op'] == '_contrib_quantize_v2' and \
                out_type in (None, node.get('attrs', {}).get('out_type', 'int8')):
            src, index, _ = node['inputs'][0]
            names.append(output_name[(nodes[src]['name'], index)])
    return names


def set_calib_table(qsym: mx.sym.Symbol, ranges: Mapping[str, Tuple[float, float]]) -> mx.sym.Symbol:
    """Write the (min, max) range of every calibrated layer output into ``qsym``; a
    non-negative one at :func:`op_table.uint8_range_factor` times its threshold, unless a
    quantize node makes it int8 (which no kernel saturates on)."""
    factor = op_table.uint8_range_factor()
    signed = frozenset(quantize_node_inputs(qsym, 'int8'))
    names = list(ranges)
    return mxnet_private.set_calib_table(
        qsym, names, [ranges[n][0] for n in names],
        [ranges[n][1] * (factor if ranges[n][0] >= 0 and n not in signed else 1.0)
         for n in names])


def quantize_offline_params(qsym: mx.sym.Symbol, arg_params: Mapping[str, mx.nd.NDArray],
                            seven_bit: Sequence[str] = ()) -> Dict[str, mx.nd.NDArray]:
    """The argument values ``qsym`` needs: FP32 params as they are, plus int8 copies
    (with their min/max) of the params the pass marked ``<name>_quantize``; those named in
    ``seven_bit`` use 63 levels instead of 127 (see :func:`_quantize_int8`)."""
    suffix = '_quantize'
    values = {}
    for name in qsym.list_arguments():
        if name in arg_params:
            values[name] = arg_params[name]
        elif name.endswith(suffix) and name[:-len(suffix)] in arg_params:
            source = name[:-len(suffix)]
            levels = SEVEN_BIT_LEVELS if source in seven_bit else INT8_LEVELS
            values[name], values[name + '_min'], values[name + '_max'] = _quantize_int8(
                arg_params[source], levels)
    return values


# oneDNN kernels read an int8 (uint8) tensor with range r at scale 127.5 / r (255.5 / r):
# MXNet's kInt8Range and kUint8Range; MXNet's quantize op writes int8 at 127 / r.
INT8_READ_RANGE, UINT8_READ_RANGE = 127.5, 255.5
# Weight levels: 8 bits, or 7 where the op table says the kernel saturates in int16 pairs
# with 8-bit weights (oneDNN's u8*s8 on CPUs without VNNI).
INT8_LEVELS, SEVEN_BIT_LEVELS = 127, 63


def _quantize_int8(param: mx.nd.NDArray, levels: int = INT8_LEVELS):
    """Symmetric quantization of one parameter over its own range to ``levels`` levels.

    The values are written at ``levels / r``; the stored range is widened to
    ``r * 127.5 / levels`` so that the kernel, which reads at ``127.5 / range``, gets
    exactly ``levels / r`` back. MXNet's own quantizer stores ``r`` and every FC output
    comes out 0.4% too small.
    """
    peak = mx.nd.max(mx.nd.abs(param))
    scale = mx.nd.where(peak > 0, levels / peak, mx.nd.ones_like(peak))
    q = mx.nd.clip(mx.nd.round(mx.nd.broadcast_mul(param, scale)), -levels, levels)
    stored = peak * (INT8_READ_RANGE / levels)
    return q.astype('int8'), -stored, stored


def summarize(nodes: Sequence[Node], qsym: mx.sym.Symbol, excluded: Mapping[str, str],
              notes: Mapping[str, str] = (), also_int8: Iterable[str] = ()) -> List[LayerInfo]:
    """One :class:`LayerInfo` per compute node of the fused graph. ``also_int8``: names
    (with the ``quantized_`` prefix) of layers that count as INT8 without an INT8 node:
    ReLUs taken out as identities, layout ops run on int8 tensors."""
    notes = dict(notes)
    quantized = {n.name for n in graph_nodes(qsym)} | set(also_int8)
    rows = []
    for node in nodes:
        if 'quantized_' + node.name in quantized:
            rows.append(LayerInfo(node.name, node.op, 'int8', '', node.inner_names,
                                  notes.get(node.name, '')))
        else:
            reason = excluded.get(node.name) or (
                'left FP32 by the quantization pass (op %s: unsupported attributes or FP32 '
                'neighbours)' % node.op if node.op in INT8_CAPABLE
                else 'no INT8 kernel for op %s' % node.op)
            rows.append(LayerInfo(node.name, node.op, 'fp32', reason, node.inner_names))
    return rows
