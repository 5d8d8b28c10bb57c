"""INT8 weights on disk: per-channel int8 weights plus scales, dequantized in the graph.

oneDNN's quantized conv/FC nodes take FP32 weights and quantize them on first use, so a
plain export stores FP32 weights. To store int8 instead:

* at quantization time every weight ``W`` of an INT8 conv/FC node is rounded once to
  per-output-channel int8: ``q = round(W / s)``, ``s = max|W_c| / 127``; the in-memory
  block runs ``W' = float32(q) * s`` (one extra rounding, at most half a channel step;
  none at all with ``granularity='channel'``, whose own scales are the same);
* the export's graph computes ``W'`` itself: ``broadcast_mul(Cast(W_int8), W_scale)``
  feeds each such node, so plain ``SymbolBlock.imports`` loads the file unchanged and
  gives bit-identical outputs (the same MXNet kernel computes ``W'`` in both places);
* :func:`gluon_int8.load` folds ``W'`` back into constants once, so a loaded block runs as
  fast as the in-memory one instead of dequantizing on every call.
"""
import json
from typing import Dict, List, Mapping, Tuple

import mxnet as mx
import numpy as np

from .op_table import WEIGHT_OPS

INT8_SUFFIX, SCALE_SUFFIX = '_int8', '_scale'


def int8_weight_names(qsym: mx.sym.Symbol, params: Mapping[str, mx.nd.NDArray]) -> List[str]:
    """FP32 weight variables that feed quantized conv/FC nodes."""
    graph = json.loads(qsym.tojson())
    nodes = graph['nodes']
    names = []
    for node in nodes:
        if node['op'] not in WEIGHT_OPS or not node['name'].startswith('quantized_'):
            continue
        for src, _, _ in node['inputs']:
            var = nodes[src]
            if (var['op'] == 'null' and var['name'].endswith('weight') and var['name'] in params
                    and np.dtype(params[var['name']].dtype) == np.float32
                    and var['name'] not in names):
                names.append(var['name'])
    return names


def _dequantize(q: mx.nd.NDArray, scale: mx.nd.NDArray) -> mx.nd.NDArray:
    """The op the exported graph runs, so in-memory and loaded weights agree bit for bit."""
    return mx.nd.broadcast_mul(mx.nd.Cast(q, dtype='float32'), scale)


def quantize_weight(weight: mx.nd.NDArray) -> Tuple[mx.nd.NDArray, mx.nd.NDArray]:
    """Per-output-channel symmetric int8 ``(q, scale)`` of ``weight`` (axis 0)."""
    flat = weight.reshape((weight.shape[0], -1))
    peak = mx.nd.max(mx.nd.abs(flat), axis=1)
    scale = mx.nd.where(peak > 0, peak / 127.0, mx.nd.ones_like(peak))
    scale = scale.reshape((weight.shape[0],) + (1,) * (weight.ndim - 1))
    q = mx.nd.clip(mx.nd.round(mx.nd.broadcast_div(weight, scale)), -127, 127).astype('int8')
    return q, scale


def round_weights(params: Mapping[str, mx.nd.NDArray], names: List[str]):
    """``params`` with each named weight replaced by its int8 round trip, and the int8
    arrays (``<name>_int8``, ``<name>_scale``) the export stores instead."""
    rounded, stored = dict(params), {}
    for name in names:
        q, scale = quantize_weight(params[name])
        rounded[name] = _dequantize(q, scale)
        stored[name + INT8_SUFFIX], stored[name + SCALE_SUFFIX] = q, scale
    return rounded, stored


def with_dequantize_nodes(qsym: mx.sym.Symbol, params: Mapping[str, mx.nd.NDArray],
                          names: List[str]) -> mx.sym.Symbol:
    """``qsym`` whose named weight inputs are computed from int8 copies and scales."""
    replacements = {}
    for name in names:
        shape = params[name].shape
        q = mx.sym.var(name + INT8_SUFFIX, shape=shape, dtype='int8')
        scale = mx.sym.var(name + SCALE_SUFFIX, shape=(shape[0],) + (1,) * (len(shape) - 1))
        # every node named: a generated name (cast0, cast2, ...) counts the Casts made
        # so far in the process, and two exports of one block would differ
        replacements[name] = mx.sym.broadcast_mul(
            mx.sym.Cast(q, dtype='float32', name=name + '_cast'), scale,
            name=name + '_dequantize')
    return qsym(**replacements) if replacements else qsym


def fold(stored: Mapping[str, mx.nd.NDArray], names: List[str]) -> Dict[str, mx.nd.NDArray]:
    """FP32 weights ``W'`` from their stored int8 copies and scales."""
    return {name: _dequantize(stored[name + INT8_SUFFIX], stored[name + SCALE_SUFFIX])
            for name in names}
