"""Quantize the small Fashion-MNIST SSD to INT8, following the reference article's flow.

Writes the FP32 deploy model ``<model-prefix>/ssd_<network>_<data-shape>-symbol.json`` /
``-0000.params`` and the INT8 one ``<model-prefix>/cqssd_<network>_<data-shape>-...``
(plus its ``-quantization.json`` sidecar), like MXNet's example/ssd/quantization.py
writes ``cqssd_vgg16_reduced_300``. Calibration: ``--num-calib-batches`` batches of
``--batch-size`` images of the synthetic *val* split (never the test split); the
reference's defaults are 5 batches of 32 and ``naive`` calibration. The feature extractor
and the heads run INT8; box decoding and NMS stay FP32 (``quantize_mode='smart'``, the
gluon_int8.zoo SSD preset).

Example::

    PYTHONPATH=. python examples/ssd/quantization.py --calib-mode naive
    PYTHONPATH=. python examples/ssd/evaluate.py --deploy --prefix=./model/cqssd_
"""
import argparse
import logging
import os

import mxnet as mx

import gluon_int8
from gluon_int8 import zoo
from gluon_int8_samples import detection as det


def calibration_batches(num_batches, batch_size, seed):
    """``num_batches`` normalized batches of the synthetic val split."""
    images, _ = det.make_detection_set('val', num_batches * batch_size, seed=seed)
    return [det.to_input(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]


def export_fp32(net, prefix, shape):
    """Hybridize, run once and export the FP32 deploy model."""
    net.hybridize(static_alloc=True, static_shape=True)
    net(mx.nd.zeros((1,) + shape))
    net.export(prefix)
    print('FP32 model: %s-symbol.json, %s-0000.params' % (prefix, prefix))


def quantize(net, batches, args, shape):
    """The INT8 block with the SSD preset's options (box decoding and NMS in FP32)."""
    preset = zoo.preset('ssd_%d' % shape[-1])
    options = dict(preset.quantize_kwargs)
    if args.exclude_first_conv:
        options['exclude_layers'] = [zoo.first_conv(net, preset)]
        print('first convolution kept FP32: %s' % options['exclude_layers'][0])
    return gluon_int8.quantize_net(net, batches, mode=args.calib_mode,
                                   quantized_dtype=args.quantized_dtype,
                                   num_calib_batches=args.num_calib_batches, **options)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model-prefix', default='./model', help='output folder')
    parser.add_argument('--network', default='fashion')
    parser.add_argument('--data-shape', type=int, default=300)
    parser.add_argument('--params', default=det.PARAMS_PATH, help='trained FP32 parameters')
    parser.add_argument('--calib-mode', default='naive', choices=['naive', 'entropy'])
    parser.add_argument('--num-calib-batches', type=int, default=5)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--exclude-first-conv', action='store_true',
                        help='keep the first convolution FP32')
    parser.add_argument('--quantized-dtype', default='auto', choices=['auto', 'int8', 'uint8'])
    parser.add_argument('--seed', type=int, default=0, help='seed of the val split images')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    shape = (3, args.data_shape, args.data_shape)
    name = '%s_%d' % (args.network, args.data_shape)
    os.makedirs(args.model_prefix, exist_ok=True)
    net = det.get_ssd_model(args.params)
    export_fp32(net, os.path.join(args.model_prefix, 'ssd_' + name), shape)
    batches = calibration_batches(args.num_calib_batches, args.batch_size, args.seed)
    qnet = quantize(net, batches, args, shape)
    prefix = os.path.join(args.model_prefix, 'cqssd_' + name)
    qnet.export(prefix)
    print('INT8 model (%s calibration, %d x %d val images): %s-symbol.json, %s-0000.params; '
          '%d layers INT8, %d FP32'
          % (args.calib_mode, len(batches), args.batch_size, prefix, prefix,
             len(qnet.int8_layers), len(qnet.fp32_layers)))
    for row in qnet.layers:  # the convolutions and NMS; every other op is glue
        if row.op in ('_sg_mkldnn_conv', '_contrib_box_nms'):
            print('  %-28s %-18s %s %s' % (row.name, row.op, row.dtype, row.reason or ''))


if __name__ == '__main__':
    main()
