"""Fashion-MNIST data and small pretrained Gluon models for INT8 experiments.

This module provides:

* data access: :func:`load_split` reads the Debian ``dataset-fashion-mnist``
  idx files directly with numpy (from :data:`DEBIAN_ROOT`, or the folder named
  by the environment variable :data:`ROOT_ENV`, read only), :func:`bundled_slice`
  reads a small slice of the test set shipped with the package, and
  :func:`default_data` picks whichever is available;
* one normalization, :func:`normalize`, used for training and evaluation
  (``(x / 255 - MEAN) / STD``, NCHW float32, shape ``(N, 1, 28, 28)``), and the
  same as :data:`IMAGE_PREPROCESS` for images read from files, which
  :func:`write_image_files` writes from the bundled slice (an image folder and a
  RecordIO file, for the command-line flow and the tests);
* small model families mirroring the classic CNN designs used in
  quantization studies -- ``'resnet'`` (ResNet-v1 basic blocks with a
  residual elementwise sum), ``'mobilenet'`` (depthwise-separable
  convolutions) and ``'inception'`` (multi-branch blocks joined by a channel
  concat), and three more (``'preact_resnet'``, ``'shufflenet'``,
  ``'mobilenetv3'``) -- with parameters trained by
  ``examples/fashion_mnist/train.py`` shipped as
  ``gluon_int8_samples/data/fashion_mnist_<name>.params``;
* :func:`get_model` to build a family and load its shipped parameters, and
  :func:`evaluate` to measure top-1 accuracy of any callable block, and
  :func:`paired_difference` to tell whether two models' top-1 on the same images
  differ by more than chance.
"""

import gzip
import logging
import math
import os

import mxnet as mx
import numpy as np
from mxnet.gluon import nn

from gluon_int8.datasets import Preprocess

LOGGER = logging.getLogger(__name__)

#: Directory of the Debian ``dataset-fashion-mnist`` package.
DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
#: Environment variable naming another folder of the four idx ``.gz`` files; it
#: replaces :data:`DEBIAN_ROOT` wherever no ``root`` is passed (e.g. to run the
#: tests as on a machine without the dataset: point it at an empty folder).
ROOT_ENV = "GLUON_INT8_FASHION_MNIST"
#: What to do where the full dataset is needed and missing.
INSTALL_HINT = ("apt-get install dataset-fashion-mnist (Debian), or set %s to a "
                "folder holding the four Fashion-MNIST idx .gz files" % ROOT_ENV)
#: Directory holding the shipped parameters and the bundled test slice.
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
#: Bundled slice: the first :data:`SLICE_SIZE` test images (uint8) + labels.
SLICE_PATH = os.path.join(DATA_DIR, "fashion_mnist_test_slice.npz")
SLICE_SIZE = 1000

#: Per-channel statistics of the Fashion-MNIST training set (pixels in [0, 1]).
MEAN = 0.2860
STD = 0.3530
NUM_CLASSES = 10
INPUT_SHAPE = (1, 28, 28)
#: :func:`normalize` for image files: 28x28 grayscale as is, the same mean/std.
IMAGE_PREPROCESS = Preprocess(resize=None, crop=None, mean=(MEAN,), std=(STD,), channels=1)

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

def _read_idx(path, expected_magic):
    """Read a gzip'd idx file and return its payload as a uint8 array."""
    with gzip.open(path, "rb") as fobj:
        raw = fobj.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic != expected_magic:
        raise ValueError("%s: bad idx magic 0x%08x (expected 0x%08x)"
                         % (path, magic, expected_magic))
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    data = np.frombuffer(raw, dtype=np.uint8, offset=offset)
    expected = int(np.prod(dims))
    if data.size != expected:
        raise ValueError("%s: payload has %d bytes, header says %d"
                         % (path, data.size, expected))
    return data.reshape(dims)


def dataset_root(root=None):
    """The folder of the idx files: ``root``, else ``$GLUON_INT8_FASHION_MNIST``,
    else :data:`DEBIAN_ROOT`."""
    if root is not None:
        return root
    return os.environ.get(ROOT_ENV) or DEBIAN_ROOT


