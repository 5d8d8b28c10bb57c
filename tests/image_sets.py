"""Image data the tests make: the bundled Fashion-MNIST slice written as PNG files in
class subfolders, as a flat folder, and as a RecordIO file (MXNet's recordio tools),
with and without its .idx. PNG is lossless, so every reader must give back exactly the
array the slice holds."""
import os
import shutil

import mxnet as mx
import numpy as np

from gluon_int8_samples import fashion_mnist as fm

#: The Fashion-MNIST models' input: 28x28 grayscale, (x / 255 - MEAN) / STD.
FASHION = fm.IMAGE_PREPROCESS


def write_image_sets(root: str, count: int) -> dict:
    """The first ``count`` slice images as 'folder', 'flat', 'rec' and 'rec_no_idx', with
    'raw' (uint8) and 'labels' arrays."""
    paths = fm.write_image_files(root, count)
    paths['rec_no_idx'] = os.path.join(root, 'sequential', 'slice.rec')
    os.makedirs(os.path.dirname(paths['rec_no_idx']))
    shutil.copy(paths['rec'], paths['rec_no_idx'])
    raw, labels = fm.bundled_raw_slice()
    return dict(paths, raw=raw[:count], labels=labels[:count])


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
