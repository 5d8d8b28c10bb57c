"""Stage 5, build: the drop-in INT8 ``QuantizedBlock`` and its export/load.

``QuantizedBlock`` is an ``mx.gluon.SymbolBlock``: same positional inputs and same
(nested) outputs as the network it came from. ``export(prefix)`` writes

* ``prefix-symbol.json`` and ``prefix-0000.params``: plain MXNet loads them with
  ``SymbolBlock.imports`` (the params use gluon's ``arg:``/``aux:`` keys);
* ``prefix-quantization.json``: the calibration table and the per-layer summary, which
  :func:`load` restores;
* ``prefix-fp32.params``: the FP32 values the INT8 graph does not hold, which with the
  fused FP32 graph in the sidecar let a loaded block run :meth:`QuantizedBlock.report`
  (a separate file: plain ``SymbolBlock.imports`` refuses extra parameters).

Every file is written to a temporary name in the target folder and renamed into place,
so a crash mid-write never leaves a half-written model behind.
"""
import json
import logging
import os
from typing import List, Optional, Sequence

import mxnet as mx
from mxnet.gluon import SymbolBlock
from mxnet.gluon.block import _regroup

from . import layout, store, weights
from .quantize_graph import LayerInfo
from .report import FP32Graph, Report, layer_report
from .table import CalibrationTable, _tmp_path, atomic_write_text
from .trace import build_symbol_block

log = logging.getLogger(__name__)

SIDECAR_VERSION = 1


class QuantizedBlock(SymbolBlock):
    """An INT8 network: a SymbolBlock plus its calibration table and layer summary.

    Returned hybridized with ``static_alloc=True, static_shape=True``: at batch 1 that is
    ~10x faster than a dynamic CachedOp for small networks; a new input shape is
    re-planned once and then runs as fast.
    """

    def __init__(self, outputs, inputs, params=None, calib_table: Optional[CalibrationTable] = None,
                 layers: Sequence[LayerInfo] = (), out_format=None, int8_weights=None,
                 fp32_graph: Optional[FP32Graph] = None):
        super().__init__(outputs, inputs, params)
        self.calib_table = calib_table
        self.layers: List[LayerInfo] = list(layers)
        self._user_out_format = out_format
        # '<w>_int8' / '<w>_scale' arrays whose dequantization gives weight <w> exactly
        self._int8_weights = dict(int8_weights or {})
        # the fused FP32 graph this INT8 graph was made from, for report()
        self.fp32_graph = fp32_graph

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
        return _regroup(list(flat), self._user_out_format)

    @property
    def int8_layers(self) -> List[str]:
        """Names of the fused layers that run INT8."""
        return [row.name for row in self.layers if row.dtype == 'int8']

    @property
    def fp32_layers(self) -> dict:
        """Fused layers that stay FP32, mapped to the reason why."""
        return {row.name: row.reason for row in self.layers if row.dtype == 'fp32'}

    def layer_table(self) -> str:
        """The per-layer summary as a plain-text table."""
        width = max([len(r.name) for r in self.layers] + [5])
        lines = ['%-*s  %-28s %-5s %s' % (width, 'layer', 'op', 'dtype', 'why FP32')]
        lines += ['%-*s  %-28s %-5s %s' % (width, r.name, r.op, r.dtype, r.reason)
                  for r in self.layers]
        return '\n'.join(lines)

    def report(self, data, num_batches: Optional[int] = None,
               num_examples: Optional[int] = None) -> Report:
        """Per-layer error of the INT8 outputs against FP32 on ``data`` (SQNR, cosine),
        with dtypes, granularity, ranges and why FP32; see :mod:`gluon_int8.report`."""
        return layer_report(self, data, num_batches, num_examples)

    def export(self, path, epoch=0, remove_amp_cast=True, int8_weights=True,
               fp32_reference=False):
        """Write ``path-symbol.json``, ``path-%04d.params`` and ``path-quantization.json``
        atomically; return the list of written paths.

        With ``int8_weights`` (default) conv/FC weights are stored as int8 plus per-channel
        scales (about a quarter of the FP32 file) and the graph dequantizes them: plain
        ``SymbolBlock.imports`` gives identical outputs but pays that dequantization on
        every call (4.5x slower for ResNet50 at batch 1 here), while
        :func:`gluon_int8.load` folds it away once. ``int8_weights=False`` stores the
        FP32 weights for deployments that must load with plain MXNet at full speed.

        With ``fp32_reference`` ``path-fp32.params`` holds the FP32 values the INT8 graph
        lacks, and the sidecar the fused FP32 graph, so that :meth:`report` works on the
        loaded block. Off by default: it is an FP32 copy of the weights, which a
        deployment export does not want.
        """
        del remove_amp_cast  # the INT8 graph has no AMP casts
        fast_symbol = self._cached_graph[1]
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ValueError('prefix: folder %r of export prefix %r does not exist'
                             % (directory, path))
        if not os.access(directory, os.W_OK):
            raise ValueError('prefix: folder %r of export prefix %r is not writable'
                             % (directory, path))
        arg_names = set(fast_symbol.list_arguments())
        data_names = {s.name for s in self._cached_graph[0]}
        int8_names = set(self.int8_weight_names if int8_weights else ())
        values = {p.name: p._reduce() for p in self.collect_params().values()}
        symbol = weights.with_dequantize_nodes(fast_symbol, values, sorted(int8_names))
        params = {'arg:%s' % k: v for k, v in self._int8_weights.items()} if int8_weights else {}
        for name, value in values.items():
            kind = 'arg' if name in arg_names else 'aux'
            if name not in data_names and name not in int8_names:
                params['%s:%s' % (kind, name)] = value
        files = {layout.symbol_file(path): lambda tmp: atomic_write_text(
                     tmp, store.canonical_json(symbol)),
                 layout.params_file(path, epoch): lambda tmp: mx.nd.save(tmp, params)}
        fp32 = self.fp32_graph if fp32_reference else None
        if fp32 is not None:
            files[layout.fp32_file(path)] = lambda tmp: mx.nd.save(
                tmp, {'arg:%s' % k: v for k, v in fp32.params.items()})
        temps = []
        try:
            for final, write in files.items():
                tmp = _tmp_path(final)
                temps.append(tmp)
                write(tmp)
            for (final, _), tmp in zip(files.items(), temps):
                os.replace(tmp, final)
        except (OSError, mx.base.MXNetError) as err:
            raise ValueError('prefix: cannot write the export %r (%s)' % (path, err)) from err
        finally:
            for tmp in temps:
                if os.path.exists(tmp):
                    os.remove(tmp)
        sidecar = layout.sidecar_file(path)
        atomic_write_text(sidecar, json.dumps(self._sidecar(sorted(int8_names), fp32), indent=1))
        written = list(files) + [sidecar]
        log.info('exported INT8 model: %s', ', '.join(written))
        return written

    def _sidecar(self, int8_names, fp32: Optional[FP32Graph] = None) -> dict:
        return {'format_version': SIDECAR_VERSION,
                'data_names': [s.name for s in self._cached_graph[0]],
                'out_format': self._user_out_format,
                'int8_weights': int8_names,
                # the graph without the dequantize nodes, for load() to fold the weights
                # once; without int8 weights the symbol file is that graph already
                'graph': store.canonical_graph(self._cached_graph[1]) if int8_names else None,
                'calib_table': self.calib_table.to_dict() if self.calib_table else None,
                'layers': [row.to_dict() for row in self.layers],
                'fp32_graph': store.canonical_graph(fp32.symbol) if fp32 is not None else None}


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _read_sidecar(path: str) -> dict:
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError('prefix: %r is truncated or corrupted (%s)' % (path, err)) from err
    if not isinstance(meta, dict) or meta.get('format_version') != SIDECAR_VERSION:
        raise ValueError('prefix: %r is not a gluon-int8 sidecar' % path)
    return meta


