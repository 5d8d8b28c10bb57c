"""Stage 6, self-check: every INT8 node against its FP32 op, on the node's own INT8 inputs.

``quantize_net`` runs this on (a few examples of) the first calibration batch before it
returns a model. For every INT8 node of the graph that runs:

1. its data inputs and its output are read from one forward pass of the INT8 graph
   (int8/uint8 values with their ranges, as the kernels saw them);
2. an oracle computes what the node should have produced from exactly those inputs: the
   node's FP32 op (from the fused FP32 graph) on the dequantized inputs, with the weights
   the kernel uses (BN folded and rounded per output channel as MXNet does; FC weights as
   gluon-int8 stores them);
3. the difference is measured in steps of the node's output grid (``range / 127.5`` for
   int8, ``/ 255.5`` for uint8).

The inputs are the INT8 graph's own and the oracle saturates at the node's own output
range, so range problems (clipping, coarse steps) do not count against a node: a correct
kernel is off by about half a step (its own rounding). A node off by more than :data:`DEFECT_STEPS` is a kernel or graph defect, not
a range problem; ``quantize_net`` warns naming it, or (``self_check='fallback'``) returns
it to FP32. The conformance probes measure the same thing on tiny graphs with exact
inputs; this check covers the shapes, layouts and data of the user's network.
"""
import collections
import collections.abc
import dataclasses
import json
import logging
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from .observe import in_budget, run_outputs as _run
from .op_table import has_vnni
from .plan import PREFIX, Rewrites, tensor_dtypes, GraphView, pattern_of

log = logging.getLogger(__name__)

# a node further than this from its oracle (in output steps) is a defect; correct kernels
# measured up to 1.5 on real data (rounding; the oracle uses oneDNN's half-resolution
# weights for s8 sources on CPUs without VNNI, as the kernel does)
DEFECT_STEPS = 4.0
EXAMPLES = 4
CHUNK_VALUES = 1 << 23  # oracle outputs and parameters per bind: bounds the memory
_LEVELS = {'s8': 127.5, 'u8': 255.5, 's32': 2147483647.0}


@dataclasses.dataclass(frozen=True)
class NodeCheck:
    """How far one INT8 node is from its FP32 op on the same inputs."""
    layer: str                  # the fused FP32 layer
    op: str
    pattern: Optional[str]
    inputs: Tuple[str, ...]     # dtypes of its data inputs
    error_steps: float          # max |INT8 - oracle| in steps of the output grid
    sqnr_db: float              # of the INT8 output against the oracle

    @property
    def defect(self) -> bool:
        return not self.error_steps <= DEFECT_STEPS

    def describe(self) -> str:
        return ('self-check: INT8 %s(%s) is %.1f steps of its 8-bit output grid away from '
                'its FP32 op on the same inputs (SQNR %.1f dB): a kernel defect, not a range '
                'problem' % (self.pattern or self.op, ','.join(self.inputs), self.error_steps,
                             self.sqnr_db))

    def to_dict(self) -> dict:
        row = dataclasses.asdict(self)
        row['sqnr_db'] = self.sqnr_db if math.isfinite(self.sqnr_db) else str(self.sqnr_db)
        return row


# -- the oracle graph of one node ------------------------------------------------------

def _inner_inputs(node: dict) -> Dict[int, int]:
    """Fused node: inner arg node index -> position in the fused node's inputs."""
    sub = node['subgraphs'][0]
    return {arg: k for k, arg in enumerate(sub['arg_nodes'])}


