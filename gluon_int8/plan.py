"""Stage 3b, plan: every INT8 node checked against the op table, and made correct.

MXNet's quantization pass (:func:`gluon_int8.quantize_graph.quantize_symbol`) quantizes
every op that has an INT8 kernel. Some kernels compute wrong numbers, or fail, for some
input dtypes (:mod:`gluon_int8.op_table` holds the measurements). :func:`plan_graph`
looks at every INT8 node of the graph as it will run (after calibration and the
post-quantization fusion), with the dtypes of its data inputs, and asks the table. For a
combination that is not ``ok`` it takes the cheapest remedy the table says is correct:

* ``pin``: a quantize node whose dtype follows its calibrated range ('auto') emits int8,
  for a kernel that reads int8 only;
* ``convert``: a uint8 tensor on its way to a kernel that reads int8 only passes a
  dequantize + int8 quantize pair;
* ``drop``: an INT8 ReLU of a uint8 tensor is the identity and is removed (MXNet's kernel
  reads its input as int8 and zeroes values above 127);
* ``7-bit weights``: an FC whose kernel saturates with 8-bit weights stores 7-bit ones;
* ``requantize``: an INT8 add emits int32 and a requantize node of its own follows (its
  fused requantize shares oneDNN primitives between adds that it must not share);
* ``signed``: a conv whose ReLU makes it emit uint8, read by a kernel that gets uint8
  wrong (oneDNN's u8*s8 saturates in int16 pairs without VNNI), gets a leaky ReLU of slope
  :data:`SIGNED_SLOPE` instead: it then emits int8, whose codes stop at 127 (the ReLU's
  function to well below one step of any 8-bit grid);
* ``split``: a conv+sum+ReLU whose sum input is int8 (its oneDNN kernel writes uint8
  values into the sum's int8 buffer) becomes conv+sum and a ReLU of its own;
* ``FP32``: the node stays FP32, with the reason.

The first five change neither the graph MXNet quantizes nor what calibration needs;
``signed``, ``split`` and ``FP32`` do, and the pass runs again. The dtype of a quantize node follows
its calibrated range, which is not known while planning: the plan holds for either
dtype, and :func:`check_calibrated` looks again once the ranges are set.
"""
import copy
import dataclasses
import json
import logging
from typing import Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from . import op_table
from .fuse import fuse, subgraph_args
from .quantize_graph import graph_outputs, quantize_symbol, set_calib_table

log = logging.getLogger(__name__)

from .op_table import (CONVERSIONS, DEQUANTIZE, LAYOUT_OPS, PASS_THROUGH, QUANTIZE, REQUANTIZE,
                       SIGNED_SLOPE, _true)

_DTYPES = {np.dtype(np.int8): 's8', np.dtype(np.uint8): 'u8', np.dtype(np.int32): 's32'}
AUTO = 'auto'
PREFIX = 'quantized_'
MAX_ROUNDS = 50
MAX_SEARCHED_INPUTS = 4  # remedies are searched over 3^inputs choices


@dataclasses.dataclass(frozen=True)
class Rewrites:
    """Changes to the quantized graph that the pass itself does not see."""
    pins: FrozenSet[str] = frozenset()                  # quantize nodes made int8
    drops: FrozenSet[str] = frozenset()                 # INT8 ReLU nodes removed
    converts: FrozenSet[Tuple[str, str]] = frozenset()  # (consumer, producer) edges -> s8
    seven_bit: FrozenSet[str] = frozenset()             # FC weights stored in 7 bits
    # INT8 adds that emit int32 into a requantize node of their own
    requantize: FrozenSet[str] = frozenset()
    # FP32 layout ops (reshape, swapaxes, split, ...) run on the int8 tensor instead
    layout: FrozenSet[str] = frozenset()

    def merge(self, more: Mapping[str, set]) -> 'Rewrites':
        return dataclasses.replace(self, **{k: getattr(self, k) | frozenset(v)
                                            for k, v in more.items()})


@dataclasses.dataclass
class Plan:
    """A fused FP32 graph, its quantized graph, and what makes the INT8 graph correct."""
    fused: mx.sym.Symbol                # FP32, after any split
    qsym: mx.sym.Symbol                 # MXNet's pass output, not calibrated
    calib_layers: List[str]             # tensors that need a range
    reasons: Dict[str, str]             # fused node -> why it stays FP32
    rewrites: Rewrites
    notes: Dict[str, str]               # fused node -> what the plan changed for it
    unsigned: FrozenSet[str] = frozenset()  # calibrated tensors uint8 whatever their range


# -- reading a quantized graph ---------------------------------------------------------

def _output_names(nodes: List[dict], outputs: List[Tuple[str, int, str]]
                  ) -> Dict[Tuple[int, int], str]:
    """(node index, output) -> output name. MXNet lists a graph's outputs node by node in
    the order of its JSON nodes, so the two are walked together: node names need not be
    unique (GluonCV's DLA names six poolings alike)."""
    names, position = {}, 0
    for index, node in enumerate(nodes):
        out = 0
        while position < len(outputs) and outputs[position][0] == node['name']:
            names[(index, out)] = outputs[position][2]
            position, out = position + 1, out + 1
    return names


