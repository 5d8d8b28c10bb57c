"""Images from disk as network input: an image folder or a RecordIO file, preprocessed
the named, reproducible way.

Sources (:class:`ImageSource`):

* a folder in the usual class-per-subfolder layout (``root/<class>/<image>``), listed by
  MXNet's ``ImageFolderDataset`` (labels are the sorted subfolder indices);
* a flat folder of images (no subfolders): calibration only, every label is -1;
* a RecordIO ``.rec`` file (``im2rec`` or ``mx.recordio``): random access through
  MXNet's ``RecordFileDataset`` when the ``.idx`` beside it exists, otherwise read in
  file order with ``mx.recordio.MXRecordIO``.

Images are decoded by MXNet (``mx.image.imread`` / ``imdecode``, OpenCV inside MXNet) and
transformed by gluon's own transforms: ``Resize`` (shorter side, or both sides),
``CenterCrop``, ``ToTensor`` (HWC uint8 -> CHW float32 in [0, 1]) and ``Normalize``.
:class:`Preprocess` names every choice; :data:`IMAGENET` is what GluonCV's ImageNet
models expect (shorter side 256, center crop 224, ImageNet mean/std, RGB, NCHW) and
:data:`PREPROCESS` holds the per-family presets the zoo uses.

An image that cannot be read or decoded is reported by its path (``file.rec#<record>``
inside a RecordIO file) and skipped, or refused with ``bad_images='raise'``. Decoding
runs in the calling thread, so a bad image never stops a worker somewhere else.
Shuffling (for calibration) is seeded: the same seed gives the same images in the same
order.
"""
import dataclasses
import functools
import logging
import os
import struct
from typing import Iterator, List, Optional, Tuple, Union

import mxnet as mx
import numpy as np
from mxnet.gluon.data.vision import transforms

log = logging.getLogger(__name__)

#: File types ``ImageFolderDataset`` lists (also used for flat folders).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
#: ImageNet channel statistics on pixels scaled to [0, 1] (GluonCV's ``Normalize``; the
#: same as MXNet's 123.68/116.28/103.53 and 58.395/57.12/57.375 on 0-255 pixels).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BAD_IMAGES = ('skip', 'raise')
LAYOUTS = ('NCHW', 'NHWC')
CHANNEL_ORDERS = ('RGB', 'BGR')


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How a decoded image becomes one network input, in this order:

    1. decode to ``channels`` (3: colour in ``channel_order``; 1: grayscale);
    2. ``resize``: the shorter side to this many pixels, aspect ratio kept
       (``keep_aspect=False``: both sides, a ``resize`` x ``resize`` image); None: as is;
    3. ``crop``: a centered ``crop`` x ``crop`` square; None: no crop;
    4. scale pixels to [0, 1], subtract ``mean`` and divide by ``std`` per channel;
    5. ``layout``: ``'NCHW'`` or ``'NHWC'`` batches.

    ``interpolation`` is OpenCV's code for resizing (1: bilinear, as GluonCV's
    transforms). Every field is validated here, with the field named in the error.
    """
    resize: Optional[int] = 256
    crop: Optional[int] = 224
    keep_aspect: bool = True
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    channels: int = 3
    channel_order: str = 'RGB'
    layout: str = 'NCHW'
    interpolation: int = 1

    def __post_init__(self):
        for name in ('resize', 'crop'):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError('preprocess.%s: got %r; expected a positive int or None'
                                 % (name, value))
        if self.channels not in (1, 3):
            raise ValueError('preprocess.channels: got %r; expected 3 (colour) or 1 '
                             '(grayscale)' % (self.channels,))
        for name in ('mean', 'std'):
            value = tuple(getattr(self, name))
            if len(value) != self.channels:
                raise ValueError('preprocess.%s: got %r; expected %d value(s), one per '
                                 'channel' % (name, value, self.channels))
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if any(s <= 0 for s in self.std):
            raise ValueError('preprocess.std: got %r; expected positive values' % (self.std,))
        for name, allowed in (('channel_order', CHANNEL_ORDERS), ('layout', LAYOUTS)):
            if getattr(self, name) not in allowed:
                raise ValueError('preprocess.%s: got %r; expected one of %s'
                                 % (name, getattr(self, name), list(allowed)))

    @property
    def input_shape(self) -> Optional[Tuple[int, int, int]]:
        """Per-example shape (in ``layout``) when it does not depend on the image."""
        side = self.crop or (self.resize if not self.keep_aspect else None)
        if side is None:
            return None
        return ((self.channels, side, side) if self.layout == 'NCHW'
                else (side, side, self.channels))

    def apply(self, image: mx.nd.NDArray) -> mx.nd.NDArray:
        """One decoded HWC uint8 image -> one float32 example (CHW or HWC)."""
        for step in _steps(self):
            image = step(image)
        return image.transpose((1, 2, 0)) if self.layout == 'NHWC' else image

    def decode_flags(self) -> dict:
        """Keyword arguments of ``mx.image.imread`` / ``imdecode`` for this preprocessing."""
        return {'flag': 1 if self.channels == 3 else 0,
                'to_rgb': self.channel_order == 'RGB'}


@functools.lru_cache(maxsize=16)
def _steps(preprocess: Preprocess) -> tuple:
    """gluon's transforms for ``preprocess``, built once per distinct preprocessing."""
    steps = []
    if preprocess.resize is not None:
        steps.append(transforms.Resize(preprocess.resize, keep_ratio=preprocess.keep_aspect,
                                       interpolation=preprocess.interpolation))
    if preprocess.crop is not None:
        steps.append(transforms.CenterCrop(preprocess.crop,
                                           interpolation=preprocess.interpolation))
    steps += [transforms.ToTensor(), transforms.Normalize(preprocess.mean, preprocess.std)]
    return tuple(steps)


