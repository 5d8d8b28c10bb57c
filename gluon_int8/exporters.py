"""Exporters: one interface, one implementation per file format.

``qnet.export(prefix, format=...)`` picks the exporter of the format. Every exporter reads
the same things off a :class:`~gluon_int8.block.QuantizedBlock`: its graphs, its
calibration table (``qnet.calib_table``) and its per-layer decisions (``qnet.layers``:
dtype, the reason a layer stays FP32, what the plan changed), and writes the files
:mod:`gluon_int8.layout` names, through :mod:`gluon_int8.store` (verified, atomic, under
the prefix's lock).

=========  ====================================================  ===========================
format     files                                                 options
=========  ====================================================  ===========================
'mxnet'    ``prefix-symbol.json``, ``prefix-0000.params``,       ``int8_weights``,
           the sidecar ``prefix-quantization.json``              ``fp32_reference``
'onnx'     ``prefix.onnx``: a QDQ model, opset 13, its table     ``input_shapes``,
           and layer table in the metadata                       ``on_unsupported``,
                                                                 ``weight_bits``
=========  ====================================================  ===========================
"""
import abc
import json
import logging
import os
from typing import Dict, List, Sequence, Tuple

from . import layout, mxnet_private, store, weights
from .sidecar import Sidecar

log = logging.getLogger(__name__)

METADATA_PREFIX = 'gluon_int8.'


class Exporter(abc.ABC):
    """Writes a QuantizedBlock in one file format."""
    format = ''
    options: Tuple[str, ...] = ()

    @abc.abstractmethod
    def files(self, prefix: str, epoch: int = 0) -> List[str]:
        """The paths an export to ``prefix`` at ``epoch`` writes (optional ones too)."""

    @abc.abstractmethod
    def write(self, block, prefix: str, epoch: int = 0, **options) -> List[str]:
        """Export ``block``; return the paths written."""

    def check_options(self, options: Dict[str, object]) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError('export: format=%r takes the options %s; got %s'
                            % (self.format, list(self.options), unknown))


def check_folder(prefix: str) -> None:
    """ValueError unless the folder of ``prefix`` exists and is writable."""
    directory = os.path.dirname(os.path.abspath(prefix))
    if not os.path.isdir(directory):
        raise ValueError('prefix: folder %r of export prefix %r does not exist'
                         % (directory, prefix))
    if not os.access(directory, os.W_OK):
        raise ValueError('prefix: folder %r of export prefix %r is not writable'
                         % (directory, prefix))


# -- MXNet ---------------------------------------------------------------------------------

class MXNetExporter(Exporter):
    """The plain MXNet export: ``SymbolBlock.imports`` loads it, :func:`gluon_int8.load`
    restores the table and layer summary too (see
    :meth:`gluon_int8.block.QuantizedBlock.export`)."""
    format = 'mxnet'
    options = ('int8_weights', 'fp32_reference')

    def files(self, prefix: str, epoch: int = 0) -> List[str]:
        return list(layout.export_files(prefix, epoch).values())

    def write(self, block, prefix: str, epoch: int = 0, int8_weights: bool = True,
              fp32_reference: bool = False) -> List[str]:
        inputs, fast_symbol = mxnet_private.cached_graph(block)
        arg_names = set(fast_symbol.list_arguments())
        data_names = {s.name for s in inputs}
        int8_names = set(block.int8_weight_names if int8_weights else ())
        values = {p.name: mxnet_private.param_value(p) for p in block.collect_params().values()}
        symbol = weights.with_dequantize_nodes(fast_symbol, values, sorted(int8_names))
        params = ({'arg:%s' % k: v for k, v in block.int8_weight_arrays.items()}
                  if int8_weights else {})
        for name, value in values.items():
            kind = 'arg' if name in arg_names else 'aux'
            if name not in data_names and name not in int8_names:
                params['%s:%s' % (kind, name)] = value
        payloads = {layout.SYMBOL: store.canonical_json(symbol), layout.PARAMS: params}
        fp32 = block.fp32_graph if fp32_reference else None
        if fp32 is not None:
            payloads[layout.FP32] = {'arg:%s' % k: v for k, v in fp32.params.items()}
        return store.write_export(prefix, epoch, payloads,
                                  sidecar(block, sorted(int8_names), fp32).to_dict())


def sidecar(block, int8_names: Sequence[str], fp32=None) -> Sidecar:
    """The sidecar of an MXNet export of ``block``: the graph without the dequantize
    nodes (for load() to fold the weights once; without int8 weights the symbol file is
    that graph already), the table, the layer summary, the FP32 graph when asked."""
    inputs, symbol = mxnet_private.cached_graph(block)
    return Sidecar([s.name for s in inputs], block.out_format, list(int8_names),
                   store.canonical_graph(symbol) if int8_names else None,
                   block.calib_table, block.layers,
                   store.canonical_graph(fp32.symbol) if fp32 is not None else None,
                   block.input_shapes)


# -- ONNX ----------------------------------------------------------------------------------

def check_input_shapes(input_shapes, count: int) -> List[Tuple[int, ...]]:
    """``input_shapes``: one shape per network input, without the batch axis."""
    ok = (isinstance(input_shapes, (list, tuple)) and len(input_shapes) == count
          and all(isinstance(s, (list, tuple)) and s and all(
              isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in s)
                  for s in input_shapes))
    if not ok:
        raise ValueError('input_shapes: got %r; expected %d shape(s) without the batch axis, '
                         'e.g. [(3, 224, 224)]' % (input_shapes, count))
    return [tuple(s) for s in input_shapes]


