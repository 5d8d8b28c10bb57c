"""INT8 accuracy on real data: every Fashion-MNIST family x mode x granularity, and MXNet's
built-in quantizer side by side.

Models are the bundled ones trained by examples/fashion_mnist/train.py. Calibration uses
5 batches of 32 training images (the reference article's default); top-1 is measured on
the full 10k test set when Debian's dataset-fashion-mnist is installed, else on the
bundled 1000-image slice (the output says which).

    python benchmarks/accuracy.py [--families resnet,mobilenet,inception]

Writes results/accuracy.json and results/accuracy.md and prints the markdown table.
"""
import argparse
import json
import logging
import os
import time
import warnings

import mxnet as mx

import gluon_int8
from gluon_int8 import bench
from gluon_int8_samples import fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ('naive', 'entropy', 'percentile', 'mse')
GRANULARITIES = ('tensor', 'channel')
CALIB_BATCHES, CALIB_BATCH_SIZE = 5, 32


def calibration_arrays():
    images, labels = (fashion_mnist.load_split('train') if fashion_mnist.debian_available()
                      else fashion_mnist.bundled_slice())
    count = CALIB_BATCHES * CALIB_BATCH_SIZE
    return images[:count], labels[:count]


def ours(family, mode, granularity, calib):
    net = fashion_mnist.get_model(family)
    batches = [mx.nd.array(calib[i:i + CALIB_BATCH_SIZE])
               for i in range(0, len(calib), CALIB_BATCH_SIZE)]
    start = time.perf_counter()
    qnet = gluon_int8.quantize_net(net, batches, mode=mode, granularity=granularity)
    return qnet, time.perf_counter() - start


def builtin(family, mode, calib, labels):
    from mxnet.contrib.quantization import quantize_net_v2
    net = fashion_mnist.get_model(family)
    loader = mx.gluon.data.DataLoader(
        mx.gluon.data.ArrayDataset(mx.nd.array(calib), mx.nd.array(labels)),
        batch_size=CALIB_BATCH_SIZE)
    start = time.perf_counter()
    qnet = quantize_net_v2(net, quantized_dtype='auto', calib_mode=mode, calib_data=loader,
                           num_calib_examples=len(calib))
    return qnet, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--families', default=','.join(sorted(fashion_mnist.MODELS)))
    parser.add_argument('--out', default=os.path.join(ROOT, 'results'))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter('ignore')

    calib, calib_labels = calibration_arrays()
    images, labels, source = fashion_mnist.default_data('test')
    rows = []
    for family in args.families.split(','):
        fp32 = 100 * fashion_mnist.evaluate(fashion_mnist.get_model(family), images, labels)
        runs = [('gluon-int8', m, g) for m in MODES for g in GRANULARITIES]
        runs += [('mxnet-builtin', m, 'tensor') for m in ('naive', 'entropy')]
        for engine, mode, granularity in runs:
            if engine == 'gluon-int8':
                qnet, seconds = ours(family, mode, granularity, calib)
            else:
                qnet, seconds = builtin(family, mode, calib, calib_labels)
            int8 = 100 * fashion_mnist.evaluate(qnet, images, labels)
            rows.append({'family': family, 'engine': engine, 'mode': mode,
                         'granularity': granularity, 'fp32_top1': fp32, 'int8_top1': int8,
                         'delta': int8 - fp32, 'calib_seconds': seconds})
            print('%-10s %-13s %-10s %-7s fp32 %.2f int8 %.2f delta %+.2f calib %.2fs'
                  % (family, engine, mode, granularity, fp32, int8, int8 - fp32, seconds),
                  flush=True)

    where = ('full %d-image test set' % len(labels) if source == 'debian'
             else 'bundled %d-image test slice' % len(labels))
    lines = ['Fashion-MNIST top-1 (%%) on the %s; calibration %d x %d training images; '
             'OMP_NUM_THREADS=%s' % (where, CALIB_BATCHES, CALIB_BATCH_SIZE, bench.omp_threads()),
             '', '| family | engine | mode | granularity | FP32 | INT8 | delta | calib s |',
             '|---|---|---|---|---|---|---|---|']
    lines += ['| %s | %s | %s | %s | %.2f | %.2f | %+.2f | %.2f |'
              % (r['family'], r['engine'], r['mode'], r['granularity'], r['fp32_top1'],
                 r['int8_top1'], r['delta'], r['calib_seconds']) for r in rows]
    table = '\n'.join(lines)
    print('\n' + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'accuracy.json'), 'w') as f:
        json.dump({'test_source': source, 'test_images': len(labels), 'rows': rows}, f, indent=1)
    with open(os.path.join(args.out, 'accuracy.md'), 'w') as f:
        f.write(table + '\n')


if __name__ == '__main__':
    main()
