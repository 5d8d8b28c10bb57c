"""Stage 5, build: the drop-in INT8 ``QuantizedBlock`` and its export/load.

``QuantizedBlock`` is an ``mx.gluon.SymbolBlock``: same positional inputs and same
(nested) outputs as the network it came from. ``export(prefix, epoch, format=...)``
hands it to an exporter (:mod:`gluon_int8.exporters`: 'mxnet' or 'onnx'); the MXNet
export writes (names in :mod:`gluon_int8.layout`)

* ``prefix-symbol.json`` and ``prefix-0000.params``: plain MXNet loads them with
  ``SymbolBlock.imports`` (the params use gluon's ``arg:``/``aux:`` keys);
* ``prefix-quantization.json`` (one per epoch): the calibration table and the per-layer
  summary, which :func:`load` restores (:mod:`gluon_int8.sidecar`), and the manifest;
* ``prefix-fp32.params``: the FP32 values the INT8 graph does not hold, which with the
  fused FP32 graph in the sidecar let a loaded block run :meth:`QuantizedBlock.report`
  (a separate file: plain ``SymbolBlock.imports`` refuses extra parameters).

The files are one unit (:mod:`gluon_int8.store`): written under a lock, each verified
before any of them replaces a file of the previous export, the sidecar with every
file's checksum written last, and checked against it by :func:`load`.
"""
import json
import logging
import os
from typing import List, Optional, Sequence

import mxnet as mx
from mxnet.gluon import SymbolBlock

from . import exporters, layout, mxnet_private, store, weights
from .errors import first_line
from .quantize_graph import LayerInfo, LayerTable
from .report import FP32Graph, Report, layer_report
from .sidecar import Sidecar, graph_symbol
from .table import CalibrationTable
from .trace import build_symbol_block

log = logging.getLogger(__name__)


class QuantizedBlock(LayerTable, SymbolBlock):
    """An INT8 network: a SymbolBlock plus its calibration table and layer summary.

    Returned hybridized with ``static_alloc=True, static_shape=True``: at batch 1 that is
    ~10x faster than a dynamic CachedOp for small networks; a new input shape is
    re-planned once and then runs as fast.
    """

    def __init__(self, outputs, inputs, params=None, calib_table: Optional[CalibrationTable] = None,
                 layers: Sequence[LayerInfo] = (), out_format=None, int8_weights=None,
                 fp32_graph: Optional[FP32Graph] = None, input_shapes=None):
        super().__init__(outputs, inputs, params)
        self.calib_table = calib_table
        self.layers: List[LayerInfo] = list(layers)
        self._user_out_format = out_format
        # '<w>_int8' / '<w>_scale' arrays whose dequantization gives weight <w> exactly
        self._int8_weights = dict(int8_weights or {})
        # the fused FP32 graph this INT8 graph was made from, for report()
        self.fp32_graph = fp32_graph
        # per INT8 layer: its distance from its FP32 op (gluon_int8.selfcheck.NodeCheck)
        self.self_check: list = []
        # per network input, its shape without the batch axis (as calibration saw it)
        self.input_shapes: Optional[List[tuple]] = (
            [tuple(s) for s in input_shapes] if input_shapes is not None else None)

    @property
    def int8_weight_names(self) -> List[str]:
        """Weights stored as int8 + scale in the export."""
        return sorted(k[:-len(weights.INT8_SUFFIX)] for k in self._int8_weights
                      if k.endswith(weights.INT8_SUFFIX))

    def forward(self, x, *args):
        out = super().forward(x, *args)
        if self._user_out_format is None:
            return out
        flat = out if isinstance(out, (list, tuple)) else [out]
        return mxnet_private.regroup(list(flat), self._user_out_format)

    def report(self, data, num_batches: Optional[int] = None,
               num_examples: Optional[int] = None) -> Report:
        """Per-layer error of the INT8 outputs against FP32 on ``data`` (SQNR, cosine),
        with dtypes, granularity, ranges and why FP32; see :mod:`gluon_int8.report`."""
        return layer_report(self, data, num_batches, num_examples)

    @property
    def out_format(self):
        """gluon's nested-output format of the network (None: as MXNet returns it)."""
        return self._user_out_format

    @property
    def int8_weight_arrays(self) -> dict:
        """``<w>_int8`` / ``<w>_scale`` arrays whose dequantization gives weight ``<w>``."""
        return dict(self._int8_weights)

    def export(self, path, epoch=0, remove_amp_cast=True, format='mxnet', **options):  # pylint: disable=redefined-builtin
        """Export the model; return the list of written paths.

        ``format='mxnet'`` (default) writes ``path-symbol.json``, ``path-%04d.params``
        and the epoch's sidecar as one unit; ``format='onnx'`` writes ``path.onnx``
        (``path-%04d.onnx`` for epoch > 0), a QDQ model for ONNX Runtime or OpenVINO
        (:class:`gluon_int8.exporters.ONNXExporter`: options ``input_shapes``,
        ``on_unsupported``, ``weight_bits``). Both read this block's calibration table and
        layer decisions.

        Every file is verified on disk before any file of a previous export is replaced;
        a failure raises ``OSError`` naming ``path`` and leaves the previous export as it
        was. Exports to one prefix from several processes take turns (a file lock).
        Every epoch shares ``path-symbol.json`` (MXNet's layout): exporting a different
        graph at a new epoch of a prefix that holds other epochs raises ``ValueError``.

        MXNet options: with ``int8_weights=True`` (default) conv/FC weights are stored as
        int8 plus per-channel scales (about a quarter of the FP32 file) and the graph
        dequantizes them: plain ``SymbolBlock.imports`` gives identical outputs but pays
        that dequantization on every call (4.5x slower for ResNet50 at batch 1 here),
        while :func:`gluon_int8.load` folds it away once. ``int8_weights=False`` stores
        the FP32 weights for deployments that must load with plain MXNet at full speed.
        With ``fp32_reference=True`` ``path-fp32.params`` holds the FP32 values the INT8
        graph lacks, and the sidecar the fused FP32 graph, so that :meth:`report` (and an
        ONNX export) works on the loaded block. Off by default: it is an FP32 copy of the
        weights, which a deployment export does not want.
        """
        del remove_amp_cast  # the INT8 graph has no AMP casts
        return exporters.export(self, path, epoch, format, **options)