class GraphView:
    """A graph as JSON, with the name of every node output (as calibration names it)."""

    def __init__(self, symbol: mx.sym.Symbol):
        self.graph = json.loads(symbol.tojson())
        self.nodes = self.graph['nodes']
        self.outputs = _output_names(self.nodes, graph_outputs(symbol))

    def output_name(self, index: int, out: int) -> str:
        node = self.nodes[index]
        return node['name'] if node['op'] == 'null' else self.outputs[(index, out)]

    def range_of(self, index: int, out: int) -> Tuple[str, str]:
        """The names of the min and max tensors of an int8 output: the node's own outputs
        1 and 2, or for a layout op run on int8 those of the tensor it reads."""
        node = self.nodes[index]
        if node['op'] in LAYOUT_OPS:
            src, src_out, _ = node['inputs'][0]
            return self.range_of(src, src_out)
        return self.output_name(index, 1), self.output_name(index, 2)

    def weight(self, node: dict) -> Optional[str]:
        """The FP32 weight an INT8 FC node's ``<w>_quantize`` input stands for."""
        for src, _, _ in node['inputs']:
            name = self.nodes[src]['name']
            if self.nodes[src]['op'] == 'null' and name.endswith('weight_quantize'):
                return name[:-len('_quantize')]
        return None

    def int8_nodes(self) -> List[int]:
        """The computing INT8 nodes (not the quantize/dequantize conversions)."""
        return [i for i, n in enumerate(self.nodes) if n['op'] not in CONVERSIONS
                and n['op'] != 'null' and n['name'].startswith(PREFIX)]

    def data_inputs(self, index: int, dtypes: Mapping[str, str]) -> List[Tuple[int, int]]:
        """(producer, output) of the int8/uint8 inputs of a node that come from other nodes
        (its data, not its int8 weights nor the float min/max), in input order."""
        return [(src, out) for src, out, _ in self.nodes[index]['inputs']
                if self.nodes[src]['op'] != 'null'
                and dtypes.get(self.output_name(src, out)) in ('u8', 's8')]

    def sources(self, index: int) -> Tuple[str, ...]:
        """The calibrated tensors whose ranges the output of node ``index`` carries."""
        node = self.nodes[index]
        if node['op'] == REQUANTIZE:  # carries the range of the node it follows
            return self.sources(node['inputs'][0][0])
        if node['op'] == QUANTIZE:
            src, out, _ = node['inputs'][0]
            if self.nodes[src]['op'] == DEQUANTIZE:  # a convert carries its source's range
                return self.sources(self.nodes[src]['inputs'][0][0])
            return (self.output_name(src, out),)
        if node['op'] in PASS_THROUGH or node['op'] in LAYOUT_OPS:
            return self._upstream(index, self.sources)
        name = node['name']
        return ((name[len(PREFIX):] if name.startswith(PREFIX) else name) + '_output',)

    def threshold(self, index: int, ranges: Mapping[str, Tuple[float, float]]) -> float:
        """max |range| of the 8-bit tensor node ``index`` emits, as the graph runs it: the
        range written into the node, else the largest of the tensors it carries
        (pooling, concat, a layout op), else that of ``ranges`` (a calibration table's)."""
        node = self.nodes[index]
        attrs = node.get('attrs', {})
        if 'max_calib_range' in attrs and 'min_calib_range' in attrs:
            return max(abs(float(attrs['min_calib_range'])), abs(float(attrs['max_calib_range'])))
        if node['op'] in PASS_THROUGH or node['op'] in LAYOUT_OPS:
            upstream = [src for src, out, _ in node['inputs']
                        if out == 0 and self.nodes[src]['op'] != 'null']
            if upstream:
                return max(self.threshold(src, ranges) for src in upstream)
        sources = self.sources(index)
        missing = [s for s in sources if s not in ranges]
        if missing or not sources:
            raise ValueError('calib_table: no range for %s, which node %r of the INT8 graph '
                             'carries' % (missing or sources, node['name']))
        return max(max(abs(lo), abs(hi)) for lo, hi in (ranges[s] for s in sources))

    def quantizers(self, index: int) -> Tuple[str, ...]:
        """The quantize (and requantize) nodes with out_type 'auto' whose dtype node
        ``index``'s output follows."""
        node = self.nodes[index]
        if node['op'] in (QUANTIZE, REQUANTIZE):
            return (node['name'],) if node.get('attrs', {}).get('out_type') == 'auto' else ()
        return self._upstream(index, self.quantizers) \
            if node['op'] in PASS_THROUGH or node['op'] in LAYOUT_OPS else ()

    def _upstream(self, index: int, fn) -> Tuple[str, ...]:
        found = [x for src, out, _ in self.nodes[index]['inputs']
                 if out == 0 and self.nodes[src]['op'] != 'null' for x in fn(src)]
        return tuple(dict.fromkeys(found))


def tensor_dtypes(symbol: mx.sym.Symbol, data_names: Sequence[str]) -> Dict[str, str]:
    internals = symbol.get_internals()
    _, types, _ = internals.infer_type_partial(**{n: 'float32' for n in data_names})
    return {name: _DTYPES.get(np.dtype(t), np.dtype(t).name) if t is not None else '?'
            for name, t in zip(internals.list_outputs(), types)}


def pattern_of(node: dict, weight: Optional[str], rewrites: 'Rewrites') -> Optional[str]:
    """The op-table pattern of an INT8 node, in the form the plan gave it."""
    if weight is not None and weight in rewrites.seven_bit:
        variant = '.w7'
    elif node['name'] in rewrites.requantize:
        variant = '.rq'
    else:
        variant = ''
    return op_table.pattern_of(node, variant)


