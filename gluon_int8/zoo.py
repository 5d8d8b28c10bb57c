"""GluonCV model zoo in one line: ``gluon_int8.zoo.get_model(name, quantized=True, ...)``.

Wraps ``gluoncv.model_zoo.get_model`` and applies a per-family preset: the input shape,
the preprocessing of images read from disk, the quantization options the family needs
(with the reason for each), and whether its stem (the first convolution and those at
its output resolution) stays FP32 (:func:`quantize_options`). Presets are matched by name
prefix, longest first.

Pretrained weights are used only when their file is already in the local store (gluoncv's
``~/.mxnet/models``); otherwise the call says so at once instead of hanging on download
retries (this toolkit never downloads).
"""
import dataclasses
import logging
import os
from typing import List, Optional, Tuple

import mxnet as mx

from . import mxnet_private
from .data import DEFAULT_BATCH_SIZE
from .datasets import IMAGENET, PREPROCESS, ImageSource, Preprocess
from .op_table import has_vnni
from .quantize_graph import reasons_of

log = logging.getLogger(__name__)

DEFAULT_ROOT = os.path.join('~', '.mxnet', 'models')  # gluoncv's local store

@dataclasses.dataclass(frozen=True)
class Preset:
    """How one model family is quantized, and why."""
    input_shape: Tuple[int, ...] = (3, 224, 224)
    quantize_kwargs: Tuple[Tuple[str, object], ...] = ()
    stem_fp32: Optional[bool] = None  # None: FP32 on CPUs without VNNI
    why: str = ('defaults: every op with an INT8 kernel runs INT8, but the stem on CPUs '
                'without VNNI')
    batch_size: Optional[int] = None  # the only batch size the network takes, if fixed
    preprocess: Preprocess = IMAGENET  # images from a folder or .rec -> input_shape


STEM_REASON = ('zoo preset: the stem (the first conv and the convs at its output resolution) '
               'stays FP32 on CPUs without VNNI, where oneDNN gives the first conv 7-bit '
               'weights (signed input) and uint8 inputs 7-bit codes: the error of the first '
               'quantized layers reaches every later one')

PRESETS = {
    '': Preset(),
    'inceptionv3': Preset((3, 299, 299), why='299x299 input; the stem FP32 on CPUs without '
                                             'VNNI',
                          preprocess=PREPROCESS['inception']),
    'ssd_300': Preset((3, 300, 300), (('quantize_mode', 'smart'),), False,
                      "box decoding and NMS stay FP32: quantize_mode='smart' keeps the "
                      'concat that joins decoded boxes, scores and ids out of INT8',
                      preprocess=PREPROCESS['ssd_300']),
    'ssd_512': Preset((3, 512, 512), (('quantize_mode', 'smart'),), False,
                      "box decoding and NMS stay FP32 (quantize_mode='smart')",
                      preprocess=PREPROCESS['ssd_512']),
    'yolo3': Preset((3, 416, 416), (('quantize_mode', 'smart'),), False,
                    "box decoding and NMS stay FP32 (quantize_mode='smart')",
                    preprocess=PREPROCESS['yolo3_416']),
    'faster_rcnn': Preset((3, 600, 600), (('quantize_mode', 'smart'),), False,
                          "proposal, ROI pooling and NMS stay FP32 (quantize_mode='smart'); "
                          "batch size 1: gluoncv's FasterRCNN.hybrid_forward fixes "
                          'batch_size = 1 outside training (a batch of 2 stops in FP32 too, at '
                          "a concat expecting [300, -1] ROIs)", batch_size=1,
                          # 600x600 (the preset's shape), where gluoncv's own evaluation
                          # keeps the aspect ratio (shorter side 600, longer <= 1000)
                          preprocess=PREPROCESS['faster_rcnn_600']),
}


def preset(name: str) -> Preset:
    """The preset whose prefix matches ``name`` best."""
    key = max((k for k in PRESETS if name.startswith(k)), key=len)
    return PRESETS[key]


def list_models():
    """Names gluoncv's model zoo can build."""
    from gluoncv.model_zoo import get_model_list
    return sorted(get_model_list())


def _check_name(name: str) -> None:
    valid = list_models()
    if name not in valid:
        raise ValueError('name: unknown model %r; valid names are: %s' % (name, ', '.join(valid)))


