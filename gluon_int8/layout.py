"""The file layout of an export: every file name of an export prefix, in one place.

An export of a :class:`~gluon_int8.block.QuantizedBlock` to ``prefix`` at ``epoch`` is
one unit of files:

* ``prefix-symbol.json``: the graph. MXNet's layout has one per prefix, shared by every
  epoch (``SymbolBlock.imports`` reads it with any epoch's parameters);
* ``prefix-0000.params``: the parameters of the epoch (``%04d``, as MXNet);
* the sidecar, ``prefix-quantization.json`` for epoch 0 and
  ``prefix-0001-quantization.json`` for epoch 1, ...: calibration table, layer summary,
  and the manifest of the unit (size and checksum of its other files);
* the FP32 reference, ``prefix-fp32.params`` (epoch 0) / ``prefix-0001-fp32.params``,
  only with ``export(..., fp32_reference=True)``;
* ``.<name>.lock`` in the same folder: the lock that exports and loads of the prefix take.

The ONNX export (``export(prefix, format='onnx')``) is one file, ``prefix.onnx``
(``prefix-0001.onnx`` for epoch 1), which carries its calibration table and layer table
in its metadata.

Epoch 0 keeps the names of the time when there was one sidecar per prefix, so exports
made then still load. :mod:`gluon_int8.store` writes and reads these files,
:mod:`gluon_int8.distributed` ships them to its actors; neither spells a name itself.
"""
import glob
import os
import re
from typing import Dict, List

SYMBOL, PARAMS, SIDECAR, FP32 = 'symbol', 'params', 'sidecar', 'fp32'
ONNX = 'onnx'
ONNX_SUFFIX = '.onnx'
MAX_EPOCH = 9999


def check_epoch(epoch) -> int:
    """``epoch`` if it is an int MXNet's four-digit file names can hold, else ValueError."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= MAX_EPOCH:
        raise ValueError('epoch: got %r; expected an int from 0 to %d' % (epoch, MAX_EPOCH))
    return epoch


def symbol_file(prefix: str) -> str:
    """The graph, shared by every epoch of the prefix (MXNet's layout)."""
    return prefix + '-symbol.json'


def params_file(prefix: str, epoch: int = 0) -> str:
    """The parameters of one epoch."""
    return '%s-%04d.params' % (prefix, epoch)


def _per_epoch(prefix: str, epoch: int, suffix: str) -> str:
    return '%s%s%s' % (prefix, '-%04d' % epoch if epoch else '', suffix)


def sidecar_file(prefix: str, epoch: int = 0) -> str:
    """gluon-int8's own description of one epoch's export, with its manifest."""
    return _per_epoch(prefix, epoch, '-quantization.json')


def fp32_file(prefix: str, epoch: int = 0) -> str:
    """The optional FP32 values :meth:`QuantizedBlock.report` compares against."""
    return _per_epoch(prefix, epoch, '-fp32.params')


def onnx_file(prefix: str, epoch: int = 0) -> str:
    """The ONNX QDQ model of one epoch."""
    return _per_epoch(prefix, epoch, ONNX_SUFFIX)


def is_onnx(path: str) -> bool:
    """True for the path of an ONNX file (as opposed to an MXNet export prefix)."""
    return str(path).endswith(ONNX_SUFFIX)


def lock_file(prefix: str) -> str:
    """The lock file of a prefix: hidden, next to the export."""
    folder, name = os.path.split(os.path.abspath(prefix))
    return os.path.join(folder, '.%s.lock' % name)


def export_files(prefix: str, epoch: int = 0) -> Dict[str, str]:
    """Role (``SYMBOL``, ``PARAMS``, ``SIDECAR``, ``FP32``) -> path of every file an
    export to ``prefix`` at ``epoch`` may hold."""
    return {SYMBOL: symbol_file(prefix), PARAMS: params_file(prefix, epoch),
            SIDECAR: sidecar_file(prefix, epoch), FP32: fp32_file(prefix, epoch)}


def epochs(prefix: str) -> List[int]:
    """The epochs that have a parameters file at ``prefix`` (ours or MXNet's)."""
    pattern = glob.escape(prefix) + '-[0-9][0-9][0-9][0-9].params'
    found = (re.search(r'-(\d{4})\.params$', path) for path in glob.glob(pattern))
    return sorted(int(m.group(1)) for m in found if m)