def _fold_conv(node: dict, params: Mapping[str, np.ndarray], names: List[str]):
    """The conv weight and bias after BN folding (as MXNet's UpdateConvWeightBias), and
    the input positions of the weight, bias and BN parameters in the fused node."""
    sub = node['subgraphs'][0]
    where = _inner_inputs(node)
    conv = next(n for n in sub['nodes'] if n['op'] == 'Convolution')
    w_pos = where[conv['inputs'][1][0]]
    b_pos = where[conv['inputs'][2][0]] if len(conv['inputs']) > 2 else None
    weight = params[names[w_pos]].astype(np.float64)
    bias = params[names[b_pos]].astype(np.float64) if b_pos is not None else \
        np.zeros(weight.shape[0])
    bn = next((n for n in sub['nodes'] if n['op'] == 'BatchNorm'), None)
    bn_pos = []
    if bn is not None:
        bn_pos = [where[src] for src, _, _ in bn['inputs'][1:5]]
        gamma, beta, mean, var = (params[names[p]].astype(np.float64) for p in bn_pos)
        attrs = bn.get('attrs', {})
        if str(attrs.get('fix_gamma', 'true')).lower() == 'true':
            gamma = np.ones_like(gamma)
        alpha = gamma / np.sqrt(var + float(attrs.get('eps', 1e-3)))
        weight = weight * alpha.reshape((-1,) + (1,) * (weight.ndim - 1))
        bias = beta + alpha * (bias - mean)
    return weight, bias, w_pos, b_pos, bn_pos, bn


def _rounded(weight: np.ndarray, half_step: bool) -> np.ndarray:
    """MXNet's per-output-channel int8 rounding at 127.5 / max|w_c| (``half_step``: at half
    that scale, as oneDNN for s8 sources without VNNI)."""
    peak = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)
    peak = np.where(peak > 0, peak, 1.0)
    scale = ((0.5 if half_step else 1.0) * 127.5 / peak).reshape((-1,) + (1,) * (weight.ndim - 1))
    return np.clip(np.rint(weight * scale), -127, 127) / scale


def _oracle_params(node: dict, int8_node: dict, names: List[str], params, values,
                   half_step: bool) -> Dict[str, np.ndarray]:
    """Values for the fused FP32 node's parameters such that it computes what the INT8
    kernel computes (its rounded weights), by input position."""
    found = {}
    if node['op'] == '_sg_mkldnn_conv':
        weight, bias, w_pos, b_pos, bn_pos, bn = _fold_conv(node, params, names)
        found[w_pos] = _rounded(weight, half_step)
        if bn is not None:  # an identity BN that adds the folded bias
            eps = float(bn.get('attrs', {}).get('eps', 1e-3))
            gamma, beta, mean, var = bn_pos
            found[gamma] = np.ones_like(bias)
            found[beta] = bias
            found[mean] = np.zeros_like(bias)
            found[var] = np.full_like(bias, 1.0 - eps)
            if b_pos is not None:
                found[b_pos] = np.zeros_like(bias)
        elif b_pos is not None:
            found[b_pos] = bias
    elif node['op'] == '_sg_mkldnn_fully_connected':
        channel = str(int8_node.get('attrs', {}).get('channel_wise_quantize',
                                                     'false')).lower() == 'true'
        for k, name in enumerate(names):
            if name + '_quantize' in values:  # offline int8 (weight or bias) as stored
                found[k] = _stored(values, name)
            elif channel and name.endswith('weight'):
                found[k] = _rounded(params[name].astype(np.float64), False)
    return found


def _stored(values, name: str) -> np.ndarray:
    """An offline-quantized parameter as the kernel reads it: q * range / 127.5."""
    rng = max(abs(float(values[name + '_quantize_min'].asscalar())),
              abs(float(values[name + '_quantize_max'].asscalar())))
    return values[name + '_quantize'].asnumpy().astype(np.float64) * rng / 127.5


def _node_symbol(node: dict, prefix: str) -> mx.sym.Symbol:
    """The fused FP32 node alone, its inputs variables named ``<prefix>_<k>``."""
    variables = [{'op': 'null', 'name': '%s_%d' % (prefix, k), 'inputs': []}
                 for k in range(len(node['inputs']))]
    alone = dict(node, inputs=[[k, 0, 0] for k in range(len(node['inputs']))])
    graph = {'nodes': variables + [alone], 'arg_nodes': list(range(len(variables))),
             'heads': [[len(variables), 0, 0]], 'attrs': {'mxnet_version': ['int', 10901]}}
    return mx.sym.load_json(json.dumps(graph))


# -- the check ---------------------------------------------------------------------------

