"""Accuracy-aware tuning on a Fashion-MNIST CNN, as trained and with outlier channels.

1. A small CNN (4 Conv-BN-ReLU, Dense) is trained briefly on real Fashion-MNIST (the
   first ``--train-images`` training images). The last 5000 training images are held
   out as the validation set ``eval_fn`` measures; the 10k test set is only reported.
   Calibration: the first 512 training images.
2. Case ``as_trained``: plain entropy, then ``gluon_int8.tune(max_drop=0.005)``.
3. Case ``outliers_x<scale>``: a function-preserving rescaling gives the third conv
   ``--outliers`` output channels ``--scale`` times larger (BN gamma and beta of those
   channels x scale, the next conv's weights for them / scale; ReLU commutes with a
   positive scale), so FP32 accuracy is unchanged. This is the inverse of cross-layer
   equalization (Nagel et al., "Data-Free Quantization Through Weight Equalization and
   Bias Correction", ICCV 2019): the per-channel range spread real networks show, made
   extreme. One per-tensor activation scale cannot serve both kinds of channels: clip
   (entropy, percentile, mse) and the outliers saturate, don't (naive) and the others
   round to a few levels, so no calibration mode reaches the budget and tuning has to
   return layers to FP32. Then the same two measurements.

    OMP_NUM_THREADS=1 python benchmarks/tune.py [--epochs 2] [--train-images 30000]

Prints the per-layer reports, the trials and the accuracies; writes results/tune.json
and the report charts results/tune_<case>_<entropy|tuned>.png.
"""
import argparse
import json
import logging
import os
import time
import warnings

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from mxnet.gluon import nn

import gluon_int8
from gluon_int8_samples import fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAL_IMAGES = 5000
CALIB_IMAGES, CALIB_BATCH = 512, 64


def conv_bn_relu(channels, strides=1):
    block = nn.HybridSequential(prefix='')
    block.add(nn.Conv2D(channels, 3, strides=strides, padding=1, use_bias=False),
              nn.BatchNorm(), nn.Activation('relu'))
    return block


class SmallCNN(nn.HybridBlock):
    """Channels 16 -> 32 (stride 2) -> 32 (the outlier layer) -> 32 (stride 2) -> Dense 10."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.c1, self.c2 = conv_bn_relu(16), conv_bn_relu(32, 2)
            self.c3, self.c4 = conv_bn_relu(32), conv_bn_relu(32, 2)
            self.fc = nn.Dense(10)

    def hybrid_forward(self, F, x):
        return self.fc(self.c4(self.c3(self.c2(self.c1(x)))))


def train(images, labels, epochs, batch_size=64, seed=0):
    mx.random.seed(seed)
    np.random.seed(seed)
    net = SmallCNN()
    net.initialize(mx.init.Xavier(magnitude=2.0))
    net.hybridize()
    trainer = gluon.Trainer(net.collect_params(), 'adam', {'learning_rate': 1e-3})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for epoch in range(epochs):
        order = np.random.permutation(len(images))
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x, y = mx.nd.array(images[idx]), mx.nd.array(labels[idx])
            with autograd.record():
                loss = loss_fn(net(x), y)
            loss.backward()
            trainer.step(len(idx))
            total += float(loss.sum().asscalar())
        print('epoch %d: train loss %.4f' % (epoch + 1, total / len(order)))
    return net


def add_outlier_channels(net, scale, count):
    """c3's first ``count`` output channels x scale; c4 compensates: same FP32 function."""
    bn, next_conv = net.c3[1], net.c4[0]
    gamma, beta, weight = bn.gamma.data(), bn.beta.data(), next_conv.weight.data()
    gamma[:count] *= scale
    beta[:count] *= scale
    weight[:, :count] /= scale
    bn.gamma.set_data(gamma)
    bn.beta.set_data(beta)
    next_conv.weight.set_data(weight)


