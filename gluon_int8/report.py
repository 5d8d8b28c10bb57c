"""Per-layer report: how far each layer's INT8 output is from its FP32 output.

Both graphs run over the same data: the fused FP32 graph that calibration ran (kept by
``quantize_net`` as :class:`FP32Graph`) and the INT8 graph, each as a static graph whose
outputs are the layer outputs (:class:`gluon_int8.observe.Watcher`, as calibration reads
its tensors; the INT8 graph's are copied in the graph, so that no in-place INT8 kernel
overwrites them). Layers are matched by name: the INT8 pass names
a quantized fused node ``quantized_<fp32 node name>``; its outputs 0, 1, 2 are the
int8/uint8 data and the real ``min``/``max`` they stand for, so the data is dequantized
as ``q * max(|min|, |max|) / 127.5`` (int8) or ``/ 255.5`` (uint8): MXNet 1.9.1's oneDNN
kernels (quantize, requantize, dequantize) all scale by ``kInt8Range = 127.5`` and
``kUint8Range = 255.5``, not 127 and 255 (checked: its dequantize node agrees with this
to 1e-7, and is 0.4% off the /127 version). A layer that stays FP32 keeps its name and
is compared as it is (its error is what reaches it from upstream).

Per layer the sums ``sum r^2``, ``sum (r - q)^2``, ``sum r q`` and ``sum q^2`` are
accumulated over the data in float64, streaming: the two graphs run on the same
sub-batch, and each layer's outputs are compared where MXNet wrote them, giving

* SQNR in dB: ``10 log10(sum r^2 / sum (r - q)^2)`` (infinite when the outputs agree);
* cosine: ``sum r q / sqrt(sum r^2 sum q^2)``.
"""
import dataclasses
import json
import logging
import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from . import mxnet_private
from .data import iter_batches
from .observe import Watcher, batch_errors, sub_batches
from .quantize_graph import INT8_READ_RANGE, UINT8_READ_RANGE, graph_outputs
from .op_table import LAYOUT_OPS, WEIGHT_OPS
from .table import atomic_write_text

log = logging.getLogger(__name__)

REPORT_VERSION = 1
# the code that max(|min|, |max|) maps to, per dtype (MXNet's kInt8Range, kUint8Range,
# kInt32Range)
LEVELS = {np.dtype(np.int8): INT8_READ_RANGE, np.dtype(np.uint8): UINT8_READ_RANGE,
          np.dtype(np.int32): 2147483647.0}
SHORT_DTYPES = {'int8': 's8', 'uint8': 'u8', 'int32': 's32', 'float32': 'f32'}


@dataclasses.dataclass
class FP32Graph:
    """The fused FP32 graph an INT8 graph was made from (what calibration ran).

    ``params`` holds copies of the FP32 values the INT8 block does not hold itself (FC
    weights replaced by int8 copies, weights rounded through int8); every other input
    of ``symbol`` is read from the INT8 block's own parameters.
    """
    symbol: mx.sym.Symbol
    params: Dict[str, mx.nd.NDArray]


def fp32_reference(fused: mx.sym.Symbol, arg_params: Mapping[str, mx.nd.NDArray],
                   int8_values: Mapping[str, mx.nd.NDArray]) -> FP32Graph:
    """The :class:`FP32Graph` of ``fused``: copies of its FP32 arguments that the INT8
    block's values (``int8_values``) lack or replaced; never aliases of the user's arrays.

    Auxiliary states need no copy: the INT8 block holds them unchanged.
    """
    needed = set(fused.list_arguments())
    own = {name: value.copy() for name, value in arg_params.items()
           if name in needed and int8_values.get(name) is not value}
    return FP32Graph(fused, own)


@dataclasses.dataclass
class LayerRow:
    """One layer of the report."""
    name: str
    op: str
    dtype: str                  # 'int8' or 'fp32': how the layer runs
    out: str                    # dtype of its output in the INT8 graph: u8, s8, s32, f32
    granularity: str            # weight scales: 'channel', 'tensor', or '-' (no weights)
    threshold: Optional[float]  # max(|lo|, |hi|) of the quantization range
    range: Optional[Tuple[float, float]]     # calibration table: quantization range (uint8: written
    # into the graph at op_table.uint8_range_factor() times it)
    observed: Optional[Tuple[float, float]]  # calibration table: calibrated min/max
    sqnr_db: Optional[float]    # None: the layer's output was not observed
    cosine: Optional[float]
    reason: str = ''            # why it stays FP32

    def to_dict(self) -> dict:
        row = dataclasses.asdict(self)
        if self.sqnr_db is not None and math.isinf(self.sqnr_db):
            row['sqnr_db'] = str(self.sqnr_db)  # 'inf' / '-inf': JSON has no infinity
        return row

    @classmethod
    def from_dict(cls, row: dict) -> 'LayerRow':
        values = dict(row)
        for key in ('range', 'observed'):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        if isinstance(values.get('sqnr_db'), str):
            values['sqnr_db'] = float(values['sqnr_db'])
        return cls(**values)


