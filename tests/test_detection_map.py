"""Detection: VOC mAP on hand-made boxes with hand-computed answers (and against GluonCV's
metric), the synthetic detection set, and the shipped SSD through INT8. Objects come
from the bundled Fashion-MNIST slice, so no dataset needs to be installed; the
determinism test also runs on the full dataset's splits where it is installed."""
import numpy as np
import pytest

from gluon_int8_samples import detection as det
from gluon_int8_samples import fashion_mnist as fm
from conftest import requires_fashion_mnist

SLICE = fm.bundled_raw_slice()

A = [0, 0, 10, 10]
B = [20, 20, 40, 40]
C = [50, 0, 60, 30]
FAR = [100, 100, 110, 110]


def single(preds, gts):
    """One image: preds [(box, score, id)], gts [(box, id)] -> voc_map argument lists."""
    pb = [np.array([p[0] for p in preds], float).reshape(-1, 4)]
    ps, pi = [np.array([p[1] for p in preds], float)], [np.array([p[2] for p in preds], float)]
    gb = [np.array([g[0] for g in gts], float).reshape(-1, 4)]
    return pb, ps, pi, gb, [np.array([g[1] for g in gts], float)]


def test_perfect_predictions_give_one():
    args = single([(A, 0.9, 0), (B, 0.8, 1), (C, 0.7, 1)], [(A, 0), (B, 1), (C, 1)])
    assert det.voc_map(*args) == 1.0
    assert det.voc_map(*args, use_07_metric=True) == 1.0


def test_false_positive_ranked_first():
    # class 0, GT A and B; ranked: FP (0.9), TP A (0.8), TP B (0.7)
    # precision 0, 1/2, 2/3 at recall 0, 1/2, 1; the envelope is 2/3 everywhere
    # area: 1/2 * 2/3 + 1/2 * 2/3 = 2/3; 11-point: 2/3 at every recall level
    args = single([(FAR, 0.9, 0), (A, 0.8, 0), (B, 0.7, 0)], [(A, 0), (B, 0)])
    assert det.voc_map(*args) == pytest.approx(2 / 3)
    assert det.voc_map(*args, use_07_metric=True) == pytest.approx(2 / 3)


def test_false_positive_between_true_positives():
    # ranked: TP (0.9), FP (0.8), TP (0.7); precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    # area: 1/2 * 1 + 1/2 * 2/3 = 5/6
    # 11-point: recall >= 0 .. 0.5 (6 levels) -> 1; 0.6 .. 1.0 (5 levels) -> 2/3: 28/33
    args = single([(A, 0.9, 0), (FAR, 0.8, 0), (B, 0.7, 0)], [(A, 0), (B, 0)])
    assert det.voc_map(*args) == pytest.approx(5 / 6)
    assert det.voc_map(*args, use_07_metric=True) == pytest.approx(28 / 33)


def test_duplicate_detection_is_a_false_positive():
    # a second box on A (IoU 0.8 >= 0.5) after A is taken counts as an FP: as above, 5/6
    args = single([(A, 0.9, 0), ([0, 0, 10, 8], 0.8, 0), (B, 0.7, 0)], [(A, 0), (B, 0)])
    assert det.voc_map(*args) == pytest.approx(5 / 6)


def test_missed_object():
    # 3 GT, 2 found at precision 1: area 2/3; 11-point: recall levels 0 .. 0.6 -> 7/11
    args = single([(A, 0.9, 0), (B, 0.8, 0)], [(A, 0), (B, 0), (C, 0)])
    assert det.voc_map(*args) == pytest.approx(2 / 3)
    assert det.voc_map(*args, use_07_metric=True) == pytest.approx(7 / 11)


def test_wrong_class_and_iou_threshold():
    # class 0: the box on A is labelled 1 -> missed (AP 0); class 1 has no GT: ignored.
    # class 2: IoU exactly 0.5 is a match ([0,0,10,5] vs A), IoU 0.49 is not
    args = single([(A, 0.9, 1)], [(A, 0)])
    assert det.per_class_ap(*args) == {0: 0.0}
    assert det.voc_map(*single([([0, 0, 10, 5], 0.9, 2)], [(A, 2)])) == 1.0
    assert det.voc_map(*single([([0, 0, 10, 4.9], 0.9, 2)], [(A, 2)])) == 0.0