# -- the graph that runs ---------------------------------------------------------------

def finalize(qsym: mx.sym.Symbol, ranges: Mapping[str, Tuple[float, float]],
             rewrites: Rewrites, cache: Optional[dict] = None,
             cache_key: str = '') -> mx.sym.Symbol:
    """``qsym`` with its pins, ranges, the post-quantization fusion, then its converts,
    drops, requantized adds and int8 layout ops: the INT8 graph that runs. With ``cache``,
    the fused graph is kept under ``(cache_key, pins)`` (the caller says that ``qsym`` and
    the ranges are the same for a key)."""
    key = (cache_key, rewrites.pins)
    calibrated = cache.get(key) if cache is not None else None
    if calibrated is None:
        graph = json.loads(qsym.tojson())
        for node in graph['nodes']:
            if node['op'] == QUANTIZE and node['name'] in rewrites.pins:
                node.setdefault('attrs', {})['out_type'] = 'int8'
        # a copy: the C++ pass writes the ranges into nodes it shares with its input
        calibrated = fuse(set_calib_table(mx.sym.load_json(json.dumps(graph)), ranges))
        if cache is not None:
            cache[key] = calibrated
    if not (rewrites.drops or rewrites.converts or rewrites.requantize or rewrites.layout):
        return calibrated
    graph = _with_converts(GraphView(calibrated), rewrites.converts, ranges) \
        if rewrites.converts else json.loads(calibrated.tojson())
    graph = _without(graph, rewrites.drops)
    graph = _requantize_apart(graph, rewrites.requantize, rewrites.pins)
    graph = _layout_on_int8(graph, rewrites.layout)
    return mx.sym.load_json(json.dumps(graph))


def _rebuild(graph: dict, order: List[dict], inputs_of) -> dict:
    """``graph`` with nodes ``order`` (topological), each node's inputs given by
    ``inputs_of(node) -> [(node dict, out, ver)]``, heads likewise."""
    index = {id(n): i for i, n in enumerate(order)}
    for node in order:
        node['inputs'] = [[index[id(src)], out, ver] for src, out, ver in inputs_of(node)]
    graph['heads'] = [[index[id(src)], out, ver] for src, out, ver in inputs_of(None)]
    graph['nodes'] = order
    graph['arg_nodes'] = [i for i, n in enumerate(order) if n['op'] == 'null']
    graph.pop('node_row_ptr', None)
    return graph


def _linked(graph: dict) -> Dict[int, list]:
    """Each node's inputs (and the heads, under key None) as (node dict, out, ver)."""
    nodes = graph['nodes']
    links = {id(n): [(nodes[s], o, v) for s, o, v in n['inputs']] for n in nodes}
    links[None] = [(nodes[s], o, v) for s, o, v in graph['heads']]
    return links


def _without(graph: dict, drops: FrozenSet[str]) -> dict:
    """Remove the named one-input INT8 nodes: their readers read their input."""
    links = _linked(graph)
    gone = {id(n): n for n in graph['nodes'] if n['name'] in drops}

    def through(entry):
        src, out, ver = entry
        while id(src) in gone:
            src, out, _ = links[id(src)][out]  # outputs 0, 1, 2 <- inputs 0, 1, 2
        return src, out, ver

    return _rebuild(graph, [n for n in graph['nodes'] if id(n) not in gone],
                    lambda n: [through(e) for e in links[id(n) if n is not None else None]])


def _with_converts(view: GraphView, edges: FrozenSet[Tuple[str, str]],
                   ranges: Mapping[str, Tuple[float, float]]) -> dict:
    """Insert dequantize -> int8 quantize between each (consumer, producer) pair."""
    graph, nodes = view.graph, view.nodes
    links = _linked(graph)
    by_name = {n['name']: i for i, n in enumerate(nodes)}
    after: Dict[int, List[dict]] = {}
    for consumer, producer in sorted(edges):
        if consumer not in by_name or producer not in by_name:
            continue
        p = nodes[by_name[producer]]
        found = [ranges[s] for s in view.sources(by_name[producer]) if s in ranges]
        threshold = max(max(abs(lo), abs(hi)) for lo, hi in found) if found else 1.0
        deq = {'op': DEQUANTIZE, 'name': '%s_dequantize_for_%s' % (producer, consumer),
               'attrs': {'out_type': 'float32'}, 'inputs': []}
        q = {'op': QUANTIZE, 'name': '%s_int8_for_%s' % (producer, consumer),
             'attrs': {'out_type': 'int8', 'min_calib_range': repr(-threshold),
                       'max_calib_range': repr(threshold)}, 'inputs': []}
        links[id(deq)] = [(p, 0, 0), (p, 1, 0), (p, 2, 0)]
        links[id(q)] = [(deq, 0, 0)]
        c = id(nodes[by_name[consumer]])
        links[c] = [(q, out, ver) if src is p else (src, out, ver) for src, out, ver in links[c]]
        after.setdefault(by_name[producer], []).extend([deq, q])
    order = [m for i, n in enumerate(nodes) for m in [n] + after.get(i, [])]
    return _rebuild(graph, order, lambda n: links[id(n) if n is not None else None])


