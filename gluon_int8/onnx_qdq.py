"""ONNX QDQ export: a QuantizedBlock as a standard QuantizeLinear/DequantizeLinear model.

The model computes what the MXNet INT8 graph computes, with the same calibration table
and the same per-layer decisions, on any runtime that reads QDQ ONNX (ONNX Runtime,
OpenVINO)::

    fused FP32 graph --unfuse--> traced ops --mx.onnx--> FP32 ONNX --fold BN--> ...
    INT8 graph that runs + calibration table --plan_qdq--> which tensors are 8-bit
    ... --insert Q/DQ, s8 weights, int32 biases--> QDQ ONNX (opset 13)

What is 8-bit is read from the INT8 graph MXNet runs (``plan_qdq``), never guessed:

* the output of every INT8 node that emits u8/s8 (a conv with its requantize, an add,
  a pooling, a concat): every reader of it, INT8 or FP32, and a graph output, reads the
  rounded values, as in MXNet. Its range is the calibration table's range of the
  tensors it carries (:meth:`gluon_int8.plan.GraphView.sources`);
* a tensor that a quantize node makes 8-bit for INT8 layers (the network input, the
  output of an FP32 layer): only those INT8 layers read the rounded values, FP32 readers
  read it as it is;
* the value before the sum of an INT8 conv+sum, with its range from the table (which has
  it when calibrated with ``for_onnx=True``: :func:`gluon_int8.plan.presum_tensors`).
  MXNet never writes it (oneDNN adds the sum inside the conv); the ONNX model rounds it
  once more, so that the conv and the add run as INT8 kernels (ONNX Runtime ran
  ResNet50's 16 convs before residual adds in float without it, at twice the latency).
  A table without it leaves those convs float, with a warning;
* the weights of INT8 convs (per output channel, as oneDNN's quantized conv always
  is) and FCs (per channel where the graph has ``channel_wise_quantize``, else per
  tensor): s8, symmetric, after the BatchNorm is folded in as MXNet folds it; biases
  int32 at ``input scale x weight scale``.

Activations are u8 (what ONNX Runtime's x86 kernels are fastest with): a tensor MXNet
holds as uint8 (range ``[0, T]``), or that is non-negative by construction (a ReLU'd
conv's output, and pooling, concat and layout ops of such tensors only), gets scale
``T/255`` and zero point 0; one MXNet holds as int8 (``[-T, T]``) scale ``T/127`` and
zero point 128, the same levels as MXNet's.

OpenVINO (2026.4, measured) runs an AveragePool that pads with zeros and counts them
(``count_include_pad``) on the u8 codes of its 8-bit input, whatever zero point or 8-bit
type the model gives, and pads with code 0, not with the zero point: under zero point 128
the border outputs come out wrong. Such a pool of a signed 8-bit tensor is written as the
depthwise Conv it equals (weights ``1/k``, the same pads and strides), which both runtimes
compute right. InceptionV3's output cosine against FP32 on OpenVINO was 0.70 before its
pools' inputs were known to be non-negative, which made them u8 with zero point 0.
The plan's kernel workarounds for MXNet (u8 -> s8 converts, int8 pins, ReLUs made leaky
so a conv emits int8, 7-bit FC weights, dropped ReLUs) are not carried over: the ONNX runtimes have their own
kernels. An INT8 layer whose tensors cannot be found in the ONNX graph stays FP32 there
(``on_unsupported='fp32'``, with a warning naming it) or is refused
(``on_unsupported='raise'``).
"""
import collections
import dataclasses
import logging
from typing import Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .op_table import DEQUANTIZE, LAYOUT_OPS, PASS_THROUGH, QUANTIZE, REQUANTIZE, uint8_range_factor
from .fuse import Unfused
from .onnx_graph import UnsupportedOpError, onnx_tensor, readers
from .plan import PREFIX, GraphView, presum_tensors, restore_relus, tensor_dtypes
from .quantize_graph import LayerInfo
from .table import CalibrationTable

log = logging.getLogger(__name__)

ON_UNSUPPORTED = ('fp32', 'raise')
WEIGHT_BITS = ('auto', 8, 7)
_WEIGHT_OPS = ('Conv', 'Gemm')
# ops that pass their input's values through unchanged (or as a max/subset of them):
# an 8-bit input stays on the same grid
_GRID_KEEPING = ('Flatten', 'Reshape', 'Relu', 'MaxPool', 'Transpose', 'Squeeze', 'Unsqueeze',
                 'Identity')