def load_raw_split(split="test", root=None):
    """Return ``(images uint8 (N, 28, 28), labels int32 (N,))`` of a split.

    ``split`` is ``'train'`` or ``'test'``; ``root`` defaults to
    :func:`dataset_root`.  Raises ``FileNotFoundError`` naming the missing
    file and what to install if the files are absent.
    """
    if split not in _FILES:
        raise ValueError("split must be one of %s, got %r"
                         % (sorted(_FILES), split))
    root = dataset_root(root)
    img_name, lbl_name = _FILES[split]
    for name in (img_name, lbl_name):
        if not os.path.isfile(os.path.join(root, name)):
            raise FileNotFoundError(
                "Fashion-MNIST %s split: %s not found; %s"
                % (split, os.path.join(root, name), INSTALL_HINT))
    images = _read_idx(os.path.join(root, img_name), 0x00000803)
    labels = _read_idx(os.path.join(root, lbl_name), 0x00000801)
    if images.shape[0] != labels.shape[0]:
        raise ValueError("%s split in %s: %d images but %d labels"
                         % (split, root, images.shape[0], labels.shape[0]))
    return images, labels.astype(np.int32)


def normalize(images):
    """Map uint8 images ``(N, 28, 28)`` or ``(N, 1, 28, 28)`` to model input.

    Returns float32 NCHW ``(N, 1, 28, 28)`` computed as
    ``(x / 255 - MEAN) / STD``.  This is the only normalization used for
    training and evaluation.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[:, None, :, :]
    if images.ndim != 4 or images.shape[1:] != INPUT_SHAPE:
        raise ValueError("expected images of shape (N, 28, 28) or "
                         "(N, 1, 28, 28), got %s" % (images.shape,))
    out = images.astype(np.float32) / np.float32(255.0)
    out -= np.float32(MEAN)
    out /= np.float32(STD)
    return out


def load_split(split="test", root=None):
    """Return ``(images float32 (N, 1, 28, 28) normalized, labels int32)``.

    Reads the Debian idx files from ``root`` (default :func:`dataset_root`).
    """
    images, labels = load_raw_split(split, root)
    return normalize(images), labels


def bundled_raw_slice():
    """Return ``(images uint8 (1000, 28, 28), labels int32)`` of the shipped slice:
    the first 1000 Fashion-MNIST test images, as the idx files hold them."""
    with np.load(SLICE_PATH) as data:
        return data["images"], data["labels"].astype(np.int32)


def bundled_slice():
    """Return ``(images, labels)`` of the slice shipped with the package.

    The slice holds the first 1000 Fashion-MNIST test images; images are
    normalized float32 ``(1000, 1, 28, 28)`` and labels int32 in ``0..9``.
    """
    images, labels = bundled_raw_slice()
    return normalize(images), labels


def write_image_files(root, count=SLICE_SIZE):
    """Write the first ``count`` images of the bundled slice as image files.

    ``root/folder/class<k>/<i>.png`` (one subfolder per class), ``root/flat/<i>.png``
    and ``root/slice.rec`` + ``slice.idx`` (PNG records with their labels, written
    with MXNet's ``recordio``; OpenCV encodes). PNG is lossless: read with
    :data:`IMAGE_PREPROCESS` they give :func:`bundled_slice` exactly. Returns the
    paths by name ('folder', 'flat', 'rec').
    """
    images, labels = bundled_raw_slice()
    paths = {"folder": os.path.join(root, "folder"), "flat": os.path.join(root, "flat"),
             "rec": os.path.join(root, "slice.rec")}
    os.makedirs(paths["flat"], exist_ok=True)
    writer = mx.recordio.MXIndexedRecordIO(os.path.join(root, "slice.idx"), paths["rec"], "w")
    for i, (image, label) in enumerate(zip(images[:count], labels[:count])):
        png = _png(image)
        for folder in (os.path.join(paths["folder"], "class%d" % label), paths["flat"]):
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "%04d.png" % i), "wb") as fobj:
                fobj.write(png)
        header = mx.recordio.IRHeader(0, float(label), i, 0)
        writer.write_idx(i, mx.recordio.pack(header, png))
    writer.close()
    LOGGER.info("wrote %d images to %s", min(count, len(labels)), root)
    return paths


def _png(image):
    import cv2  # pylint: disable=import-outside-toplevel
    ok, png = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("image: OpenCV could not encode a %s %s array as PNG"
                         % (image.dtype, image.shape))
    return png.tobytes()


def write_bundled_slice(path, root=None, count=SLICE_SIZE):
    """Write the first ``count`` test images (uint8) and labels to ``path``.

    ``path`` has no default: the shipped slice is :data:`SLICE_PATH`, inside the
    installed package, which only a script run from the repository should rewrite.
    """
    images, labels = load_raw_split("test", root)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, images=images[:count].astype(np.uint8),
                        labels=labels[:count].astype(np.uint8))
    LOGGER.info("wrote %d test images to %s", count, path)
    return path


def debian_available(root=None):
    """Return True if all four Fashion-MNIST files exist in ``root`` (default
    :func:`dataset_root`)."""
    root = dataset_root(root)
    return all(os.path.isfile(os.path.join(root, name))
               for pair in _FILES.values() for name in pair)


def default_data(split="test", root=None):
    """Return ``(images, labels, source)`` for ``split``.

    ``source`` is ``'debian'`` when the full split was read from the Debian
    files, or ``'bundled'`` when they are missing and the shipped 1000-image
    test slice is returned instead (only possible for ``split='test'``).
    """
    if debian_available(root):
        images, labels = load_split(split, root)
        LOGGER.info("Fashion-MNIST %s split: %d images from %s", split,
                    len(labels), dataset_root(root))
        return images, labels, "debian"
    if split != "test":
        raise FileNotFoundError(
            "Fashion-MNIST %s split not found under %s and only a test slice "
            "is bundled; %s" % (split, dataset_root(root), INSTALL_HINT))
    images, labels = bundled_slice()
    LOGGER.warning("Debian Fashion-MNIST files not found; using the bundled "
                   "%d-image test slice %s", len(labels), SLICE_PATH)
    return images, labels, "bundled"


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------

def _conv_bn_relu(channels, in_channels, kernel=3, strides=1, groups=1,
                  relu=True):
    """Return a Sequential ``Conv2D -> BatchNorm [-> ReLU]`` unit."""
    seq = nn.HybridSequential(prefix="")
    seq.add(nn.Conv2D(channels, kernel, strides=strides, padding=kernel // 2,
                      groups=groups, use_bias=False, in_channels=in_channels))
    seq.add(nn.BatchNorm(in_channels=channels))
    if relu:
        seq.add(nn.Activation("relu"))
    return seq


class _Classifier(nn.HybridBlock):
    """Common head: ``features`` (a HybridSequential) -> global pool -> flatten -> Dense."""

    def _add_head(self, in_ch, classes):
        self.features.add(nn.GlobalAvgPool2D())
        self.features.add(nn.Flatten())
        self.output = nn.Dense(classes, in_units=in_ch)

    def hybrid_forward(self, F, x):  # pylint: disable=arguments-differ
        return self.output(self.features(x))


class BasicBlockV1(nn.HybridBlock):
    """ResNet-v1 basic block: two 3x3 Conv-BN, residual sum, then ReLU."""

    def __init__(self, channels, in_channels, strides=1, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.body = nn.HybridSequential(prefix="")
            self.body.add(_conv_bn_relu(channels, in_channels, 3, strides))
            self.body.add(_conv_bn_relu(channels, channels, 3, 1, relu=False))
            if strides != 1 or channels != in_channels:
                self.downsample = _conv_bn_relu(channels, in_channels, 1,
                                                strides, relu=False)
            else:
                self.downsample = None

    def hybrid_forward(self, F, x):  # pylint: disable=arguments-differ
        residual = x if self.downsample is None else self.downsample(x)
        return F.Activation(self.body(x) + residual, act_type="relu")


class FashionResNet(_Classifier):
    """Small ResNet-v1 for 28x28 inputs: stem + 3 stages of 2 basic blocks."""

    def __init__(self, channels=(24, 48, 96), blocks=2, stem=16,
                 classes=NUM_CLASSES, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.features = nn.HybridSequential(prefix="")
            self.features.add(_conv_bn_relu(stem, 1, 3, 1))
            in_ch = stem
            for out_ch in channels:
                for i in range(blocks):
                    # every stage halves the resolution: 28 -> 14 -> 7 -> 4
                    strides = 2 if i == 0 else 1
                    self.features.add(BasicBlockV1(out_ch, in_ch, strides))
                    in_ch = out_ch
            self._add_head(in_ch, classes)


class FashionMobileNet(_Classifier):
    """Small MobileNet-v1: Conv-BN-ReLU stem then depthwise-separable units.

    Each unit is a depthwise 3x3 convolution (``groups=channels``) + BN + ReLU
    followed by a pointwise 1x1 convolution + BN + ReLU.
    """

    # (output channels, stride) of each depthwise-separable unit
    UNITS = ((64, 2), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1))

    def __init__(self, stem=32, units=UNITS, classes=NUM_CLASSES, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.features = nn.HybridSequential(prefix="")
            self.features.add(_conv_bn_relu(stem, 1, 3, 1))
            in_ch = stem
            for out_ch, strides in units:
                self.features.add(_conv_bn_relu(in_ch, in_ch, 3, strides,
                                                groups=in_ch))
                self.features.add(_conv_bn_relu(out_ch, in_ch, 1, 1))
                in_ch = out_ch
            self._add_head(in_ch, classes)


class InceptionBlock(nn.HybridBlock):
    """Inception block: 1x1, 1x1->3x3, 1x1->3x3->3x3 and pool->1x1 branches.

    Every convolution is followed by BN + ReLU; the four branches are joined
    with a channel concat.
    """

    def __init__(self, in_channels, c1, c3r, c3, cdr, cd, cpool, **kwargs):
        super().__init__(**kwargs)
        self.out_channels = c1 + c3 + cd + cpool
        with self.name_scope():
            self.branch1 = _conv_bn_relu(c1, in_channels, 1)
            self.branch3 = nn.HybridSequential(prefix="")
            self.branch3.add(_conv_bn_relu(c3r, in_channels, 1))
            self.branch3.add(_conv_bn_relu(c3, c3r, 3))
            self.branch_dbl = nn.HybridSequential(prefix="")
            self.branch_dbl.add(_conv_bn_relu(cdr, in_channels, 1))
            self.branch_dbl.add(_conv_bn_relu(cd, cdr, 3))
            self.branch_dbl.add(_conv_bn_relu(cd, cd, 3))
            self.branch_pool = nn.HybridSequential(prefix="")
            self.branch_pool.add(nn.AvgPool2D(3, strides=1, padding=1,
                                              count_include_pad=False))
            self.branch_pool.add(_conv_bn_relu(cpool, in_channels, 1))

    def hybrid_forward(self, F, x):  # pylint: disable=arguments-differ
        return F.concat(self.branch1(x), self.branch3(x), self.branch_dbl(x),
                        self.branch_pool(x), dim=1)


class FashionInception(_Classifier):
    """Small Inception network: stem, 4 inception blocks, max-pool reductions."""

    def __init__(self, classes=NUM_CLASSES, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.features = nn.HybridSequential(prefix="")
            self.features.add(_conv_bn_relu(32, 1, 3, 1))
            self.features.add(nn.MaxPool2D(2, 2))                    # 14x14
            block = InceptionBlock(32, 16, 24, 32, 8, 16, 16)       # -> 80
            self.features.add(block)
            block = InceptionBlock(block.out_channels, 32, 32, 48, 12, 24, 24)
            self.features.add(block)                                # -> 128
            self.features.add(nn.MaxPool2D(2, 2))                    # 7x7
            block = InceptionBlock(block.out_channels, 48, 32, 64, 16, 32, 32)
            self.features.add(block)                                # -> 176
            block = InceptionBlock(block.out_channels, 64, 48, 80, 24, 48, 48)
            self.features.add(block)                                # -> 240
            self._add_head(block.out_channels, classes)


class PreActBlock(nn.HybridBlock):
    """Pre-activation basic block (He et al. 2016, "Identity Mappings in Deep Residual
    Networks"): ``BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3``, plus the identity
    ``x``, or a strided 1x1 conv of the pre-activated input where the shape changes
    (GluonCV's ``BasicBlockV2``)."""

    def __init__(self, channels, in_channels, strides=1, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.bn1 = nn.BatchNorm(in_channels=in_channels)
            self.conv1 = nn.Conv2D(channels, 3, strides, 1, use_bias=False,
                                   in_channels=in_channels)
            self.bn2 = nn.BatchNorm(in_channels=channels)
            self.conv2 = nn.Conv2D(channels, 3, 1, 1, use_bias=False,
                                   in_channels=channels)
            if strides != 1 or channels != in_channels:
                self.downsample = nn.Conv2D(channels, 1, strides, use_bias=False,
                                            in_channels=in_channels)
            else:
                self.downsample = None

    def hybrid_forward(self, F, x):  # pylint: disable=arguments-differ
        act = F.Activation(self.bn1(x), act_type="relu")
        residual = x if self.downsample is None else self.downsample(act)
        out = self.conv1(act)
        out = self.conv2(F.Activation(self.bn2(out), act_type="relu"))
        return out + residual


class FashionPreActResNet(_Classifier):
    """Pre-activation ResNet in the CIFAR layout of He et al. 2016: a 3x3 stem conv
    without BN, 3 stages of 2 pre-activation blocks (16, 32, 64 channels; the first
    stage keeps the 28x28 resolution and its identity shortcuts read the stem conv's raw
    output), then ``BN -> ReLU -> global pool -> Dense``."""

    def __init__(self, channels=(16, 32, 64), blocks=2, stem=16,
                 classes=NUM_CLASSES, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.features = nn.HybridSequential(prefix="")
            self.features.add(nn.Conv2D(stem, 3, 1, 1, use_bias=False, in_channels=1))
            in_ch = stem
            for stage, out_ch in enumerate(channels):
                for i in range(blocks):
                    strides = 2 if i == 0 and stage > 0 else 1
                    self.features.add(PreActBlock(out_ch, in_ch, strides))
                    in_ch = out_ch
            self.features.add(nn.BatchNorm(in_channels=in_ch))
            self.features.add(nn.Activation("relu"))
            self._add_head(in_ch, classes)


def _shuffle(F, x, groups=2):
    """Channel shuffle: reshape to (N, g, C/g, H, W), swap the two channel axes, flatten
    them again (MXNet's special reshape codes -4, -3, -2, as GluonCV's ShuffleNet)."""
    x = F.reshape(x, shape=(0, -4, groups, -1, -2))
    return F.reshape(F.swapaxes(x, 1, 2), shape=(0, -3, -2))


class ShuffleUnit(nn.HybridBlock):
    """ShuffleNetV2 unit. Stride 1: split the channels in half, run one half through
    ``1x1-BN-ReLU -> dw3x3-BN -> 1x1-BN-ReLU``, concat, shuffle. Stride 2: both branches
    downsample (``dw3x3-BN -> 1x1-BN-ReLU`` on the left) and the channels double."""

    def __init__(self, channels, in_channels, strides=1, **kwargs):
        super().__init__(**kwargs)
        self.strides = strides
        branch_in = in_channels if strides == 2 else in_channels // 2
        mid = channels // 2
        with self.name_scope():
            self.branch = nn.HybridSequential(prefix="")
            self.branch.add(_conv_bn_relu(mid, branch_in, 1))
            self.branch.add(_conv_bn_relu(mid, mid, 3, strides, groups=mid, relu=False))
            self.branch.add(_conv_bn_relu(mid, mid, 1))
            if strides == 2:
                self.left = nn.HybridSequential(prefix="")
                self.left.add(_conv_bn_relu(in_channels, in_channels, 3, strides,
                                            groups=in_channels, relu=False))
                self.left.add(_conv_bn_relu(mid, in_channels, 1))

    def hybrid_forward(self, F, x):  # pylint: disable=arguments-differ
        if self.strides == 2:
            out = F.concat(self.left(x), self.branch(x), dim=1)
        else:
            left, right = F.split(x, num_outputs=2, axis=1)
            out = F.concat(left, self.branch(right), dim=1)
        return _shuffle(F, out)


class FashionShuffleNet(_Classifier):
    """Small ShuffleNetV2: Conv-BN-ReLU stem, 3 stages (a stride-2 unit, then stride-1
    units), a 1x1 Conv-BN-ReLU, global pool, Dense."""

    STAGES = ((48, 2), (96, 3), (192, 1))  # (channels, stride-1 units after the stride-2 one)

    def __init__(self, stem=24, stages=STAGES, last=256, classes=NUM_CLASSES, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.features = nn.HybridSequential(prefix="")
            self.features.add(_conv_bn_relu(stem, 1, 3, 1))
            in_ch = stem
            for out_ch, repeats in stages:
                self.features.add(ShuffleUnit(out_ch, in_ch, 2))
                for _ in range(repeats):
                    self.features.add(ShuffleUnit(out_ch, out_ch, 1))
                in_ch = out_ch
            self.features.add(_conv_bn_relu(last, in_ch, 1))
            self._add_head(last, classes)


def _hard_sigmoid(F, x):
    return F.clip(x + 3.0, 0.0, 6.0) / 6.0


class _Act(nn.HybridBlock):
    """ReLU or hard-swish ``x * clip(x + 3, 0, 6) / 6``."""

    def __init__(self, kind, **kwargs):
        super().__init__(**kwargs)
        self.kind = kind

    def hybrid_forward(self, F, x):  # pylint: disable=arguments-differ
        if self.kind == "relu":
            return F.Activation(x, act_type="relu")
        return x * _hard_sigmoid(F, x)


class SqueezeExcite(nn.HybridBlock):
    """``x * hard_sigmoid(conv(relu(conv(avgpool(x)))))``."""

    def __init__(self, channels, squeeze, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.reduce = nn.Conv2D(squeeze, 1, in_channels=channels)
            self.expand = nn.Conv2D(channels, 1, in_channels=squeeze)

    def hybrid_forward(self, F, x):  # pylint: disable=arguments-differ
        w = F.Pooling(x, kernel=(1, 1), global_pool=True, pool_type="avg")
        w = self.expand(F.Activation(self.reduce(w), act_type="relu"))
        return F.broadcast_mul(x, _hard_sigmoid(F, w))


class InvertedResidual(nn.HybridBlock):
    """MobileNetV3 block: ``1x1 expand-BN-act -> dw kxk-BN-act [-> SE] -> 1x1 project-BN``,
    plus the input where stride is 1 and the channels match."""

    def __init__(self, in_channels, kernel, expand, channels, se, act, strides, **kwargs):
        super().__init__(**kwargs)
        self.residual = strides == 1 and in_channels == channels
        with self.name_scope():
            self.body = nn.HybridSequential(prefix="")
            if expand != in_channels:
                self.body.add(_conv_bn_relu(expand, in_channels, 1, relu=False))
                self.body.add(_Act(act))
            self.body.add(_conv_bn_relu(expand, expand, kernel, strides, groups=expand,
                                        relu=False))
            self.body.add(_Act(act))
            if se:
                self.body.add(SqueezeExcite(expand, max(8, expand // 4)))
            self.body.add(_conv_bn_relu(channels, expand, 1, relu=False))

    def hybrid_forward(self, F, x):  # pylint: disable=arguments-differ
        out = self.body(x)
        return out + x if self.residual else out


class FashionMobileNetV3(_Classifier):
    """Small MobileNetV3: a stride-2 hard-swish stem, inverted residuals with depthwise convs and
    squeeze-excitation gates, a 1x1 Conv-BN-hard-swish, global pool, Dense."""

    # (kernel, expansion, output channels, SE, activation, stride)
    BLOCKS = ((3, 16, 16, True, "relu", 1),
              (3, 64, 24, False, "relu", 2),
              (3, 72, 24, False, "relu", 1),
              (5, 96, 40, True, "hswish", 2),
              (5, 120, 40, True, "hswish", 1),
              (3, 144, 48, True, "hswish", 1),
              (3, 192, 96, True, "hswish", 1),
              (3, 288, 96, True, "hswish", 1))

    def __init__(self, stem=16, blocks=BLOCKS, last=288, classes=NUM_CLASSES, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.features = nn.HybridSequential(prefix="")
            self.features.add(_conv_bn_relu(stem, 1, 3, 2, relu=False))  # 28 -> 14
            self.features.add(_Act("hswish"))
            in_ch = stem
            for kernel, expand, out_ch, se, act, strides in blocks:
                self.features.add(InvertedResidual(in_ch, kernel, expand, out_ch, se, act,
                                                   strides))
                in_ch = out_ch
            self.features.add(_conv_bn_relu(last, in_ch, 1, relu=False))
            self.features.add(_Act("hswish"))
            self._add_head(last, classes)


#: Model family name -> constructor.
MODELS = {
    "resnet": FashionResNet,
    "mobilenet": FashionMobileNet,
    "inception": FashionInception,
    "preact_resnet": FashionPreActResNet,
    "shufflenet": FashionShuffleNet,
    "mobilenetv3": FashionMobileNetV3,
}


def params_path(name):
    """Return the path of the shipped parameter file of model ``name``."""
    return os.path.join(DATA_DIR, "fashion_mnist_%s.params" % name)


def _check_name(name):
    if name not in MODELS:
        raise ValueError("unknown Fashion-MNIST model %r; valid names: %s"
                         % (name, ", ".join(sorted(MODELS))))


def load_params(net, path, ctx=None):
    """Load ``path`` into ``net`` strictly (no missing, extra or reshaped).

    Raises ``ValueError`` naming the file and the mismatch reported by MXNet.
    """
    ctx = mx.cpu() if ctx is None else ctx
    if not os.path.isfile(path):
        raise FileNotFoundError("parameter file not found: %s" % path)
    try:
        net.load_parameters(path, ctx=ctx, allow_missing=False,
                            ignore_extra=False)
    except (AssertionError, ValueError, KeyError, mx.base.MXNetError) as err:
        raise ValueError("parameters in %s do not match the %s architecture: "
                         "%s" % (path, type(net).__name__, err)) from err
    return net


def get_model(name, pretrained=True, ctx=None, params_file=None):
    """Build model family ``name`` ('resnet', 'mobilenet' or 'inception').

    With ``pretrained=True`` the shipped parameters (or ``params_file``) are
    loaded strictly; a file that does not match the architecture raises
    ``ValueError``.  With ``pretrained=False`` the parameters are freshly
    initialized (MSRA/He initialization for weights).  The block is returned
    un-hybridized; call ``net.hybridize()`` as needed.
    """
    _check_name(name)
    ctx = mx.cpu() if ctx is None else ctx
    net = MODELS[name]()
    if pretrained:
        load_params(net, params_file or params_path(name), ctx)
    else:
        net.initialize(mx.init.MSRAPrelu(factor_type="in", slope=0.0),
                       ctx=ctx)
    return net


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------

def predict(net, images, batch_size=256, ctx=None):
    """Return the argmax class predictions (int array) of ``net`` on images.

    ``net`` may be any callable mapping an NDArray batch to logits, e.g. an
    FP32 HybridBlock or a quantized SymbolBlock; for multi-output blocks the
    first output is used.
    """
    ctx = mx.cpu() if ctx is None else ctx
    if isinstance(images, mx.nd.NDArray):
        images = images.asnumpy()
    images = np.asarray(images, dtype=np.float32)
    preds = []
    for start in range(0, len(images), batch_size):
        batch = mx.nd.array(images[start:start + batch_size], ctx=ctx)
        out = net(batch)
        if isinstance(out, (list, tuple)):
            out = out[0]
        preds.append(out.argmax(axis=1).asnumpy().astype(np.int64))
    if not preds:
        return np.zeros((0,), dtype=np.int64)
    return np.concatenate(preds)


def evaluate(net, images, labels, batch_size=256, ctx=None):
    """Return the top-1 accuracy (float in [0, 1]) of ``net`` on the data."""
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(labels) == 0:
        raise ValueError("evaluate() needs at least one sample")
    preds = predict(net, images, batch_size, ctx)
    if preds.shape != labels.shape:
        raise ValueError("got %d predictions for %d labels"
                         % (preds.shape[0], labels.shape[0]))
    return float(np.mean(preds == labels))


def paired_difference(hits_a, hits_b):
    """How two models' top-1 differ on the same images, and whether that is chance.

    ``hits_a`` and ``hits_b`` say per image whether each model was right. Returns
    ``only_a`` (images only A gets right), ``only_b`` and ``p_value``: the exact two-sided
    McNemar test, the chance that the two counts split at least this unevenly if either
    model were as likely to win each disagreement (``2 * P(Binomial(n, 1/2) <= min)``,
    at most 1). Top-1 of A minus top-1 of B is ``(only_a - only_b) / len``.
    """
    hits_a = np.asarray(hits_a, dtype=bool).reshape(-1)
    hits_b = np.asarray(hits_b, dtype=bool).reshape(-1)
    if hits_a.shape != hits_b.shape:
        raise ValueError("paired_difference: hits_a has %d images, hits_b %d; they must "
                         "be the same images" % (hits_a.size, hits_b.size))
    only_a, only_b = int(np.sum(hits_a & ~hits_b)), int(np.sum(hits_b & ~hits_a))
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1))
    return {'only_a': only_a, 'only_b': only_b,
            'p_value': min(1.0, 2 * tail / 2 ** n)}