@dataclasses.dataclass
class Report:
    """The per-layer report: rows in graph order, and the data it was measured on."""
    rows: List[LayerRow]
    num_batches: int
    num_examples: int

    def to_dict(self) -> dict:
        return {'format_version': REPORT_VERSION, 'num_batches': self.num_batches,
                'num_examples': self.num_examples, 'layers': [r.to_dict() for r in self.rows]}

    def to_json(self, path: Optional[str] = None) -> str:
        """The report as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_dict(cls, data: dict) -> 'Report':
        if not isinstance(data, dict) or data.get('format_version') != REPORT_VERSION:
            raise ValueError('report: not a gluon-int8 report (format_version %r, expected %d)'
                             % (data.get('format_version') if isinstance(data, dict) else None,
                                REPORT_VERSION))
        return cls([LayerRow.from_dict(r) for r in data['layers']], data['num_batches'],
                   data['num_examples'])

    def table(self) -> str:
        """The report as a plain-text table."""
        width = max([len(r.name) for r in self.rows] + [5])
        head = '%-*s  %-27s %-5s %-4s %-7s %10s  %-21s %-21s %8s %8s  %s' % (
            width, 'layer', 'op', 'runs', 'out', 'weights', 'threshold', 'range', 'observed',
            'SQNR dB', 'cosine', 'why FP32')
        lines = [head] + [_table_line(r, width) for r in self.rows]
        lines.append('(%d examples in %d batches)' % (self.num_examples, self.num_batches))
        return '\n'.join(lines)

    def __str__(self) -> str:
        return self.table()

    def save_png(self, path: str, title: Optional[str] = None) -> str:
        """A bar chart of the SQNR of every layer (FP32 layers hatched grey) as PNG."""
        _plot(self.rows, path, title or 'INT8 vs FP32 per layer (%d examples)'
              % self.num_examples)
        return path


def _fmt(value, spec: str, missing: str = '-') -> str:
    if value is None:
        return missing
    if isinstance(value, tuple):
        return '[%s, %s]' % (format(value[0], spec), format(value[1], spec))
    return format(value, spec)


def _table_line(r: LayerRow, width: int) -> str:
    return '%-*s  %-27s %-5s %-4s %-7s %10s  %-21s %-21s %8s %8s  %s' % (
        width, r.name, r.op, r.dtype, r.out, r.granularity, _fmt(r.threshold, '.4g'),
        _fmt(r.range, '.4g'), _fmt(r.observed, '.4g'), _fmt(r.sqnr_db, '.2f'),
        _fmt(r.cosine, '.5f'), r.reason)


def _plot(rows: List[LayerRow], path: str, title: str) -> None:
    """Horizontal bars, one per layer; infinite SQNR drawn at the axis end."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError('save_png needs matplotlib (pip install matplotlib)') from err
    finite = [r.sqnr_db for r in rows if r.sqnr_db is not None and math.isfinite(r.sqnr_db)]
    cap = max(finite + [10.0]) * 1.15
    fig = Figure(figsize=(9, 1.2 + 0.3 * len(rows)))
    FigureCanvasAgg(fig)  # Agg canvas: no pyplot, no global backend switch
    ax = fig.add_subplot(1, 1, 1)
    ys = np.arange(len(rows))[::-1]
    for y, r in zip(ys, rows):
        value = 0.0 if r.sqnr_db is None else min(r.sqnr_db, cap)
        fp32 = r.dtype == 'fp32'
        ax.barh(y, value, color='#bbbbbb' if fp32 else '#3b75af', hatch='//' if fp32 else None,
                edgecolor='#555555')
        note = 'FP32: %s' % r.reason if fp32 else ''
        note = ('inf  ' + note) if r.sqnr_db is not None and math.isinf(r.sqnr_db) else note
        if note:
            ax.text(value, y, ' ' + note, va='center', fontsize=7)
    longest = max([len(r.reason) for r in rows if r.dtype == 'fp32'] + [0])
    ax.set_xlim(0, cap * (1.0 + 0.012 * (longest + 12 if longest else 0)))  # room for notes
    ax.set_yticks(ys)
    ax.set_yticklabels([r.name for r in rows], fontsize=7)
    ax.set_xlabel('SQNR of the layer output vs FP32 (dB, higher is better)')
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format='png', dpi=100)


