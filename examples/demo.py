"""`make demo`: quantize the bundled Fashion-MNIST ResNet and print the article's table.

1. loads the bundled residual model (trained by examples/fashion_mnist/train.py);
2. calibrates with 5 batches of 32 training images (the reference's default);
3. evaluates FP32 and INT8 top-1 on the full 10k test set where Debian's
   dataset-fashion-mnist is installed, otherwise on the bundled 1000-image slice;
4. times latency at batch 1 and throughput at batch 64 for FP32 base, FP32 fused, INT8;
5. prints one table like the reference article's appendix;
6. exports the INT8 model to ./model/ and prints its path and size;
7. quantizes every shipped family the same way and prints FP32 vs INT8 top-1 for each
   (``--no-families`` skips it).

    python examples/demo.py [--model resnet|...] [--mode entropy] [--no-families]
"""
import argparse
import logging
import os
import time
import warnings

import mxnet as mx
from tqdm import tqdm

import gluon_int8
from gluon_int8 import bench
from gluon_int8_samples import fashion_mnist

CALIB_BATCHES, CALIB_BATCH_SIZE = 5, 32


def calibration_batches():
    """5 x 32 training images, or the first 160 slice images without the Debian files."""
    count = CALIB_BATCHES * CALIB_BATCH_SIZE
    if fashion_mnist.debian_available():
        images, _ = fashion_mnist.load_split('train')
        source = 'Fashion-MNIST train split'
    else:
        images, _ = fashion_mnist.bundled_slice()
        source = 'bundled test slice (no Debian train split on this machine)'
    batches = [mx.nd.array(images[i:i + CALIB_BATCH_SIZE]) for i in range(0, count, CALIB_BATCH_SIZE)]
    return batches, source


def accuracy(net, images, labels, desc, batch_size=250):
    """Top-1 with a progress bar over the evaluation batches."""
    correct = 0
    for start in tqdm(range(0, len(labels), batch_size), desc=desc, unit='batch', leave=False):
        out = net(mx.nd.array(images[start:start + batch_size]))
        correct += int((out.argmax(axis=1).asnumpy() == labels[start:start + batch_size]).sum())
    return 100.0 * correct / len(labels)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='resnet', choices=sorted(fashion_mnist.MODELS))
    parser.add_argument('--mode', default='entropy', choices=gluon_int8.MODES[:-1])
    parser.add_argument('--out', default='model')
    parser.add_argument('--no-families', action='store_true',
                        help='skip the accuracy table of every shipped family')
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter('ignore', UserWarning)

    net = fashion_mnist.get_model(args.model)
    calib, calib_source = calibration_batches()
    print('model: bundled Fashion-MNIST %s; calibration: %d batches of %d from the %s'
          % (args.model, len(calib), CALIB_BATCH_SIZE, calib_source))
    start = time.perf_counter()
    qnet = gluon_int8.quantize_net(net, calib, mode=args.mode, progress=True)
    calib_seconds = time.perf_counter() - start
    print('quantized in %.2f s: %d layers INT8, %d FP32 %s'
          % (calib_seconds, len(qnet.int8_layers), len(qnet.fp32_layers),
             qnet.fp32_layers or ''))

    images, labels, source = fashion_mnist.default_data('test')
    where = ('full %d-image test set' % len(labels) if source == 'debian' else
             'bundled %d-image test slice (Debian dataset-fashion-mnist not installed)'
             % len(labels))
    blocks = bench.variants(net, calib[:1], qnet)
    fp32_acc = accuracy(blocks['base'], images, labels, 'FP32 top-1')
    int8_acc = accuracy(qnet, images, labels, 'INT8 top-1')

    shape1, shape64 = [(1,) + fashion_mnist.INPUT_SHAPE], [(64,) + fashion_mnist.INPUT_SHAPE]
    lat, thr = {}, {}
    for name, block in tqdm(blocks.items(), desc='timing', unit='variant', leave=False):
        lat[name] = bench.latency_ms(block, shape1, runs=200)
        thr[name] = bench.throughput(block, shape64, runs=30)

    print('\nFashion-MNIST %s, 1x28x28, %s threads, top-1 on the %s'
          % (args.model, bench.omp_threads(), where))
    print('| BS | metric | Base | Fusion | Fusion+Quant | Speedup (INT8/Base) | FP32 top-1 | INT8 top-1 |')
    print('|---|---|---|---|---|---|---|---|')
    print('| 1 | latency ms | %.3f | %.3f | %.3f | %.2fx | %.2f%% | %.2f%% |'
          % (lat['base'], lat['fusion'], lat['int8'], lat['base'] / lat['int8'], fp32_acc, int8_acc))
    print('| 64 | img/s | %.0f | %.0f | %.0f | %.2fx | | |'
          % (thr['base'], thr['fusion'], thr['int8'], thr['int8'] / thr['base']))
    print('INT8 - FP32 top-1: %+.2f points' % (int8_acc - fp32_acc))

    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, 'cq_fashion_%s' % args.model)
    for path in qnet.export(prefix):
        print('exported %s (%.1f KB)' % (path, os.path.getsize(path) / 1024.0))
    if not args.no_families:
        families(calib, images, labels, where, args.mode)


def families(calib, images, labels, where, mode):
    """FP32 vs INT8 top-1 of every shipped family, quantized the same way."""
    print('\nevery shipped family, %s calibration, top-1 on the %s' % (mode, where))
    print('| family | FP32 top-1 | INT8 top-1 | INT8 - FP32 | layers INT8 / FP32 | quantize s |')
    print('|---|---|---|---|---|---|')
    for name in sorted(fashion_mnist.MODELS):
        if not os.path.isfile(fashion_mnist.params_path(name)):
            print('| %s | (no trained parameters shipped) | | | | |' % name)
            continue
        net = fashion_mnist.get_model(name)
        start = time.perf_counter()
        qnet = gluon_int8.quantize_net(net, calib, mode=mode)
        seconds = time.perf_counter() - start
        fp32 = accuracy(net, images, labels, '%s FP32' % name)
        int8 = accuracy(qnet, images, labels, '%s INT8' % name)
        print('| %s | %.2f%% | %.2f%% | %+.2f | %d / %d | %.1f |'
              % (name, fp32, int8, int8 - fp32, len(qnet.int8_layers), len(qnet.fp32_layers),
                 seconds))


if __name__ == '__main__':
    main()
