"""Every use of MXNet 1.9.1's private API, in one place.

gluon-int8 needs a few things MXNet keeps behind underscores: the C calls of its
quantization passes (``_LIB.MXQuantizeSymbol``, ``MXSetCalibTableToQuantizedSymbol``),
the address of an NDArray's memory (``MXNDArrayGetData``), a Gluon block's traced graph
(``_get_graph``, ``_cached_graph``, ``_in_format``/``_out_format``, ``_reg_params``), the
state of its parameters (``_deferred_init``, ``_data``, ``_load_init``, ``_reduce``),
gluon's output regrouping (``_regroup``), a BatchNorm's constructor arguments
(``_kwargs``) and the ONNX converter's graph builder (``MXNetGraph``). Each is wrapped here by a function with
a plain signature, so the rest of the package uses public names only and a new MXNet
version has one module to check.
"""
import ctypes
from typing import List, Mapping, Sequence, Tuple

import mxnet as mx
from mxnet.base import (SymbolHandle, _LIB, c_array, c_str, c_str_array,
                        check_call, mx_uint, py_str)
from mxnet.gluon.block import _regroup

# -- C API: the quantization passes --------------------------------------------------------


def quantize_symbol(symbol: mx.sym.Symbol, excluded_names: Sequence[str],
                    offline_params: Sequence[str], quantized_dtype: str, quantize_mode: str,
                    granularity: str) -> Tuple[mx.sym.Symbol, List[str]]:
    """``MXQuantizeSymbol``: the INT8 symbol and the names of the tensors that need a
    calibrated range. ``granularity`` in MXNet's spelling ('tensor-wise', 'channel-wise')."""
    out = SymbolHandle()
    num_calib = mx_uint()
    calib_names = ctypes.POINTER(ctypes.c_char_p)()
    offline = [c_str(name) for name in offline_params]
    check_call(_LIB.MXQuantizeSymbol(
        symbol.handle, ctypes.byref(out), ctypes.byref(ctypes.c_int(mx.cpu().device_typeid)),
        mx_uint(len(excluded_names)), c_str_array(list(excluded_names)),
        mx_uint(0), c_str_array([]),
        mx_uint(len(offline)), c_array(ctypes.c_char_p, offline),
        c_str(quantized_dtype), ctypes.c_bool(True), c_str(quantize_mode),
        c_str(granularity), ctypes.byref(num_calib), ctypes.byref(calib_names)))
    layers = [py_str(calib_names[i]) for i in range(num_calib.value)]
    return mx.sym.Symbol(out), layers


def set_calib_table(qsym: mx.sym.Symbol, names: Sequence[str], lows: Sequence[float],
                    highs: Sequence[float]) -> mx.sym.Symbol:
    """``MXSetCalibTableToQuantizedSymbol``: ``qsym`` with the ranges written in."""
    calibrated = SymbolHandle()
    check_call(_LIB.MXSetCalibTableToQuantizedSymbol(
        qsym.handle, mx_uint(len(names)), c_str_array(list(names)),
        c_array(ctypes.c_float, list(lows)), c_array(ctypes.c_float, list(highs)),
        ctypes.byref(calibrated)))
    return mx.sym.Symbol(calibrated)


# -- memory --------------------------------------------------------------------------------

def data_pointer(arr: mx.nd.NDArray) -> int:
    """The address of a CPU NDArray's memory (valid while MXNet does not write it)."""
    pointer = ctypes.c_void_p()
    check_call(_LIB.MXNDArrayGetData(arr.handle, ctypes.byref(pointer)))
    return pointer.value


# -- Gluon blocks --------------------------------------------------------------------------

def cached_graph(block) -> Tuple[list, mx.sym.Symbol]:
    """``(input symbols, output symbol)`` a hybridized block ran, or ``()`` if none yet."""
    return block._cached_graph  # pylint: disable=protected-access


def traced_graph(block, placeholders: Sequence[mx.sym.Symbol]):
    """Run ``block``'s ``hybrid_forward`` on symbols: ``(inputs, output symbol, output
    format)``, with the block's own cached graph and formats put back as they were."""
    saved = (block._cached_graph, block._in_format, block._out_format)  # pylint: disable=protected-access
    try:
        inputs, out = block._get_graph(*placeholders)  # pylint: disable=protected-access
        return inputs, out, block._out_format  # pylint: disable=protected-access
    finally:
        if not saved[0]:
            block._cached_graph, block._in_format, block._out_format = saved  # pylint: disable=protected-access


def registered_params(block) -> set:
    """Names of the parameters registered on the block itself (keyword arguments of its
    ``hybrid_forward``)."""
    return set(block._reg_params)  # pylint: disable=protected-access


def param_state(param) -> str:
    """'deferred' (waits for deferred initialization), 'empty' (no data, not deferred)
    or 'ready'."""
    if param._deferred_init:  # pylint: disable=protected-access
        return 'deferred'
    return 'empty' if param._data is None else 'ready'  # pylint: disable=protected-access


def load_param(param, value: mx.nd.NDArray) -> None:
    """Set a parameter's value in memory, cast to its dtype, on the CPU."""
    param._load_init(value, mx.cpu(), cast_dtype=True, dtype_source='saved')  # pylint: disable=protected-access


def param_value(param) -> mx.nd.NDArray:
    """A parameter's value (reduced over its contexts)."""
    return param._reduce()  # pylint: disable=protected-access


def regroup(flat: list, out_format):
    """gluon's regrouping of flat outputs into the network's nested format."""
    return _regroup(flat, out_format)


def batchnorm_axis(block) -> int:
    """The channel axis a gluon ``nn.BatchNorm`` was built with."""
    return block._kwargs.get('axis', 1)  # pylint: disable=protected-access


# -- ONNX ----------------------------------------------------------------------------------

def onnx_converters(opset: int) -> frozenset:
    """The MXNet ops ``mx.onnx`` can convert at ``opset``."""
    from mxnet.onnx.mx2onnx._export_onnx import MXNetGraph  # pylint: disable=import-outside-toplevel
    return frozenset(op for version in range(opset, 11, -1)
                     for op in MXNetGraph.registry_.get(version, {}))  # pylint: disable=protected-access


def onnx_graph_proto(symbol: mx.sym.Symbol, params: Mapping[str, mx.nd.NDArray],
               in_shapes: Sequence[tuple], opset: int, dynamic_shapes: Sequence[tuple]):
    """``mx.onnx``'s GraphProto of ``symbol``, converted for ``opset`` in memory (its
    public ``export_model`` writes a file and converts for the ``onnx`` package's newest
    opset, which its converters are not written for)."""
    import onnx  # pylint: disable=import-outside-toplevel
    from mxnet.onnx.mx2onnx._export_onnx import MXNetGraph  # pylint: disable=import-outside-toplevel
    types = [onnx.TensorProto.FLOAT] * len(in_shapes)
    return MXNetGraph().create_onnx_graph_proto(
        symbol, dict(params), [tuple(s) for s in in_shapes], types, opset_version=opset,
        dynamic=True, dynamic_input_shapes=[tuple(s) for s in dynamic_shapes])
