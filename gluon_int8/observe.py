"""Reading tensors from inside a graph: one forward pass of a graph whose outputs are them.

Calibration (every tensor that needs a range), the per-layer report (the layers of an
INT8 graph and of its FP32 graph), ``tune`` (through calibration) and the self-check all
read tensors from inside a graph, and all read them the same way:

* the graph is cut to a symbol whose outputs are copies of exactly the wanted tensors
  (:func:`watch_symbol`). A full ``slice`` makes the copy: oneDNN reorders each tensor
  out of its blocked layout straight into it, in one pass, and no in-place kernel of
  the graph (an INT8 ReLU writes over its input) can touch it before it is read;
* graphs with INT8 ops put a ``BlockGrad`` after each output: a CachedOp builds a
  backward graph even for inference, and MXNet's INT8 add and activation have none;
* it runs as a SymbolBlock, never an executor: ``bind`` would apply MXNet's default
  MKLDNN subgraph pass to the (already fused or quantized) graph again;
* for data (:class:`Watcher`) the block is static (``static_alloc``, ``static_shape``):
  its memory is planned once, and oneDNN's primitives run bulked, without a stop per
  tensor. A batch is read in sub-batches when its tensors would take more than
  ``max_bytes``, so memory is bounded whatever the batch size and flat in the number
  of batches;
* each output is read where MXNet wrote it (:func:`host_view`, no copy), until the
  next run.

This replaced op hooks (``register_op_hook``): they make MXNet's CachedOp run op by op,
stop at every output, and each output was copied out of oneDNN's layout on its own
into fresh memory (``asnumpy``), which cost about as much again as the forward pass
(README, "Calibration speed").
"""
import contextlib
import ctypes
import ctypes.util
import logging
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from . import mxnet_private
from .errors import first_line
from .trace import build_symbol_block

log = logging.getLogger(__name__)

# bytes of watched tensors one sub-batch may hold (the block holds about twice that: the
# outputs, and MXNet's temporary reorders out of oneDNN's blocked layout). Against 256 MB,
# ResNet50's calibration pass (64 images) grew the peak RSS by 260-280 MB less and took 5%
# longer (3.85 against 3.68 s, medians of three fresh processes); MobileNet and
# InceptionV3 took the same time (README, "Calibration speed")
MAX_BYTES = 128 << 20


def watch_symbol(symbol: mx.sym.Symbol, names: Sequence[str],
                 block_grad: bool = False) -> mx.sym.Symbol:
    """A symbol whose outputs are copies of the internal tensors ``names`` of ``symbol``,
    in plain (not oneDNN-blocked) layout, each in a buffer of its own
    (:func:`copied`); ``block_grad`` puts a ``BlockGrad`` after each, for graphs with ops
    that have no gradient (INT8)."""
    internals = symbol.get_internals()
    position = {name: i for i, name in enumerate(internals.list_outputs())}
    outputs = []
    for name in names:  # by position: indexing by name searches every output's name
        tensor = copied(internals[position[name]])
        outputs.append(mx.sym.BlockGrad(tensor) if block_grad else tensor)
    return mx.sym.Group(outputs)


def copied(tensor: mx.sym.Symbol) -> mx.sym.Symbol:
    """A copy of ``tensor`` in its own dtype: a full ``slice``, into which oneDNN reorders
    the tensor out of its blocked layout in one pass."""
    return mx.sym.slice(tensor, begin=(None,), end=(None,))


def _block(group: mx.sym.Symbol, data_names: Sequence[str], params: Mapping[str, mx.nd.NDArray]):
    needed = set(group.list_arguments()) | set(group.list_auxiliary_states())
    return build_symbol_block(group, data_names, {k: v for k, v in params.items() if k in needed},
                              {})


def run_outputs(symbol: mx.sym.Symbol, wanted: Optional[List[str]], data_names: Sequence[str],
                inputs, params, copy: bool = False) -> List[np.ndarray]:
    """Outputs of ``symbol`` (its internals named ``wanted``, or all its outputs) for one
    forward pass, as numpy arrays; for one-off passes over graphs of any kind.

    Every output passes a ``BlockGrad``; with ``copy`` it is first copied
    (:func:`copied`), so that no in-place kernel of the graph can write over it."""
    if wanted is not None:
        internals = symbol.get_internals()
        position = {name: i for i, name in enumerate(internals.list_outputs())}
        group = watch_symbol(symbol, wanted, block_grad=True) if copy else \
            mx.sym.Group([mx.sym.BlockGrad(internals[position[w]]) for w in wanted])
    else:
        group = mx.sym.Group([mx.sym.BlockGrad(copied(o) if copy else o) for o in symbol])
    out = _block(group, data_names, params)(*inputs)
    return [o.asnumpy() for o in (out if isinstance(out, (list, tuple)) else [out])]