def check_pretrained_local(name: str, root: str = DEFAULT_ROOT) -> None:
    """Raise at once when the pretrained weights are not in the local store."""
    from gluoncv.model_zoo.model_store import short_hash
    try:
        local = os.path.join(os.path.expanduser(root), '%s-%s.params' % (name, short_hash(name)))
    except ValueError:
        raise ValueError('pretrained: gluoncv has no pretrained weights for %r' % name) from None
    if not os.path.isfile(local):
        raise RuntimeError('pretrained=True: the weights of %r are not in %s (expected %s); '
                           'gluon-int8 does not download: fetch them where there is internet '
                           "(gluoncv.model_zoo.get_model(%r, pretrained=True)) and copy the "
                           'file here, or use pretrained=False for random weights'
                           % (name, root, os.path.basename(local), name))


class RandomInit(mx.init.Xavier):
    """Xavier, except for 1-D weights (BatchNorm scales created with an explicit Xavier
    initializer, e.g. in SSD's extra layers): ones for gammas, zeros otherwise."""

    def _init_weight(self, name, arr):
        if len(arr.shape) < 2:
            arr[:] = 1.0 if name.endswith('gamma') else 0.0
        else:
            super()._init_weight(name, arr)


def set_batchnorm_statistics(net, batch: mx.nd.NDArray) -> int:
    """Set every BatchNorm's running mean/var to the statistics of its input on ``batch``.

    For random weights only: with Xavier weights and the default running statistics
    (mean 0, var 1) activations shrink layer after layer (MobileNet 1.0's logits end near
    1e-19), which no trained network does. One imperative forward pass: each BatchNorm's
    pre-hook sets its statistics from the input it is about to normalize, so later layers
    see normalized activations. Same graph, same shapes. Returns the number of layers set.
    """
    blocks = []
    net.apply(lambda b: blocks.append(b) if isinstance(b, mx.gluon.nn.BatchNorm) else None)

    def set_stats(block, args):
        x = args[0]
        axis = mxnet_private.batchnorm_axis(block) % x.ndim
        reduce_axes = tuple(a for a in range(x.ndim) if a != axis)
        mean = x.mean(axis=reduce_axes)
        centred = x - mean.reshape([-1 if a == axis else 1 for a in range(x.ndim)])
        block.running_mean.set_data(mean)
        block.running_var.set_data((centred ** 2).mean(axis=reduce_axes))

    handles = [b.register_forward_pre_hook(set_stats) for b in blocks]
    try:
        net(batch)
    finally:
        for handle in handles:
            handle.detach()
    return len(blocks)


def get_model(name: str, quantized: bool = True, calib_data=None, mode: str = 'entropy',
              pretrained: bool = False, exclude_stem: Optional[bool] = None,
              root: str = DEFAULT_ROOT, quantize_kwargs=None,
              bn_batch: Optional[mx.nd.NDArray] = None, **gluoncv_kwargs):
    """A GluonCV model, FP32 or quantized with its family preset.

    ``pretrained=False`` gives random (Xavier) weights: right for speed work, never for
    accuracy; ``bn_batch`` then sets the BatchNorm statistics from that batch (see
    :func:`set_batchnorm_statistics`). ``quantize_kwargs`` override the preset's options.
    ``calib_data`` may be the path of an image folder or a ``.rec``: it is read with the
    preset's preprocessing, shuffled with seed 0 (an ``ImageSource`` for other settings).
    ``exclude_stem``: True/False, or None for the preset's choice
    (:func:`quantize_options`).
    """
    from gluoncv.model_zoo import get_model as gluoncv_get_model
    from .api import quantize_net
    _check_name(name)
    if pretrained:
        check_pretrained_local(name, root)
    if 'pretrained_base' not in gluoncv_kwargs and any(k in name for k in ('ssd', 'yolo', 'rcnn')):
        gluoncv_kwargs['pretrained_base'] = False
    net = gluoncv_get_model(name, pretrained=pretrained, root=root, **gluoncv_kwargs)
    if not pretrained:
        net.initialize(RandomInit(), force_reinit=True)
        if bn_batch is not None:
            set_batchnorm_statistics(net, bn_batch)
    if not quantized:
        return net
    family = preset(name)
    options = quantize_options(net, family, exclude_stem, quantize_kwargs)
    log.info('%s: preset %s', name, family.why)
    if isinstance(calib_data, (str, os.PathLike)):
        calib_data = ImageSource(calib_data, family.preprocess,
                                 family.batch_size or DEFAULT_BATCH_SIZE, shuffle=True, seed=0,
                                 param='calib_data')
    if family.batch_size is not None and calib_data is not None:
        calib_data = _fixed_batch_size(calib_data, net, family)
    return quantize_net(net, calib_data, mode=mode, **options)