def _parse_symbol(data: bytes, path: str) -> mx.sym.Symbol:
    try:
        text = data.decode('utf-8')
        json.loads(text)
        return mx.sym.load_json(text)
    except (UnicodeDecodeError, json.JSONDecodeError, mx.base.MXNetError) as err:
        raise ValueError('prefix: %r is truncated or corrupted (%s)'
                         % (path, first_line(err))) from err


def _parse_params(data: bytes, path: str) -> dict:
    try:
        saved = mx.nd.load_frombuffer(data)
    except mx.base.MXNetError as err:
        raise ValueError('prefix: %r is truncated or corrupted (%s)'
                         % (path, first_line(err))) from err
    if not saved:  # mx.nd.save of no arrays loads back as an empty list
        return {}
    if not isinstance(saved, dict):
        raise ValueError('prefix: %r holds no named parameters' % path)
    return {k.split(':', 1)[-1]: v for k, v in saved.items()}


def _fp32_graph(meta: Sidecar, blobs: dict, paths: dict) -> Optional[FP32Graph]:
    """The FP32 graph of an export (None when it was exported without one)."""
    if meta.fp32_graph is None:
        return None
    if layout.FP32 not in blobs:
        log.warning('prefix: no file %r; the model loads, but report() needs it',
                    paths[layout.FP32])
        return None
    return FP32Graph(graph_symbol(meta.fp32_graph, paths[layout.SIDECAR], 'fp32_graph'),
                     _parse_params(blobs[layout.FP32], paths[layout.FP32]))


def _int8_graph(meta: Sidecar, symbol: mx.sym.Symbol, stored: dict, paths: dict):
    """The graph the sidecar describes, checked to be the symbol file's graph without
    its dequantize nodes."""
    graph = graph_symbol(meta.graph, paths[layout.SIDECAR], 'graph')
    shapes = {n: stored[n + weights.INT8_SUFFIX] for n in meta.int8_weights}
    rebuilt = store.canonical_json(weights.with_dequantize_nodes(graph, shapes,
                                                                 meta.int8_weights))
    if rebuilt != store.canonical_json(symbol):
        raise ValueError('prefix: %r is not the graph %r describes (with int8 weights); '
                         'the two files come from different exports'
                         % (paths[layout.SYMBOL], paths[layout.SIDECAR]))
    return graph


def load(prefix: str, epoch: int = 0) -> QuantizedBlock:
    """Load an export of :meth:`QuantizedBlock.export` with its table and layer summary.

    The files are checked against the manifest in the sidecar first: a set whose files
    come from different exports, or were truncated or changed, is refused with a
    ``ValueError`` naming them. INT8 weights are dequantized once here (the graph of the
    sidecar has no dequantize nodes), so the loaded block runs as fast as the one
    ``quantize_net`` returned.
    """
    prefix = os.fspath(prefix)
    layout.check_epoch(epoch)
    paths = layout.export_files(prefix, epoch)
    raw, blobs = store.read_export(prefix, epoch)
    meta = Sidecar.from_dict(raw, paths[layout.SIDECAR])
    symbol = _parse_symbol(blobs[layout.SYMBOL], paths[layout.SYMBOL])
    values = _parse_params(blobs[layout.PARAMS], paths[layout.PARAMS])
    stored = {k: values.pop(k) for n in meta.int8_weights
              for k in (n + weights.INT8_SUFFIX, n + weights.SCALE_SUFFIX) if k in values}
    if meta.int8_weights:
        missing = [n for n in meta.int8_weights if n + weights.INT8_SUFFIX not in stored
                   or n + weights.SCALE_SUFFIX not in stored]
        if missing:
            raise ValueError('prefix: %r lacks the int8 weights of %s'
                             % (paths[layout.PARAMS], missing))
        values.update(weights.fold(stored, meta.int8_weights))
        symbol = _int8_graph(meta, symbol, stored, paths)
    _check_graph_inputs(symbol, values, meta, paths)
    block = build_symbol_block(
        symbol, meta.data_names, values, {}, cls=QuantizedBlock, calib_table=meta.calib_table,
        layers=meta.layers, out_format=meta.out_format, int8_weights=stored,
        fp32_graph=_fp32_graph(meta, blobs, paths), input_shapes=meta.input_shapes)
    block.hybridize(static_alloc=True, static_shape=True)
    return block


def _check_graph_inputs(symbol: mx.sym.Symbol, values: dict, meta: Sidecar, paths: dict):
    unknown = sorted(set(meta.data_names) - set(symbol.list_inputs()))
    if unknown:
        raise ValueError('prefix: %r names inputs %s that the graph does not have'
                         % (paths[layout.SIDECAR], unknown))
    missing = sorted(set(symbol.list_inputs()) - set(values) - set(meta.data_names))
    if missing:
        raise ValueError('prefix: %r lacks parameters %s of the graph'
                         % (paths[layout.PARAMS], missing))
    count = meta.num_outputs()
    if count is not None and count != len(symbol.list_outputs()):
        raise ValueError('prefix: %r describes %d outputs; the graph has %d'
                         % (paths[layout.SIDECAR], count, len(symbol.list_outputs())))
