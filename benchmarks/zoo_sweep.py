"""Sweep over the GluonCV model zoo: does every family quantize, follow FP32, run faster?

For each model (random weights; BatchNorm running statistics set from one batch of real
images so activations are not degenerate) it records: ok or the error; the cosine of
INT8 vs FP32 outputs and the top-1 agreement on 32 real images (Fashion-MNIST, resized to
the model's input and repeated over 3 channels); latency at batch 1 of fused FP32 and
INT8. Every model runs in its own subprocess, so a crash is recorded, not fatal.

    OMP_NUM_THREADS=2 python benchmarks/zoo_sweep.py [--models a,b] [--timeout 600] [--mode naive]

Calibration is 'naive' by default: random weights give activations without the long tails
of trained networks, and the KL search clips them (resnet50_v1 cosine 0.954 entropy vs
0.977 naive, vgg16 0.960 vs 0.999, densenet121 0.948 vs 0.973, 16 calibration images).
The column "FP32, 8-bit input" is the cosine of FP32 logits when only the input is rounded
to 256 levels: how chaotic the random network is on its own (mobilenet1.0: 0.955), the
floor any INT8 result is up against.

Writes results/zoo_sweep.json and docs/zoo_sweep.md.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One or more members of every classification family gluoncv builds, then detectors.
CLASSIFICATION = [
    'resnet18_v1', 'resnet50_v1', 'resnet101_v1', 'resnet152_v1', 'resnet18_v2', 'resnet50_v2',
    'resnet50_v1b', 'resnet50_v1c', 'resnet50_v1d', 'resnet50_v1s', 'resnext50_32x4d',
    'resnext101_32x4d', 'se_resnet18_v1', 'se_resnet50_v1', 'se_resnet50_v2',
    'se_resnext50_32x4d', 'resnest14', 'resnest50', 'mobilenet1.0', 'mobilenet0.25',
    'mobilenetv2_1.0', 'mobilenetv2_0.5', 'mobilenetv3_large', 'mobilenetv3_small',
    'squeezenet1.0', 'squeezenet1.1', 'densenet121', 'densenet169', 'vgg11', 'vgg16',
    'vgg16_bn', 'alexnet', 'googlenet', 'inceptionv3', 'darknet53', 'xception',
    'shufflenet_v1', 'shufflenet_v2', 'hrnet_w18_small_v1_c', 'dla34',
    'residualattentionnet56', 'nasnet_4_1056',
]
DETECTION = ['ssd_300_vgg16_atrous_voc', 'ssd_512_mobilenet1.0_voc', 'yolo3_mobilenet1.0_voc',
             'faster_rcnn_resnet50_v1b_voc']


def real_images(shape, count=32):
    """Fashion-MNIST test images as float32 (count, 3, H, W), normalized like ImageNet input."""
    import mxnet as mx
    from gluon_int8 import fashion_mnist
    images, _ = fashion_mnist.bundled_slice()
    x = mx.nd.array(images[:count])                       # (N, 1, 28, 28), normalized
    x = mx.nd.contrib.BilinearResize2D(x, height=shape[1], width=shape[2])
    return mx.nd.tile(x, reps=(1, 3, 1, 1))


def cosine(a, b) -> float:
    import numpy as np
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def flat_outputs(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def run_one(name, mode):
    """Child: quantize one model and print one JSON line."""
    import logging
    import warnings
    import mxnet as mx
    import numpy as np
    warnings.simplefilter('ignore')
    logging.disable(logging.WARNING)
    import gluon_int8
    from gluon_int8 import bench, zoo
    row = {'model': name, 'kind': 'detection' if name in DETECTION else 'classification'}
    family = zoo.preset(name)
    row['preset'] = family.why
    mx.random.seed(0)
    net = zoo.get_model(name, quantized=False)
    images = real_images(family.input_shape)
    zoo.set_batchnorm_statistics(net, images[:16])
    start = time.perf_counter()
    qnet = gluon_int8.quantize_net(net, [images[:16]], mode=mode,
                                   **dict(family.quantize_kwargs))
    row['mode'] = mode
    row['quantize_seconds'] = time.perf_counter() - start
    row['int8_layers'], row['fp32_layers'] = len(qnet.int8_layers), len(qnet.fp32_layers)
    test = images[16:32]
    ref, out = flat_outputs(net(test)), flat_outputs(qnet(test))
    a = np.concatenate([r.asnumpy().ravel() for r in ref]).astype(np.float64)
    b = np.concatenate([o.asnumpy().ravel() for o in out]).astype(np.float64)
    row['cosine'] = cosine(a, b)
    step = float(test.abs().max().asscalar()) / 127  # the input alone at 8 bits, FP32 after
    c = np.concatenate([o.asnumpy().ravel() for o in flat_outputs(net((test / step).round() * step))])
    row['fp32_input8_cosine'] = cosine(a, c.astype(np.float64))
    if row['kind'] == 'classification':
        row['top1_agreement'] = float((ref[0].argmax(axis=1) == out[0].argmax(axis=1)).mean().asscalar())
    blocks = bench.variants(net, [test[:1]], qnet)
    for variant in ('fusion', 'int8'):
        row['latency_ms_' + variant] = bench.latency_ms(blocks[variant], [(1,) + family.input_shape],
                                                        warmup=3, runs=10)
    row['speedup'] = row['latency_ms_fusion'] / row['latency_ms_int8']
    row['status'] = 'ok'
    print(json.dumps(row))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', default=','.join(CLASSIFICATION + DETECTION))
    parser.add_argument('--timeout', type=int, default=900)
    parser.add_argument('--mode', default='naive')
    parser.add_argument('--one', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one, args.mode)
        return
    rows = []
    for name in args.models.split(','):
        try:
            proc = subprocess.run([sys.executable, __file__, '--one', name, '--mode', args.mode],
                                  capture_output=True, text=True, timeout=args.timeout)
            lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
            if proc.returncode == 0 and lines:
                row = json.loads(lines[-1])
            else:
                reason = 'signal %d (crash)' % -proc.returncode if proc.returncode < 0 else \
                    (proc.stderr.strip().splitlines() or ['exit %d' % proc.returncode])[-1]
                row = {'model': name, 'status': 'error', 'error': reason[:300]}
        except subprocess.TimeoutExpired:
            row = {'model': name, 'status': 'error', 'error': 'timeout after %d s' % args.timeout}
        rows.append(row)
        print(json.dumps(row), flush=True)
    write(rows, args.mode)


def write(rows, mode):
    from gluon_int8 import bench
    cls = [r for r in rows if r['model'] in CLASSIFICATION]
    good = [r for r in cls if r['status'] == 'ok' and r['cosine'] >= 0.98 and r['speedup'] > 1]
    lines = ['# GluonCV zoo sweep', '',
             'Random weights, BatchNorm statistics from 16 real images, %s calibration on '
             'them; cosine and top-1 agreement of INT8 vs FP32 on 16 other real images '
             '(Fashion-MNIST resized); "FP32, 8-bit input": cosine of FP32 with only its input '
             'rounded to 8 bits (the chaos of the random network alone); latency at batch 1. '
             'Command: `%s python benchmarks/zoo_sweep.py %s`.'
             % (mode, ' '.join('%s=%s' % kv for kv in sorted(bench.environment().items())),
                ' '.join(sys.argv[1:])), '',
             '%d of %d classification models quantize with cosine >= 0.98 and run faster in '
             'INT8 than fused FP32.' % (len(good), len(cls)), '',
             '| model | status | cosine | FP32, 8-bit input | top-1 agree | fused FP32 ms | '
             'INT8 ms | speedup | INT8/FP32 layers | note |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        if r['status'] == 'ok':
            lines.append('| %s | ok | %.4f | %.4f | %s | %.2f | %.2f | %.2f | %d/%d | %s |' % (
                r['model'], r['cosine'], r['fp32_input8_cosine'],
                '%.2f' % r['top1_agreement'] if 'top1_agreement' in r
                else '-', r['latency_ms_fusion'], r['latency_ms_int8'], r['speedup'],
                r['int8_layers'], r['fp32_layers'], r['preset']))
        else:
            lines.append('| %s | error | | | | | | | | %s |' % (r['model'], r['error']))
    os.makedirs(os.path.join(ROOT, 'results'), exist_ok=True)
    os.makedirs(os.path.join(ROOT, 'docs'), exist_ok=True)
    with open(os.path.join(ROOT, 'results', 'zoo_sweep.json'), 'w') as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(ROOT, 'docs', 'zoo_sweep.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
