"""The FP32 ONNX graph of a quantized network, ready for QDQ insertion.

The ONNX QDQ exporter (:mod:`gluon_int8.onnx_qdq`) starts from the *fused* FP32 graph a
:class:`~gluon_int8.block.QuantizedBlock` was made from, since that is the graph its
layer table and calibration table describe. This module turns it into ONNX:

* :func:`gluon_int8.fuse.unfuse` inlines every fused oneDNN node back into the ops inside
  it, which keep the names of the traced graph (each fused node is one chain of ops);
* :func:`explicit_reshapes` writes MXNet's special Reshape codes (-2, -3, -4: a channel
  shuffle) as plain shapes, which MXNet's ONNX converter cannot translate;
* :func:`to_onnx` runs MXNet's own converter (``mx.onnx``) in memory, stamps the opset its
  converters write (13; the ``onnx`` package's default, 19, makes ONNX Runtime refuse
  their ``Split``), and lists the weights as initializers only, so runtimes can fold them;
* :func:`fold_batchnorm` folds a BatchNormalization into the Conv before it, as MXNet's
  fused conv does before it quantizes the weights.

:func:`fp32_model` is the three in a row, for any unfused FP32 symbol: the QDQ export's
starting point, and the FP32 model that ``benchmarks/accuracy.py`` hands the peer
quantizers (ONNX Runtime, NNCF), so that every engine quantizes the same graph.

An op that MXNet's converter does not know raises :class:`UnsupportedOpError` naming it.
"""
import json
import logging
from typing import Dict, List, Mapping

import mxnet as mx
import numpy as np

from . import mxnet_private

log = logging.getLogger(__name__)

OPSET = 13  # the opset mx.onnx 1.9.1's newest converters are written for
_SPECIAL_RESHAPE = {-2, -3, -4}


class UnsupportedOpError(ValueError):
    """A node of the network that the ONNX export cannot write."""

    def __init__(self, node: str, op: str, why: str):
        super().__init__('ONNX export: node %r (op %s) %s' % (node, op, why))
        self.node, self.op = node, op


# -- MXNet's Reshape codes -----------------------------------------------------------------

def explicit_reshapes(symbol: mx.sym.Symbol, data_shapes: Mapping[str, tuple]) -> mx.sym.Symbol:
    """``symbol`` with each Reshape that uses -2/-3/-4 written with its inferred shape:
    ``0`` on the batch axis (copied at run time, so the batch stays dynamic) and the
    inferred sizes elsewhere. A Reshape that does not keep axis 0 is refused."""
    graph = json.loads(symbol.tojson())
    special = [n for n in graph['nodes'] if n['op'] in ('Reshape', 'reshape')
               and _SPECIAL_RESHAPE & set(_shape_attr(n))]
    if not special:
        return symbol
    shapes = _output_shapes(symbol, data_shapes)
    for node in special:
        codes = _shape_attr(node)
        if codes[0] != 0 or node.get('attrs', {}).get('reverse', 'False') == 'True':
            raise UnsupportedOpError(node['name'], node['op'], 'uses shape=%s: only special '
                                     'codes after a kept batch axis (0, ...) are written '
                                     'to ONNX' % (codes,))
        shape = (0,) + tuple(shapes[node['name'] + '_output'][1:])
        node['attrs']['shape'] = str(shape)
    log.debug('ONNX export: %d Reshapes with special codes written as plain shapes',
              len(special))
    return mx.sym.load_json(json.dumps(graph))


def _shape_attr(node: dict) -> List[int]:
    text = node.get('attrs', {}).get('shape', '()')
    return [int(v) for v in text.strip('()[] ').replace(' ', '').split(',') if v]


def _output_shapes(symbol: mx.sym.Symbol, data_shapes: Mapping[str, tuple]) -> Dict[str, tuple]:
    internals = symbol.get_internals()
    _, shapes, _ = internals.infer_shape_partial(**data_shapes)
    return dict(zip(internals.list_outputs(), [tuple(s) if s else () for s in shapes]))


# -- mx.onnx -------------------------------------------------------------------------------

def to_onnx(symbol: mx.sym.Symbol, params: Mapping[str, mx.nd.NDArray],
            data_shapes: Mapping[str, tuple]):
    """The ONNX model (opset :data:`OPSET`, batch axis dynamic, weights as initializers
    only) of an unfused FP32 ``symbol``; :class:`UnsupportedOpError` names an op MXNet's
    converter does not know."""
    import onnx  # pylint: disable=import-outside-toplevel
    data_names = list(data_shapes)
    _check_convertible(symbol)
    shapes = [tuple(data_shapes[n]) for n in data_names]
    graph = mxnet_private.onnx_graph_proto(symbol, dict(params), shapes, OPSET,
                                     [(None,) + tuple(s[1:]) for s in shapes])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid('', OPSET)],
                                   producer_name='gluon-int8')
    weights_as_initializers(model)
    _order_outputs(model, symbol)
    return model


