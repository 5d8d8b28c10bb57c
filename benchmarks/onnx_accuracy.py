"""Deploy with ONNX Runtime / OpenVINO: top-1 of the ONNX QDQ export against MXNet INT8 and FP32.

For every shipped Fashion-MNIST family: the FP32 network, gluon-int8's MXNet INT8 block
(``quantize_net`` defaults: entropy, auto dtypes; calibration 5 x 32 training images, as
benchmarks/accuracy.py; ``for_onnx=True``, which adds ranges only the export reads), and
that block exported with ``export(prefix, format='onnx')`` and run on ONNX Runtime and on
OpenVINO (``gluon_int8.runtimes.load_onnx``). Top-1 on
the full 10k test set when Debian's dataset-fashion-mnist is installed, else on the
bundled 1000-image slice (the output says which), plus the cosine of each runtime's
logits against MXNet INT8's, and, image by image, how many test images only the runtime or
only MXNet INT8 gets right, with the exact McNemar p-value of that split. Accuracy does
not depend on timing: run it anywhere.

    OMP_NUM_THREADS=1 python benchmarks/onnx_accuracy.py [--families resnet,...]
        [--params-dir DIR]   # trained parameters from another folder (read only)

Writes results/onnx_accuracy.json and results/onnx_accuracy.md and prints the table. A
family whose trained parameters are missing is listed as skipped.
"""
import argparse
import json
import logging
import os
import tempfile
import time
import warnings

import mxnet as mx
import numpy as np

import gluon_int8
from gluon_int8 import runtimes
from gluon_int8_samples import fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALIB_BATCHES, CALIB_BATCH_SIZE = 5, 32
TARGET_VS_INT8, TARGET_VS_FP32 = 0.1, 0.3  # points (issue 15)


def calibration_batches():
    images, _ = (fashion_mnist.load_split('train') if fashion_mnist.debian_available()
                 else fashion_mnist.bundled_slice())
    count = CALIB_BATCHES * CALIB_BATCH_SIZE
    return [mx.nd.array(images[i:i + CALIB_BATCH_SIZE]) for i in range(0, count, CALIB_BATCH_SIZE)]


def logits(block, images, batch_size=500):
    outs = []
    for start in range(0, len(images), batch_size):
        out = block(mx.nd.array(images[start:start + batch_size]))
        outs.append((out[0] if isinstance(out, (list, tuple)) else out).asnumpy())
    return np.concatenate(outs)


def cosine(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def measure(family, params_dir, calib, images, labels):
    path = os.path.join(params_dir, 'fashion_mnist_%s.params' % family) if params_dir \
        else fashion_mnist.params_path(family)
    if not os.path.isfile(path):
        return {'family': family, 'skipped': 'no trained parameters at %s' % path}
    net = fashion_mnist.get_model(family, params_file=path)
    qnet = gluon_int8.quantize_net(net, calib, for_onnx=True)  # MXNet's INT8 graph is the same
    results = {'fp32': logits(net, images), 'mxnet_int8': logits(qnet, images)}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        onnx_path = qnet.export(os.path.join(tmp, family), format='onnx')[0]
        export_seconds = time.perf_counter() - start
        size = os.path.getsize(onnx_path)
        blocks = {rt: runtimes.load_onnx(onnx_path, runtime=rt) for rt in runtimes.RUNTIMES}
    for runtime, block in blocks.items():
        results[runtime] = logits(block, images)
    hits = {k: v.argmax(1) == labels for k, v in results.items()}
    top1 = {k: 100.0 * float(v.mean()) for k, v in hits.items()}
    onnx_layers = blocks['onnxruntime'].layers
    return {'family': family, 'top1': top1,
            'versus_mxnet_int8': {rt: fashion_mnist.paired_difference(hits[rt],
                                                                      hits['mxnet_int8'])
                                  for rt in runtimes.RUNTIMES},
            'cosine_vs_mxnet_int8': {rt: cosine(results[rt], results['mxnet_int8'])
                                     for rt in runtimes.RUNTIMES},
            'int8_layers': {'mxnet': len(qnet.int8_layers),
                            'onnx': sum(r.dtype == 'int8' for r in onnx_layers)},
            'export_seconds': round(export_seconds, 2), 'onnx_bytes': size}


def markdown(rows, source):
    lines = ['Fashion-MNIST top-1 (%%) on %s; ONNX = `qnet.export(prefix, format=\'onnx\')`, '
             'run with `gluon_int8.runtimes.load_onnx`' % source, '',
             '| family | FP32 | MXNet INT8 | ONNX Runtime INT8 | OpenVINO INT8 | '
             'ORT - MXNet INT8 | OV - MXNet INT8 | ORT - FP32 | OV - FP32 | '
             'cosine vs MXNet INT8 (ORT / OV) |', '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        if 'skipped' in r:
            lines.append('| %s | skipped: %s |||||||||' % (r['family'], r['skipped']))
            continue
        t = r['top1']
        lines.append('| %s | %.2f | %.2f | %.2f | %.2f | %+.2f | %+.2f | %+.2f | %+.2f | '
                     '%.5f / %.5f |' % (
                         r['family'], t['fp32'], t['mxnet_int8'], t['onnxruntime'],
                         t['openvino'], t['onnxruntime'] - t['mxnet_int8'],
                         t['openvino'] - t['mxnet_int8'], t['onnxruntime'] - t['fp32'],
                         t['openvino'] - t['fp32'], r['cosine_vs_mxnet_int8']['onnxruntime'],
                         r['cosine_vs_mxnet_int8']['openvino']))
    lines += ['', 'Each runtime against MXNet INT8 image by image: test images only the runtime '
              'gets right / only MXNet INT8 gets right, and the exact McNemar p-value of that '
              'split (fashion_mnist.paired_difference)', '',
              '| family | ORT only / MXNet only | p | OV only / MXNet only | p |',
              '|---|---|---|---|---|']
    for r in rows:
        if 'skipped' not in r:
            v = r['versus_mxnet_int8']
            lines.append('| %s | %d / %d | %.2f | %d / %d | %.2f |' % (
                r['family'], v['onnxruntime']['only_a'], v['onnxruntime']['only_b'],
                v['onnxruntime']['p_value'], v['openvino']['only_a'],
                v['openvino']['only_b'], v['openvino']['p_value']))
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--families', default=','.join(fashion_mnist.MODELS))
    parser.add_argument('--params-dir', default=None,
                        help='folder holding fashion_mnist_<family>.params (default: the '
                             'shipped ones)')
    parser.add_argument('--out', default=os.path.join(ROOT, 'results'))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter('ignore')
    calib = calibration_batches()
    images, labels, source = fashion_mnist.default_data('test')
    rows = []
    for family in args.families.split(','):
        print(family, flush=True)
        rows.append(measure(family, args.params_dir, calib, images, labels))
        print('  %s' % json.dumps(rows[-1].get('top1', rows[-1].get('skipped'))), flush=True)
    table = markdown(rows, '%d test images (%s)' % (
        len(labels), 'the full test set' if source == 'debian' else 'the bundled slice'))
    print('\n' + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'onnx_accuracy.json'), 'w') as f:
        json.dump({'data': source, 'omp_num_threads': os.environ.get('OMP_NUM_THREADS'),
                   'calibration': '%d x %d training images' % (CALIB_BATCHES, CALIB_BATCH_SIZE),
                   'rows': rows}, f, indent=1)
    with open(os.path.join(args.out, 'onnx_accuracy.md'), 'w') as f:
        f.write(table + '\n')


if __name__ == '__main__':
    main()