def _requantize_apart(graph: dict, names: FrozenSet[str], pins: FrozenSet[str]) -> dict:
    """The named INT8 nodes lose their calibrated range (they emit int32) and a
    requantize node with that range follows each: MXNet's INT8 add caches its oneDNN
    primitive under a key that reads its output range before it is written, so two adds
    of the same shapes and input ranges share the first one's output scale."""
    links = _linked(graph)
    after = {}
    for node in graph['nodes']:
        attrs = node.get('attrs', {})
        if node['name'] not in names or 'max_calib_range' not in attrs:
            continue
        name = 'requantize_' + node['name']
        rq = {'op': REQUANTIZE, 'name': name,
              'attrs': {'out_type': 'int8' if name in pins else 'auto',
                        'min_calib_range': attrs.pop('min_calib_range'),
                        'max_calib_range': attrs.pop('max_calib_range')}}
        for key, entries in links.items():
            links[key] = [(rq, o, v) if src is node else (src, o, v) for src, o, v in entries]
        links[id(rq)] = [(node, 0, 0), (node, 1, 0), (node, 2, 0)]
        after[id(node)] = rq
    order = [m for n in graph['nodes'] for m in ([n, after[id(n)]] if id(n) in after else [n])]
    return _rebuild(graph, order, lambda n: links[id(n) if n is not None else None])


def _layout_on_int8(graph: dict, names: FrozenSet[str]) -> dict:
    """The named FP32 layout nodes read the int8 tensor a dequantize node (or another such
    node) reads, instead of the dequantized one. Their int8 outputs carry that tensor's
    min/max: a quantize node after them is removed (its readers read the layout node), any
    other reader gets a dequantize node of its own."""
    links = _linked(graph)
    nodes = graph['nodes']
    ranges: Dict[Tuple[int, int], tuple] = {}  # (id(node), output) -> (min entry, max entry)
    for node in nodes:
        if node['name'] not in names:
            continue
        src, out, ver = links[id(node)][0]
        if src['op'] == DEQUANTIZE:
            data, low, high = links[id(src)][:3]
        elif (id(src), out) in ranges:
            data, (low, high) = (src, out, ver), ranges[(id(src), out)]
        else:
            continue
        links[id(node)][0] = data
        for k in range(int(node.get('attrs', {}).get('num_outputs', 1))):
            ranges[(id(node), k)] = (low, high)
    return _rebuild(graph, *_readers_of_int8(graph, links, ranges))


def _readers_of_int8(graph: dict, links: Dict[int, list], ranges: dict):
    """Node order and inputs after the layout rewrite: a quantize node of a rewritten
    output disappears (its readers read the output and its range); a rewritten layout
    node reads it as it is; any other reader (an FP32 op, a graph output) reads a
    dequantize node of it."""
    replace = {}  # id(quantize node) -> its outputs 0, 1, 2 as entries
    for node in graph['nodes']:
        if node['op'] == QUANTIZE:
            src, out, ver = links[id(node)][0]
            if (id(src), out) in ranges:
                replace[id(node)] = [(src, out, ver)] + list(ranges[(id(src), out)])
    added: Dict[Tuple[int, int], dict] = {}

    def dequantized(src, out, ver):
        deq = added.get((id(src), out))
        if deq is None:
            deq = added[(id(src), out)] = {
                'op': DEQUANTIZE, 'name': '%s_output%d_dequantize' % (src['name'], out),
                'attrs': {'out_type': 'float32'}}
            links[id(deq)] = [(src, out, 0)] + list(ranges[(id(src), out)])
        return deq, 0, ver

    for key in [k for k in links if k not in replace]:
        int8_reader = key is not None and (key, 0) in ranges  # a rewritten layout node
        fixed = []
        for slot, (src, out, ver) in enumerate(links[key]):
            if id(src) in replace:
                fixed.append(replace[id(src)][out])
            elif (id(src), out) in ranges and not (int8_reader and slot == 0):
                fixed.append(dequantized(src, out, ver))
            else:
                fixed.append((src, out, ver))
        links[key] = fixed
    after = {}
    for (src_id, _), deq in added.items():
        after.setdefault(src_id, []).append(deq)
    order = [m for n in graph['nodes'] if id(n) not in replace
             for m in [n] + after.get(id(n), [])]
    return order, lambda n: links[id(n) if n is not None else None]


def split_postsum_act(fused: mx.sym.Symbol, name: str) -> mx.sym.Symbol:
    """``fused`` with the activation after the sum of conv node ``name`` taken out into a
    node of its own: the same function, and the conv+sum emits int8."""
    graph = json.loads(fused.tojson())
    links = _linked(graph)
    node = next(n for n in graph['nodes'] if n['name'] == name)
    sub = node['subgraphs'][0]
    act = sub['nodes'][sub['heads'][0][0]]  # the last inner node
    sub['heads'] = [list(act['inputs'][0])]
    sub['nodes'].remove(act)
    sub['arg_nodes'] = [i for i, n in enumerate(sub['nodes']) if n['op'] == 'null']
    sub.pop('node_row_ptr', None)
    node['attrs'] = {k: v for k, v in node['attrs'].items() if k != 'with_postsum_act'}
    standalone = {'op': act['op'], 'name': act['name'], 'attrs': act.get('attrs', {})}
    if _signed_act(act):  # a ReLU the plan made leaky: standalone, the INT8 ReLU emits
        standalone.update(op='Activation', attrs={'act_type': 'relu'})  # int8 anyway
    for key, entries in links.items():
        links[key] = [(standalone, 0, v) if src is node else (src, o, v) for src, o, v in entries]
    links[id(standalone)] = [(node, 0, 0)]
    order = [m for n in graph['nodes'] for m in ([n, standalone] if n is node else [n])]
    log.info('%s: its ReLU after the sum now runs as %s', name, act['name'])
    return mx.sym.load_json(json.dumps(
        _rebuild(graph, order, lambda n: links[id(n) if n is not None else None])))