def fp32_model(symbol: mx.sym.Symbol, params: Mapping[str, mx.nd.NDArray],
               data_shapes: Mapping[str, tuple]):
    """The FP32 ONNX model of an unfused FP32 ``symbol`` (a traced network, or the
    unfused graph of a fused one), with its BatchNorms folded into their convs, and how
    many were folded. ``params`` may hold more values than the symbol reads; ``data_shapes``
    maps each network input to a shape (its batch size is not kept: the batch axis is
    dynamic)."""
    symbol = explicit_reshapes(symbol, data_shapes)
    needed = set(symbol.list_inputs()) - set(data_shapes)
    model = to_onnx(symbol, {k: v for k, v in params.items() if k in needed}, data_shapes)
    return model, fold_batchnorm(model)


def _check_convertible(symbol: mx.sym.Symbol) -> None:
    """Name the first node whose op MXNet's ONNX converter has no function for."""
    known = mxnet_private.onnx_converters(OPSET)
    for node in json.loads(symbol.tojson())['nodes']:
        if node['op'] != 'null' and node['op'] not in known:
            raise UnsupportedOpError(node['name'], node['op'],
                                     'has no converter in MXNet %s\'s ONNX exporter'
                                     % mx.__version__)


def weights_as_initializers(model) -> int:
    """Drop every graph input that has an initializer; returns how many were dropped.
    (An input with an initializer is a default the caller may override, which keeps
    runtimes from folding it, e.g. a BatchNorm into its conv.)"""
    weights = {init.name for init in model.graph.initializer}
    keep = [inp for inp in model.graph.input if inp.name not in weights]
    dropped = len(model.graph.input) - len(keep)
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return dropped


def _order_outputs(model, symbol: mx.sym.Symbol) -> None:
    """mx.onnx sorts graph outputs by name; put them back in the network's order."""
    wanted = [_onnx_output_name(n) for n in symbol.list_outputs()]
    by_name = {o.name: o for o in model.graph.output}
    if set(wanted) != set(by_name):
        return
    ordered = [by_name[n] for n in wanted]
    del model.graph.output[:]
    model.graph.output.extend(ordered)


def _onnx_output_name(mx_output: str) -> str:
    """The ONNX tensor mx.onnx names an MXNet output (``x_output`` -> ``x``,
    ``x_output1`` -> ``x1``)."""
    if mx_output.endswith('_output'):
        return mx_output[:-len('_output')]
    if mx_output[-1:].isdigit() and mx_output[:-1].endswith('_output'):
        return mx_output[:-len('_output0')] + mx_output[-1]
    return mx_output


def onnx_tensor(model_names: set, node: str, index: int) -> str:
    """The ONNX tensor of output ``index`` of MXNet node ``node`` (mx.onnx names output
    0 ``node``, and the outputs of a multi-output op ``node0``, ``node1``, ...)."""
    if index == 0 and node in model_names:
        return node
    name = '%s%d' % (node, index)
    if name in model_names:
        return name
    raise KeyError(node)


# -- BatchNorm folding ---------------------------------------------------------------------

def readers(graph) -> Dict[str, list]:
    """Tensor name -> the nodes that read it."""
    found: Dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def fold_batchnorm(model) -> int:
    """Fold every BatchNormalization whose input is a Conv read by nothing else (and not
    a graph output) into that Conv's weights and bias; returns how many were folded."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses = readers(graph)
    outputs = {o.name for o in graph.output}
    producers = {out: n for n in graph.node for out in n.output}
    pairs = []
    for bn in graph.node:
        conv = producers.get(bn.input[0]) if bn.op_type == 'BatchNormalization' else None
        if conv is None or conv.op_type != 'Conv' or len(uses[conv.output[0]]) != 1 \
                or conv.output[0] in outputs or len(bn.output) != 1 \
                or not all(n in inits for n in list(bn.input[1:5]) + list(conv.input[1:])):
            continue
        pairs.append((conv, bn))
    for conv, bn in pairs:
        _fold_one(graph, inits, conv, bn)
    remove_unused_initializers(model)
    return len(pairs)


def _fold_one(graph, inits, conv, bn) -> None:
    from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
    gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64)
                              for n in bn.input[1:5])
    eps = next((a.f for a in bn.attribute if a.name == 'epsilon'), 1e-5)
    scale = gamma / np.sqrt(var + eps)
    weight = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
    bias = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
            if len(conv.input) > 2 and conv.input[2] else np.zeros(weight.shape[0]))
    weight = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    w_name, b_name = bn.output[0] + '_weight', bn.output[0] + '_bias'
    graph.initializer.extend([numpy_helper.from_array(weight.astype(np.float32), w_name),
                              numpy_helper.from_array(((bias - mean) * scale + beta)
                                                      .astype(np.float32), b_name)])
    data = conv.input[0]
    del conv.input[:]
    conv.input.extend([data, w_name, b_name])
    conv.output[0] = bn.output[0]  # the folded conv writes the tensor the BN wrote
    graph.node.remove(bn)


def remove_unused_initializers(model) -> int:
    """Drop initializers no node reads; returns how many."""
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    dropped = len(model.graph.initializer) - len(keep)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return dropped