def output_keys(symbol: mx.sym.Symbol, nodes: Iterable[str],
                indices: Iterable[int] = (0, 1, 2)) -> Dict[str, Tuple[str, int]]:
    """Output name -> (node, index) for the outputs ``indices`` of ``nodes``."""
    wanted, indices = set(nodes), set(indices)
    return {out_name: (node, idx) for node, idx, out_name in graph_outputs(symbol)
            if node in wanted and idx in indices}


def first_outputs(symbol: mx.sym.Symbol) -> Dict[str, str]:
    """Node name -> the name of its output 0 (the name calibration tables use)."""
    return {node: out_name for node, idx, out_name in graph_outputs(symbol) if idx == 0}


def dequantized(arrays: Mapping[Tuple[str, int], np.ndarray], node: str,
                range_keys: Optional[Tuple[Tuple[str, int], Tuple[str, int]]] = None
                ) -> Optional[np.ndarray]:
    """The real-valued output 0 of ``node`` in the INT8 graph (None if not seen); its
    range is its outputs 1 and 2, or ``range_keys`` (a layout op run on int8 carries the
    range of the tensor it reads)."""
    data = arrays.get((node, 0))
    if data is None or data.dtype not in LEVELS:
        return data
    lo_key, hi_key = range_keys or ((node, 1), (node, 2))
    lo, hi = arrays.get(lo_key), arrays.get(hi_key)
    if lo is None or hi is None:
        raise RuntimeError('report: INT8 node %r reported no min/max outputs' % node)
    scale = max(abs(float(lo.ravel()[0])), abs(float(hi.ravel()[0]))) / LEVELS[data.dtype]
    return data.astype(np.float64) * scale


class _Sums:
    """Streaming sums for SQNR and cosine of one layer."""

    def __init__(self):
        self.ref2 = self.err2 = self.dot = self.q2 = 0.0

    def add(self, ref: np.ndarray, q: np.ndarray) -> None:
        r, q = ref.astype(np.float64).ravel(), q.astype(np.float64).ravel()
        diff = r - q
        self.ref2 += float(r @ r)
        self.err2 += float(diff @ diff)
        self.dot += float(r @ q)
        self.q2 += float(q @ q)

    def sqnr_db(self) -> float:
        if self.err2 == 0.0:
            return math.inf
        if self.ref2 == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.ref2 / self.err2)

    def cosine(self) -> float:
        norm = math.sqrt(self.ref2 * self.q2)
        if norm == 0.0:
            return 1.0 if self.ref2 == self.q2 else 0.0
        return self.dot / norm


def _int8_node(arrays, name: str) -> str:
    quantized = 'quantized_' + name
    return quantized if (quantized, 0) in arrays else name


class _Comparison:
    """Per-layer sums over the data. For each sub-batch the INT8 graph's outputs are
    kept (``int8``, as MXNet wrote them), then each FP32 output is compared with them."""

    def __init__(self, carried: Mapping[str, Tuple[Tuple[str, int], Tuple[str, int]]]):
        self.sums: Dict[str, _Sums] = {}
        self.out_dtypes: Dict[str, str] = {}
        self.int8: Dict[Tuple[str, int], np.ndarray] = {}
        self.carried = carried  # layout node -> the (node, output) keys of its range

    def compare(self, name: str, ref: np.ndarray) -> None:
        node = _int8_node(self.int8, name)
        value = dequantized(self.int8, node, self.carried.get(node))
        if value is None:
            return
        if ref.size != value.size:
            raise RuntimeError('report: layer %r has %d FP32 values but %d INT8 values'
                               % (name, ref.size, value.size))
        dtype = str(self.int8[(node, 0)].dtype)
        self.out_dtypes[name] = SHORT_DTYPES.get(dtype, dtype)
        self.sums.setdefault(name, _Sums()).add(ref, value)


def _carried_ranges(int8_symbol: mx.sym.Symbol, names: Iterable[str], data_names: Sequence[str]
                    ) -> Dict[str, Tuple[Tuple[str, int], Tuple[str, int]]]:
    """Layout layer run on int8 -> the (node, output) of the min and max it carries: those
    of the tensor it reads (:meth:`gluon_int8.plan.GraphView.range_of`)."""
    from .plan import GraphView, tensor_dtypes  # pylint: disable=import-outside-toplevel
    view, wanted = GraphView(int8_symbol), set(names)
    dtypes = tensor_dtypes(int8_symbol, data_names)
    where = {out_name: (node, idx) for node, idx, out_name in graph_outputs(int8_symbol)}
    return {node['name']: tuple(where[n] for n in view.range_of(i, 0))
            for i, node in enumerate(view.nodes)
            if node['op'] in LAYOUT_OPS and node['name'] in wanted
            and dtypes.get(view.output_name(i, 0)) in ('s8', 'u8')}


