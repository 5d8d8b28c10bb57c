"""Stage 1, trace: a Gluon HybridBlock -> (symbol, arg params, aux params) in memory.

The block's ``hybrid_forward`` is run once with symbols, exactly as ``hybridize`` does,
so there is no export to a temporary directory. The block's own cached graph is put back
as it was: tracing leaves the user's block as it found it. The one exception is a block
whose parameters are still waiting for deferred initialization: it needs one real forward
pass to learn its shapes, which initializes those parameters (as any first call would).
"""
import dataclasses
import inspect
from typing import Dict, List, Optional, Sequence

import mxnet as mx
from mxnet.gluon import HybridBlock, SymbolBlock

from . import mxnet_private
from .table import fingerprint


@dataclasses.dataclass
class TracedGraph:
    """A traced network: its symbol, parameters, input names and output structure."""
    symbol: mx.sym.Symbol
    arg_params: Dict[str, mx.nd.NDArray]
    aux_params: Dict[str, mx.nd.NDArray]
    data_names: List[str]
    out_format: object  # gluon's nested-output format, to regroup flat outputs
    _fingerprint: Optional[str] = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def num_inputs(self) -> int:
        return len(self.data_names)

    def fingerprint(self) -> str:
        """:func:`gluon_int8.table.fingerprint` of this network, computed once (it hashes
        every weight)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.symbol, self.arg_params, self.aux_params)
        return self._fingerprint


def count_inputs(block: HybridBlock) -> int:
    """Number of tensor inputs ``block`` requires.

    Read from the block's traced graph when it has one (hybridized blocks that ran, and
    SymbolBlocks), otherwise from the required positional parameters of
    ``hybrid_forward`` after ``F`` (parameters registered on the block are keyword
    arguments and do not count).
    """
    cached = mxnet_private.cached_graph(block)
    if cached:
        return len(cached[0])
    signature = inspect.signature(block.hybrid_forward)
    params = list(signature.parameters.values())[1:]  # drop F
    registered = mxnet_private.registered_params(block)
    required = [p for p in params
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                and p.default is p.empty and p.name not in registered]
    return max(1, len(required))


def _check_initialized(block: HybridBlock) -> bool:
    """True when every parameter has data; False when some wait for deferred init."""
    deferred = False
    for name, param in block.collect_params().items():
        state = mxnet_private.param_state(param)
        if state == 'deferred':
            deferred = True
        elif state == 'empty':
            raise ValueError('block: parameter %r is not initialized; call '
                             'block.initialize() or load its parameters first' % name)
    return not deferred


def trace(block: HybridBlock, sample_inputs: Sequence[mx.nd.NDArray] = None) -> TracedGraph:
    """Trace ``block`` into a :class:`TracedGraph`.

    ``sample_inputs`` (one batch, as NDArrays) is only needed when some parameters still
    wait for deferred initialization.
    """
    num_inputs = count_inputs(block)
    if not _check_initialized(block):
        if sample_inputs is None:
            raise ValueError('block: some parameters wait for deferred initialization and '
                             'no calib_data was given to run one forward pass')
        block(*sample_inputs[:num_inputs])  # finishes the deferred initialization
    placeholders = [mx.sym.var('data%d' % i) for i in range(num_inputs)]
    try:
        inputs, out, out_format = mxnet_private.traced_graph(block, placeholders)
    except Exception as err:  # user code: anything can fail when it meets a Symbol
        raise ValueError('block: %s cannot be hybridized: its hybrid_forward failed on '
                         'symbolic inputs (%s: %s); it may only use F.* operators, no '
                         'NDArray-only calls such as asnumpy(), shape or indexing'
                         % (type(block).__name__, type(err).__name__, err)) from err
    data_names = [sym.name for sym in inputs]
    params = {p.name: p for p in block.collect_params().values()}
    arg_params = {n: params[n].data() for n in out.list_arguments() if n not in data_names}
    aux_params = {n: params[n].data() for n in out.list_auxiliary_states()}
    return TracedGraph(out, arg_params, aux_params, data_names, out_format)


def build_symbol_block(symbol: mx.sym.Symbol, data_names: Sequence[str],
                       arg_params: Dict[str, mx.nd.NDArray],
                       aux_params: Dict[str, mx.nd.NDArray], cls=SymbolBlock, **kwargs):
    """A SymbolBlock (or subclass ``cls``) running ``symbol`` with the given parameters.

    Parameters are copied in memory, never through a file.
    """
    inputs = [mx.sym.var(name, dtype='float32') for name in data_names]
    block = cls(symbol, inputs, **kwargs)
    values = dict(aux_params)
    values.update(arg_params)
    for param in block.collect_params().values():
        param.grad_req = 'null'
        if param.name not in values:
            raise ValueError('graph argument %r has no parameter value' % param.name)
        mxnet_private.load_param(param, values[param.name])
    return block