def _fixed_batch_size(calib_data, net, family: Preset):
    """The calibration batches, each checked against the one batch size ``net`` takes."""
    from .data import iter_batches
    from .trace import count_inputs
    for index, batch in enumerate(iter_batches(calib_data, count_inputs(net))):
        if batch[0].shape[0] != family.batch_size:
            raise ValueError('calib_data: batch %d has %d examples; this model takes batches '
                             'of exactly %d (%s)' % (index, batch[0].shape[0],
                                                     family.batch_size, family.why))
        yield batch


def quantize_options(net, family: Preset, exclude_stem: Optional[bool] = None,
                     quantize_kwargs=None) -> dict:
    """The ``quantize_net`` options of ``family`` for ``net``: the preset's, updated with
    ``quantize_kwargs``, and the stem's convs (:func:`stem_convs`) in ``exclude_layers``
    where the stem stays FP32.

    ``exclude_stem`` (True/False) overrides the preset. A preset that does not choose
    (``stem_fp32=None``: the classification families) keeps the stem FP32 on a CPU without
    VNNI (:func:`gluon_int8.op_table.has_vnni`). There oneDNN adds u8 x s8 products in
    int16 pairs: it gives a conv whose input is signed (a normalized image) 7-bit weights,
    and a uint8 input gets codes below 128 (:func:`gluon_int8.op_table.uint8_range_factor`).
    The error of the first quantized layers reaches every later layer, and the stem's
    convs are a small part of the work. Measured on this AVX2 machine (zoo sweep, random
    weights, cosine of INT8 to FP32), the first conv alone FP32: resnet50_v1d 0.963 -> 0.979,
    vgg16_bn 0.942 -> 0.965, hrnet_w18_small_v1_c 0.976 -> 0.985; the whole stem: vgg16_bn
    0.965 -> 0.976, resnest50 0.969 -> 0.982, mobilenet0.25 0.950 -> 0.963 (their floors
    0.991, 0.990, 0.972), at a batch-1 latency of 1.14x that of all INT8 on mobilenet1.0
    (7.96 against 6.96 ms). The layer table gives the reason (``exclude_layers`` becomes a
    dict, rule -> reason).
    """
    if exclude_stem is not None and not isinstance(exclude_stem, bool):
        raise TypeError('exclude_stem: got %r; expected True, False or None (the '
                        "preset's choice)" % (exclude_stem,))
    options = dict(family.quantize_kwargs)
    options.update(quantize_kwargs or {})
    if exclude_stem is not None:
        choice, why = exclude_stem, 'exclude_stem=True'
    elif family.stem_fp32 is not None:
        choice, why = family.stem_fp32, 'zoo preset: stem_fp32=True'
    else:
        choice, why = not has_vnni(), STEM_REASON
    if choice:
        options['exclude_layers'] = {**reasons_of(options.get('exclude_layers')),
                                     **{name: why for name in stem_convs(net, family)}}
    return options


def _traced_nodes(net, family: Preset):
    """The traced graph's nodes of ``net`` and the shape of each node's first output, for
    one input of the preset's shape."""
    import json
    from .trace import trace
    traced = trace(net, [mx.nd.zeros((1,) + family.input_shape)])
    internals = traced.symbol.get_internals()
    _, shapes, _ = internals.infer_shape(**{traced.data_names[0]: (1,) + family.input_shape})
    shape_of = dict(zip(internals.list_outputs(), shapes))
    nodes = json.loads(traced.symbol.tojson())['nodes']
    return [(node, shape_of.get(node['name'] + '_output', shape_of.get(node['name'] + '_output0')))
            for node in nodes if node['op'] != 'null']


def first_conv(net, family: Preset) -> str:
    """Name of the first Convolution of ``net`` in its traced graph."""
    return stem_convs(net, family)[0]


def stem_convs(net, family: Preset) -> List[str]:
    """Names of the stem's Convolutions in ``net``'s traced graph: the first one, and every
    one after it, in graph order, whose output keeps the first one's resolution, up to the
    first node whose output is smaller (a pooling or a strided conv). E.g. resnet50_v1: its
    7x7 conv; resnet50_v1d and resnest50: the three 3x3 convs; vgg16: both convs at
    224x224; mobilenet1.0: the first conv and the depthwise and pointwise convs of the
    first block."""
    convs, size = [], None
    for node, shape in _traced_nodes(net, family):
        spatial = tuple(shape[2:]) if shape is not None and len(shape) == 4 else None
        if size and spatial and spatial[0] * spatial[1] < size[0] * size[1]:
            break
        if node['op'] == 'Convolution' and (not convs or spatial == size):
            convs.append(node['name'])
            size = size or spatial
    if not convs:
        raise ValueError('exclude_stem: %s has no Convolution' % type(net).__name__)
    return convs