def _read_symbol(path: str) -> mx.sym.Symbol:
    try:
        with open(path, 'rb') as f:
            text = f.read().decode('utf-8')
        json.loads(text)
        return mx.sym.load_json(text)
    except (UnicodeDecodeError, json.JSONDecodeError, mx.base.MXNetError) as err:
        raise ValueError('prefix: %r is truncated or corrupted (%s)'
                         % (path, _first_line(err))) from err


def _read_params(path: str) -> dict:
    try:
        saved = mx.nd.load(path)
    except mx.base.MXNetError as err:
        raise ValueError('prefix: %r is truncated or corrupted (%s)'
                         % (path, _first_line(err))) from err
    if not saved:  # mx.nd.save of no arrays loads back as an empty list
        return {}
    if not isinstance(saved, dict):
        raise ValueError('prefix: %r holds no named parameters' % path)
    return {k.split(':', 1)[-1]: v for k, v in saved.items()}


def _read_fp32_graph(prefix: str, meta: dict) -> Optional[FP32Graph]:
    """The FP32 graph of an export (None when it was exported without one)."""
    graph = meta.get('fp32_graph')
    if graph is None:
        return None
    path = layout.fp32_file(prefix)
    if not os.path.isfile(path):
        log.warning('prefix: %r has no file %r; the model loads, but report() needs it',
                    prefix, path)
        return None
    return FP32Graph(mx.sym.load_json(json.dumps(graph)), _read_params(path))


def load(prefix: str, epoch: int = 0) -> QuantizedBlock:
    """Load an export of :meth:`QuantizedBlock.export` with its table and layer summary.

    INT8 weights are dequantized once here (the graph of the sidecar has no dequantize
    nodes), so the loaded block runs as fast as the one ``quantize_net`` returned.
    """
    sym_file, params_file = layout.symbol_file(prefix), layout.params_file(prefix, epoch)
    sidecar_file = layout.sidecar_file(prefix)
    for f in (sym_file, params_file, sidecar_file):
        if not os.path.isfile(f):
            raise ValueError('prefix: %r has no file %r' % (prefix, f))
    meta = _read_sidecar(sidecar_file)
    symbol = _read_symbol(sym_file)
    values = _read_params(params_file)
    int8_names = meta.get('int8_weights') or []
    stored = {k: values.pop(k) for n in int8_names
              for k in (n + weights.INT8_SUFFIX, n + weights.SCALE_SUFFIX) if k in values}
    if int8_names:
        missing = [n for n in int8_names if n + weights.INT8_SUFFIX not in stored]
        if missing:
            raise ValueError('prefix: %r lacks the int8 weights of %s' % (params_file, missing))
        values.update(weights.fold(stored, int8_names))
        symbol = mx.sym.load_json(json.dumps(meta['graph']))
    missing = sorted(set(symbol.list_inputs()) - set(values) - set(meta['data_names']))
    if missing:
        raise ValueError('prefix: %r lacks parameters %s of the graph' % (params_file, missing))
    table = meta.get('calib_table')
    block = build_symbol_block(
        symbol, meta['data_names'], values, {}, cls=QuantizedBlock,
        calib_table=CalibrationTable.from_dict(table, source=sidecar_file) if table else None,
        layers=[LayerInfo(r['name'], r['op'], r['dtype'], r['reason'], tuple(r['layers']))
                for r in meta.get('layers', [])],
        out_format=meta.get('out_format'),  # gluon's format: ints and lists, as JSON keeps them
        int8_weights=stored, fp32_graph=_read_fp32_graph(prefix, meta))
    block.hybridize(static_alloc=True, static_shape=True)
    return block