class _Memory:
    """An NDArray's memory as numpy sees it (``__array_interface__``); holding the
    NDArray keeps MXNet from freeing the memory while a view of it lives."""

    def __init__(self, arr: mx.nd.NDArray, pointer: int, shape, dtype: np.dtype):
        self.arr = arr
        self.__array_interface__ = {'data': (pointer, True), 'shape': tuple(shape),
                                    'typestr': dtype.str, 'version': 3}


def host_view(arr: mx.nd.NDArray, shape: Optional[Tuple[int, ...]] = None,
              dtype=None) -> np.ndarray:
    """A read-only numpy view of a CPU NDArray's memory, once it is ready (no copy).

    Valid until MXNet writes the array again (for a :class:`Watcher`: its next run).
    ``shape`` and ``dtype``, when known, save asking MXNet for them."""
    arr.wait_to_read()
    shape = tuple(arr.shape) if shape is None else shape
    dtype = np.dtype(arr.dtype if dtype is None else dtype)
    if int(np.prod(shape)) == 0:
        return np.empty(shape, dtype)
    view = np.asarray(_Memory(arr, mxnet_private.data_pointer(arr), shape, dtype))
    view.flags.writeable = False
    return view


@contextlib.contextmanager
def batch_errors(param: str, index: int, batch: Sequence[mx.nd.NDArray]):
    """MXNet failing on a batch -> ValueError naming batch ``index`` of ``param``."""
    try:
        yield
    except mx.base.MXNetError as err:
        raise ValueError('%s: batch %d with shapes %s does not fit the network: %s'
                         % (param, index, [tuple(b.shape) for b in batch],
                            first_line(err))) from err


