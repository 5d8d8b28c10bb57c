"""Stage 2, fuse: oneDNN (MKLDNN) operator fusion on the traced FP32 graph, made safe.

MXNet's C++ subgraph backends do the fusion: ``MKLDNN`` for FP32 inference (Conv+BN,
Conv+ReLU, Conv+Sum, FC+act) and ``MKLDNN_QUANTIZE`` for a graph about to be quantized
(the same patterns, plus the requantize/dequantize fusion after calibration).

Three steps around the C++ pass:

* :func:`canonicalize` rewrites ``relu(x)`` (what ``F.relu`` emits) into
  ``Activation(x, act_type='relu')``: the same function, but the oneDNN passes only fuse
  ``Activation``. It also rewrites a 1x1 convolution with a stride and no padding into a
  ``slice`` with that step and a 1x1 convolution with stride 1: the same function, but
  oneDNN's INT8 kernel for the strided one (on an AVX2 CPU, with more than one OpenMP
  thread) gave outputs that differ from run to run in our Fashion-MNIST ResNet (up to
  0.2 in its logits; none with the rewrite). The plan runs the slice on the int8 tensor.
* :func:`guard` keeps the pass from changing the function. MXNet 1.9.1 fuses BN, an
  activation or a residual sum into a conv (or FC) whose output also has other consumers,
  and then hands those consumers the *fused* output (a pre-activation ResNet's identity
  shortcut gets ``relu(bn(conv(x)))`` instead of ``conv(x)``: its top-1 fell from 91.6
  to 63.2). Before the pass, every such conv gets a copy per fusable consumer, so each
  copy has one consumer to fuse with and the original keeps the rest.
* :func:`verify` runs the fused graph against the traced one on a few examples; a
  difference beyond float rounding raises :class:`FusionError` naming the first fused
  node whose output differs. ``quantize_net`` never returns a model built on it.

:func:`unfuse` goes back: every fused node inlined as the ops inside it, with their
traced names; :func:`tensor_names` maps the fused graph's tensors (what calibration
tables name) to the traced graph's, which the ONNX export writes.
"""
import dataclasses
import json
import logging
import re
from typing import Dict, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from .op_table import FUSABLE_CONSUMERS, FUSION_HEADS
from .quantize_graph import graph_outputs

log = logging.getLogger(__name__)

FP32_BACKEND = 'MKLDNN'
QUANTIZE_BACKEND = 'MKLDNN_QUANTIZE'

# fused vs traced: a difference beyond this fraction of the output's largest magnitude is
# not float rounding (the defect above is 85% of it)...
VERIFY_RTOL = 1e-3
VERIFY_EXAMPLES = 4
# ... unless the network itself moves that tensor as much when its input moves by a few
# float32 ulps (INPUT_NUDGE, relative): fused ops round differently, and a chaotic random
# network, or NMS, makes that visible. A tensor may differ by NUDGE_MARGIN x its own move.
INPUT_NUDGE = 2.0 ** -20
NUDGE_MARGIN = 10.0
COPY_SUFFIX = '_fusecopy'
_COPY = re.compile(r'%s\d+(?=_output|$)' % COPY_SUFFIX)


class FusionError(RuntimeError):
    """The fused FP32 graph computes something else than the traced graph."""


def canonicalize(symbol: mx.sym.Symbol) -> mx.sym.Symbol:
    """``symbol`` with every ``relu`` op written as ``Activation(act_type='relu')``, and
    every strided 1x1 convolution without padding as a strided ``slice`` (named
    ``<conv>`` + :data:`STRIDE_SUFFIX`) and a convolution with stride 1."""
    graph = json.loads(symbol.tojson())
    changed, strided = False, []
    for i, node in enumerate(graph['nodes']):
        if node['op'] == 'relu':
            node['op'] = 'Activation'
            node['attrs'] = dict(node.get('attrs', {}), act_type='relu')
            changed = True
        elif _strided_pointwise(node):
            strided.append(i)
    if strided:
        graph = _unit_stride(graph, strided)
    return mx.sym.load_json(json.dumps(graph)) if changed or strided else symbol


STRIDE_SUFFIX = '_stride'


def _tuple(attrs: dict, key: str, default: Tuple[int, ...]) -> Tuple[int, ...]:
    text = attrs.get(key)
    return tuple(int(v) for v in re.findall(r'-?\d+', text)) if text else default


def _strided_pointwise(node: dict) -> bool:
    """A 2-d 1x1 convolution without padding (dilation does not change it) with a stride
    above 1."""
    attrs = node.get('attrs', {})
    if node['op'] != 'Convolution' or _tuple(attrs, 'kernel', ()) != (1, 1):
        return False
    return (any(s > 1 for s in _tuple(attrs, 'stride', (1, 1)))
            and not any(_tuple(attrs, 'pad', (0, 0)))
            and attrs.get('layout', 'NCHW') == 'NCHW')


