"""Image data the tests make: the bundled Fashion-MNIST slice written as PNG files in
class subfolders, as a flat folder, and as a RecordIO file (MXNet's recordio tools),
with and without its .idx. PNG is lossless, so every reader must give back exactly the
array the slice holds."""
import os
import shutil

import cv2
import mxnet as mx
import numpy as np

from gluon_int8.datasets import Preprocess
from gluon_int8_samples import fashion_mnist as fm

#: The Fashion-MNIST models' input: 28x28 grayscale, (x / 255 - MEAN) / STD.
FASHION = Preprocess(resize=None, crop=None, mean=(fm.MEAN,), std=(fm.STD,), channels=1)


def write_image_sets(root: str, count: int) -> dict:
    """The first ``count`` slice images as 'folder', 'flat', 'rec' and 'rec_no_idx'."""
    raw, labels = fm.bundled_raw_slice()
    raw, labels = raw[:count], labels[:count]
    paths = {name: os.path.join(root, name) for name in ('folder', 'flat')}
    paths.update(rec=os.path.join(root, 'slice.rec'),
                 rec_no_idx=os.path.join(root, 'sequential', 'slice.rec'))
    os.makedirs(paths['flat'])
    for i, (image, label) in enumerate(zip(raw, labels)):
        folder = os.path.join(paths['folder'], 'class%d' % label)
        os.makedirs(folder, exist_ok=True)
        cv2.imwrite(os.path.join(folder, '%04d.png' % i), image)
        cv2.imwrite(os.path.join(paths['flat'], '%04d.png' % i), image)
    write_rec(paths['rec'], raw, labels)
    os.makedirs(os.path.dirname(paths['rec_no_idx']))
    shutil.copy(paths['rec'], paths['rec_no_idx'])
    return dict(paths, raw=raw, labels=labels)


def write_rec(path: str, images, labels, bad=()) -> None:
    """An indexed .rec of PNG records; record ids in ``bad`` hold bytes no decoder reads."""
    writer = mx.recordio.MXIndexedRecordIO(os.path.splitext(path)[0] + '.idx', path, 'w')
    for i, (image, label) in enumerate(zip(images, labels)):
        header = mx.recordio.IRHeader(0, float(label), i, 0)
        record = (mx.recordio.pack(header, b'not an image') if i in bad else
                  mx.recordio.pack_img(header, image, img_fmt='.png'))
        writer.write_idx(i, record)
    writer.close()


def folder_order(labels: np.ndarray) -> np.ndarray:
    """The order ImageFolderDataset lists write_image_sets' folder: by class, then file."""
    return np.array(sorted(range(len(labels)), key=lambda i: ('class%d' % labels[i], i)))