class ONNXExporter(Exporter):
    """A standard QDQ ONNX model (:mod:`gluon_int8.onnx_qdq`) for ONNX Runtime, OpenVINO
    and other runtimes that read QDQ; :func:`gluon_int8.runtimes.load_onnx` runs it
    behind the ``__call__`` of a QuantizedBlock.

    Options: ``input_shapes`` (one per input, without the batch axis, which stays
    dynamic; default: the shapes calibration saw), ``on_unsupported`` ('fp32': an INT8
    layer the ONNX graph cannot hold stays FP32 there, with a warning; 'raise': refused),
    ``weight_bits`` ('auto', 8, 7: 'auto' is 7 on CPUs without VNNI but for depthwise
    convs, see :func:`gluon_int8.onnx_qdq.weight_levels`).
    """
    format = 'onnx'
    options = ('input_shapes', 'on_unsupported', 'weight_bits')

    def files(self, prefix: str, epoch: int = 0) -> List[str]:
        return [layout.onnx_file(prefix, epoch)]

    def write(self, block, prefix: str, epoch: int = 0, input_shapes=None,
              on_unsupported: str = 'fp32', weight_bits='auto') -> List[str]:
        import onnx  # pylint: disable=import-outside-toplevel
        from . import onnx_qdq  # pylint: disable=import-outside-toplevel
        if on_unsupported not in onnx_qdq.ON_UNSUPPORTED:
            raise ValueError('on_unsupported: got %r; expected one of %s'
                             % (on_unsupported, list(onnx_qdq.ON_UNSUPPORTED)))
        if weight_bits not in onnx_qdq.WEIGHT_BITS or isinstance(weight_bits, bool):
            raise ValueError('weight_bits: got %r; expected one of %s'
                             % (weight_bits, list(onnx_qdq.WEIGHT_BITS)))
        onnx_qdq.check_exportable(block)
        names = [s.name for s in mxnet_private.cached_graph(block)[0]]
        shapes = self._shapes(block, input_shapes, len(names))
        model, layers = onnx_qdq.export_model(
            block, {n: (1,) + s for n, s in zip(names, shapes)}, on_unsupported, weight_bits)
        write_metadata(model, {
            'data_names': names, 'out_format': block.out_format, 'input_shapes': shapes,
            'layers': [row.to_dict() for row in layers],
            'calib_table': block.calib_table.to_dict(),
            'weight_levels': onnx_qdq.weight_levels(weight_bits),
            'depthwise_weight_levels': onnx_qdq.weight_levels(weight_bits, depthwise=True)})
        onnx.checker.check_model(model)
        path = store.write_file(prefix, layout.onnx_file(prefix, epoch),
                                model.SerializeToString())
        return [path]

    @staticmethod
    def _shapes(block, input_shapes, count: int) -> List[Tuple[int, ...]]:
        if input_shapes is None:
            input_shapes = block.input_shapes
        if input_shapes is None:
            raise ValueError("input_shapes: the block does not know its input shapes (it was "
                             "quantized from a table, without data); pass "
                             "export(..., format='onnx', input_shapes=[(C, H, W)])")
        return check_input_shapes(input_shapes, count)


def write_metadata(model, entries: Dict[str, object]) -> None:
    """Store JSON ``entries`` in the model's ``metadata_props`` (``gluon_int8.<key>``)."""
    del model.metadata_props[:]
    for key, value in sorted(entries.items()):
        prop = model.metadata_props.add()
        prop.key, prop.value = METADATA_PREFIX + key, json.dumps(value, sort_keys=True)


def read_metadata(model) -> Dict[str, object]:
    """The entries :func:`write_metadata` stored (empty for another producer's model)."""
    found = {}
    for prop in model.metadata_props:
        if prop.key.startswith(METADATA_PREFIX):
            try:
                found[prop.key[len(METADATA_PREFIX):]] = json.loads(prop.value)
            except json.JSONDecodeError as err:
                raise ValueError('the ONNX model\'s metadata %r is not JSON (%s)'
                                 % (prop.key, err)) from err
    return found


EXPORTERS: Dict[str, Exporter] = {e.format: e for e in (MXNetExporter(), ONNXExporter())}


def exporter(format: str) -> Exporter:  # pylint: disable=redefined-builtin
    """The exporter of ``format``; ValueError listing the formats for another name."""
    found = EXPORTERS.get(format) if isinstance(format, str) else None
    if found is None:
        raise ValueError('format: got %r; expected one of %s' % (format, sorted(EXPORTERS)))
    return found


def export(block, prefix, epoch: int = 0, format: str = 'mxnet',  # pylint: disable=redefined-builtin
           **options) -> List[str]:
    """Export ``block`` to ``prefix`` in ``format``; return the paths written."""
    chosen = exporter(format)
    chosen.check_options(options)
    prefix = os.fspath(prefix)
    layout.check_epoch(epoch)
    check_folder(prefix)
    written = chosen.write(block, prefix, epoch, **options)
    log.info('exported INT8 model (%s): %s', format, ', '.join(written))
    return written