def test_classes_without_ground_truth_and_padding_are_ignored():
    # class 3 exists only in predictions; id -1 rows are SSD padding
    args = single([(A, 0.9, 0), (B, 0.95, 3), (C, 0.99, -1)], [(A, 0)])
    assert det.per_class_ap(*args) == {0: 1.0}
    assert det.voc_map(*args) == 1.0


def test_detections_ranked_across_images():
    # image 1: GT A found at 0.6; image 2: GT B missed, an FP at 0.9
    # ranked FP, TP: precision 0, 1/2 at recall 0, 1/2 -> area 1/2 * 1/2 = 1/4
    args = [[np.array([A], float), np.array([FAR], float)], [np.array([0.6]), np.array([0.9])],
            [np.array([0]), np.array([0])], [np.array([A], float), np.array([B], float)],
            [np.array([0]), np.array([0])]]
    assert det.voc_map(*args) == pytest.approx(0.25)


def random_case(rng, num_images=25, num_classes=4):
    preds, gts = ([], [], []), ([], [])
    for _ in range(num_images):
        k = rng.integers(1, 5)
        xy = rng.uniform(0, 200, (k, 2))
        gt = np.concatenate([xy, xy + rng.uniform(10, 80, (k, 2))], axis=1)
        gt_ids = rng.integers(0, num_classes, k)
        keep = rng.random(k) < 0.8  # some objects missed
        jitter = gt[keep] + rng.normal(0, 6, (keep.sum(), 4))
        noise_xy = rng.uniform(0, 200, (3, 2))
        noise = np.concatenate([noise_xy, noise_xy + rng.uniform(10, 80, (3, 2))], axis=1)
        boxes = np.concatenate([jitter, noise, jitter[:1] + 2])  # + a likely duplicate
        ids = np.concatenate([np.where(rng.random(keep.sum()) < 0.9, gt_ids[keep],
                                       rng.integers(0, num_classes, keep.sum())),
                              rng.integers(0, num_classes, 3), gt_ids[keep][:1]])
        for out, value in zip(preds + gts, (boxes, rng.random(len(boxes)), ids, gt, gt_ids)):
            out.append(value)
    return preds, gts


@pytest.mark.parametrize('use_07', [False, True])
def test_matches_gluoncv_metric_on_random_boxes(use_07):
    from gluoncv.utils.metrics.voc_detection import VOC07MApMetric, VOCMApMetric
    (pb, ps, pi), (gb, gi) = random_case(np.random.default_rng(7))
    metric = (VOC07MApMetric if use_07 else VOCMApMetric)(iou_thresh=0.5)
    for boxes, scores, ids, gt, gt_ids in zip(pb, ps, pi, gb, gi):
        # gluoncv adds 1 to xmax/ymax (integer pixel boxes): hand it xmax - 1, ymax - 1
        minus = lambda b: b - np.array([0, 0, 1, 1])  # noqa: E731
        metric.update(minus(boxes)[None], ids[None], scores[None], minus(gt)[None], gt_ids[None])
    expected = metric.get()[1]
    assert 0.2 < expected < 0.95  # a case with both hits and misses
    assert det.voc_map(pb, ps, pi, gb, gi, use_07_metric=use_07) == pytest.approx(expected,
                                                                                   abs=1e-12)