def _sum_parts(node: dict) -> Optional[Tuple[dict, list, int]]:
    """Of a fused conv+sum node: (its inner elemwise_add, the add's input entry that is
    the conv's value, the add's input slot of the sum), or None for another node."""
    if node['op'] != '_sg_mkldnn_conv' or not _true(node.get('attrs', {}), 'with_sum'):
        return None
    inner = node['subgraphs'][0]['nodes']
    add = next(n for n in inner if n['op'] == 'elemwise_add')
    slot = next(k for k, (src, _, _) in enumerate(add['inputs']) if inner[src]['op'] == 'null')
    return add, add['inputs'][1 - slot], slot


def presum_tensors(fused: mx.sym.Symbol) -> Dict[str, str]:
    """Fused conv+sum node -> the tensor of its conv's value before the sum, named as the
    inner node that computes it (``batchnorm3_fwd_output``): a tensor MXNet never writes
    (the sum is fused) but ONNX runtimes quantize (their conv and add are two ops)."""
    found = {}
    for node in json.loads(fused.tojson())['nodes']:
        parts = _sum_parts(node)
        if parts is not None:
            src = node['subgraphs'][0]['nodes'][parts[1][0]]
            found[node['name']] = src['name'] + '_output'
    return found


def with_presums(fused: mx.sym.Symbol) -> mx.sym.Symbol:
    """``fused`` with one more output per conv+sum node: a copy of its conv without the
    sum, named as its :func:`presum_tensors` tensor (for calibration). The graph's own
    nodes are untouched, so every tensor they compute keeps its value bit for bit (a
    split conv + add is not: oneDNN adds the bias and the sum in another order)."""
    graph = json.loads(fused.tojson())
    links = _linked(graph)
    order = list(graph['nodes'])
    for node in graph['nodes']:
        parts = _sum_parts(node)
        if parts is None:
            continue
        add, conv_entry, slot = parts
        sub = copy.deepcopy(node['subgraphs'][0])
        inner, sublinks = sub['nodes'], _linked(sub)
        head = inner[conv_entry[0]]
        keep = _ancestors(sub, conv_entry[0])
        outer_slot = subgraph_args(node).index(add['inputs'][slot][0])
        _rebuild(sub, [n for i, n in enumerate(inner) if i in keep],
                 lambda n, h=head, e=conv_entry: sublinks[id(n)] if n is not None
                 else [(h, e[1], 0)])
        conv = {'op': node['op'], 'name': head['name'], 'subgraphs': [sub],
                'attrs': {k: v for k, v in node.get('attrs', {}).items()
                          if k not in ('with_sum', 'with_postsum_act')}}
        links[id(conv)] = [e for k, e in enumerate(links[id(node)]) if k != outer_slot]
        links[None] = links[None] + [(conv, 0, 0)]
        order.append(conv)
    return mx.sym.load_json(json.dumps(
        _rebuild(graph, order, lambda n: links[id(n) if n is not None else None])))


def _ancestors(graph: dict, index: int) -> set:
    """Indices of the nodes ``graph['nodes'][index]`` is computed from, itself included."""
    found, todo = set(), [index]
    while todo:
        i = todo.pop()
        if i not in found:
            found.add(i)
            todo.extend(src for src, _, _ in graph['nodes'][i]['inputs'])
    return found


# -- decisions -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Input:
    """A data input of an INT8 node, as planning sees it."""
    dtype: str                   # u8, s8 or auto (follows the calibrated range)
    producer: str                # the node that produces it
    quantizers: Tuple[str, ...]  # auto: the quantize nodes it follows
    sources: Tuple[str, ...]     # the calibrated tensors whose ranges it carries


@dataclasses.dataclass(frozen=True)
class _Node:
    name: str                    # the INT8 node
    fp32: str                    # its fused FP32 node
    pattern: Optional[str]
    inputs: Tuple[_Input, ...]
    weight: Optional[str]        # FC: its weight parameter

    @property
    def dtypes(self) -> List[str]:
        return [i.dtype for i in self.inputs]


def analyse(qsym: mx.sym.Symbol, calib_layers: Sequence[str], data_names: Sequence[str],
            rewrites: Rewrites, fused_cache: Optional[dict] = None) -> List[_Node]:
    """Every INT8 node of the graph that will run, with its input dtypes: fixed whatever
    the ranges, or 'auto'. ``fused_cache`` keeps the (costly) calibrated-and-fused graphs
    between calls on the same ``qsym``: they depend only on the pins."""
    unsigned = finalize(qsym, {n: (0.0, 1.0) for n in calib_layers}, rewrites,
                        fused_cache, 'unsigned')
    signed = finalize(qsym, {n: (-1.0, 1.0) for n in calib_layers}, rewrites,
                      fused_cache, 'signed')
    dtype_u, dtype_s = tensor_dtypes(unsigned, data_names), tensor_dtypes(signed, data_names)
    view = GraphView(unsigned)
    found = []
    for index in view.int8_nodes():
        node = view.nodes[index]
        inputs = []
        for src, out in view.data_inputs(index, dtype_u):
            name = view.output_name(src, out)
            dtype = dtype_u[name] if dtype_u[name] == dtype_s.get(name) else AUTO
            inputs.append(_Input(dtype, view.nodes[src]['name'], view.quantizers(src),
                                 view.sources(src)))
        weight = view.weight(node)
        found.append(_Node(node['name'], node['name'][len(PREFIX):],
                           pattern_of(node, weight, rewrites), tuple(inputs), weight))
    return found + _layout_candidates(view, dtype_u, dtype_s, rewrites)


