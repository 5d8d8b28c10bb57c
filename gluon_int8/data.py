"""Calibration data: every accepted form of ``calib_data`` -> a stream of input batches.

Accepted: a gluon ``DataLoader`` of ``(data, label)`` tuples, any iterable of NDArray or
numpy batches (or tuples of them), an ``mx.io.DataIter``, a single array (split into
batches of ``DEFAULT_BATCH_SIZE``), or the path of an image folder or a RecordIO ``.rec``
(read by :class:`gluon_int8.datasets.ImageSource` with the ImageNet preprocessing, in
batches of ``DEFAULT_BATCH_SIZE``, shuffled with seed 0; pass an ``ImageSource`` for
other settings). Each batch becomes a tuple of exactly
``num_inputs`` float32 NDArrays: the network's inputs come first in a tuple, what
follows (labels) is dropped. ``num_inputs`` comes from the traced network, never from
trying calls.
"""
import logging
import os
from typing import Iterator, Optional, Tuple

import mxnet as mx
import numpy as np

from .datasets import ImageSource

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32
Batch = Tuple[mx.nd.NDArray, ...]


def _as_input(value, index: int, position: int, param: str) -> mx.nd.NDArray:
    """One network input of one batch as a float32 NDArray, or a clear error."""
    if isinstance(value, np.ndarray):
        dtype = value.dtype
    elif isinstance(value, mx.nd.NDArray):
        dtype = np.dtype(value.dtype)
    else:
        raise TypeError('%s: batch %d input %d is a %s; expected an NDArray or a numpy '
                        'array' % (param, index, position, type(value).__name__))
    if not np.issubdtype(dtype, np.floating):
        raise ValueError('%s: batch %d input %d has dtype %s; the network takes float32 '
                         '(convert and normalize the data as for FP32 inference)'
                         % (param, index, position, dtype))
    if value.ndim == 0 or value.shape[0] == 0:
        raise ValueError('%s: batch %d input %d has shape %s; expected a batch with at '
                         'least one example on axis 0' % (param, index, position, value.shape))
    if isinstance(value, np.ndarray):
        return mx.nd.array(value, dtype=np.float32)
    return value if dtype == np.float32 else value.astype(np.float32)


def _raw_batches(calib_data, param: str) -> Iterator:
    """The batches of ``calib_data`` as they come (array, or tuple/list of arrays)."""
    if isinstance(calib_data, (np.ndarray, mx.nd.NDArray)):
        for start in range(0, calib_data.shape[0], DEFAULT_BATCH_SIZE):
            yield calib_data[start:start + DEFAULT_BATCH_SIZE]
    elif isinstance(calib_data, mx.io.DataIter):
        calib_data.reset()
        for batch in calib_data:
            data = list(batch.data)
            if batch.pad:
                data = [d[:d.shape[0] - batch.pad] for d in data]
            yield data
    elif isinstance(calib_data, (str, os.PathLike)):
        yield from ImageSource(calib_data, batch_size=DEFAULT_BATCH_SIZE, shuffle=True,
                               seed=0, param=param)
    else:
        try:
            iterator = iter(calib_data)
        except TypeError as err:
            raise TypeError('%s: got a %s, which is not iterable; expected a DataLoader, an '
                            'iterable of batches, an mx.io.DataIter or an array'
                            % (param, type(calib_data).__name__)) from err
        yield from iterator


def _check_tuple_of_arrays(calib_data, param: str) -> None:
    """``calib_data=(X, y)`` reads as two batches, X and then y; say so before the
    network meets y, instead of "batch 1 with shapes [(16,)] does not fit"."""
    if not isinstance(calib_data, tuple) or not calib_data or not all(
            isinstance(v, (np.ndarray, mx.nd.NDArray)) for v in calib_data):
        return
    shapes = [tuple(v.shape) for v in calib_data]
    if len({len(s) for s in shapes}) > 1:
        raise ValueError('%s: got a tuple of %d arrays with shapes %s; a tuple or list is read '
                         'as a sequence of batches, each array one batch. For one array of '
                         'examples with its labels pass the array alone (%s=X), a list of '
                         'batches ([(X, y)] for one batch), or a DataLoader'
                         % (param, len(shapes), shapes, param))


def iter_batches(calib_data, num_inputs: int, num_calib_batches: Optional[int] = None,
                 num_calib_examples: Optional[int] = None,
                 param: str = 'calib_data') -> Iterator[Batch]:
    """Yield input batches until the data or the batch/example budget runs out.

    Raises for empty data; warns when fewer batches or examples came than were asked.
    Messages name ``param``, the caller's name for the data.
    """
    _check_tuple_of_arrays(calib_data, param)
    seen_batches = seen_examples = 0
    for index, raw in enumerate(_raw_batches(calib_data, param)):
        if num_calib_batches is not None and seen_batches >= num_calib_batches:
            break
        if num_calib_examples is not None and seen_examples >= num_calib_examples:
            break
        items = list(raw) if isinstance(raw, (tuple, list)) else [raw]
        if len(items) < num_inputs:
            raise ValueError('%s: batch %d holds %d array(s); the network takes %d input(s)'
                             % (param, index, len(items), num_inputs))
        batch = tuple(_as_input(v, index, i, param) for i, v in enumerate(items[:num_inputs]))
        size = batch[0].shape[0]
        if num_calib_examples is not None and seen_examples + size > num_calib_examples:
            keep = num_calib_examples - seen_examples
            batch = tuple(b[:keep] for b in batch)
            size = keep
        seen_batches += 1
        seen_examples += size
        yield batch
    if seen_batches == 0:
        raise ValueError('%s: got no batch; at least one batch of data is needed (for '
                         'calibration, calib_table= reuses saved thresholds instead)' % param)
    if num_calib_batches is not None and seen_batches < num_calib_batches:
        log.warning('%s ran out after %d batch(es); num_calib_batches=%d asked for more. '
                    'Going on with what there is.', param, seen_batches, num_calib_batches)
    if num_calib_examples is not None and seen_examples < num_calib_examples:
        log.warning('%s ran out after %d example(s); num_calib_examples=%d asked for '
                    'more. Going on with what there is.', param, seen_examples,
                    num_calib_examples)