#: GluonCV's ImageNet evaluation: shorter side 256, center crop 224.
IMAGENET = Preprocess()
#: Inception V3 (299x299): shorter side ceil(299 / 0.875) = 342, as GluonCV's scripts.
INCEPTION = Preprocess(resize=342, crop=299)


def detector(size: int) -> Preprocess:
    """GluonCV's detection evaluation (SSD, YOLO): resized to ``size`` x ``size``."""
    return Preprocess(resize=size, crop=None, keep_aspect=False)


#: Named presets (the zoo presets refer to these).
PREPROCESS = {
    'imagenet': IMAGENET,
    'inception': INCEPTION,
    'ssd_300': detector(300),
    'ssd_512': detector(512),
    'yolo3_416': detector(416),
    'faster_rcnn_600': detector(600),
}


# ---------------------------------------------------------------------------
# Reading: a list of samples, each read and decoded on demand
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Bad:
    """An image that could not be read: where it is and why."""
    where: str
    reason: str


def _reason(err: Exception) -> str:
    """The useful line of an MXNet error (its last line; the rest is a C++ traceback)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _folder_items(path: str, param: str) -> Tuple[list, Optional[List[str]]]:
    """(file, label) items and class names of a class-per-subfolder or flat folder."""
    entries = sorted(os.listdir(path))
    if any(os.path.isdir(os.path.join(path, e)) for e in entries):
        listed = mx.gluon.data.vision.ImageFolderDataset(path)
        items, classes = list(listed.items), list(listed.synsets)
    else:
        items = [(os.path.join(path, e), -1) for e in entries
                 if os.path.splitext(e)[1].lower() in IMAGE_EXTENSIONS]
        classes = None
    if not items:
        raise ValueError('%s: folder %r holds no %s images, neither directly nor in class '
                         'subfolders' % (param, path, '/'.join(IMAGE_EXTENSIONS)))
    return items, classes


def _label(value) -> float:
    """A record's class id: its header label (the first value of a label vector)."""
    flat = np.ravel(value)
    return float(flat[0]) if flat.size else -1.0


