"""SSD detection mAP, FP32 vs INT8: the shipped Fashion-MNIST SSD, every calibration variant.

Builds the FP32 SSD from gluon_int8_samples/data/ssd_fashion.params (trained by
examples/ssd/train.py), quantizes it with gluon-int8 (naive and entropy calibration, with
and without the first convolution kept FP32; box decoding and NMS stay FP32 through the
SSD preset's quantize_mode='smart') and with MXNet's built-in quantize_net_v2 as a peer,
calibrating on 5 batches of 32 synthetic *val* images (the reference article's default),
and measures PASCAL VOC mAP at IoU 0.5 (area method, and the VOC2007 11-point one) on the
synthetic *test* split. The target: INT8 within 0.5 mAP points of FP32.

    OMP_NUM_THREADS=2 PYTHONPATH=. python benchmarks/ssd_map.py [--num-images 1000]

Writes results/ssd_map.json and results/ssd_map.md and prints the table.
"""
import argparse
import json
import logging
import os
import warnings

import mxnet as mx

import gluon_int8
from gluon_int8 import zoo
from gluon_int8_samples import detection as det

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALIB_BATCHES, CALIB_BATCH_SIZE = 5, 32
TARGET_POINTS = 0.5
PRESET = zoo.preset('ssd_300')


def calibration_batches(seed):
    images, _ = det.make_detection_set('val', CALIB_BATCHES * CALIB_BATCH_SIZE, seed=seed)
    return [det.to_input(images[i:i + CALIB_BATCH_SIZE])
            for i in range(0, len(images), CALIB_BATCH_SIZE)]


def ours(net, calib, mode, exclude_first_conv):
    options = dict(PRESET.quantize_kwargs)
    if exclude_first_conv:
        options['exclude_layers'] = [zoo.first_conv(net, PRESET)]
    return gluon_int8.quantize_net(net, calib, mode=mode, **options)


def builtin(net, calib, mode):
    from mxnet.contrib.quantization import quantize_net_v2
    loader = [(b, mx.nd.zeros(b.shape[0])) for b in calib]
    qnet = quantize_net_v2(net, quantized_dtype='auto', calib_mode=mode, calib_data=loader,
                           quantize_mode=dict(PRESET.quantize_kwargs)['quantize_mode'])
    qnet.hybridize(static_alloc=True, static_shape=True)
    return qnet


def scores(block, images, labels):
    """mAP (area and 11-point) and the per-class APs, in points."""
    boxes, confidences, ids = det.detect(block, images)
    gt_boxes, gt_ids = [lab[:, :4] for lab in labels], [lab[:, 4] for lab in labels]
    per_class = det.per_class_ap(boxes, confidences, ids, gt_boxes, gt_ids)
    return {'mAP': 100 * det.voc_map(boxes, confidences, ids, gt_boxes, gt_ids),
            'mAP_07': 100 * det.voc_map(boxes, confidences, ids, gt_boxes, gt_ids,
                                        use_07_metric=True),
            'per_class_AP': {det.CLASS_NAMES[c]: 100 * ap for c, ap in per_class.items()}}


def variants():
    """(row name, engine, mode, first conv FP32) of every INT8 row."""
    rows = [('gluon-int8', mode, first) for mode in ('naive', 'entropy') for first in (False, True)]
    return rows + [('mxnet-builtin', mode, False) for mode in ('naive', 'entropy')]


def run(args):
    images, labels = det.make_detection_set('test', args.num_images, seed=args.seed)
    calib = calibration_batches(args.seed)
    net = det.get_ssd_model(args.params)
    net.hybridize(static_alloc=True, static_shape=True)
    fp32 = scores(net, images, labels)
    rows = [dict(engine='FP32', mode='-', first_conv_fp32='-', **fp32)]
    print('FP32: mAP %.2f' % fp32['mAP'], flush=True)
    for engine, mode, first in variants():
        qnet = ours(net, calib, mode, first) if engine == 'gluon-int8' else builtin(net, calib, mode)
        row = dict(engine=engine, mode=mode, first_conv_fp32=first, **scores(qnet, images, labels))
        row['loss_points'] = fp32['mAP'] - row['mAP']
        rows.append(row)
        print('%s %s first-conv-fp32=%s: mAP %.2f (loss %.2f points)'
              % (engine, mode, first, row['mAP'], row['loss_points']), flush=True)
    return rows


def markdown(rows, args) -> str:
    lines = ['SSD (gluon_int8_samples.detection, 300x300) on the synthetic Fashion-MNIST detection set: '
             'VOC mAP@0.5 (%%) on %d test images (seed %d); calibration %d x %d val images; '
             'OMP_NUM_THREADS=%s. Target: INT8 loss <= %.1f points.'
             % (args.num_images, args.seed, CALIB_BATCHES, CALIB_BATCH_SIZE,
                os.environ.get('OMP_NUM_THREADS', 'unset'), TARGET_POINTS), '',
             '| engine | calibration | first conv FP32 | mAP | INT8 - FP32 (points) | target | '
             'mAP 11-point |', '|---|---|---|---|---|---|---|']
    for r in rows:
        loss = r.get('loss_points')
        verdict = '-' if loss is None else ('met' if loss <= TARGET_POINTS else 'missed')
        lines.append('| %s | %s | %s | %.2f | %s | %s | %.2f |' % (
            r['engine'], r['mode'], r['first_conv_fp32'], r['mAP'],
            '-' if loss is None else '%+.2f' % -loss, verdict, r['mAP_07']))
    return '\n'.join(lines) + '\n'


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--num-images', type=int, default=1000)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--params', default=det.PARAMS_PATH, help='FP32 SSD parameters')
    parser.add_argument('--out', default=os.path.join(ROOT, 'results'))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter('ignore')
    rows = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'ssd_map.json'), 'w') as fobj:
        json.dump({'test_images': args.num_images, 'seed': args.seed,
                   'calibration': '%d x %d val images' % (CALIB_BATCHES, CALIB_BATCH_SIZE),
                   'target_points': TARGET_POINTS, 'rows': rows}, fobj, indent=2)
    table = markdown(rows, args)
    with open(os.path.join(args.out, 'ssd_map.md'), 'w') as fobj:
        fobj.write(table)
    print(table)
    ours_rows = [r for r in rows if r['engine'] == 'gluon-int8']
    worst = max(ours_rows, key=lambda r: r['loss_points'])
    print('largest gluon-int8 mAP loss: %.2f points (%s, first conv FP32: %s); target <= %.1f: %s'
          % (worst['loss_points'], worst['mode'], worst['first_conv_fp32'], TARGET_POINTS,
             'met' if worst['loss_points'] <= TARGET_POINTS else 'MISSED'))


if __name__ == '__main__':
    main()
