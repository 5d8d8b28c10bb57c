"""Object detection on real images: a synthetic Fashion-MNIST detection set, VOC mAP and
a small GluonCV SSD trained on it (parameters shipped as
``gluon_int8_samples/data/ssd_fashion.params``). Needs OpenCV and GluonCV (the ``[samples]``
extra).

* :func:`make_detection_set` pastes real Fashion-MNIST items (cropped to their tight box,
  resized to a random scale, tinted) at random positions onto dark 300x300 canvases with
  a mild gradient and noise, and returns VOC-style boxes ``[xmin, ymin, xmax, ymax,
  class]`` in pixels. Image ``i`` of a split depends only on ``(seed, split, i)``.
  Objects come from disjoint pools: ``'train'`` from the Fashion-MNIST training split,
  ``'val'`` from test items 0-4999 and ``'test'`` from test items 5000-9999 (the full
  dataset: ``fm.INSTALL_HINT``); or, with ``items=``, from given items such as the
  bundled 1000-image slice.
* :func:`voc_map` is the PASCAL VOC mean average precision (area under the interpolated
  precision/recall curve, or the 11-point VOC2007 variant), written from the VOC devkit's
  definition (Everingham et al., "The PASCAL Visual Object Classes Challenge", IJCV 2010).
* :func:`get_ssd_model` builds GluonCV's ``SSD`` on :class:`LightFeatures` (a small
  VGG-like feature extractor, four feature maps at strides 16-100) for 10 classes.
"""
import functools
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import mxnet as mx
import numpy as np
from mxnet.gluon import nn

from . import fashion_mnist as fm

log = logging.getLogger(__name__)

CLASS_NAMES = fm.CLASS_NAMES
SPLITS = {'train': ('train', 0, 60000), 'val': ('test', 0, 5000), 'test': ('test', 5000, 10000)}
_SPLIT_CODES = {'train': 0, 'val': 1, 'test': 2}
#: Fashion-MNIST pixels at or above this value belong to the object (its tight box).
OBJECT_THRESHOLD = 32
#: Normalization of the network input (ImageNet statistics, as GluonCV's SSD transforms).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PARAMS_PATH = os.path.join(fm.DATA_DIR, 'ssd_fashion.params')


# ---------------------------------------------------------------------------
# Synthetic detection set
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _split_items(fm_split: str, root: str) -> Tuple[np.ndarray, np.ndarray]:
    return fm.load_raw_split(fm_split, root)


def _pool(split: str, root: Optional[str], items) -> Tuple[np.ndarray, np.ndarray, int, int]:
    """(images, labels, lo, hi): objects of ``split`` are items lo .. hi - 1."""
    if items is not None:
        return items[0], items[1], 0, len(items[1])
    fm_split, lo, hi = SPLITS[split]
    return _split_items(fm_split, fm.dataset_root(root)) + (lo, hi)


