"""Image folders and RecordIO files as data: readers, preprocessing, seeded shuffling,
unreadable images, and the same numbers as the array path on the same images."""
import logging
import os

import cv2
import mxnet as mx
import numpy as np
import pytest

import gluon_int8
from gluon_int8 import datasets, zoo
from gluon_int8.data import iter_batches
from gluon_int8.datasets import ImageSource, Preprocess
from gluon_int8.evaluation import evaluate, load_model, parse_metrics
from gluon_int8_samples import fashion_mnist as fm
from image_sets import FASHION, folder_order, write_image_sets, write_rec

COUNT = 80  # images; batches of 32 leave a partial last batch


@pytest.fixture(scope='module')
def sets(tmp_path_factory):
    return write_image_sets(str(tmp_path_factory.mktemp('images')), COUNT)


def read_all(source):
    batches = list(source)
    return (np.concatenate([b[0].asnumpy() for b in batches]),
            np.concatenate([b[1].asnumpy() for b in batches]))


@pytest.mark.parametrize('name, kind', [('folder', 'folder'), ('rec', 'indexed rec'),
                                        ('rec_no_idx', 'sequential rec')])
def test_every_reader_gives_the_array_path_bit_for_bit(sets, name, kind):
    source = ImageSource(sets[name], FASHION, batch_size=32)
    assert source.kind == kind
    assert source.num_batches == (None if kind == 'sequential rec' else 3)
    data, labels = read_all(source)
    order = folder_order(sets['labels']) if name == 'folder' else np.arange(COUNT)
    assert data.dtype == np.float32 and data.shape == (COUNT, 1, 28, 28)
    np.testing.assert_array_equal(data, fm.normalize(sets['raw'][order]))
    np.testing.assert_array_equal(labels, sets['labels'][order])
    if name == 'folder':
        assert source.classes == ['class%d' % c for c in range(10)]


def test_shuffling_is_seeded(sets):
    first = read_all(ImageSource(sets['rec'], FASHION, 16, shuffle=True, seed=7))[1]
    again = read_all(ImageSource(sets['rec'], FASHION, 16, shuffle=True, seed=7))[1]
    other = read_all(ImageSource(sets['rec'], FASHION, 16, shuffle=True, seed=8))[1]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first, sets['labels'])
    assert sorted(first) == sorted(sets['labels'])  # every image once


def test_a_rec_without_idx_is_read_in_file_order_and_says_so(sets, caplog):
    with caplog.at_level(logging.WARNING, logger='gluon_int8.datasets'):
        source = ImageSource(sets['rec_no_idx'], FASHION, 32, shuffle=True)
    assert 'no .idx' in caplog.text and sets['rec_no_idx'] in caplog.text
    np.testing.assert_array_equal(read_all(source)[1], sets['labels'])


def test_flat_folder_calibrates_but_does_not_evaluate(sets):
    source = ImageSource(sets['flat'], FASHION, 32)
    assert source.kind == 'flat folder' and not source.has_labels
    data, labels = read_all(source)
    np.testing.assert_array_equal(data, fm.normalize(sets['raw']))
    assert (labels == -1).all()
    with pytest.raises(ValueError, match='flat folder'):
        evaluate(fm.get_model('resnet'), source)


def test_corrupt_images_are_reported_by_path_then_skipped_or_refused(sets, tmp_path, caplog):
    folder = tmp_path / 'folder'
    os.makedirs(folder / 'class3')
    cv2.imwrite(str(folder / 'class3' / 'good.png'), sets['raw'][0])
    (folder / 'class3' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    rec = str(tmp_path / 'bad.rec')
    write_rec(rec, sets['raw'][:5], sets['labels'][:5], bad={2})
    for path, where, good in ((str(folder), str(folder / 'class3' / 'broken.png'), 1),
                              (rec, rec + '#2', 4)):
        caplog.clear()
        source = ImageSource(path, FASHION, 32)
        with caplog.at_level(logging.WARNING, logger='gluon_int8.datasets'):
            data, _ = read_all(source)
        assert len(data) == good
        assert [w for w, _ in source.skipped] == [where]
        assert 'Decoding failed' in source.skipped[0][1]
        assert where in caplog.text
        with pytest.raises(ValueError, match="data: cannot read image %s" % where):
            read_all(ImageSource(path, FASHION, 32, bad_images='raise'))


def test_imagenet_preprocessing_by_hand(tmp_path):
    """A pure red 300x400 photo: known values after resize, crop, mean/std, per order."""
    path = tmp_path / 'red' / 'red.jpg'
    os.makedirs(path.parent)
    cv2.imwrite(str(path), np.tile(np.array([0, 0, 255], np.uint8), (300, 400, 1)))  # BGR
    mean, std = np.array(datasets.IMAGENET_MEAN), np.array(datasets.IMAGENET_STD)
    rgb = (np.array([1.0, 0.0, 0.0]) - mean) / std  # [2.2489, -2.0357, -1.8044]
    bgr = (np.array([0.0, 0.0, 1.0]) - mean) / std
    cases = [(datasets.IMAGENET, (3, 224, 224), rgb), (datasets.INCEPTION, (3, 299, 299), rgb),
             (datasets.PREPROCESS['ssd_300'], (3, 300, 300), rgb),
             (Preprocess(layout='NHWC'), (224, 224, 3), rgb),
             (Preprocess(channel_order='BGR'), (3, 224, 224), bgr)]
    for preprocess, shape, expected in cases:
        data, label = next(iter(ImageSource(str(tmp_path), preprocess, 1)))
        assert data.shape == (1,) + shape == (1,) + preprocess.input_shape
        pixels = data.asnumpy()[0].reshape(3, -1) if preprocess.layout == 'NCHW' else \
            data.asnumpy()[0].reshape(-1, 3).T
        # JPEG keeps a flat red within 1-2 levels of 255/0
        np.testing.assert_allclose(np.median(pixels, axis=1), expected, atol=0.04)
        assert label.asnumpy().tolist() == [0.0]


@pytest.mark.parametrize('kwargs, field', [
    (dict(resize=0), 'resize'), (dict(crop=2.5), 'crop'), (dict(channels=2), 'channels'),
    (dict(mean=(0.5,)), 'mean'), (dict(std=(1, 0, 1)), 'std'),
    (dict(channel_order='RBG'), 'channel_order'), (dict(layout='CHW'), 'layout'),
])
def test_bad_preprocessing_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=r'^preprocess\.%s: got' % field):
        Preprocess(**kwargs)