def _dequantized(observed, dtypes, name_data: str, name_min: Optional[str],
                 name_max: Optional[str]):
    """A tensor of the INT8 graph in real values, the step of its grid and its range
    (None, None for a float tensor). ``observed`` holds every tensor in its own dtype
    (int8, uint8, int32 codes, or float32), a quarter of float32's memory for 8-bit ones.
    An int32 tensor is requantized next: it is judged on an 8-bit grid of its range."""
    data = observed[name_data].astype(np.float32, copy=False)  # codes as float32
    levels = _LEVELS.get(dtypes.get(name_data))
    if levels is None or name_min is None:
        return data, None, None
    rng = max(abs(float(observed[name_min].ravel()[0])), abs(float(observed[name_max].ravel()[0])))
    return (data * np.float32(rng / levels), rng / (levels if levels < 1e3 else _LEVELS['s8']),
            rng)


@dataclasses.dataclass
class _Job:
    index: int                     # INT8 node in the graph that runs
    fp32: dict                     # its fused FP32 node
    inputs: List[Tuple[str, str, str]]   # observed (data, min, max) output names per data slot
    output: Tuple[str, Optional[str], Optional[str]]
    param_names: List[str]         # FP32 node input names (variables) by position
    data_slots: List[int]          # FP32 node input positions that are data


def check(qsym: mx.sym.Symbol, values: Mapping[str, mx.nd.NDArray],
          aux: Mapping[str, mx.nd.NDArray], fused: mx.sym.Symbol,
          fp32_params: Mapping[str, mx.nd.NDArray], data_names: Sequence[str],
          batch: Sequence[mx.nd.NDArray], rewrites: Rewrites,
          examples: int = EXAMPLES) -> List[NodeCheck]:
    """One :class:`NodeCheck` per INT8 node of ``qsym`` (see the module docstring)."""
    view = GraphView(qsym)
    dtypes = tensor_dtypes(qsym, data_names)
    jobs = _jobs(view, dtypes, fused, data_names)
    if not jobs:
        return []
    inputs = [b[:examples] for b in batch]
    observed = _observe(qsym, values, aux, data_names, inputs, jobs)
    params = _AsNumpy(fp32_params)
    results = []
    for chunk in in_budget(jobs, lambda job: _values(job, observed, fp32_params, values),
                           CHUNK_VALUES):
        results.extend(_compare(chunk, view, dtypes, observed, params, values, rewrites))
    return results


class _AsNumpy(collections.abc.Mapping):
    """NDArrays, each read as numpy when looked up: an oracle's parameters are read with
    it, not all of the network's at once (ResNet50's are 100 MB)."""

    def __init__(self, arrays: Mapping[str, mx.nd.NDArray]):
        self.arrays = arrays

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name].asnumpy()

    def __iter__(self):
        return iter(self.arrays)

    def __len__(self) -> int:
        return len(self.arrays)


def _values(job: '_Job', observed, fp32_params, values) -> int:
    """Values the oracle of ``job`` holds: its output and its parameters (FP32, or int8 as
    stored: the weights of a late ResNet50 stage outweigh its outputs)."""
    found = (fp32_params.get(name, values.get(name + '_quantize'))
             for k, name in enumerate(job.param_names) if k not in job.data_slots)
    return observed[job.output[0]].size + sum(p.size for p in found if p is not None)