def _unit_stride(graph: dict, strided: Sequence[int]) -> dict:
    """The graph with a strided ``slice`` before each listed convolution (placed right
    before it: node order stays topological), which then runs with stride 1."""
    order, new_index, strided = [], {}, set(strided)
    for i, node in enumerate(graph['nodes']):
        node['inputs'] = [[new_index[src], out, ver] for src, out, ver in node['inputs']]
        if i in strided:
            step = _tuple(node['attrs'], 'stride', (1, 1))
            order.append({'op': 'slice', 'name': node['name'] + STRIDE_SUFFIX,
                          'attrs': {'begin': '(None, None, None, None)',
                                    'end': '(None, None, None, None)',
                                    'step': str((1, 1) + step)},
                          'inputs': [node['inputs'][0]]})
            node['inputs'][0] = [len(order) - 1, 0, 0]
            node['attrs'] = dict(node['attrs'], stride='(1, 1)')
        new_index[i] = len(order)
        order.append(node)
    return _with_order(graph, order, new_index)


def _with_order(graph: dict, order: List[dict], new_index: Dict[int, int]) -> dict:
    """``graph`` with its nodes replaced by ``order`` (old node index -> ``new_index``)."""
    graph['nodes'] = order
    graph['arg_nodes'] = [i for i, n in enumerate(order) if n['op'] == 'null']
    graph['heads'] = [[new_index[src], out, ver] for src, out, ver in graph['heads']]
    graph.pop('node_row_ptr', None)
    return graph


def _consumers(graph: dict) -> Dict[int, List[Tuple[int, int]]]:
    """Node index -> (consumer index, input slot) of every use of its output 0; graph
    outputs count as a consumer with index -1."""
    uses: Dict[int, List[Tuple[int, int]]] = {}
    for i, node in enumerate(graph['nodes']):
        for slot, (src, out, _) in enumerate(node['inputs']):
            if out == 0:
                uses.setdefault(src, []).append((i, slot))
    for src, out, _ in graph['heads']:
        if out == 0:
            uses.setdefault(src, []).append((-1, -1))
    return uses


def guard(symbol: mx.sym.Symbol) -> mx.sym.Symbol:
    """``symbol`` where no conv/FC output feeds a fusable op *and* another consumer.

    Such a node keeps its non-fusable consumers (or, if it has none, its first fusable
    one); every other fusable consumer reads its own copy of the node (same inputs, same
    weights). The function is unchanged; the price is the copies' compute.
    """
    graph = json.loads(symbol.tojson())
    nodes = graph['nodes']
    uses = _consumers(graph)
    copies: Dict[int, List[Tuple[int, int]]] = {}
    for i, node in enumerate(nodes):
        if node['op'] not in FUSION_HEADS or len(uses.get(i, [])) < 2:
            continue
        fusable = [u for u in uses[i] if u[0] >= 0 and nodes[u[0]]['op'] in FUSABLE_CONSUMERS]
        if not fusable:
            continue
        keep_one = len(fusable) == len(uses[i])
        copies[i] = fusable[1:] if keep_one else fusable
    if not copies:
        return symbol
    log.info('fuse: %d conv/FC outputs feed a fusable op and another consumer; '
             'copied for the fusion: %s', len(copies), [nodes[i]['name'] for i in copies])
    return mx.sym.load_json(json.dumps(_with_copies(graph, copies)))


def _with_copies(graph: dict, copies: Dict[int, List[Tuple[int, int]]]) -> dict:
    """The graph with each listed node duplicated once per (consumer, slot) given, the
    copy placed right after the original (node order stays topological)."""
    order, new_index, redirect = [], {}, {}
    for i, node in enumerate(graph['nodes']):  # inputs always precede their consumers
        node['inputs'] = [[redirect.get((i, slot), new_index[src]), out, ver]
                          for slot, (src, out, ver) in enumerate(node['inputs'])]
        new_index[i] = len(order)
        order.append(node)
        for k, (consumer, slot) in enumerate(copies.get(i, []), 1):
            copy = json.loads(json.dumps(node))
            copy['name'] = '%s%s%d' % (node['name'], COPY_SUFFIX, k)
            redirect[(consumer, slot)] = len(order)
            order.append(copy)
    return _with_order(graph, order, new_index)


def fuse(symbol: mx.sym.Symbol, backend: str = QUANTIZE_BACKEND) -> mx.sym.Symbol:
    """Apply the oneDNN fusion passes of ``backend`` to ``symbol`` (guarded)."""
    return guard(canonicalize(symbol)).get_backend_symbol(backend)


# -- the unfused graph -------------------------------------------------------------------