def run_case(name, net, calib, val, test, args):
    """Plain entropy, then tune, on one network; per-layer reports as PNG; a JSON record."""
    def eval_fn(block):
        return fashion_mnist.evaluate(block, *val)

    acc = {'fp32': {'val': eval_fn(net), 'test': fashion_mnist.evaluate(net, *test)}}
    entropy = gluon_int8.quantize_net(net, calib, mode='entropy')
    acc['entropy'] = {'val': eval_fn(entropy), 'test': fashion_mnist.evaluate(entropy, *test)}
    start = time.perf_counter()
    result = gluon_int8.tune(net, calib, eval_fn, max_drop=args.max_drop,
                             max_trials=args.max_trials)
    seconds = time.perf_counter() - start
    acc['tuned'] = {'val': result.best_metric,
                    'test': fashion_mnist.evaluate(result.block, *test)}
    reports = {}
    for kind, block in (('entropy', entropy), ('tuned', result.block)):
        report = block.report(calib[:2])
        report.save_png(os.path.join(os.path.dirname(args.out), 'tune_%s_%s.png' % (name, kind)),
                        title='%s: %s INT8 vs FP32' % (name, kind))
        reports[kind] = report.to_dict()
        print('\n[%s] per-layer report, %s INT8:\n%s' % (name, kind, report.table()))
    print('\n[%s] trials:\n%s' % (name, result.table()))
    print('\n[%s]\n| model | val top-1 (eval_fn, 5k) | test top-1 (10k) |\n|---|---|---|' % name)
    for kind in ('fp32', 'entropy', 'tuned'):
        print('| %s | %.4f | %.4f |' % (kind, acc[kind]['val'], acc[kind]['test']))
    print('tune %s the budget (val drop <= %g) in %d trials, %.1f s; layers returned to FP32: %s'
          % ('reached' if result.reached else 'did NOT reach', args.max_drop,
             len(result.trials), seconds, ', '.join(result.best_trial['fp32_layers']) or 'none'))
    return {'accuracy': acc, 'tune_seconds': seconds, 'tune': result.to_dict(),
            'reports': reports}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--train-images', type=int, default=30000)
    parser.add_argument('--scale', type=float, default=300.0)
    parser.add_argument('--outliers', type=int, default=4, help='outlier channels of c3')
    parser.add_argument('--max-drop', type=float, default=0.005)
    parser.add_argument('--max-trials', type=int, default=30)
    parser.add_argument('--out', default=os.path.join(ROOT, 'results', 'tune.json'))
    args = parser.parse_args()
    warnings.simplefilter('ignore')
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    for quiet in ('gluon_int8.api', 'gluon_int8.calibrate', 'gluon_int8.report'):
        logging.getLogger(quiet).setLevel(logging.WARNING)

    images, labels = fashion_mnist.load_split('train')
    test = fashion_mnist.load_split('test')
    val = images[-VAL_IMAGES:], labels[-VAL_IMAGES:]
    calib = [mx.nd.array(images[i:i + CALIB_BATCH]) for i in range(0, CALIB_IMAGES, CALIB_BATCH)]
    start = time.perf_counter()
    net = train(images[:args.train_images], labels[:args.train_images], args.epochs)
    record = {'command': 'OMP_NUM_THREADS=%s python benchmarks/tune.py --epochs %d '
                         '--train-images %d --scale %g --outliers %d --max-drop %g'
                         % (os.environ.get('OMP_NUM_THREADS', '?'), args.epochs,
                            args.train_images, args.scale, args.outliers, args.max_drop),
              'train_seconds': time.perf_counter() - start, 'cases': {}}
    record['cases']['as_trained'] = run_case('as_trained', net, calib, val, test, args)
    add_outlier_channels(net, args.scale, args.outliers)
    name = 'outliers_x%g' % args.scale
    record['cases'][name] = run_case(name, net, calib, val, test, args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(record, f, indent=1)
    print('wrote %s' % args.out)


if __name__ == '__main__':
    main()