@pytest.mark.parametrize('call, param', [
    (lambda: det.voc_map([np.zeros((2, 5))], [np.zeros(2)], [np.zeros(2)], [np.zeros((1, 4))],
                         [np.zeros(1)]), 'pred_boxes[0]'),
    (lambda: det.voc_map([np.zeros((2, 4))], [np.zeros(3)], [np.zeros(2)], [np.zeros((1, 4))],
                         [np.zeros(1)]), 'pred_scores[0]'),
    (lambda: det.voc_map([np.zeros((2, 4))], [np.zeros(2)], [np.zeros(2)], [], []), 'gt_boxes'),
    (lambda: det.voc_map([], [], [], [], [], iou_thresh=1.5), 'iou_thresh'),
    (lambda: det.make_detection_set('holdout', 2), 'split'),
    (lambda: det.make_detection_set('test', 0), 'num_images'),
    (lambda: det.make_detection_set('test', 2, scale_range=(2, 50)), 'scale_range'),
    (lambda: det.make_detection_set('test', 2, items=SLICE[0]), 'items'),
    (lambda: det.make_detection_set('test', 2, items=(SLICE[0].astype(float), SLICE[1])),
     'items'),
    (lambda: det.to_input(np.zeros((2, 300, 300), np.uint8)), 'images'),
    (lambda: det.evaluate_map(None, np.zeros((2, 300, 300, 3), np.uint8), []), 'labels'),
])
def test_bad_input_names_the_parameter(call, param):
    with pytest.raises(ValueError, match=r'^%s' % param.replace('[', r'\[').replace(']', r'\]')):
        call()


@pytest.mark.parametrize('items', [
    pytest.param(SLICE, id='bundled-slice'),
    pytest.param(None, id='full-dataset', marks=requires_fashion_mnist)])
def test_detection_set_is_deterministic_and_well_formed(items):
    images, labels = det.make_detection_set('test', 6, seed=3, items=items)
    again, again_labels = det.make_detection_set('test', 3, seed=3, start=3, items=items)
    np.testing.assert_array_equal(images[3:], again)  # image i depends on (seed, split, i)
    for a, b in zip(labels[3:], again_labels):
        np.testing.assert_array_equal(a, b)
    other, _ = det.make_detection_set('test', 3, seed=4, start=3, items=items)
    assert not np.array_equal(other, again)
    val, _ = det.make_detection_set('val', 3, seed=3, start=3, items=items)
    assert not np.array_equal(val, again)  # the split seeds the generator
    assert images.shape == (6, 300, 300, 3) and images.dtype == np.uint8
    for image, lab in zip(images, labels):
        assert lab.shape[1] == 5 and 1 <= len(lab) <= 4
        assert (lab[:, :2] >= 0).all() and (lab[:, 2:4] <= 300).all()
        assert (lab[:, 2:4] - lab[:, :2] >= 4).all()
        assert set(lab[:, 4]) <= set(range(10))
        for x0, y0, x1, y1, _ in lab.astype(int):  # an object is where its box says
            assert image[y0:y1, x0:x1].max() > 150
        mask = np.ones((300, 300), bool)
        for x0, y0, x1, y1, _ in lab.astype(int):
            mask[y0:y1, x0:x1] = False
        assert image[mask].max() < 120  # and nothing bright outside the boxes


@pytest.fixture(scope='module')
def ssd_and_data():
    net = det.get_ssd_model()
    net.hybridize(static_alloc=True, static_shape=True)
    # disjoint halves of the bundled slice: calibration objects, test objects
    images, labels = det.make_detection_set('test', 50, items=(SLICE[0][500:], SLICE[1][500:]))
    calib, _ = det.make_detection_set('val', 16, items=(SLICE[0][:500], SLICE[1][:500]))
    return net, images, labels, calib


def test_shipped_ssd_quantizes_with_fp32_nms_and_keeps_its_map(ssd_and_data):
    import gluon_int8
    from gluon_int8 import zoo
    net, images, labels, calib = ssd_and_data
    qnet = gluon_int8.quantize_net(net, [det.to_input(calib)], mode='naive',
                                   **dict(zoo.preset('ssd_300').quantize_kwargs))
    convs = [r for r in qnet.layers if r.op == '_sg_mkldnn_conv']
    assert convs and all(r.dtype == 'int8' for r in convs)
    assert all(r.dtype == 'fp32' for r in qnet.layers if r.op == '_contrib_box_nms')
    fp32, int8 = det.evaluate_map(net, images, labels), det.evaluate_map(qnet, images, labels)
    # measured: FP32 0.9031, INT8 0.9003 (124 objects on these 50 images)
    assert fp32 > 0.8  # the shipped model was trained
    assert abs(fp32 - int8) < 0.02
