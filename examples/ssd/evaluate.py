"""Evaluate the small Fashion-MNIST SSD: VOC mAP on the synthetic test split, and speed.

With ``--deploy`` it loads an exported model ``<prefix><network>_<data-shape>`` (as in
the reference article: ``--prefix=./model/ssd_`` for FP32, ``--prefix=./model/cqssd_``
for INT8); an INT8 export (one with a sidecar for the epoch, see ``gluon_int8.layout``) is
loaded with ``gluon_int8.load``, an FP32 one with plain ``SymbolBlock.imports``. Without
``--deploy`` it evaluates the Gluon network built from ``--params``.

Example::

    PYTHONPATH=. python examples/ssd/evaluate.py --deploy --prefix=./model/ssd_
    PYTHONPATH=. python examples/ssd/evaluate.py --deploy --prefix=./model/cqssd_
"""
import argparse
import json
import logging
import os
import time

import mxnet as mx

import gluon_int8
from gluon_int8 import bench, layout
from gluon_int8_samples import detection as det


def load_deploy(prefix, epoch=0):
    """An exported model: gluon_int8.load when it is an INT8 export, else plain MXNet."""
    if os.path.isfile(layout.sidecar_file(prefix, epoch)):
        return gluon_int8.load(prefix, epoch)
    net = mx.gluon.SymbolBlock.imports(layout.symbol_file(prefix), ['data'],
                                       layout.params_file(prefix, epoch))
    net.hybridize(static_alloc=True, static_shape=True)
    return net


def load_model(args):
    """(block, description) from the command line."""
    if args.deploy:
        prefix = '%s%s_%d' % (args.prefix, args.network, args.data_shape)
        return load_deploy(prefix, args.epoch), prefix
    net = det.get_ssd_model(args.params)
    net.hybridize(static_alloc=True, static_shape=True)
    return net, args.params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--deploy', action='store_true', help='load an exported model')
    parser.add_argument('--prefix', default='./model/ssd_')
    parser.add_argument('--network', default='fashion')
    parser.add_argument('--data-shape', type=int, default=300)
    parser.add_argument('--epoch', type=int, default=0)
    parser.add_argument('--params', default=det.PARAMS_PATH, help='without --deploy')
    parser.add_argument('--num-images', type=int, default=500, help='test split images')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--speed-runs', type=int, default=10,
                        help='timed runs for the speed figures (0: skip)')
    parser.add_argument('--json', default=None, help='also write the figures here')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    net, source = load_model(args)
    images, labels = det.make_detection_set('test', args.num_images, seed=args.seed)
    start = time.time()
    value = det.evaluate_map(net, images, labels, args.batch_size)
    result = {'model': source, 'test_images': args.num_images, 'seed': args.seed,
              'mAP': value, 'eval_seconds': time.time() - start}
    print('%s: VOC mAP@0.5 %.4f on %d test images' % (source, value, args.num_images))
    if args.speed_runs > 0:
        shape = (3, args.data_shape, args.data_shape)
        result['latency_ms'] = bench.latency_ms(net, [(1,) + shape], runs=args.speed_runs)
        result['images_per_s'] = bench.throughput(net, [(args.batch_size,) + shape],
                                                  runs=args.speed_runs)
        result['omp_threads'] = bench.omp_threads()
        print('speed: %.2f ms latency at batch 1, %.1f images/s at batch %d (%s threads)'
              % (result['latency_ms'], result['images_per_s'], args.batch_size,
                 result['omp_threads']))
    if args.json:
        with open(args.json, 'w') as fobj:
            json.dump(result, fobj, indent=2)


if __name__ == '__main__':
    main()
