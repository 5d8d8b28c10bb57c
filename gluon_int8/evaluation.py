"""Classification accuracy of a network, FP32 or INT8, on labelled data.

    result = evaluate(load_model('model/cq_resnet50'), 'val/', metrics='top1,top5')
    result.accuracy   # {'top1': 0.761, 'top5': 0.929}

``data`` is an image folder (class-per-subfolder) or a RecordIO ``.rec`` (read by
:class:`gluon_int8.datasets.ImageSource` in file order, with ``preprocess``), an
``ImageSource``, ``(images, labels)`` arrays, or any iterable of ``(data, label)``
batches. Top-k counts an image as correct when its label is among the k highest scores
of the first output, ties going to the lower class id (a stable sort, as
``gluon_int8.distributed``). :func:`load_model` loads any MXNet export: a gluon-int8
INT8 export with its sidecar, or a plain FP32 ``prefix-symbol.json`` +
``prefix-0000.params``, so FP32 and INT8 are evaluated the same way.
"""
import dataclasses
import itertools
import os
import re
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import mxnet as mx
import numpy as np
from tqdm import tqdm

from . import layout
from .datasets import IMAGENET, ImageSource, Preprocess

_METRIC = re.compile(r'^top([1-9][0-9]*)$')


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Accuracy per metric (a fraction in [0, 1]), over ``num_images`` images;
    ``skipped``: the unreadable images left out, as ``(path, reason)``."""
    accuracy: Dict[str, float]
    num_images: int
    skipped: Tuple[Tuple[str, str], ...] = ()


def parse_metrics(metrics: Union[str, Sequence[str]]) -> Dict[str, int]:
    """``'top1,top5'`` (or a list of names) -> ``{'top1': 1, 'top5': 5}``."""
    names = metrics.split(',') if isinstance(metrics, str) else list(metrics)
    parsed = {}
    for name in (n.strip() for n in names):
        match = _METRIC.match(name)
        if not match:
            raise ValueError('metric: got %r; expected top1, top5 or topK for any K >= 1, '
                             'comma-separated' % (name,))
        parsed[name] = int(match.group(1))
    if not parsed:
        raise ValueError('metric: got %r; expected at least one of top1, top5, topK'
                         % (metrics,))
    return parsed


def load_model(prefix: str, epoch: int = 0, runtime: str = 'onnxruntime'):
    """An export as a block: :func:`gluon_int8.load` when the gluon-int8 sidecar
    ``prefix-quantization.json`` is there, else plain ``SymbolBlock.imports`` of
    ``prefix-symbol.json`` + ``prefix-%04d.params`` (inputs: the symbol's inputs that are
    not parameters), hybridized with ``static_alloc`` and ``static_shape`` either way;
    an ONNX file (``*.onnx``) on ``runtime`` (:func:`gluon_int8.runtimes.load_onnx`)."""
    from .block import load  # pylint: disable=import-outside-toplevel
    if layout.is_onnx(prefix):
        from .runtimes import load_onnx  # pylint: disable=import-outside-toplevel
        return load_onnx(prefix, runtime)
    if os.path.isfile(layout.sidecar_file(prefix, epoch)):
        return load(prefix, epoch)
    symbol_file, params_file = layout.symbol_file(prefix), layout.params_file(prefix, epoch)
    for path in (symbol_file, params_file):
        if not os.path.isfile(path):
            raise ValueError('prefix: %r has no file %r; expected an MXNet export '
                             '(prefix-symbol.json + prefix-%04d.params)' % (prefix, path, epoch))
    known = {k.split(':', 1)[-1] for k in mx.nd.load(params_file)}
    inputs = [n for n in mx.sym.load(symbol_file).list_inputs() if n not in known]
    block = mx.gluon.SymbolBlock.imports(symbol_file, inputs, params_file)
    block.hybridize(static_alloc=True, static_shape=True)
    return block


def _array_batches(images, labels, batch_size: int) -> Iterable[tuple]:
    images = images.asnumpy() if isinstance(images, mx.nd.NDArray) else np.asarray(images)
    labels = labels.asnumpy() if isinstance(labels, mx.nd.NDArray) else np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError('data: labels have shape %s for %d images; expected one class id '
                         'per image' % (labels.shape, images.shape[0]))
    return [(images[i:i + batch_size], labels[i:i + batch_size])
            for i in range(0, len(labels), batch_size)]


def _batches(data, batch_size: int, preprocess: Preprocess, bad_images: str):
    """(iterable of (data, label) batches, number of batches or None)."""
    if isinstance(data, (str, os.PathLike)):
        data = ImageSource(data, preprocess, batch_size, bad_images=bad_images)
    if isinstance(data, ImageSource):
        if not data.has_labels:
            raise ValueError('data: %r is a flat folder of images, which has no labels; '
                             'evaluation needs one subfolder per class (or a .rec)'
                             % (data.path,))
        return data, data.num_batches
    if (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(v, (np.ndarray, mx.nd.NDArray)) for v in data)):
        batches = _array_batches(data[0], data[1], batch_size)
        return batches, len(batches)
    return data, (len(data) if hasattr(data, '__len__') else None)


def _hits(logits: np.ndarray, labels: np.ndarray, ks: Dict[str, int]) -> Dict[str, int]:
    """Images of the batch whose label is among the k best classes, per metric."""
    best = np.argsort(-logits, axis=1, kind='stable')[:, :max(ks.values())]
    found = best == labels.astype(np.int64).reshape(-1, 1)
    return {name: int(found[:, :k].any(axis=1).sum()) for name, k in ks.items()}


def _as_numpy(value) -> np.ndarray:
    return value.asnumpy() if isinstance(value, mx.nd.NDArray) else np.asarray(value)


def evaluate(net, data, metrics: Union[str, Sequence[str]] = 'top1', batch_size: int = 32,
             preprocess: Preprocess = IMAGENET, bad_images: str = 'skip',
             num_batches: Optional[int] = None, progress: bool = False) -> Evaluation:
    """Top-k accuracy of ``net`` (any callable block) on labelled ``data``.

    ``batch_size``, ``preprocess`` and ``bad_images`` apply where ``data`` is a path
    (``batch_size`` also to ``(images, labels)`` arrays); ``num_batches`` stops early;
    ``progress`` shows a tqdm bar.
    """
    ks = parse_metrics(metrics)
    if num_batches is not None and (isinstance(num_batches, bool)
                                    or not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError('num_batches: got %r; expected a positive int or None'
                         % (num_batches,))
    batches, total = _batches(data, batch_size, preprocess, bad_images)
    if num_batches is not None:
        total = num_batches if total is None else min(total, num_batches)
    hits, count = dict.fromkeys(ks, 0), 0
    for index, batch in enumerate(tqdm(itertools.islice(batches, num_batches), total=total,
                                       desc='evaluate', unit='batch', disable=not progress,
                                       leave=False)):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError('data: batch %d is not a (data, label) pair; evaluation needs '
                             'labels' % index)
        x = batch[0] if isinstance(batch[0], mx.nd.NDArray) else mx.nd.array(batch[0])
        out = net(x)
        logits = _as_numpy(out[0] if isinstance(out, (list, tuple)) else out)
        for name, n in _hits(logits, _as_numpy(batch[1]), ks).items():
            hits[name] += n
        count += logits.shape[0]
    if count == 0:
        raise ValueError('data: got no image; evaluation needs at least one')
    skipped = tuple(batches.skipped) if isinstance(batches, ImageSource) else ()
    return Evaluation({name: hits[name] / count for name in ks}, count, skipped)
