"""The sidecar of an export: what the plain MXNet files of an INT8 model do not say.

:meth:`QuantizedBlock.export <gluon_int8.block.QuantizedBlock.export>` writes it (through
:mod:`gluon_int8.store`, which adds the manifest and a checksum) and
:func:`gluon_int8.load` reads it back. Every field is checked on the way in: a sidecar
that does not hold what this module writes is refused with a ``ValueError`` naming the
file and the field, never a ``KeyError`` or ``TypeError`` from deep inside, nor an output
format that makes every call recurse forever.
"""
import dataclasses
import json
from typing import List, Optional

import mxnet as mx

from .quantize_graph import LayerInfo
from .errors import first_line
from .table import CalibrationTable

VERSION = 2  # 1: no manifest (read unverified); 2: with manifest and checksum
_LAYER_FIELDS = ('name', 'op', 'dtype', 'reason')
_MAX_NESTING = 32


@dataclasses.dataclass
class Sidecar:
    """The content of a sidecar (``store`` adds ``files`` and ``checksum``)."""
    data_names: List[str]
    out_format: object  # gluon's nested-output format: ints and lists of them, or None
    int8_weights: List[str]
    graph: Optional[dict]  # the INT8 graph without dequantize nodes (int8 weights only)
    calib_table: Optional[CalibrationTable]
    layers: List[LayerInfo]
    fp32_graph: Optional[dict]  # the fused FP32 graph, for report()
    input_shapes: Optional[list] = None  # per input, without the batch axis (ONNX export)

    def to_dict(self) -> dict:
        found = {'format_version': VERSION, 'data_names': list(self.data_names),
                 'out_format': self.out_format, 'int8_weights': list(self.int8_weights),
                 'graph': self.graph,
                 'calib_table': self.calib_table.to_dict() if self.calib_table else None,
                 'layers': [row.to_dict() for row in self.layers],
                 'fp32_graph': self.fp32_graph}
        if self.input_shapes is not None:  # absent, not null: older exports stay identical
            found['input_shapes'] = [list(s) for s in self.input_shapes]
        return found

    @classmethod
    def from_dict(cls, meta: dict, path: str) -> 'Sidecar':
        """The validated sidecar; ValueError naming ``path`` and the bad field."""
        def check(ok: bool, field: str, expected: str) -> None:
            if not ok:
                raise ValueError('prefix: %r is corrupted: its field %r is %s; expected %s'
                                 % (path, field, _shorten(meta.get(field, 'missing')),
                                    expected))
        check(_str_list(meta.get('data_names')) and meta.get('data_names'), 'data_names',
              'a non-empty list of input names')
        check(_valid_out_format(meta.get('out_format')), 'out_format',
              "gluon's output format (None, an int >= 0 or nested lists of them)")
        check(_str_list(meta.get('int8_weights', [])), 'int8_weights', 'a list of names')
        for field in ('graph', 'fp32_graph', 'calib_table'):
            check(meta.get(field) is None or isinstance(meta[field], dict), field,
                  'null or a JSON object')
        check(isinstance(meta.get('layers', []), list)
              and all(_valid_layer(r) for r in meta.get('layers', [])), 'layers',
              'a list of {name, op, dtype, reason, layers}')
        check(meta.get('input_shapes') is None or _valid_shapes(meta['input_shapes']),
              'input_shapes', 'a list of shapes (lists of positive ints)')
        table = meta.get('calib_table')
        return cls(list(meta['data_names']), meta.get('out_format'),
                   list(meta.get('int8_weights', [])), meta.get('graph'),
                   CalibrationTable.from_dict(table, source='prefix: %r' % path)
                   if table else None,
                   [LayerInfo(r['name'], r['op'], r['dtype'], r['reason'], tuple(r['layers']),
                              r.get('note', '') if isinstance(r.get('note', ''), str) else '')
                    for r in meta.get('layers', [])],
                   meta.get('fp32_graph'),
                   [tuple(s) for s in meta['input_shapes']] if meta.get('input_shapes') else None)

    def num_outputs(self) -> Optional[int]:
        """How many flat outputs ``out_format`` regroups (None without a format)."""
        return None if self.out_format is None else _count_outputs(self.out_format)


def graph_symbol(graph: dict, path: str, field: str) -> mx.sym.Symbol:
    """The symbol of a graph stored in the sidecar at ``path``."""
    try:
        return mx.sym.load_json(json.dumps(graph))
    except (mx.base.MXNetError, TypeError, ValueError) as err:
        raise ValueError('prefix: %r is corrupted: its field %r is not an MXNet graph (%s)'
                         % (path, field, first_line(err))) from err


def _shorten(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + '...'


def _str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _valid_shapes(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(s, list) and all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                    for d in s) for s in value)


def _valid_layer(row) -> bool:
    return (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in _LAYER_FIELDS)
            and _str_list(row.get('layers')))


def _valid_out_format(fmt, depth: int = 0) -> bool:
    """gluon's ``_regroup`` recurses into anything iterable: a string would recurse
    forever on every call of the loaded block."""
    if fmt is None and depth == 0:
        return True
    if isinstance(fmt, int) and not isinstance(fmt, bool):
        return fmt >= 0
    return (isinstance(fmt, list) and depth < _MAX_NESTING
            and all(_valid_out_format(f, depth + 1) for f in fmt))


def _count_outputs(fmt) -> int:
    if isinstance(fmt, int):
        return max(fmt, 1)  # 0: a single output, n: a list of n
    return sum(_count_outputs(f) for f in fmt)