def subgraph_args(node: dict) -> List[int]:
    """The inner variable nodes of a fused node, in the order of its inputs."""
    sub = node['subgraphs'][0]
    args = sub.get('arg_nodes') or [i for i, n in enumerate(sub['nodes']) if n['op'] == 'null']
    if len(args) != len(node['inputs']):
        raise ValueError('fused node %r (op %s) has %d inputs but its subgraph %d variables: '
                         'cannot unfuse it' % (node['name'], node['op'], len(node['inputs']),
                                               len(args)))
    return list(args)


@dataclasses.dataclass
class Unfused:
    """The unfused graph of a fused one, and how their names relate."""
    symbol: mx.sym.Symbol
    heads: Dict[Tuple[str, int], Tuple[str, int]]  # (fused node, out) -> (unfused node, out)
    owner: Dict[str, str]                          # unfused node -> the fused node it is in


def unfuse(fused: mx.sym.Symbol) -> Unfused:
    """``fused`` with every fused node replaced by the ops inside it (a fused node's
    output k is its subgraph's head k)."""
    graph = json.loads(fused.tojson())
    order: List[dict] = []
    where: Dict[Tuple[int, int], Tuple[int, int]] = {}   # (old node, out) -> (new node, out)
    owner: Dict[str, str] = {}
    for i, node in enumerate(graph['nodes']):
        inputs = [where[(src, out)] for src, out, _ in node['inputs']]
        if not node.get('subgraphs'):
            node['inputs'] = [[s, o, 0] for s, o in inputs]
            order.append(node)
            owner[node['name']] = node['name']
            where.update(_entries(i, len(order) - 1, node))
            continue
        sub = node['subgraphs'][0]
        local = {(arg, 0): entry for arg, entry in zip(subgraph_args(node), inputs)}
        for j, inner in enumerate(sub['nodes']):
            if inner['op'] == 'null':
                continue
            inner['inputs'] = [list(local[(s, o)]) + [0] for s, o, _ in inner['inputs']]
            order.append(inner)
            owner[inner['name']] = node['name']
            local.update(_entries(j, len(order) - 1, inner))
        where.update({(i, k): local[(h, o)] for k, (h, o, _) in enumerate(sub['heads'])})
    graph['nodes'] = order
    graph['arg_nodes'] = [i for i, n in enumerate(order) if n['op'] == 'null']
    graph['heads'] = [list(where[(s, o)]) + [0] for s, o, _ in graph['heads']]
    graph.pop('node_row_ptr', None)
    old = graph_nodes_by_index(fused)
    heads = {(old[i], k): (order[j]['name'], o) for (i, k), (j, o) in where.items()
             if old[i] is not None}
    return Unfused(mx.sym.load_json(json.dumps(graph)), heads, owner)


def graph_nodes_by_index(symbol: mx.sym.Symbol) -> List[str]:
    """Node index -> name for compute nodes (None for variables)."""
    return [n['name'] if n['op'] != 'null' else None
            for n in json.loads(symbol.tojson())['nodes']]


_MAX_OUTPUTS = 16  # no op of a classification network has more outputs


def _entries(old: int, new: int, node: dict) -> Dict[Tuple[int, int], Tuple[int, int]]:
    count = int(node.get('attrs', {}).get('num_outputs', 1)) if node['op'] == 'SliceChannel' \
        else _MAX_OUTPUTS
    return {(old, k): (new, k) for k in range(count)}


def traced_name(name: str) -> str:
    """The traced graph's name of a tensor of a conv that :func:`guard` copied
    (``conv0_fwd_fusecopy1_output`` -> ``conv0_fwd_output``); other names as they are."""
    return _COPY.sub('', name)


def tensor_names(fused: mx.sym.Symbol) -> Dict[str, str]:
    """Tensor name in the fused graph (``sg_mkldnn_conv_bn_act_0_output``) -> the same
    tensor's name in the traced graph (``conv0_relu_fwd_output``): a fused node's output
    is its subgraph head's output; a conv that :func:`guard` copied computes what the
    original does (``conv0_fwd_fusecopy1`` -> ``conv0_fwd``)."""
    unfused = unfuse(fused)
    traced = {(node, idx): name for node, idx, name in graph_outputs(unfused.symbol)}
    found = {}
    for node, idx, out_name in graph_outputs(fused):
        inner = unfused.heads.get((node, idx))
        if inner is not None and inner in traced:
            found[out_name] = traced_name(traced[inner])
        elif out_name == node:  # a variable: the network input keeps its name
            found[out_name] = out_name
    return found


# -- verification ---------------------------------------------------------------------