def test_bad_sources_name_the_parameter(sets, tmp_path):
    with pytest.raises(ValueError, match=r"^calib_data: got '.*missing'; expected an image "
                                         r'folder'):
        ImageSource(str(tmp_path / 'missing'), param='calib_data')
    os.makedirs(tmp_path / 'empty')
    with pytest.raises(ValueError, match='holds no .jpg/.jpeg/.png images'):
        ImageSource(str(tmp_path / 'empty'))
    for kwargs, param in ((dict(batch_size=0), 'batch_size'), (dict(seed=-1), 'seed'),
                          (dict(bad_images='ignore'), 'bad_images')):
        with pytest.raises(ValueError, match='^%s: got' % param):
            ImageSource(sets['rec'], **kwargs)
    with pytest.raises(ValueError, match='^metric: got'):
        parse_metrics('top1,accuracy')
    two_sizes = Preprocess(resize=20, crop=None, mean=(0.5,), std=(0.5,), channels=1)
    cv2.imwrite(str(tmp_path / 'empty' / 'wide.png'), np.zeros((10, 30), np.uint8))
    cv2.imwrite(str(tmp_path / 'empty' / 'tall.png'), np.zeros((30, 10), np.uint8))
    with pytest.raises(ValueError, match='after preprocessing .*tall.png has shape'):
        read_all(ImageSource(str(tmp_path / 'empty'), two_sizes, 2))


def test_a_path_is_calibration_data(sets):
    """iter_batches reads a path with the ImageNet preprocessing, shuffled with seed 0."""
    batches = list(iter_batches(sets['folder'], 1, num_calib_batches=2))
    assert [b[0].shape for b in batches] == [(32, 3, 224, 224)] * 2
    again = list(iter_batches(sets['folder'], 1, num_calib_batches=2))
    np.testing.assert_array_equal(batches[1][0].asnumpy(), again[1][0].asnumpy())


def test_zoo_presets_preprocess_to_their_input_shape():
    assert zoo.preset('inceptionv3').preprocess.input_shape == (3, 299, 299)
    assert zoo.preset('ssd_512_resnet50_v1_voc').preprocess.input_shape == (3, 512, 512)
    for name, family in zoo.PRESETS.items():
        assert family.preprocess.input_shape == family.input_shape, name


def test_folder_and_rec_give_the_array_accuracy_fp32_and_int8(sets, tmp_path):
    net = fm.get_model('resnet')
    qnet = gluon_int8.quantize_net(net, ImageSource(sets['folder'], FASHION, 16, shuffle=True),
                                   mode='naive', num_calib_batches=2)
    images, labels = fm.normalize(sets['raw']), sets['labels']
    prefix = str(tmp_path / 'fp32')
    net.hybridize()
    net(mx.nd.array(images[:1]))
    net.export(prefix)
    for block in (load_model(prefix), qnet):
        by_array = evaluate(block, (images, labels), 'top1,top5')
        assert by_array.accuracy['top1'] == fm.evaluate(block, images, labels)
        for name in ('folder', 'rec', 'rec_no_idx'):
            from_disk = evaluate(block, ImageSource(sets[name], FASHION, 32), 'top1,top5')
            assert from_disk == by_array, name
    assert 0.9 <= by_array.accuracy['top1'] < by_array.accuracy['top5'] == 1.0