@dataclasses.dataclass(frozen=True)
class TensorQuant:
    """One 8-bit tensor of the INT8 graph, as the fused graph names it."""
    node: str                          # fused node (or network input) that produces it
    index: int                         # its output index
    threshold: float                   # T: the range is [0, T] (unsigned) or [-T, T]
    unsigned: bool
    readers: Optional[FrozenSet[str]]  # fused INT8 nodes that read it 8-bit; None: all

    @property
    def scale(self) -> float:
        return self.threshold / (255.0 if self.unsigned else 127.0)

    @property
    def zero_point(self) -> int:
        return 0 if self.unsigned else 128


@dataclasses.dataclass
class QDQPlan:
    """What is 8-bit in the INT8 graph MXNet runs."""
    tensors: List[TensorQuant]
    int8_layers: List[str]              # fused nodes that run INT8
    channel_wise: FrozenSet[str]        # INT8 FC nodes with per-channel weight scales


def _fused_name(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def plan_qdq(qsym, data_names: Sequence[str], table: CalibrationTable,
             relus: FrozenSet[str] = frozenset()) -> QDQPlan:
    """The 8-bit tensors and INT8 layers of ``qsym`` (the INT8 graph that runs), with the
    ranges of ``table``. ``relus``: the fused convs whose ReLU the plan made leaky so they
    emit int8 for MXNet's kernels (:func:`gluon_int8.plan.restore_relus`); their outputs
    are uint8 here, as the ReLU the ONNX model runs makes them."""
    view, dtypes = GraphView(qsym), tensor_dtypes(qsym, data_names)
    consumers: Dict[int, List[int]] = {}
    for i, node in enumerate(view.nodes):
        for src, _, _ in node['inputs']:
            consumers.setdefault(src, []).append(i)
    tensors, nonnegative = [], set()
    for i, node in enumerate(view.nodes):
        if node['op'] in ('null', DEQUANTIZE) or \
                dtypes.get(view.output_name(i, 0)) not in ('u8', 's8'):
            continue
        if _nonnegative(view, i, dtypes, relus, nonnegative):
            nonnegative.add(view.output_name(i, 0))
        found = _tensor(view, i, consumers)
        if found is None:
            continue
        producer, index, readers_of = found
        unsigned = view.output_name(i, 0) in nonnegative
        threshold = view.threshold(i, table.ranges)
        if dtypes[view.output_name(i, 0)] == 'u8':  # written wider for MXNet's kernels;
            threshold /= uint8_range_factor()        # the runtimes take the calibrated one
        tensors.append(TensorQuant(producer, index, threshold, unsigned, readers_of))
    int8 = [_fused_name(view.nodes[i]['name']) for i in view.int8_nodes()]
    uncalibrated = []
    for node, tensor in presum_tensors(qsym).items():
        if _fused_name(node) not in int8:
            continue
        if tensor not in table.ranges:
            uncalibrated.append(_fused_name(node))
            continue
        lo, hi = table.ranges[tensor]
        tensors.append(TensorQuant(tensor[:-len('_output')], 0, max(abs(lo), abs(hi)),
                                   lo >= 0, None))
    if uncalibrated:
        log.warning("format='onnx': the value before the residual sum of %d INT8 convs (%s) "
                    'was not calibrated, so ONNX runtimes run those convs in float; '
                    'quantize_net(..., for_onnx=True) calibrates it', len(uncalibrated),
                    ', '.join(uncalibrated[:3]) + (', ...' if len(uncalibrated) > 3 else ''))
    channel = frozenset(_fused_name(n['name']) for n in view.nodes
                        if n.get('attrs', {}).get('channel_wise_quantize') == 'true')
    return QDQPlan(tensors, int8, channel)


def _nonnegative(view: GraphView, index: int, dtypes: Mapping[str, str],
                 relus: FrozenSet[str], known: set) -> bool:
    """Whether the 8-bit output of node ``index`` is never negative: MXNet holds it as
    uint8, or it is a restored ReLU's conv output, or a pooling, concat, layout op or
    requantize of such tensors only (``known``: the ones found so far)."""
    node = view.nodes[index]
    if dtypes[view.output_name(index, 0)] == 'u8' or _fused_name(node['name']) in relus:
        return True
    if node['op'] not in PASS_THROUGH | LAYOUT_OPS | {REQUANTIZE}:
        return False
    data = [view.output_name(src, out) for src, out, _ in node['inputs']
            if dtypes.get(view.output_name(src, out)) in ('u8', 's8')]
    return bool(data) and all(name in known for name in data)


def _tensor(view: GraphView, index: int, consumers) -> Optional[Tuple[str, int, Optional[frozenset]]]:
    """(fused producer, output, readers) of the 8-bit tensor node ``index`` emits."""
    node = view.nodes[index]
    if node['op'] == QUANTIZE:
        src, out, _ = node['inputs'][0]
        if view.nodes[src]['op'] == DEQUANTIZE:
            return None  # a u8 -> s8 convert for an MXNet kernel: ONNX reads the source
        readers_of = frozenset(_fused_name(view.nodes[c]['name'])
                               for c in consumers.get(index, []))
        return view.nodes[src]['name'], out, readers_of
    while node['op'] == REQUANTIZE:
        node = view.nodes[node['inputs'][0][0]]
    if not node['name'].startswith(PREFIX):
        return None
    return _fused_name(node['name']), 0, None


# -- the ONNX side -------------------------------------------------------------------------

def _key(node) -> str:
    """An ONNX node's identity: its name (:class:`_Graph` names every node)."""
    return node.name


class _Graph:
    """An ONNX graph with the lookups QDQ insertion needs."""

    def __init__(self, model, unfused: Unfused, data_names: Sequence[str]):
        self.model, self.graph = model, model.graph
        self.unfused = unfused
        self.data_names = set(data_names)
        self.names = {out for n in self.graph.node for out in n.output} | set(data_names)
        self.inits = {i.name: i for i in self.graph.initializer}
        for node in self.graph.node:  # mx.onnx leaves some nodes unnamed
            node.name = node.name or node.output[0]
        prefixes = sorted(unfused.owner, key=len, reverse=True)
        self.owner = {_key(n): self._owner(n, prefixes) for n in self.graph.node}

    def _owner(self, node, prefixes) -> Optional[str]:
        """The fused node an ONNX node belongs to: mx.onnx names the outputs of the ONNX
        nodes it writes for MXNet node ``x`` ``x``, ``x0``, ``x_...``."""
        name = node.output[0] if node.output else node.name
        for prefix in prefixes:
            if name.startswith(prefix):
                return self.unfused.owner[prefix]
        return None

    def tensor(self, fused_node: str, index: int) -> str:
        """The ONNX tensor of a fused node's output, or of a node inside a fused node
        (named as in the unfused graph); KeyError if there is none."""
        if fused_node in self.data_names:
            return fused_node
        unfused, out = self.unfused.heads.get((fused_node, index), (fused_node, index))
        return onnx_tensor(self.names, unfused, out)

    def producer(self, tensor: str):
        return next((n for n in self.graph.node if tensor in n.output), None)


def _qdq_pair(tensor: str, out: str, scale: float, zero_point: int, suffix: str):
    """QuantizeLinear(tensor) -> DequantizeLinear -> ``out``, with its two initializers."""
    from onnx import helper, numpy_helper  # pylint: disable=import-outside-toplevel
    scale_name, zp_name = tensor + suffix + '_scale', tensor + suffix + '_zero_point'
    inits = [numpy_helper.from_array(np.array(scale, dtype=np.float32), scale_name),
             numpy_helper.from_array(np.array(zero_point, dtype=np.uint8), zp_name)]
    nodes = [helper.make_node('QuantizeLinear', [tensor, scale_name, zp_name],
                              [tensor + suffix + '_q'], name=tensor + suffix + '_q'),
             helper.make_node('DequantizeLinear', [tensor + suffix + '_q', scale_name, zp_name],
                              [out], name=tensor + suffix + '_dq')]
    return nodes, inits


def _add(g: _Graph, nodes, inits) -> None:
    g.graph.node.extend(nodes)
    g.graph.initializer.extend(inits)
    g.inits.update((i.name, i) for i in inits)


def _insert_all(g: _Graph, tensor: str, quant: TensorQuant) -> None:
    """Every reader of ``tensor`` (and the graph output of that name) reads it 8-bit:
    its producer writes ``<tensor>_fp32``, which the Q/DQ pair turns into ``tensor``."""
    producer = g.producer(tensor)
    raw = tensor + '_fp32'
    producer.output[list(producer.output).index(tensor)] = raw
    _add(g, *_qdq_pair(raw, tensor, quant.scale, quant.zero_point, ''))


def _insert_for(g: _Graph, tensor: str, quant: TensorQuant, uses) -> int:
    """Only the ONNX nodes of ``quant.readers`` read ``tensor`` 8-bit."""
    chosen = [n for n in uses.get(tensor, []) if g.owner.get(_key(n)) in quant.readers]
    if not chosen:
        return 0
    suffix = '_u8_%g' % quant.threshold if quant.unsigned else '_s8_%g' % quant.threshold
    out = tensor + suffix + '_dq'
    if out not in g.names:
        _add(g, *_qdq_pair(tensor, out, quant.scale, quant.zero_point, suffix))
        g.names.add(out)
    for node in chosen:
        for k, name in enumerate(node.input):
            if name == tensor:
                node.input[k] = out
    return len(chosen)


def insert_activations(g: _Graph, plan: QDQPlan) -> Dict[str, str]:
    """Q/DQ pairs on the 8-bit tensors of ``plan``; returns fused INT8 layer -> why it
    could not be marked (its tensors are not in the ONNX graph)."""
    problems = {}
    uses = readers(g.graph)
    for quant in plan.tensors:
        try:
            tensor = g.tensor(quant.node, quant.index)
        except KeyError:
            for layer in sorted(quant.readers or {quant.node}):
                problems[layer] = ('ONNX export: the tensor %s:%d it reads or writes has no '
                                   'counterpart in the ONNX graph' % (quant.node, quant.index))
            continue
        if quant.readers is None:
            _insert_all(g, tensor, quant)
        else:
            _insert_for(g, tensor, quant, uses)
    return problems


# -- weights -------------------------------------------------------------------------------

def _dq_of(g: _Graph, tensor: str):
    """The DequantizeLinear writing ``tensor``, through ops that keep the 8-bit grid
    (Flatten, ReLU, ...); (DQ node, the path of grid-keeping nodes) or (None, [])."""
    path = []
    node = g.producer(tensor)
    while node is not None and node.op_type in _GRID_KEEPING:
        path.append(node)
        node = g.producer(node.input[0])
    if node is not None and node.op_type == 'DequantizeLinear':
        return node, path
    return None, []


def _requantize_input(g: _Graph, node, dq) -> None:
    """A weight op that reads an 8-bit tensor through grid-keeping ops (an FC after
    Flatten) gets the same Q/DQ right before it, so runtimes see a quantized input."""
    from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
    tensor = node.input[0]
    out = tensor + '_regrid_dq'
    if out not in g.names:  # one pair for every weight op that reads the tensor
        scale = float(numpy_helper.to_array(g.inits[dq.input[1]]))
        zero_point = int(numpy_helper.to_array(g.inits[dq.input[2]]))
        _add(g, *_qdq_pair(tensor, out, scale, zero_point, '_regrid'))
        g.names.add(out)
    node.input[0] = out


def quantize_weights(g: _Graph, layers: Sequence[str], channel_wise: FrozenSet[str],
                     weight_bits) -> int:
    """s8 weights in ``[-levels, levels]`` (:func:`weight_levels`; and int32 biases where
    the input is 8-bit) for the Conv/Gemm nodes of the INT8 ``layers``; returns how many
    weight ops were quantized."""
    wanted = set(layers)
    done = 0
    for node in list(g.graph.node):
        if node.op_type not in _WEIGHT_OPS or g.owner.get(_key(node)) not in wanted \
                or node.input[1] not in g.inits:
            continue
        per_channel = node.op_type == 'Conv' or g.owner[_key(node)] in channel_wise
        if node.op_type == 'Gemm' and not _trans_b(node):
            per_channel = False  # (in, out) weights: per-channel would be axis 1
        w_scale = _quantize_weight(g, node, per_channel,
                                   weight_levels(weight_bits, _depthwise(g, node)))
        dq, path = _dq_of(g, node.input[0])
        if dq is not None and path:
            _requantize_input(g, node, dq)
            dq = g.producer(node.input[0])
        if dq is not None and len(node.input) > 2 and node.input[2] in g.inits:
            from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
            x_scale = float(numpy_helper.to_array(g.inits[dq.input[1]]))
            _quantize_bias(g, node, x_scale * w_scale)
        done += 1
    return done


def _depthwise(g: _Graph, node) -> bool:
    """A Conv with one input channel per group."""
    return node.op_type == 'Conv' and _attributes(node).get('group', 1) > 1 \
        and g.inits[node.input[1]].dims[1] == 1


def _trans_b(node) -> bool:
    return any(a.name == 'transB' and a.i == 1 for a in node.attribute)


def _quantize_weight(g: _Graph, node, per_channel: bool, levels: int) -> np.ndarray:
    """Replace the op's weight by s8 + DequantizeLinear; return the weight scale(s)."""
    from onnx import helper, numpy_helper  # pylint: disable=import-outside-toplevel
    name = node.input[1]
    weight = numpy_helper.to_array(g.inits[name]).astype(np.float64)
    flat = weight.reshape(weight.shape[0], -1) if per_channel else weight.reshape(1, -1)
    peak = np.abs(flat).max(axis=1)
    scale = np.where(peak > 0, peak / levels, 1.0)
    shaped = scale.reshape((-1,) + (1,) * (weight.ndim - 1)) if per_channel else scale[0]
    q = np.clip(np.round(weight / shaped), -levels, levels).astype(np.int8)
    scale32 = scale.astype(np.float32) if per_channel else np.array(scale[0], np.float32)
    zero = np.zeros(scale32.shape, dtype=np.int8)
    base = name + '_s8'
    inits = [numpy_helper.from_array(q, base), numpy_helper.from_array(scale32, base + '_scale'),
             numpy_helper.from_array(zero, base + '_zero_point')]
    g.graph.initializer.extend(inits)
    g.inits.update((i.name, i) for i in inits)
    attrs = {'axis': 0} if per_channel else {}
    g.graph.node.extend([helper.make_node('DequantizeLinear', [base, base + '_scale',
                                                               base + '_zero_point'],
                                          [base + '_dq'], name=base + '_dq', **attrs)])
    node.input[1] = base + '_dq'
    return scale32.astype(np.float64)


def _quantize_bias(g: _Graph, node, scale: np.ndarray) -> None:
    """int32 bias at ``scale`` (input scale x weight scale), as quantized kernels add it."""
    from onnx import helper, numpy_helper  # pylint: disable=import-outside-toplevel
    name = node.input[2]
    bias = numpy_helper.to_array(g.inits[name]).astype(np.float64)
    if bias.ndim != 1 or (np.ndim(scale) and np.size(scale) != bias.shape[0]):
        return
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), bias.shape)
    q = np.clip(np.round(bias / scale), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
    base = name + '_s32'
    g.graph.initializer.extend([numpy_helper.from_array(q, base),
                                numpy_helper.from_array(scale.astype(np.float32), base + '_scale'),
                                numpy_helper.from_array(np.zeros(bias.shape, np.int32),
                                                        base + '_zero_point')])
    g.graph.node.extend([helper.make_node('DequantizeLinear', [base, base + '_scale',
                                                               base + '_zero_point'],
                                          [base + '_dq'], name=base + '_dq', axis=0)])
    node.input[2] = base + '_dq'


# -- the whole model -------------------------------------------------------------------------

def weight_levels(weight_bits, depthwise: bool = False) -> int:
    """Levels per side of the s8 weights: 127 (8 bits) or 63 (7 bits). ``'auto'``: 7 bits
    on a CPU without VNNI, whose u8 x s8 instructions (``vpmaddubsw``) add pairs of
    products in int16 and saturate with 8-bit weights: ONNX Runtime's x86 kernels do,
    as MXNet's oneDNN kernels do (the op table's ``reduce`` remedy); measured on the
    shipped ResNet: 8-bit weights cost ONNX Runtime 0.6 points on the bundled slice.
    A ``depthwise`` conv keeps 8 bits: neither runtime's depthwise kernel adds products
    in pairs (measured exact at full-range codes and weights, ``tests/test_onnx.py``),
    and its 7-bit weights cost MobileNet 0.10 points on the 10k test set."""
    if weight_bits == 'auto':
        from .op_table import has_vnni  # pylint: disable=import-outside-toplevel
        return 127 if depthwise or has_vnni() else 63
    return {8: 127, 7: 63, 6: 31}[weight_bits]


def to_qdq(model, unfused: Unfused, plan: QDQPlan, data_names: Sequence[str],
           layers: Sequence[LayerInfo], on_unsupported: str = 'fp32',
           weight_bits='auto') -> List[LayerInfo]:
    """Insert the QDQ nodes of ``plan`` into ``model`` (an FP32 ONNX model of the unfused
    graph, BatchNorms folded); returns the layer table of the ONNX model."""
    from .onnx_graph import remove_unused_initializers  # pylint: disable=import-outside-toplevel
    g = _Graph(model, unfused, data_names)
    problems = {k: v for k, v in insert_activations(g, plan).items() if k in plan.int8_layers}
    if problems and on_unsupported == 'raise':
        layer, why = sorted(problems.items())[0]
        raise UnsupportedOpError(layer, _op_of(layers, layer), why[len('ONNX export: '):])
    for layer, why in sorted(problems.items()):
        log.warning('%s stays FP32 in the ONNX model: %s', layer, why)
    int8 = [n for n in plan.int8_layers if n not in problems]
    count = quantize_weights(g, int8, plan.channel_wise, weight_bits)
    _sort_topologically(model.graph)
    pools = padded_pools_as_convs(g)
    strided = strided_slices_as_pools(g)
    remove_unused_initializers(model)
    log.info('ONNX QDQ: %d 8-bit tensors, %d quantized weight ops, %d padded average pools '
             'as depthwise convs, %d strided slices as 1x1 max pools', len(plan.tensors),
             count, pools, strided)
    return [dataclasses.replace(row, dtype='fp32', reason=problems[row.name])
            if row.name in problems else row for row in layers]


def _attributes(node) -> dict:
    from onnx import helper  # pylint: disable=import-outside-toplevel
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _padded_average(node) -> bool:
    """Whether ``node`` is an AveragePool that pads with zeros and counts them."""
    attrs = _attributes(node)
    return node.op_type == 'AveragePool' and bool(attrs.get('count_include_pad')) and \
        any(attrs.get('pads', ())) and not attrs.get('ceil_mode')


def padded_pools_as_convs(g: _Graph) -> int:
    """Every zero-padded AveragePool that reads a signed 8-bit tensor (zero point not 0,
    through grid-keeping ops) becomes the depthwise Conv it equals, for OpenVINO (see
    the module docstring); returns how many. The graph is in topological order."""
    from onnx import helper, numpy_helper, shape_inference  # pylint: disable=import-outside-toplevel
    pools = []
    for node in g.graph.node:
        dq = _dq_of(g, node.input[0])[0] if _padded_average(node) else None
        if dq is not None and int(numpy_helper.to_array(g.inits[dq.input[2]])) != 0:
            pools.append(node)
    if not pools:
        return 0
    shapes = {v.name: v.type.tensor_type.shape for v in
              shape_inference.infer_shapes(g.model).graph.value_info}
    for pool in pools:
        attrs = _attributes(pool)
        channels = shapes[pool.output[0]].dim[1].dim_value
        kernel = list(attrs['kernel_shape'])
        weight = pool.name + '_average_weight'
        _add(g, [], [numpy_helper.from_array(np.full([channels, 1] + kernel, 1.0 / np.prod(kernel),
                                                     dtype=np.float32), weight)])
        del pool.attribute[:]
        pool.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items()
                              if k in ('kernel_shape', 'pads', 'strides'))
        pool.attribute.append(helper.make_attribute('group', channels))
        pool.op_type = 'Conv'
        pool.input.append(weight)
    return len(pools)


