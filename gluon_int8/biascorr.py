"""Bias correction (``quantize_net(..., bias_correction=True)``), between calibration and
building the block.

Rounding a layer's weights and its input to 8 bits moves the mean of each of its output
channels; the layers after it read that shift as signal. Following Nagel et al. 2019
("Data-Free Quantization Through Weight Equalization and Bias Correction", the empirical
variant) as NNCF's fast bias correction does it, layer by layer on the FP32 network's
own inputs (so no upstream shift is counted twice), for every INT8 conv and FC of the
graph that runs, on the first calibration batch:

    x    the layer's input in the FP32 network
    x^   x on the 8-bit grid the INT8 graph reads it on (its range and dtype), clipped
    W    the layer's weights, BatchNorm folded in; W^ as the kernel rounds them
    shift[c] = mean over examples and positions of (W x)[c] - (W^ x^)[c]

before any activation or sum. The shift is added to the channel's bias: the BatchNorm's
beta where one is fused into the conv (the folded bias moves by exactly that), else the
layer's own bias; a layer traced without one gets a zero bias first
(:func:`with_biases`). Only the INT8 block's values change: the FP32 reference, and so
the ONNX export (which rounds weights and inputs its own way), keep the network's own.
"""
import json
import logging
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from .op_table import has_vnni
from .plan import PREFIX, GraphView, tensor_dtypes
from .observe import in_budget, run_outputs
from .selfcheck import _fold_conv, _oracle_params, _rounded
from .trace import TracedGraph

log = logging.getLogger(__name__)

WEIGHT_OPS = {'Convolution': 'num_filter', 'FullyConnected': 'num_hidden'}
# the levels at which oneDNN reads an 8-bit tensor of range r (MXNet's kInt8Range and
# kUint8Range), and its codes
_GRID = {'s8': (127.5, -127.0, 127.0), 'u8': (255.5, 0.0, 255.0)}
CHUNK_VALUES = 1 << 26  # FP32 inputs observed per forward pass: bounds the memory


# -- a bias for every weight layer --------------------------------------------------------

def with_biases(traced: TracedGraph) -> TracedGraph:
    """``traced`` with a zero bias on every Convolution and FullyConnected traced without
    one (the same function; a bias to correct). The fingerprint stays the network's."""
    graph = json.loads(traced.symbol.tojson())
    nodes, moved, added = [], {}, {}
    for old, node in enumerate(graph['nodes']):
        node['inputs'] = [[moved[s], o, v] for s, o, v in node['inputs']]
        attrs = node.get('attrs', {})
        if node['op'] in WEIGHT_OPS and str(attrs.get('no_bias', 'false')).lower() == 'true':
            name = _free_name(node['name'] + '_bias', traced.arg_params, added)
            nodes.append({'op': 'null', 'name': name, 'inputs': []})
            node['inputs'].append([len(nodes) - 1, 0, 0])
            attrs['no_bias'] = 'False'
            added[name] = mx.nd.zeros((int(attrs[WEIGHT_OPS[node['op']]]),))
        nodes.append(node)
        moved[old] = len(nodes) - 1
    if not added:
        return traced
    graph['nodes'] = nodes
    graph['arg_nodes'] = [i for i, n in enumerate(nodes) if n['op'] == 'null']
    graph['heads'] = [[moved[s], o, v] for s, o, v in graph['heads']]
    graph.pop('node_row_ptr', None)
    fingerprint = traced.fingerprint()
    return TracedGraph(mx.sym.load_json(json.dumps(graph)), {**traced.arg_params, **added},
                       traced.aux_params, traced.data_names, traced.out_format, fingerprint)


def _free_name(name: str, *taken) -> str:
    candidate, k = name, 0
    while any(candidate in t for t in taken):
        k += 1
        candidate = '%s%d' % (name, k)
    return candidate


# -- the shifts ---------------------------------------------------------------------------