def _layout_candidates(view: GraphView, dtype_u, dtype_s, rewrites: Rewrites) -> List[_Node]:
    """FP32 layout nodes that read a dequantized INT8 tensor (or the int8 output of a
    layout node already rewritten): they could run on the int8 tensor."""
    found = []
    for node in view.nodes:
        if node['op'] not in LAYOUT_OPS or node['name'] in rewrites.layout:
            continue
        src, out, _ = node['inputs'][0]
        producer = view.nodes[src]
        if producer['op'] == DEQUANTIZE:
            src, out, _ = producer['inputs'][0]
        elif producer['name'] not in rewrites.layout:
            continue
        name = view.output_name(src, out)
        dtype = dtype_u[name] if dtype_u[name] == dtype_s.get(name) else AUTO
        given = _Input(dtype, view.nodes[src]['name'], view.quantizers(src), view.sources(src))
        found.append(_Node(node['name'], node['name'], 'layout:' + node['op'], (given,), None))
    return found


@dataclasses.dataclass
class _Decision:
    rewrites: Dict[str, set] = dataclasses.field(default_factory=dict)
    fp32: Dict[str, str] = dataclasses.field(default_factory=dict)   # fused node -> reason
    split: List[str] = dataclasses.field(default_factory=list)       # fused conv nodes
    signed: List[str] = dataclasses.field(default_factory=list)      # fused conv nodes
    notes: Dict[str, Tuple[Tuple[str, ...], str]] = dataclasses.field(default_factory=dict)

    def note(self, node: '_Node', what: str, why: bool = True) -> None:
        """Record ``what`` was done for ``node``, and (``why``) the table's reason."""
        done, _ = self.notes.get(node.fp32, ((), ''))
        reason = (op_table.describe(node.pattern, _failing(node.pattern, node.dtypes))
                  if why else '')
        self.notes[node.fp32] = (tuple(dict.fromkeys(done + (what,))), reason)

    def add(self, kind: str, values) -> None:
        self.rewrites.setdefault(kind, set()).update(values)

    @property
    def changes_graph(self) -> bool:
        return bool(self.fp32 or self.split or self.signed)


_EXPAND = {AUTO: ('u8', 's8')}
# per input dtype: (dtype after the remedy, the remedy), cheapest first
_OPTIONS = {'u8': (('u8', None), ('s8', 'converts')),
            's8': (('s8', None),),
            AUTO: ((AUTO, None), ('s8', 'pins'))}
_COST = {None: 0, 'pins': 1, 'converts': 2}


def _combos(dtypes: Sequence[str]) -> List[Tuple[str, ...]]:
    out = [()]
    for d in dtypes:
        out = [c + (x,) for c in out for x in _EXPAND.get(d, (d,))]
    return out


def _works(pattern: str, dtypes: Sequence[str]) -> bool:
    return all(op_table.is_ok(pattern, combo) for combo in _combos(dtypes))


def _remedies(pattern: str, dtypes: Sequence[str]) -> Optional[Tuple[Optional[str], ...]]:
    """The cheapest remedy per input (None: as it is) under which every dtype the inputs
    may take is ok for ``pattern``; None if there is none."""
    if _works(pattern, dtypes):
        return (None,) * len(dtypes)
    if len(dtypes) > MAX_SEARCHED_INPUTS:
        return None
    choices = [()]
    for d in dtypes:
        choices = [c + (o,) for c in choices for o in _OPTIONS.get(d, ((d, None),))]
    for choice in sorted(choices, key=lambda c: sum(_COST[r] for _, r in c)):
        if _works(pattern, [d for d, _ in choice]):
            return tuple(r for _, r in choice)
    return None


def _failing(pattern: str, dtypes: Sequence[str]) -> Tuple[str, ...]:
    """The first concrete dtype combination the kernel does not get right as it is."""
    for combo in _combos(dtypes):
        if not op_table.is_ok(pattern, combo):
            return combo
    return tuple(dtypes)


def _apply(node: _Node, remedies: Sequence[Optional[str]], decision: _Decision) -> None:
    for remedy, given in zip(remedies, node.inputs):
        if remedy == 'pins':
            decision.add('pins', given.quantizers)
        elif remedy == 'converts':
            decision.add('converts', [(node.name, given.producer)])
    used = sorted({r for r in remedies if r in ('pins', 'converts')})
    if used:
        what = {'pins': 'input quantized as int8', 'converts': 'uint8 input converted to int8'}
        for u in used:
            decision.note(node, what[u])


def _signed_producers(node: _Node, remedies, signable: FrozenSet[str]) -> List[str]:
    """The ReLU'd convs behind the inputs a remedy would convert to int8, when every one
    of them can emit int8 itself (a leaky ReLU): no conversion at run time then."""
    found = []
    for remedy, given in zip(remedies, node.inputs):
        if remedy != 'converts':
            continue
        names = [s[:-len('_output')] for s in given.sources if s.endswith('_output')]
        if not names or len(names) < len(given.sources) or not set(names) <= signable:
            return []
        found.extend(names)
    return found