def _strided_slice_step(g: _Graph, node) -> int:
    """The step of a Slice that takes every s-th row and column of a whole NCHW tensor
    (what :func:`gluon_int8.fuse.canonicalize` writes before a 1x1 conv), else 0."""
    from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
    if node.op_type != 'Slice' or len(node.input) != 5 or \
            not all(name in g.inits for name in node.input[1:]):
        return 0
    starts, ends, axes, steps = (numpy_helper.to_array(g.inits[n]).tolist()
                                 for n in node.input[1:])
    whole = starts == [0, 0, 0, 0] and min(ends) >= 2 ** 31 - 1 and axes == [0, 1, 2, 3]
    step = steps[2]
    return step if whole and steps == [1, 1, step, step] and step > 1 else 0


def strided_slices_as_pools(g: _Graph) -> int:
    """Each strided Slice read only by a 1x1 Conv (stride 1, no padding) becomes the
    MaxPool of kernel 1 and the same stride, which takes the same values: MXNet's rewrite
    of a strided 1x1 conv (:func:`gluon_int8.fuse.canonicalize`) kept in a form both
    runtimes run on 8-bit data. ONNX Runtime ran the Slice in float with transposes around
    it. Written back as the conv's stride, OpenVINO (2026.4) moved the stride up into a
    pooling of its own after the dequantization and ran ResNet50's 6 strided convs in f32
    (34.2 ms at batch 1); with the MaxPool all 53 run u8 (24.4 ms) and ONNX Runtime's
    output is bit for bit the same. Returns how many."""
    from onnx import helper  # pylint: disable=import-outside-toplevel
    uses, outputs, count = readers(g.graph), {o.name for o in g.graph.output}, 0
    for node in g.graph.node:
        step = _strided_slice_step(g, node)
        conv = uses.get(node.output[0], [None])[0] if step else None
        if conv is None or len(uses[node.output[0]]) != 1 or node.output[0] in outputs \
                or conv.op_type != 'Conv':
            continue
        attrs = _attributes(conv)
        if attrs.get('kernel_shape') != [1, 1] or attrs.get('strides', [1, 1]) != [1, 1] or \
                any(attrs.get('pads', ())) or attrs.get('dilations', [1, 1]) != [1, 1]:
            continue
        node.op_type = 'MaxPool'  # in place: its starts/ends/axes/steps become unused
        del node.input[1:]
        node.attribute.extend([helper.make_attribute('kernel_shape', [1, 1]),
                               helper.make_attribute('strides', [step, step])])
        count += 1
    return count


