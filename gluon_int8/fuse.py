"""Stage 2, fuse: oneDNN (MKLDNN) operator fusion on the traced FP32 graph.

MXNet's C++ subgraph backends do the fusion: ``MKLDNN`` for FP32 inference (Conv+BN,
Conv+ReLU, Conv+Sum, FC+act) and ``MKLDNN_QUANTIZE`` for a graph about to be quantized
(the same patterns, plus the requantize/dequantize fusion after calibration).

Before fusing, :func:`canonicalize` rewrites ``relu(x)`` (what ``F.relu`` emits) into
``Activation(x, act_type='relu')``: the two are the same function, but the oneDNN
passes only fuse ``Activation``, so a network written with ``F.relu`` would otherwise
keep every ReLU as a separate FP32 op between INT8 layers.
"""
import json

import mxnet as mx

FP32_BACKEND = 'MKLDNN'
QUANTIZE_BACKEND = 'MKLDNN_QUANTIZE'


def canonicalize(symbol: mx.sym.Symbol) -> mx.sym.Symbol:
    """``symbol`` with every ``relu`` op written as ``Activation(act_type='relu')``."""
    graph = json.loads(symbol.tojson())
    changed = False
    for node in graph['nodes']:
        if node['op'] == 'relu':
            node['op'] = 'Activation'
            node['attrs'] = dict(node.get('attrs', {}), act_type='relu')
            changed = True
    return mx.sym.load_json(json.dumps(graph)) if changed else symbol


def fuse(symbol: mx.sym.Symbol, backend: str = QUANTIZE_BACKEND) -> mx.sym.Symbol:
    """Apply the oneDNN fusion passes of ``backend`` to ``symbol``."""
    return canonicalize(symbol).get_backend_symbol(backend)