def _decide(node: _Node, decision: _Decision, signable: FrozenSet[str] = frozenset()) -> None:
    """Add to ``decision`` what makes ``node`` correct (nothing when it is). ``signable``:
    the fused convs whose ReLU may become a leaky one (see ``signed``)."""
    pattern, dtypes = node.pattern, node.dtypes
    if pattern.startswith('layout:') if pattern else False:
        if _works(pattern, dtypes):  # else it stays FP32 as it is, for lack of a kernel
            decision.add('layout', [node.name])
            decision.note(node, 'runs on the int8 tensor, with its range', why=False)
        return
    if pattern is None:
        decision.fp32[node.fp32] = 'INT8 %s is not in the op table (never measured)' % \
            node.name
        return
    if pattern == 'act:relu' and dtypes == ['u8'] and not op_table.is_ok(pattern, ('u8',)):
        decision.add('drops', [node.name])
        decision.note(node, 'removed: the ReLU of a uint8 tensor is the identity')
        return
    remedies = _remedies(pattern, dtypes)
    producers = _signed_producers(node, remedies, signable) if remedies else []
    if producers:
        decision.signed.extend(producers)
        decision.note(node, 'its uint8 input comes signed (leaky ReLU, slope %g)' % SIGNED_SLOPE)
        return
    if remedies is not None:
        _apply(node, remedies, decision)
        return
    if node.fp32 in signable and _remedies(pattern + '.s', dtypes) is not None:
        decision.signed.append(node.fp32)  # its own ReLU made leaky: an int8 output
        decision.note(node, 'emits int8 (leaky ReLU, slope %g)' % SIGNED_SLOPE)
        return
    if pattern in ('conv+sum+act', 'gconv+sum+act') and dtypes[1] != 'u8':
        decision.split.append(node.fp32)
        decision.note(node, 'the ReLU after the sum runs as its own op')
        return
    if pattern == 'add':
        remedies = _remedies('add.rq', dtypes)
        if remedies is not None:
            decision.add('requantize', [node.name])
            decision.note(node, 'int32 output with a requantize node of its own')
            _apply(node, remedies, decision)
            return
    if pattern in ('fc', 'fc+act') and node.weight:
        remedies = _remedies(pattern + '.w7', dtypes)
        if remedies is not None:
            decision.add('seven_bit', [node.weight])
            decision.note(node, '7-bit weights')
            _apply(node, remedies, decision)
            return
    decision.fp32[node.fp32] = op_table.describe(pattern, _failing(pattern, dtypes))


def plan_graph(fused: mx.sym.Symbol, excluded: Mapping[str, str], offline_params: Sequence[str],
               data_names: Sequence[str], quantized_dtype: str, quantize_mode: str,
               granularity: str) -> Plan:
    """Quantize ``fused`` with MXNet's pass and make every INT8 node correct (see the
    module docstring). ``excluded`` maps the user's FP32 layers to their reasons."""
    reasons, notes = dict(excluded), {}  # notes: fused node -> (what was done, why)
    for _ in range(MAX_ROUNDS):
        qsym, layers = quantize_symbol(fused, sorted(reasons), offline_params, quantized_dtype,
                                       quantize_mode, granularity)
        rewrites, decision = _settle(qsym, layers, data_names, _signable(fused))
        _merge_notes(notes, decision.notes)
        if not decision.changes_graph:
            notes = {n: '; '.join(done) + (' (%s)' % why if why else '')
                     for n, (done, why) in notes.items()}
            return Plan(fused, qsym, layers, reasons, rewrites, notes,
                        _unsigned(qsym, layers, data_names, rewrites))
        for name, reason in decision.fp32.items():
            log.info('%s stays FP32: %s', name, reason)
        reasons.update(decision.fp32)
        for name in decision.split:
            fused = split_postsum_act(fused, name)
        signable = _signable(fused)  # a conv split this round has no ReLU to sign
        fused = signed_relu(fused, [n for n in decision.signed if n in signable])
    raise RuntimeError('plan: no stable plan after %d rounds' % MAX_ROUNDS)




def _relu_of(node: dict) -> Optional[dict]:
    """The inner ReLU that makes a fused conv emit uint8: the one after its sum, or after
    the conv where there is no sum; None if its output is signed already."""
    if node['op'] != '_sg_mkldnn_conv':
        return None
    inner = node['subgraphs'][0]['nodes']
    acts = [n for n in inner if n['op'] == 'Activation'
            and n.get('attrs', {}).get('act_type') == 'relu']
    with_sum = any(n['op'] == 'elemwise_add' for n in inner)
    head = inner[node['subgraphs'][0]['heads'][0][0]]
    if not acts or head not in acts or (with_sum and not _true(node.get('attrs', {}),
                                                                'with_postsum_act')):
        return None
    return head


def _signable(fused: mx.sym.Symbol) -> FrozenSet[str]:
    """The fused convs whose output is uint8 because of a ReLU that can be made leaky."""
    return frozenset(n['name'] for n in json.loads(fused.tojson())['nodes']
                     if _relu_of(n) is not None)