def _op_of(layers: Sequence[LayerInfo], name: str) -> str:
    return next((r.op for r in layers if r.name == name), '?')


def _sort_topologically(graph) -> None:
    """ONNX wants nodes in topological order; the inserted ones were appended (Kahn's
    algorithm, keeping the original order among ready nodes)."""
    produced = {out: i for i, n in enumerate(graph.node) for out in n.output}
    waiting = [0] * len(graph.node)
    users: Dict[int, List[int]] = {}
    for i, node in enumerate(graph.node):
        deps = {produced[t] for t in node.input if t in produced}
        waiting[i] = len(deps)
        for d in deps:
            users.setdefault(d, []).append(i)
    ready = collections.deque(i for i, w in enumerate(waiting) if w == 0)
    order = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for u in users.get(i, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    if len(order) != len(graph.node):
        raise RuntimeError('ONNX export: the graph has a cycle')
    nodes = [graph.node[i] for i in order]
    copies = [type(n)() for n in nodes]
    for copy, node in zip(copies, nodes):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def check_exportable(block) -> None:
    """ValueError unless ``block`` holds what a QDQ model is made from."""
    if block.calib_table is None:
        raise ValueError("format='onnx': the block has no calibration table (mode='none' "
                         'computes ranges at run time, which a QDQ model cannot); quantize '
                         'with calibration data or a calib_table')
    if block.fp32_graph is None:
        raise ValueError("format='onnx': the block has no FP32 graph to export from; a block "
                         "loaded with gluon_int8.load needs an export made with "
                         'fp32_reference=True')


def export_model(block, input_shapes: Mapping[str, tuple], on_unsupported: str = 'fp32',
                 weight_bits='auto'):
    """The QDQ ONNX model of a :class:`~gluon_int8.block.QuantizedBlock` and its layer
    table in the model. ``input_shapes``: each network input's shape (any batch size:
    the model's batch axis is dynamic)."""
    from . import fuse, mxnet_private, onnx_graph  # pylint: disable=import-outside-toplevel
    check_exportable(block)
    data_names = list(mxnet_private.cached_graph(block)[0] and
                      [s.name for s in mxnet_private.cached_graph(block)[0]])
    values = {p.name: p.data() for p in block.collect_params().values()}
    values.update(block.fp32_graph.params)
    fused, relus = restore_relus(block.fp32_graph.symbol)
    unfused = fuse.unfuse(fused)
    model, folded = onnx_graph.fp32_model(unfused.symbol, values, input_shapes)
    plan = plan_qdq(mxnet_private.cached_graph(block)[1], data_names, block.calib_table,
                    relus)
    layers = to_qdq(model, unfused, plan, data_names, block.layers, on_unsupported,
                    weight_bits)
    log.info('ONNX export: %d BatchNorms folded into convs', folded)
    return model, layers