class ImageSource:
    """An image folder or a RecordIO file as batches ``(data, label)`` of NDArrays.

    ``data`` is float32 ``(B,) + preprocess.input_shape``; ``label`` float32 ``(B,)``
    (-1 where the source has no labels: a flat folder). Every iteration yields the same
    batches: in file order, or with ``shuffle=True`` in the order of a permutation
    seeded by ``seed`` (a ``.rec`` needs its ``.idx`` for that). Accepted by
    ``quantize_net``/``tune`` as ``calib_data`` and by :func:`gluon_int8.evaluation.evaluate`.

    ``bad_images``: ``'skip'`` logs a warning naming each unreadable image and goes on
    (the batch is one image shorter; :attr:`skipped` lists them after an iteration), or
    ``'raise'`` stops with a ``ValueError`` naming it. ``param`` is the caller's name for
    the data in error messages.
    """

    def __init__(self, path: Union[str, os.PathLike], preprocess: Preprocess = IMAGENET,
                 batch_size: int = 32, *, shuffle: bool = False, seed: int = 0,
                 bad_images: str = 'skip', param: str = 'data'):
        self.path = os.fspath(path)
        self.param = param
        if not isinstance(preprocess, Preprocess):
            raise TypeError('preprocess: got %s; expected a gluon_int8.datasets.Preprocess'
                            % type(preprocess).__name__)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError('batch_size: got %r; expected a positive int' % (batch_size,))
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError('seed: got %r; expected an int >= 0' % (seed,))
        if bad_images not in BAD_IMAGES:
            raise ValueError('bad_images: got %r; expected one of %s'
                             % (bad_images, list(BAD_IMAGES)))
        self.preprocess, self.batch_size = preprocess, batch_size
        self.shuffle, self.seed, self.bad_images = bool(shuffle), seed, bad_images
        self.classes: Optional[List[str]] = None
        self.skipped: List[Tuple[str, str]] = []
        self._items, self._records = self._open()

    # -- opening ----------------------------------------------------------------------

    def _open(self):
        """(folder items, None) or (None, RecordFileDataset or None for sequential)."""
        if os.path.isdir(self.path):
            items, self.classes = _folder_items(self.path, self.param)
            return items, None
        if not os.path.isfile(self.path) or not self.path.endswith('.rec'):
            raise ValueError('%s: got %r; expected an image folder (class subfolders, or '
                             'images directly in it) or a RecordIO .rec file'
                             % (self.param, self.path))
        if os.path.isfile(os.path.splitext(self.path)[0] + '.idx'):
            return None, mx.gluon.data.RecordFileDataset(self.path)
        if self.shuffle:
            log.warning('%s: %r has no .idx beside it, so its records are read in file '
                        'order, not shuffled (im2rec and mx.recordio.MXIndexedRecordIO '
                        'write the index)', self.param, self.path)
        return None, None

    @property
    def kind(self) -> str:
        """'folder', 'flat folder', 'indexed rec' or 'sequential rec'."""
        if self._items is not None:
            return 'folder' if self.classes is not None else 'flat folder'
        return 'indexed rec' if self._records is not None else 'sequential rec'

    @property
    def has_labels(self) -> bool:
        """False for a flat folder (calibration only)."""
        return self.kind != 'flat folder'

    @property
    def num_images(self) -> Optional[int]:
        """Number of images listed (None for a .rec without .idx: unknown until read)."""
        if self._items is not None:
            return len(self._items)
        return len(self._records) if self._records is not None else None

    @property
    def num_batches(self) -> Optional[int]:
        """Batches per iteration, before any image is skipped (None when unknown)."""
        count = self.num_images
        return None if count is None else -(-count // self.batch_size)

    # -- reading ----------------------------------------------------------------------

    def _order(self) -> np.ndarray:
        order = np.arange(self.num_images)
        return np.random.default_rng(self.seed).permutation(order) if self.shuffle else order

    def _raw(self) -> Iterator[Union[tuple, _Bad]]:
        """(where, 'file' or 'bytes', file path or record bytes, label) in order, or a
        :class:`_Bad` for a record that cannot be read."""
        if self._items is not None:
            for i in self._order():
                path, label = self._items[i]
                yield path, 'file', path, float(label)
        elif self._records is not None:
            for i in self._order():
                where = '%s#%d' % (self.path, i)
                try:
                    record = self._records[int(i)]
                except mx.base.MXNetError as err:
                    yield _Bad(where, _reason(err))
                    continue
                yield self._unpacked(where, record)
        else:
            yield from self._sequential()

    def _sequential(self) -> Iterator[Union[tuple, _Bad]]:
        """The records of a .rec without .idx, in file order."""
        reader = mx.recordio.MXRecordIO(self.path, 'r')
        try:
            index = 0
            while True:
                try:
                    record = reader.read()
                except mx.base.MXNetError as err:
                    raise ValueError('%s: %r cannot be read past record %d (%s)'
                                     % (self.param, self.path, index, _reason(err))) from err
                if record is None:
                    return
                yield self._unpacked('%s#%d' % (self.path, index), record)
                index += 1
        finally:
            reader.close()

    @staticmethod
    def _unpacked(where: str, record: bytes) -> Union[tuple, _Bad]:
        try:
            header, payload = mx.recordio.unpack(record)
        except struct.error as err:
            return _Bad(where, 'not an image record (%s)' % err)
        return where, 'bytes', payload, _label(header.label)

    def _decode(self, where: str, how: str, source, label: float):
        """The preprocessed example and its label, or a :class:`_Bad`."""
        try:
            if how == 'file':
                image = mx.image.imread(source, **self.preprocess.decode_flags())
            else:
                image = mx.image.imdecode(source, **self.preprocess.decode_flags())
            # MXNet runs ops asynchronously: wait here, so that a decoding error surfaces
            # now, for this image, rather than in a later op or at exit
            image.wait_to_read()
            example = self.preprocess.apply(image)
            example.wait_to_read()
        except mx.base.MXNetError as err:
            return _Bad(where, _reason(err))
        return where, example, label

    def _report(self, bad: _Bad) -> None:
        if self.bad_images == 'raise':
            raise ValueError("%s: cannot read image %s (%s); bad_images='skip' reports "
                             'and skips such images' % (self.param, bad.where, bad.reason))
        log.warning('%s: skipped unreadable image %s (%s)', self.param, bad.where, bad.reason)
        self.skipped.append((bad.where, bad.reason))

    def _batch(self, examples: list) -> Tuple[mx.nd.NDArray, mx.nd.NDArray]:
        first_where, first, _ = examples[0]
        for where, example, _ in examples[1:]:
            if example.shape != first.shape:
                raise ValueError('%s: after preprocessing %s has shape %s but %s has %s; '
                                 'set preprocess resize/crop so that every image gets one '
                                 'size' % (self.param, first_where, first.shape, where,
                                           example.shape))
        data = mx.nd.stack(*[e for _, e, _ in examples])
        return data, mx.nd.array([label for _, _, label in examples], dtype=np.float32)

    def __iter__(self) -> Iterator[Tuple[mx.nd.NDArray, mx.nd.NDArray]]:
        self.skipped = []
        examples = []
        for raw in self._raw():
            decoded = raw if isinstance(raw, _Bad) else self._decode(*raw)
            if isinstance(decoded, _Bad):
                self._report(decoded)
                continue
            examples.append(decoded)
            if len(examples) == self.batch_size:
                yield self._batch(examples)
                examples = []
        if examples:
            yield self._batch(examples)
        if self.skipped:
            log.warning('%s: %d unreadable image(s) skipped in %s', self.param,
                        len(self.skipped), self.path)

    def __repr__(self) -> str:
        return ('ImageSource(%r, %s, batch_size=%d, shuffle=%s, seed=%r)'
                % (self.path, self.kind, self.batch_size, self.shuffle, self.seed))