def signed_relu(fused: mx.sym.Symbol, names: Sequence[str]) -> mx.sym.Symbol:
    """``fused`` with the ReLU of each conv node in ``names`` made a leaky ReLU of slope
    :data:`SIGNED_SLOPE`: the same function to well below one 8-bit step, and the INT8
    conv emits int8 instead of uint8."""
    wanted = set(names)
    if not wanted:
        return fused
    graph = json.loads(fused.tojson())
    for node in graph['nodes']:
        if node['name'] in wanted:
            relu = _relu_of(node)
            relu['op'] = 'LeakyReLU'
            relu['attrs'] = {'act_type': 'leaky', 'slope': repr(SIGNED_SLOPE)}
    log.info('%s: ReLU made a leaky ReLU of slope %g, so that the conv emits int8',
             ', '.join(sorted(wanted)), SIGNED_SLOPE)
    return mx.sym.load_json(json.dumps(graph))


def _signed_act(inner: dict) -> bool:
    """Whether an inner node is a ReLU that :func:`signed_relu` made leaky."""
    attrs = inner.get('attrs', {})
    return inner['op'] == 'LeakyReLU' and attrs.get('act_type') == 'leaky' and \
        float(attrs.get('slope', 'nan')) == SIGNED_SLOPE


def restore_relus(fused: mx.sym.Symbol) -> Tuple[mx.sym.Symbol, FrozenSet[str]]:
    """``fused`` with every ReLU that :func:`signed_relu` made leaky a ReLU again, and the
    names of those convs: a runtime with kernels of its own (ONNX) runs the network's
    own function, with the convs' outputs uint8."""
    graph, restored = json.loads(fused.tojson()), set()
    for node in graph['nodes']:
        for inner in node.get('subgraphs', [{}])[0].get('nodes', []):
            if _signed_act(inner):
                inner['op'], inner['attrs'] = 'Activation', {'act_type': 'relu'}
                restored.add(node['name'])
    if not restored:
        return fused, frozenset()
    return mx.sym.load_json(json.dumps(graph)), frozenset(restored)


def _merge_notes(into: dict, more: dict) -> None:
    for node, (done, why) in more.items():
        before = into.get(node, ((), why))[0]
        into[node] = (tuple(dict.fromkeys(before + done)), why)


def _settle(qsym, layers, data_names, signable: FrozenSet[str]) -> Tuple[Rewrites, _Decision]:
    """Rewrites of one quantized graph until every node is correct or the graph itself
    must change (the decision then says how)."""
    rewrites, notes, fused_cache = Rewrites(), {}, {}
    for _ in range(MAX_ROUNDS):
        decision = _Decision()
        for node in analyse(qsym, layers, data_names, rewrites, fused_cache):
            if not decision.changes_graph:
                _decide(node, decision, signable)
                continue
            # the graph changes this round. More changes of one conv (signed, split)
            # are collected: neither turns another node's int8 input into uint8. A
            # layer kept FP32 for want of a correct kernel is decided on the changed
            # graph, where its inputs may differ.
            probe = _Decision()
            _decide(node, probe, signable)
            if not probe.fp32 and probe.changes_graph:
                decision.signed.extend(probe.signed)
                decision.split.extend(probe.split)
                _merge_notes(decision.notes, probe.notes)
        _merge_notes(notes, decision.notes)
        merged = rewrites.merge(decision.rewrites)
        if decision.changes_graph or merged == rewrites:
            decision.notes = notes
            return merged, decision
        rewrites = merged
    raise RuntimeError('plan: the rewrites did not settle after %d rounds' % MAX_ROUNDS)


def _unsigned(qsym, layers, data_names, rewrites: Rewrites) -> FrozenSet[str]:
    """The calibrated tensors that are uint8 even with signed ranges (a conv with a fused
    ReLU emits uint8 whatever its range says)."""
    signed = finalize(qsym, {n: (-1.0, 1.0) for n in layers}, rewrites)
    dtypes, view = tensor_dtypes(signed, data_names), GraphView(signed)
    found = set()
    for index in view.int8_nodes():
        if dtypes.get(view.output_name(index, 0)) == 'u8':
            found.update(view.sources(index))
    return frozenset(found & set(layers))


def check_calibrated(qsym: mx.sym.Symbol, data_names: Sequence[str],
                     rewrites: Rewrites) -> Dict[str, str]:
    """After calibration: fused node -> why, for every INT8 node of the graph that runs
    whose input dtypes the op table does not call ok (empty when the plan held)."""
    view, dtypes = GraphView(qsym), tensor_dtypes(qsym, data_names)
    problems = {}
    for index in view.int8_nodes() + [i for i, n in enumerate(view.nodes)
                                       if n['name'] in rewrites.layout]:
        node = view.nodes[index]
        combo = []
        for src, out in view.data_inputs(index, dtypes):
            combo.append(dtypes[view.output_name(src, out)])
        pattern = 'layout:' + node['op'] if node['name'] in rewrites.layout \
            else pattern_of(node, view.weight(node), rewrites)
        if pattern is None or not op_table.is_ok(pattern, tuple(combo)):
            name = node['name'][len(PREFIX):] if node['name'].startswith(PREFIX) else node['name']
            problems[name] = op_table.describe(pattern or node['op'], tuple(combo))
    return problems


def ranges_in_graph(ranges: Mapping[str, Tuple[float, float]],
                    plan: Plan) -> Dict[str, Tuple[float, float]]:
    """The ranges the INT8 graph uses. A tensor that is uint8 whatever its range gets
    ``[0, T]``: a custom collector may report a negative min there, which MXNet's next
    kernel would refuse."""
    used = {}
    for name, (lo, hi) in ranges.items():
        if name in plan.unsigned and lo < 0:
            lo, hi = 0.0, max(-lo, hi)
        used[name] = (lo, hi)
    return used