class Watcher:
    """Runs ``symbol`` on data and returns its tensors ``names``, batch by batch, in
    sub-batches of at most ``max_bytes`` of watched tensors (see the module docstring).

    A batch is split only when every watched tensor is laid out example by example along
    axis 0 (its shape scales with the batch), so that the parts of a tensor are the
    tensor; tensors in ``per_run`` (an INT8 node's min/max) are exempt: they are read
    with the data of the same run."""

    def __init__(self, symbol: mx.sym.Symbol, names: Sequence[str], data_names: Sequence[str],
                 params: Mapping[str, mx.nd.NDArray], block_grad: bool = False,
                 max_bytes: int = MAX_BYTES, per_run: Sequence[str] = ()):
        self.names = list(names)
        self.per_run = set(per_run)  # tensors of one value per run (a range): not split
        self.data_names = list(data_names)
        self.max_bytes = max_bytes
        # with nothing to watch, the graph still runs (a batch that does not fit fails)
        self.symbol = watch_symbol(symbol, self.names, block_grad=block_grad) if self.names \
            else symbol
        self.block = _block(self.symbol, data_names, params)
        self.block.hybridize(static_alloc=True, static_shape=True)
        self._split_cache: Dict[Tuple, int] = {}
        self._meta: Dict[Tuple, List[Tuple[Tuple[int, ...], np.dtype]]] = {}

    def sub_batch(self, batch: Sequence[mx.nd.NDArray]) -> int:
        """Examples per sub-batch for ``batch`` (its whole size when it fits the budget,
        or when some watched tensor is not laid out example by example on axis 0)."""
        shapes = tuple(tuple(b.shape) for b in batch)
        if shapes not in self._split_cache:
            self._split_cache[shapes] = self._plan(shapes)
        return self._split_cache[shapes]

    def _plan(self, shapes: Tuple[Tuple[int, ...], ...]) -> int:
        size = shapes[0][0]
        if size <= 1 or any(s[0] != size for s in shapes):
            return size
        whole = self._outputs(shapes)
        single = self._outputs(tuple((1,) + s[1:] for s in shapes))
        if whole is None or single is None or any(
                n not in self.per_run and (w[1:] != s[1:] or w[0] != s[0] * size)
                for n, (w, _), (s, _) in zip(self.names, whole, single)):
            return size  # a tensor not laid out example by example: read batches whole
        per_example = sum(int(np.prod(s)) * t.itemsize for s, t in single)
        fits = max(1, self.max_bytes // max(per_example, 1))
        return _even_split(size, fits)

    def _outputs(self, shapes) -> Optional[List[Tuple[Tuple[int, ...], np.dtype]]]:
        """(shape, dtype) of every watched tensor for inputs of ``shapes`` (None when
        MXNet cannot infer them: the forward pass will report it, naming the batch)."""
        if shapes not in self._meta:
            try:
                out_shapes = self.symbol.infer_shape(**dict(zip(self.data_names, shapes)))[1]
            except mx.base.MXNetError:
                return None
            out_types = self.symbol.infer_type(**{n: 'float32' for n in self.data_names})[1]
            self._meta[shapes] = [(tuple(s), np.dtype(t)) for s, t in zip(out_shapes, out_types)]
        return self._meta[shapes]

    def run(self, inputs: Sequence[mx.nd.NDArray]) -> List[mx.nd.NDArray]:
        """Start one forward pass on ``inputs``; the watched tensors, in ``names`` order
        (read each with :func:`host_view`, before the next run)."""
        out = self.block(*inputs)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def read(self, inputs: Sequence[mx.nd.NDArray]) -> Iterator[Tuple[str, np.ndarray]]:
        """One forward pass on ``inputs``: (name, read-only view) of each watched tensor
        as soon as it is ready, in graph order; the views are valid until the next run."""
        outputs = self.run(inputs)
        meta = self._outputs(tuple(tuple(b.shape) for b in inputs)) or [(None, None)] * len(outputs)
        for out in outputs[len(self.names):]:  # the graph's own outputs, when nothing is watched
            out.wait_to_read()
        for name, out, (shape, dtype) in zip(self.names, outputs, meta):
            yield name, host_view(out, shape, dtype)


def release_memory() -> None:
    """Give the memory freed so far back to the OS, once MXNet has freed what it was done
    with. glibc keeps freed blocks of a few MB (activations) on its heap, so the memory of
    a pass stayed in the process after it and each stage of ``quantize_net`` added its
    peak on top of the ones before (ResNet50: 1.3 GB still held once it returned).
    Nothing happens where the C library has no ``malloc_trim`` (not glibc)."""
    mx.nd.waitall()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _malloc_trim():
    name = ctypes.util.find_library('c')
    return getattr(ctypes.CDLL(name), 'malloc_trim', None) if name else None


_MALLOC_TRIM = _malloc_trim()


def in_budget(items: Sequence, size, budget: int, key=None) -> List[list]:
    """``items`` in consecutive groups whose ``size(item)`` add up to at most ``budget`` (an
    item larger than the budget forms a group alone). Items of one ``key`` within a group
    share what they read: only the first counts."""
    groups, current, total, seen = [], [], 0, set()
    for item in items:
        tag = None if key is None else key(item)
        n = 0 if tag is not None and tag in seen else size(item)
        if current and total + n > budget:
            groups.append(current)
            current, total, seen = [], 0, set()
            n = size(item)
        current.append(item)
        seen.add(tag)
        total += n
    return groups + ([current] if current else [])


def _even_split(size: int, fits: int) -> int:
    """Examples per part: at most ``fits``, as even as can be (a static block replans its
    memory on every new shape): a divisor of ``size`` when one is close to ``fits``."""
    if fits >= size:
        return size
    divisor = max(d for d in range(1, fits + 1) if size % d == 0)
    return divisor if 2 * divisor > fits else -(-size // -(-size // fits))


def sub_batches(batch: Sequence[mx.nd.NDArray], size: int
                ) -> Iterator[Tuple[int, Tuple[mx.nd.NDArray, ...]]]:
    """(first example, inputs) of each part of ``batch`` of at most ``size`` examples."""
    total = batch[0].shape[0]
    if size >= total:
        yield 0, tuple(batch)
        return
    for start in range(0, total, size):
        yield start, tuple(b[start:start + size] for b in batch)


__all__: List[str] = ['Watcher', 'watch_symbol', 'run_outputs', 'host_view', 'batch_errors',
                      'in_budget', 'release_memory',
                      'sub_batches', 'MAX_BYTES']