def _granularities(int8_symbol: mx.sym.Symbol) -> Dict[str, str]:
    """Fused node name -> weight scale granularity of its INT8 node.

    oneDNN's quantized conv always scales weights per output channel (its
    ``weight_channelwise_scale`` defaults to true); the quantized FC is per channel only
    when the pass set ``channel_wise_quantize``.
    """
    found = {}
    for node in json.loads(int8_symbol.tojson())['nodes']:
        if node['op'] not in WEIGHT_OPS or not node['name'].startswith('quantized_'):
            continue
        attrs = {k: str(v).lower() for k, v in node.get('attrs', {}).items()}
        if node['op'] == '_sg_mkldnn_conv':
            channel = attrs.get('weight_channelwise_scale', 'true') == 'true'
        else:
            channel = attrs.get('channel_wise_quantize', 'false') == 'true'
        found[node['name'][len('quantized_'):]] = 'channel' if channel else 'tensor'
    return found


def _row(layer, sums: Optional[_Sums], out: str, granularity: str, table, out_name) -> LayerRow:
    rng = table.ranges.get(out_name) if table is not None else None
    observed = table.observed.get(out_name) if table is not None and rng is not None else None
    return LayerRow(
        name=layer.name, op=layer.op, dtype=layer.dtype,
        out=out if layer.dtype == 'int8' else 'f32', granularity=granularity,
        threshold=max(abs(rng[0]), abs(rng[1])) if rng is not None else None,
        range=tuple(rng) if rng is not None else None,
        observed=tuple(observed) if observed is not None else None,
        sqnr_db=sums.sqnr_db() if sums is not None else None,
        cosine=sums.cosine() if sums is not None else None, reason=layer.reason)


def _check_count(param: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError('%s: got %r; expected a positive int or None' % (param, value))


def layer_report(qnet, data, num_batches: Optional[int] = None,
                 num_examples: Optional[int] = None) -> Report:
    """Run ``qnet`` (a QuantizedBlock) and its FP32 graph over ``data``; one row per layer.

    ``data`` takes every form ``calib_data`` does; ``num_batches``/``num_examples`` stop early.
    """
    _check_count('num_batches', num_batches)
    _check_count('num_examples', num_examples)
    if getattr(qnet, 'fp32_graph', None) is None:
        raise ValueError('qnet: this QuantizedBlock carries no FP32 graph to compare with '
                         '(it was exported without it, or by an older gluon-int8); '
                         'quantize the FP32 network again to get a report')
    data_names = [s.name for s in mxnet_private.cached_graph(qnet)[0]]
    values = {p.name: p.data() for p in qnet.collect_params().values()}
    fp32_values = dict(values)
    fp32_values.update(qnet.fp32_graph.params)
    names = [layer.name for layer in qnet.layers]
    int8_symbol = mxnet_private.cached_graph(qnet)[1]
    int8_keys = output_keys(int8_symbol, names + ['quantized_' + n for n in names])
    carried = _carried_ranges(int8_symbol, names, data_names)
    int8_keys.update(output_keys(int8_symbol, {k[0] for keys in carried.values() for k in keys},
                                 indices=(1, 2)))
    ref_keys = output_keys(qnet.fp32_graph.symbol, names, indices=(0,))
    int8 = Watcher(int8_symbol, list(int8_keys), data_names, values, block_grad=True,
                   per_run=[n for n, (_, idx) in int8_keys.items() if idx > 0])
    ref = Watcher(qnet.fp32_graph.symbol, list(ref_keys), data_names, fp32_values)
    comparison = _Comparison(carried)
    count = examples = 0
    for batch in iter_batches(data, len(data_names), num_batches, num_examples, param='data'):
        with batch_errors('data', count, batch):
            for _, inputs in sub_batches(batch, min(int8.sub_batch(batch), ref.sub_batch(batch))):
                comparison.int8 = {int8_keys[n]: view for n, view in int8.read(inputs)}
                for name, view in ref.read(inputs):
                    comparison.compare(ref_keys[name][0], view)
        count, examples = count + 1, examples + batch[0].shape[0]
    outputs, grans = first_outputs(qnet.fp32_graph.symbol), _granularities(int8_symbol)
    rows = [_row(layer, comparison.sums.get(layer.name),
                 comparison.out_dtypes.get(layer.name, '-'), grans.get(layer.name, '-'),
                 qnet.calib_table, outputs.get(layer.name))
            for layer in qnet.layers]
    missing = [r.name for r in rows if r.sqnr_db is None]
    if missing:
        log.warning('report: no output seen for layers %s', missing)
    log.info('report over %d examples in %d batches: %d layers', examples, count, len(rows))
    return Report(rows, count, examples)