def _outputs(symbol, data_names, params, inputs, param: str = 'calib_data') -> List[np.ndarray]:
    """The outputs of ``symbol`` on ``inputs``; a batch the network cannot take is
    reported as batch 0 of the caller's ``param``."""
    from .trace import build_symbol_block  # pylint: disable=import-outside-toplevel
    block = build_symbol_block(symbol, data_names, params, {})
    try:
        out = block(*inputs)
        return [o.asnumpy() for o in (out if isinstance(out, (list, tuple)) else [out])]
    except mx.base.MXNetError as err:
        lines = [l for l in str(err).strip().splitlines() if l.strip()
                 and not l.lstrip().startswith(('Traceback', 'File', '[bt]', 'Stack trace'))]
        raise ValueError('%s: batch 0 with shapes %s does not fit the network: %s'
                         % (param, [tuple(b.shape) for b in inputs],
                            lines[0] if lines else type(err).__name__)) from err


def _differs(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| as a fraction of max |want| (inf for a shape mismatch)."""
    if got.shape != want.shape or not np.isfinite(got).all():
        return float('inf')
    scale = max(float(np.abs(want).max()), 1e-6)
    return float(np.abs(got.astype(np.float64) - want).max()) / scale


def verify(fused: mx.sym.Symbol, traced: mx.sym.Symbol, data_names: Sequence[str], params,
           batch: Sequence[mx.nd.NDArray], examples: int = VERIFY_EXAMPLES) -> None:
    """Raise :class:`FusionError` unless ``fused`` computes what ``traced`` computes on the
    first ``examples`` examples of ``batch``, naming the first fused node that differs.

    A difference beyond :data:`VERIFY_RTOL` is then checked tensor by tensor against how
    much the traced network itself moves each tensor when its input moves by
    :data:`INPUT_NUDGE`: the fused graph rounds differently, and NMS after a chaotic
    random backbone turns that into other boxes (yolo3_mobilenet1.0_voc: a head's slice
    off by 0.00101 fused, and by 0.00101 with the input nudged; its NMS output 100%)."""
    inputs = [b[:examples] for b in batch]
    if not all(np.isfinite(i.asnumpy()).all() for i in inputs):
        return  # NaN/Inf in the data (a ReLU turns NaN into 0 in one graph and not the
        # other): calibration names the input
    want = _outputs(traced, data_names, params, inputs)
    if not all(np.isfinite(w).all() for w in want):
        return  # NaN/Inf in the network itself: calibration names the layer
    got = _outputs(fused, data_names, params, inputs)
    worst = max(_differs(g, w) for g, w in zip(got, want))
    if worst <= VERIFY_RTOL:
        return
    node, error, moved = _first_difference(fused, traced, data_names, params, inputs)
    if node is None:
        log.info('fuse: the fused graph\'s outputs differ from the network\'s by %.3g of their '
                 'magnitude, within what an input change of %.2g moves each tensor: float '
                 'rounding, not a fusion defect', worst, INPUT_NUDGE)
        return
    raise FusionError(
        'fuse: the oneDNN-fused FP32 graph computes something else than the network '
        '(outputs off by %.3g of their magnitude); the first fused node that differs is %r '
        '(off by %.3g, where an input change of %.2g moves it by %.3g), so no model was '
        'built. This is a defect of MXNet\'s fusion pass that gluon_int8.fuse.guard does not '
        'cover yet: please report the network' % (worst, node, error, INPUT_NUDGE, moved))


def _first_difference(fused, traced, data_names, params, inputs
                      ) -> Tuple[Optional[str], float, float]:
    """The first fused node (graph order) whose output differs from the traced tensor of
    the same name (:func:`tensor_names`: a fused node computes its subgraph head's
    output) beyond :data:`VERIFY_RTOL` and :data:`NUDGE_MARGIN` times the traced tensor's
    own move under an input change of :data:`INPUT_NUDGE`; with its difference and that
    move; ``None`` when none does. The graph outputs are checked last, named by themselves."""
    names = tensor_names(fused)
    pairs = [(node, out, names[out]) for node, idx, out in graph_outputs(fused)
             if idx == 0 and out in names]
    pairs += [(None, f, t) for f, t in zip(fused.list_outputs(), traced.list_outputs())]
    fused_out = dict(zip(fused.get_internals().list_outputs(),
                         _outputs(fused.get_internals(), data_names, params, inputs)))
    internals = traced.get_internals()
    traced_out = dict(zip(internals.list_outputs(),
                          _outputs(internals, data_names, params, inputs)))
    nudged = dict(zip(internals.list_outputs(), _outputs(
        internals, data_names, params, [i * (1 + INPUT_NUDGE) for i in inputs])))
    for name, fused_name, traced_name in pairs:
        if fused_name in fused_out and traced_name in traced_out:
            error = _differs(fused_out[fused_name], traced_out[traced_name])
            moved = _differs(nudged[traced_name], traced_out[traced_name])
            if error > max(VERIFY_RTOL, NUDGE_MARGIN * moved):
                return name or fused_name, error, moved
    return None, float('nan'), float('nan')