def _tight_crop(item: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero((item >= OBJECT_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((item >= OBJECT_THRESHOLD).any(axis=0))
    return item[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Dark canvas: a random level, a linear gradient in a random direction, noise."""
    level = rng.uniform(0, 40, size=3).astype(np.float32)
    angle, slope = rng.uniform(0, 2 * np.pi), rng.uniform(0, 30)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    grad = np.float32(slope * np.cos(angle)) * ramp[None, :] \
        + np.float32(slope * np.sin(angle)) * ramp[:, None]
    canvas = rng.standard_normal((size, size, 3), dtype=np.float32)
    canvas *= np.float32(4.0)
    canvas += grad[:, :, None]
    canvas += level
    return canvas


def _overlap(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection of ``box`` with each of ``boxes`` over the smaller of the two areas
    (unlike IoU, it also rejects a small object inside a large one)."""
    lo, hi = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    return inter / np.minimum(_area(box[None])[0], _area(boxes))


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.prod(np.clip(boxes[:, 2:4] - boxes[:, :2], 0, None), axis=1)


def _place(rng, canvas, items, labels, boxes, lo, hi, scale_range, max_overlap) -> None:
    """Paste one random item where it covers at most ``max_overlap`` of any earlier one's
    box, or of its own (20 tries; none fits: fewer objects)."""
    size = canvas.shape[0]
    for _ in range(20):
        index = int(rng.integers(lo, hi))
        crop = _tight_crop(items[index])
        longest = rng.uniform(*scale_range)
        h, w = (max(4, int(round(d * longest / max(crop.shape)))) for d in crop.shape)
        x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        box = np.array([x, y, x + w, y + h], dtype=np.float32)
        tint = rng.uniform(0.45, 1.0, size=3)
        if boxes and _overlap(box, np.array(boxes)[:, :4]).max() > max_overlap:
            continue
        obj = cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        patch = canvas[y:y + h, x:x + w]
        np.maximum(patch, obj[:, :, None] * (tint / tint.max()).astype(np.float32), out=patch)
        boxes.append(np.append(box, labels[index]))
        return


def _make_image(split: str, index: int, seed: int = 0, size: int = 300,
               max_objects: int = 4, scale_range=(40.0, 140.0), max_overlap: float = 0.2,
               root: Optional[str] = None, items=None) -> Tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of ``split``: ``(uint8 (size, size, 3), float32 (k, 5) boxes)``."""
    items, labels, lo, hi = _pool(split, root, items)
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    canvas = _background(rng, size)
    boxes: List[np.ndarray] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        _place(rng, canvas, items, labels, boxes, lo, hi, scale_range, max_overlap)
    image = np.clip(canvas + np.float32(0.5), 0, 255).astype(np.uint8)  # round, clip
    return image, np.array(boxes, dtype=np.float32).reshape(-1, 5)


def make_detection_set(split: str, num_images: int, seed: int = 0, size: int = 300,
                       start: int = 0, max_objects: int = 4, scale_range=(40.0, 140.0),
                       max_overlap: float = 0.2, root: Optional[str] = None, items=None
                       ) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Images ``start .. start + num_images - 1`` of a deterministic detection split.

    Returns ``(images uint8 (N, size, size, 3), labels)``, ``labels[i]`` a float32
    ``(k, 5)`` array of ``[xmin, ymin, xmax, ymax, class_id]`` (pixels, class 0-9),
    ``1 <= k <= max_objects``. An object's longest side is uniform in ``scale_range``
    pixels; objects cover at most ``max_overlap`` of each other's box area. ``root``: the
    folder of the Fashion-MNIST idx files (default: ``fm.dataset_root()``). ``items``:
    ``(uint8 images (n, 28, 28), labels (n,))`` to draw the objects from instead of the
    split's share of the dataset (e.g. ``fm.bundled_raw_slice()``, which needs no
    dataset installed); ``split`` still seeds the generator.
    """
    _check_split_args(split, num_images, seed, size, start, max_objects, scale_range)
    _check_items(items)
    images = np.empty((num_images, size, size, 3), dtype=np.uint8)
    labels = []
    for i in range(num_images):
        images[i], boxes = _make_image(split, start + i, seed, size, max_objects, scale_range,
                                      max_overlap, root, items)
        labels.append(boxes)
    log.debug('%s split: %d images from index %d (seed %d)', split, num_images, start, seed)
    return images, labels


def _check_split_args(split, num_images, seed, size, start, max_objects, scale_range) -> None:
    if split not in SPLITS:
        raise ValueError('split: got %r; expected one of %s' % (split, list(SPLITS)))
    for name, value, low in (('num_images', num_images, 1), ('seed', seed, 0),
                             ('start', start, 0), ('max_objects', max_objects, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError('%s: got %r; expected an int >= %d' % (name, value, low))
    if len(scale_range) != 2 or not 4 <= scale_range[0] <= scale_range[1] <= size:
        raise ValueError('scale_range: got %r; expected (low, high) with 4 <= low <= high '
                         '<= size=%r' % (scale_range, size))


def _check_items(items) -> None:
    if items is None:
        return
    ok = isinstance(items, (tuple, list)) and len(items) == 2
    images, labels = (np.asarray(items[0]), np.asarray(items[1])) if ok else (None, None)
    if not ok or images.ndim != 3 or images.dtype != np.uint8 or len(images) == 0 \
            or labels.shape != images.shape[:1]:
        raise ValueError('items: got %s; expected (uint8 images (n, 28, 28), labels (n,)) '
                         'with n >= 1, e.g. fashion_mnist.bundled_raw_slice()'
                         % (_describe(items),))


def _describe(items) -> str:
    if isinstance(items, (tuple, list)):
        return '(%s)' % ', '.join('%s %s' % (np.asarray(v).dtype, np.asarray(v).shape)
                                  for v in items)
    return type(items).__name__


def to_input(images: np.ndarray) -> mx.nd.NDArray:
    """uint8 NHWC images -> normalized float32 NCHW network input."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError('images: got shape %s; expected (N, H, W, 3) uint8'
                         % (images.shape,))
    x = images.astype(np.float32) / np.float32(255.0)
    x = (x - np.float32(MEAN)) / np.float32(STD)
    return mx.nd.array(x.transpose(0, 3, 1, 2))


# ---------------------------------------------------------------------------
# VOC mean average precision
# ---------------------------------------------------------------------------

def _as_boxes(param: str, value, index: int, cols: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if cols == 0 and arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]  # (n, 1) scores or ids, as SSD returns them
    if (cols and (arr.ndim != 2 or arr.shape[1] != cols)) or (not cols and arr.ndim != 1):
        raise ValueError('%s[%d]: got shape %s; expected %s' % (
            param, index, arr.shape, '(n, %d)' % cols if cols else '(n,) or (n, 1)'))
    return arr


def _per_image(pred_boxes, pred_scores, pred_ids, gt_boxes, gt_ids):
    """Validated per-image arrays, predictions with id < 0 (SSD padding) dropped."""
    named = {'pred_boxes': pred_boxes, 'pred_scores': pred_scores, 'pred_ids': pred_ids,
             'gt_boxes': gt_boxes, 'gt_ids': gt_ids}
    for name, value in named.items():
        if len(value) != len(pred_boxes):
            raise ValueError('%s: got %d images, pred_boxes has %d; every list needs one '
                             'entry per image' % (name, len(value), len(pred_boxes)))
    for i, (pb, ps, pi, gb, gi) in enumerate(zip(*named.values())):
        pb, gb = _as_boxes('pred_boxes', pb, i, 4), _as_boxes('gt_boxes', gb, i, 4)
        ps, pi, gi = (_as_boxes(n, v, i, 0) for n, v in
                      (('pred_scores', ps), ('pred_ids', pi), ('gt_ids', gi)))
        for name, arr, boxes in (('pred_scores', ps, pb), ('pred_ids', pi, pb),
                                 ('gt_ids', gi, gb)):
            if len(arr) != len(boxes):
                raise ValueError('%s[%d]: got %d values for %d boxes; expected one per box'
                                 % (name, i, len(arr), len(boxes)))
        keep = pi >= 0
        yield pb[keep], ps[keep], pi[keep].astype(int), gb, gi.astype(int)


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    union = _area(a)[:, None] + _area(b)[None, :] - inter
    return inter / np.maximum(union, np.finfo(np.float64).tiny)


def _match_image(boxes, scores, gt, iou_thresh) -> Tuple[np.ndarray, np.ndarray]:
    """(scores, is_tp) of one image's detections of one class, greedy in score order: each
    detection takes its highest-IoU ground truth; a ground truth already taken, or IoU
    below the threshold, makes it a false positive (the VOC devkit's rule)."""
    order = np.argsort(-scores, kind='stable')
    boxes, scores = boxes[order], scores[order]
    tp = np.zeros(len(boxes), dtype=bool)
    if len(gt):
        iou = _iou_matrix(boxes, gt)
        taken = np.zeros(len(gt), dtype=bool)
        for k, row in enumerate(iou):
            best = int(row.argmax())
            if row[best] >= iou_thresh and not taken[best]:
                tp[k] = taken[best] = True
    return scores, tp


def average_precision(recall: np.ndarray, precision: np.ndarray,
                      use_07_metric: bool = False) -> float:
    """AP from a recall/precision curve (detections in decreasing score order).

    VOC2010+: area under the precision envelope (precision made monotone from the right),
    summed where recall changes. VOC2007: mean of the best precision at recall >= t for
    t = 0, 0.1, ..., 1.
    """
    if use_07_metric:
        return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                              for t in np.linspace(0, 1, 11)]))
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def per_class_ap(pred_boxes, pred_scores, pred_ids, gt_boxes, gt_ids, iou_thresh: float = 0.5,
                 use_07_metric: bool = False) -> Dict[int, float]:
    """VOC average precision of every class that has at least one ground-truth box.

    Each argument is a list with one entry per image: boxes ``(n, 4)`` as ``[xmin, ymin,
    xmax, ymax]`` (continuous coordinates: area = width x height), scores and class ids
    ``(n,)`` or ``(n, 1)``. Predictions with a negative id are padding and ignored.
    Classes that only appear in predictions have no recall and are left out, as in VOC.
    """
    if not 0 < iou_thresh <= 1:
        raise ValueError('iou_thresh: got %r; expected a number in (0, 1]' % (iou_thresh,))
    scores: Dict[int, list] = {}
    hits: Dict[int, list] = {}
    num_gt: Dict[int, int] = {}
    for pb, ps, pi, gb, gi in _per_image(pred_boxes, pred_scores, pred_ids, gt_boxes, gt_ids):
        for cls in np.unique(np.concatenate([pi, gi])):
            num_gt[cls] = num_gt.get(cls, 0) + int((gi == cls).sum())
            s, tp = _match_image(pb[pi == cls], ps[pi == cls], gb[gi == cls], iou_thresh)
            scores.setdefault(cls, []).append(s)
            hits.setdefault(cls, []).append(tp)
    result = {}
    for cls in sorted(c for c, n in num_gt.items() if n > 0):
        s, tp = np.concatenate(scores[cls]), np.concatenate(hits[cls])
        tp = tp[np.argsort(-s, kind='stable')]
        ctp = np.cumsum(tp)
        precision = ctp / np.arange(1, len(tp) + 1)
        result[int(cls)] = average_precision(ctp / num_gt[cls], precision, use_07_metric)
    return result


def voc_map(pred_boxes, pred_scores, pred_ids, gt_boxes, gt_ids, iou_thresh: float = 0.5,
            use_07_metric: bool = False) -> float:
    """PASCAL VOC mAP: the mean of :func:`per_class_ap` (same arguments); NaN when no
    image has a ground-truth box."""
    aps = per_class_ap(pred_boxes, pred_scores, pred_ids, gt_boxes, gt_ids, iou_thresh,
                       use_07_metric)
    return float(np.mean(list(aps.values()))) if aps else float('nan')


# ---------------------------------------------------------------------------
# The small SSD
# ---------------------------------------------------------------------------

def _conv(channels: int, kernel: int, strides: int = 1) -> nn.HybridSequential:
    unit = nn.HybridSequential(prefix='')
    unit.add(nn.Conv2D(channels, kernel, strides, kernel // 2, use_bias=False),
             nn.BatchNorm(), nn.Activation('relu'))
    return unit


class LightFeatures(nn.HybridBlock):
    """A small VGG-like base for a 300x300 SSD: 3x3 Conv-BN-ReLU units, four outputs
    (19x19, 10x10, 5x5 and 3x3 for a 300x300 input). Plain convolutions rather than
    MobileNet's depthwise ones: with MXNet's CPU backward pass of depthwise convolutions,
    a MobileNet-like base of similar size trained about 5x slower."""

    #: (channels, stride) of the units before the first output (stride 16)
    TRUNK = ((16, 2), (32, 2), (32, 1), (64, 2), (64, 1), (96, 2), (96, 1))
    #: channels of the stride-2 units giving the later outputs
    EXTRAS = (96, 96, 96)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.trunk = nn.HybridSequential(prefix='')
            for channels, strides in self.TRUNK:
                self.trunk.add(_conv(channels, 3, strides))
            self.extras = nn.HybridSequential(prefix='')
            for channels in self.EXTRAS:
                self.extras.add(_conv(channels, 3, 2))

    def hybrid_forward(self, F, x):  # pylint: disable=arguments-differ
        outputs = [self.trunk(x)]
        for unit in self.extras:
            outputs.append(unit(outputs[-1]))
        return outputs


#: Anchor layout: sizes (len(outputs) + 1), ratios and steps per output, in pixels.
ANCHORS = dict(sizes=[32, 64, 100, 140, 180], ratios=[[1, 2, 0.5]] * 4, steps=[16, 30, 60, 100])


def build_ssd(nms_thresh: float = 0.45, nms_topk: int = 200, post_nms: int = 50):
    """The uninitialized SSD (GluonCV ``SSD`` class on :class:`LightFeatures`), 300x300."""
    from gluoncv.model_zoo.ssd.ssd import SSD
    return SSD(None, base_size=300, features=lambda **kwargs: LightFeatures(), num_filters=[],
               classes=list(CLASS_NAMES), pretrained=False, nms_thresh=nms_thresh,
               nms_topk=nms_topk, post_nms=post_nms, anchor_alloc_size=20, **ANCHORS)


def get_ssd_model(params: Optional[str] = PARAMS_PATH, **kwargs):
    """The small SSD with ``params`` loaded (default: the shipped parameters); ``None``
    gives Xavier-initialized weights for training. ``kwargs`` go to :func:`build_ssd`."""
    net = build_ssd(**kwargs)
    if params is None:
        net.initialize(mx.init.Xavier(magnitude=2.0))
        return net
    if not os.path.isfile(params):
        raise FileNotFoundError('params: %r is not a file; train one with '
                                'examples/ssd/train.py' % (params,))
    net.load_parameters(params, ctx=mx.cpu())
    return net


def detect(net, images: np.ndarray, batch_size: int = 32) -> Tuple[list, list, list]:
    """Run ``net`` over uint8 NHWC images; per-image (boxes, scores, ids) numpy arrays."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError('batch_size: got %r; expected a positive int' % (batch_size,))
    boxes, scores, ids = [], [], []
    for start in range(0, len(images), batch_size):
        cls, score, box = net(to_input(images[start:start + batch_size]))
        ids.extend(cls.asnumpy()[:, :, 0])
        scores.extend(score.asnumpy()[:, :, 0])
        boxes.extend(box.asnumpy())
    return boxes, scores, ids


def evaluate_map(net, images: np.ndarray, labels: Sequence[np.ndarray], batch_size: int = 32,
                 use_07_metric: bool = False) -> float:
    """VOC mAP (IoU 0.5) of ``net`` on uint8 NHWC ``images`` and their (k, 5) ``labels``."""
    if len(images) != len(labels):
        raise ValueError('labels: got %d entries for %d images; expected one (k, 5) array '
                         'per image' % (len(labels), len(images)))
    boxes, scores, ids = detect(net, images, batch_size)
    return voc_map(boxes, scores, ids, [lab[:, :4] for lab in labels],
                   [lab[:, 4] for lab in labels], use_07_metric=use_07_metric)