def _jobs(view: GraphView, dtypes, fused: mx.sym.Symbol, data_names) -> List[_Job]:
    fp32_graph = json.loads(fused.tojson())
    counts = collections.Counter(n['name'] for n in fp32_graph['nodes'])
    # a node name used twice (GluonCV's DLA has six Poolings 'pool0_fwd') tells neither
    # its FP32 op nor its tensors: nodes that touch one are not checked
    fp32_nodes = {n['name']: n for n in fp32_graph['nodes'] if counts[n['name']] == 1}
    shared = {name for name, k in collections.Counter(view.outputs.values()).items() if k > 1}
    jobs = []
    for index in view.int8_nodes():
        node = view.nodes[index]
        fp32 = fp32_nodes.get(node['name'][len(PREFIX):])
        if fp32 is None:
            continue
        names = [fp32_graph['nodes'][src]['name'] for src, _, _ in fp32['inputs']]
        slots = [k for k, (src, _, _) in enumerate(fp32['inputs'])
                 if fp32_graph['nodes'][src]['op'] != 'null' or names[k] in data_names]
        data = view.data_inputs(index, dtypes)
        if len(data) != len(slots):
            continue  # the node reads an input the FP32 node does not (nothing to compare)
        inputs = [(view.output_name(s, o),) + view.range_of(s, o) for s, o in data]
        outs = [view.outputs[(index, k)] for k in range(3) if (index, k) in view.outputs]
        if shared & ({n for triple in inputs for n in triple} | set(outs)):
            continue
        output = (outs[0], outs[1], outs[2]) if len(outs) == 3 else (outs[0], None, None)
        jobs.append(_Job(index, fp32, inputs, output, names, slots))
    return jobs


def _observe(qsym, values, aux, data_names, inputs, jobs) -> Dict[str, np.ndarray]:
    """One forward pass of the INT8 graph with every tensor the jobs read as an output."""
    wanted = []
    for job in jobs:
        for triple in job.inputs + [job.output]:
            wanted.extend(n for n in triple if n is not None)
    wanted = list(dict.fromkeys(w for w in wanted if w not in data_names))
    observed = dict(zip(wanted, _run(qsym.get_internals(), wanted, data_names, inputs,
                                     {**aux, **values}, copy=True)))
    observed.update({n: v.asnumpy() for n, v in zip(data_names, inputs)})
    return observed


def _half_step(job: _Job, dtypes_in: Tuple[str, ...]) -> bool:
    """Whether the kernel computes with half-step weights: a conv with an s8 source on a
    CPU without VNNI (oneDNN's reorder halves the weight scale there)."""
    return (job.fp32['op'] == '_sg_mkldnn_conv' and dtypes_in[:1] == ('s8',)
            and not has_vnni())


def _compare(jobs: List[_Job], view: GraphView, dtypes, observed, params, values,
             rewrites: Rewrites) -> List[NodeCheck]:
    """Run the oracles of ``jobs`` in one bind; compare."""
    symbols, args, inputs = [], {}, {}
    in_dtypes = [tuple(dtypes.get(i[0], 'f32') for i in job.inputs) for job in jobs]
    for j, job in enumerate(jobs):
        prefix = 'sc%d' % j
        symbols.append(_node_symbol(job.fp32, prefix))
        special = _oracle_params(job.fp32, view.nodes[job.index], job.param_names, params,
                                 values, _half_step(job, in_dtypes[j]))
        data = iter(job.inputs)
        for k, name in enumerate(job.param_names):
            var = '%s_%d' % (prefix, k)
            if k in job.data_slots:
                d, lo, hi = next(data)
                inputs[var] = mx.nd.array(_dequantized(observed, dtypes, d, lo, hi)[0])
            else:
                args[var] = mx.nd.array(special[k] if k in special else params[name])
    group = mx.sym.Group(symbols)
    data = [n for n in group.list_inputs() if n in inputs]
    oracle = _run(group, None, data, [inputs[n] for n in data], args)
    results = []
    for job, job_dtypes, ref in zip(jobs, in_dtypes, oracle):  # float32; sums in float64
        got, step, top = _dequantized(observed, dtypes, *job.output)
        if step is not None:  # saturating at its own range is what the node must do
            ref = np.clip(ref, 0.0 if dtypes[job.output[0]] == 'u8' else -top, top)
        if not step:  # a float output (dequantize fused), or a zero range
            step = max(float(np.abs(ref).max()), 1e-30) / 127.5
        err = got - ref
        error = float(np.abs(err).max()) / step
        noise = float(np.square(err, out=err).sum(dtype=np.float64))
        signal = float(np.square(ref).sum(dtype=np.float64))
        sqnr = math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)
        node = view.nodes[job.index]
        results.append(NodeCheck(node['name'][len(PREFIX):], node['op'],
                                 pattern_of(node, view.weight(node), rewrites),
                                 job_dtypes, round(error, 3), round(sqnr, 2)))
    return results
