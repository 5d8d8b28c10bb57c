"""The file layout of an export: every file name of an export prefix, in one place.

An export of a :class:`~gluon_int8.block.QuantizedBlock` to ``prefix`` is:

* ``prefix-symbol.json``: the graph (MXNet's name, read by ``SymbolBlock.imports``);
* ``prefix-0000.params``: the parameters, one file per epoch (``%04d``, as MXNet);
* ``prefix-quantization.json``: the sidecar (calibration table, layer summary);
* ``prefix-fp32.params``: the FP32 reference values, only with ``fp32_reference=True``.

:mod:`gluon_int8.block` writes and reads these files, :mod:`gluon_int8.distributed`
ships them to its actors; neither spells a file name itself.
"""
from typing import Dict

SYMBOL, PARAMS, SIDECAR, FP32 = 'symbol', 'params', 'sidecar', 'fp32'


def symbol_file(prefix: str) -> str:
    """The graph, shared by every epoch of the prefix (MXNet's layout)."""
    return prefix + '-symbol.json'


def params_file(prefix: str, epoch: int = 0) -> str:
    """The parameters of one epoch."""
    return '%s-%04d.params' % (prefix, epoch)


def sidecar_file(prefix: str) -> str:
    """gluon-int8's own description of the export."""
    return prefix + '-quantization.json'


def fp32_file(prefix: str) -> str:
    """The optional FP32 values :meth:`QuantizedBlock.report` compares against."""
    return prefix + '-fp32.params'


def export_files(prefix: str, epoch: int = 0) -> Dict[str, str]:
    """Role (``SYMBOL``, ``PARAMS``, ``SIDECAR``, ``FP32``) -> path of every file an
    export to ``prefix`` at ``epoch`` may hold."""
    return {SYMBOL: symbol_file(prefix), PARAMS: params_file(prefix, epoch),
            SIDECAR: sidecar_file(prefix), FP32: fp32_file(prefix)}