class _Layer:
    """One INT8 conv or FC: what its shift is computed from, and where it goes."""

    def __init__(self, op: str, attrs: dict, source: str, grid: Tuple[float, str],
                 weight: np.ndarray, rounded: np.ndarray, target: str):
        self.op, self.attrs, self.source, self.grid = op, attrs, source, grid
        self.weight, self.rounded, self.target = weight, rounded, target

    def shift(self, x: np.ndarray) -> np.ndarray:
        threshold, dtype = self.grid
        levels, low, high = _GRID[dtype]
        step = threshold / levels if threshold > 0 else 1.0
        rounded = np.clip(np.rint(x / step), low, high) * step
        exact = self._apply(x, self.weight) - self._apply(rounded, self.rounded)
        channel = 1 if self.op == 'Convolution' else exact.ndim - 1
        return exact.mean(axis=tuple(a for a in range(exact.ndim) if a != channel))

    def _apply(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        fn = mx.nd.Convolution if self.op == 'Convolution' else mx.nd.FullyConnected
        out = fn(mx.nd.array(x), mx.nd.array(weight), **dict(self.attrs, no_bias=True))
        return out.asnumpy().astype(np.float64)


def shifts(qsym: mx.sym.Symbol, fused: mx.sym.Symbol, params: Mapping[str, mx.nd.NDArray],
           values: Mapping[str, mx.nd.NDArray], data_names: Sequence[str],
           batch: Sequence[mx.nd.NDArray], ranges: Mapping[str, Tuple[float, float]]
           ) -> Dict[str, np.ndarray]:
    """Parameter name -> the shift to add to it, for every INT8 conv and FC of ``qsym``
    (see the module docstring). ``params``: the FP32 values (arguments and auxiliary
    states), ``values``: the INT8 graph's (its offline-quantized weights), ``ranges``:
    the calibration table's."""
    layers = _layers(qsym, fused, {k: v.asnumpy() for k, v in params.items()}, values,
                     data_names, ranges)
    found: Dict[str, List[np.ndarray]] = {}
    internals = fused.get_internals()
    for chunk in _chunks(layers, internals, data_names, batch):
        wanted = list(dict.fromkeys(layer.source for layer in chunk))
        observed = dict(zip(wanted, run_outputs(internals, wanted, data_names, batch, params)))
        for layer in chunk:
            found.setdefault(layer.target, []).append(layer.shift(observed[layer.source]))
    shared = sorted(name for name, s in found.items() if len(s) > 1)
    if shared:
        log.info('bias correction: %s shared by several INT8 layers, left as they are',
                 ', '.join(shared))
    return {name: s[0] for name, s in found.items() if len(s) == 1}


def corrected(params: Mapping[str, mx.nd.NDArray],
              found: Mapping[str, np.ndarray]) -> Dict[str, mx.nd.NDArray]:
    """``params`` with the shifts added (new arrays: the originals are the user's)."""
    out = dict(params)
    for name, shift in found.items():
        out[name] = params[name] + mx.nd.array(shift, dtype=params[name].dtype)
    worst = max((float(np.abs(s).max()) for s in found.values()), default=0.0)
    log.info('bias correction: %d biases corrected, largest shift %.4g', len(found), worst)
    return out


def _layers(qsym, fused, params, values, data_names, ranges) -> List[_Layer]:
    view, dtypes = GraphView(qsym), tensor_dtypes(qsym, data_names)
    fp32 = GraphView(fused)
    by_name = {n['name']: (i, n) for i, n in enumerate(fp32.nodes)}
    half = not has_vnni()  # oneDNN halves its weight scale for s8 sources then
    layers = []
    for index in view.int8_nodes():
        node = view.nodes[index]
        found = by_name.get(node['name'][len(PREFIX):])
        inner = _weight_op(found[1]) if found else None
        data = view.data_inputs(index, dtypes)
        if inner is None or not data:
            continue
        position, fp32_node = found
        src, out, _ = fp32_node['inputs'][0]
        dtype = dtypes[view.output_name(*data[0])]
        grid = (view.threshold(data[0][0], ranges), dtype)
        made = _weights(fp32_node, node, fp32, params, values, half and dtype == 's8')
        if made is not None:
            layers.append(_Layer(inner['op'], _attrs(inner), fp32.output_name(src, out), grid,
                                 *made))
    return layers


def _weight_op(node: dict) -> Optional[dict]:
    """The Convolution or FullyConnected inside a fused node."""
    if not node.get('subgraphs'):
        return None
    return next((n for n in node['subgraphs'][0]['nodes'] if n['op'] in WEIGHT_OPS), None)


def _attrs(inner: dict) -> dict:
    keep = ('kernel', 'stride', 'dilate', 'pad', 'num_filter', 'num_group', 'layout',
            'num_hidden', 'flatten')
    return {k: v for k, v in inner.get('attrs', {}).items() if k in keep}


def _weights(fp32_node: dict, int8_node: dict, fp32: GraphView, params, values, half: bool
             ) -> Optional[Tuple[np.ndarray, np.ndarray, str]]:
    """(W with BN folded, W as the kernel rounds it, the parameter the shift goes to)."""
    names = [fp32.nodes[s]['name'] for s, _, _ in fp32_node['inputs']]
    if fp32_node['op'] == '_sg_mkldnn_conv':
        weight, _, _, b_pos, bn_pos, bn = _fold_conv(fp32_node, params, names)
        target = names[bn_pos[1]] if bn is not None else \
            (names[b_pos] if b_pos is not None else None)
        return None if target is None else (weight, _rounded(weight, half), target)
    inner = _weight_op(fp32_node)
    where = {arg: k for k, arg in enumerate(fp32_node['subgraphs'][0]['arg_nodes'])}
    if len(inner['inputs']) < 3:
        return None
    w_pos, b_pos = where[inner['inputs'][1][0]], where[inner['inputs'][2][0]]
    special = _oracle_params(fp32_node, int8_node, names, params, values, False)
    weight = params[names[w_pos]].astype(np.float64)
    return weight, special.get(w_pos, weight), names[b_pos]


def _chunks(layers: List[_Layer], internals, data_names, batch) -> List[List[_Layer]]:
    """Layers in groups whose FP32 inputs fit :data:`CHUNK_VALUES` together."""
    shapes = dict(zip(internals.list_outputs(), internals.infer_shape_partial(
        **{n: b.shape for n, b in zip(data_names, batch)})[1]))
    return in_budget(layers, lambda layer: int(np.prod(shapes.get(layer.source) or (1,))),
                     CHUNK_VALUES, key=lambda layer: layer.source)
