"""Sweep over the GluonCV model zoo: does every family quantize, follow FP32, run faster?

For each model (random weights; BatchNorm running statistics set from one batch of real
images so activations are not degenerate) it records: ok or the error; the cosine of
INT8 vs FP32 outputs and the top-1 agreement on 32 real images (Fashion-MNIST, resized to
the model's input and repeated over 3 channels); latency at batch 1 of fused FP32 and
INT8. Every model runs in its own subprocess, so a crash is recorded, not fatal.

    OMP_NUM_THREADS=2 python benchmarks/zoo_sweep.py [--models a,b] [--timeout 600]
        [--mode entropy] [--no-timing] [--merge]

Calibration is quantize_net's default, 'entropy'. It was 'naive' while the KL search alone
clipped these random networks' activations (resnet50_v1 cosine 0.954 entropy vs 0.977
naive); with the MSE guard of thresholds.entropy_threshold, entropy is ahead: in two full
runs on 2026-11-30 (AVX2 machine; naive at commit 1e3c294, entropy at c1813bd), 33 of 42
models within 0.02 of their floor with entropy against 29 with naive (densenet121 0.985
vs 0.977, resnet50_v2 0.975 vs 0.970; resnet50_v1d the one that fell out, 0.963 vs 0.967).

The column "FP32, 8-bit input" is the cosine of FP32 logits when only the input is rounded
to 256 levels: how chaotic the random network is on its own (mobilenet1.0: 0.955), the
floor any INT8 result is up against.

Writes results/zoo_sweep.json and docs/zoo_sweep.md. ``--merge`` replaces only the rows
of ``--models`` in the existing results and keeps the others; ``--no-timing`` skips the
latencies (for runs on a busy machine: their cells read "not timed").
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
    from gluon_int8_samples import fashion_mnist
    images, _ = fashion_mnist.bundled_slice()
    x = mx.nd.array(images[:count])                       # (N, 1, 28, 28), normalized
    x = mx.nd.contrib.BilinearResize2D(x, height=shape[1], width=shape[2])
    return mx.nd.tile(x, reps=(1, 3, 1, 1))


def flat_outputs(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def cosine(a, b) -> float:
    import numpy as np
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def batched(images, batch_size):
    """``images`` cut into batches of the preset's fixed batch size (or one batch)."""
    if batch_size is None:
        return [images]
    return [images[i:i + batch_size] for i in range(0, images.shape[0], batch_size)]


def outputs_over(block, batches):
    """The flat outputs of ``block`` on every batch, as one float64 vector per batch."""
    import numpy as np
    return np.concatenate([np.concatenate([o.asnumpy().ravel() for o in flat_outputs(block(b))])
                           for b in batches]).astype(np.float64)


def blame(qnet, tests):
    """What the self-check and the report blame: the INT8 node furthest from its FP32 op
    (output steps), and the layer whose SQNR against FP32 falls most below that of the
    worst of its inputs (graph edges of the fused FP32 graph, not the order of the rows:
    after an SE gate the row before a ``broadcast_mul`` is the gate's, whose SQNR an
    added constant inflates)."""
    found = {}
    if qnet.self_check:
        check = max(qnet.self_check, key=lambda c: c.error_steps)
        found['self_check_worst'] = [check.layer, check.pattern, check.error_steps]
    rows = {r.name: r for r in qnet.report(tests[:1]).rows
            if r.sqnr_db is not None and r.sqnr_db != float('inf')}
    worst = worst_inputs(qnet.fp32_graph.symbol, {n: r.sqnr_db for n, r in rows.items()})
    drops = [(worst[name] - row.sqnr_db, row) for name, row in rows.items() if name in worst]
    if drops:
        drop, row = max(drops, key=lambda d: d[0])
        found['report_largest_drop'] = [row.name, row.op, round(drop, 2), round(row.sqnr_db, 2)]
    return found


def worst_inputs(symbol, sqnr):
    """Node name -> the lowest SQNR among the tensors it reads, in one pass over the
    (topologically ordered) nodes of ``symbol``: a node without an entry in ``sqnr``
    carries the worst of its own inputs'; nodes that read only graph inputs are left out."""
    nodes = json.loads(symbol.tojson())['nodes']
    carried, worst = {}, {}
    for node in nodes:
        found = [carried[nodes[i]['name']] for i, *_ in node['inputs']
                 if carried[nodes[i]['name']] is not None]
        if found:
            worst[node['name']] = min(found)
        carried[node['name']] = sqnr.get(node['name'], worst.get(node['name']))
    return worst


def run_one(name, mode, timing=True):
    """Child: quantize one model and print one JSON line."""
    import logging
    import warnings
    import mxnet as mx
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
    zoo.set_batchnorm_statistics(net, images[:family.batch_size or 16])  # fixed: its size
    start = time.perf_counter()
    qnet = gluon_int8.quantize_net(net, batched(images[:16], family.batch_size), mode=mode,
                                   **zoo.quantize_options(net, family))
    row['quantize_seconds'] = time.perf_counter() - start
    row['int8_layers'], row['fp32_layers'] = len(qnet.int8_layers), len(qnet.fp32_layers)
    test = images[16:32]
    tests = batched(test, family.batch_size)
    a, b = outputs_over(net, tests), outputs_over(qnet, tests)
    row['cosine'], row['mode'] = cosine(a, b), mode
    step = float(test.abs().max().asscalar()) / 127  # the input alone at 8 bits, FP32 after
    row['fp32_input8_cosine'] = cosine(a, outputs_over(net, [(t / step).round() * step
                                                             for t in tests]))
    if row['kind'] == 'classification':
        ref, out = flat_outputs(net(test)), flat_outputs(qnet(test))
        row['top1_agreement'] = float((ref[0].argmax(axis=1) == out[0].argmax(axis=1)).mean().asscalar())
        row.update(blame(qnet, tests))
    row['status'] = 'ok'
    blocks = bench.variants(net, [test[:1]], qnet)
    if not timing:  # still run what the timing runs: 4 calls of each at batch 1
        for variant in ('fusion', 'int8'):
            for _ in range(4):
                flat_outputs(blocks[variant](test[:1]))[0].wait_to_read()
        row['timed'] = False
        print(json.dumps(row))
        return
    for variant in ('fusion', 'int8'):
        row['latency_ms_' + variant] = bench.latency_ms(blocks[variant], [(1,) + family.input_shape],
                                                        warmup=3, runs=10)
    row['speedup'] = row['latency_ms_fusion'] / row['latency_ms_int8']
    print(json.dumps(row))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', default=','.join(CLASSIFICATION + DETECTION))
    parser.add_argument('--timeout', type=int, default=900)
    parser.add_argument('--mode', default='entropy', help='calibration mode (default entropy)')
    parser.add_argument('--no-timing', action='store_true',
                        help='skip the latencies (busy machine); the cells read "not timed"')
    parser.add_argument('--merge', action='store_true',
                        help='replace only these models\' rows in results/zoo_sweep.json')
    parser.add_argument('--one', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one, args.mode, timing=not args.no_timing)
        return
    rows = []
    for name in args.models.split(','):
        try:
            proc = subprocess.run([sys.executable, __file__, '--one', name, '--mode', args.mode]
                                  + (['--no-timing'] if args.no_timing else []),
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
    write(merged(rows) if args.merge else rows, args.mode, args.merge)


def merged(new_rows):
    """The stored rows with those of ``new_rows`` replaced (new models appended)."""
    with open(os.path.join(ROOT, 'results', 'zoo_sweep.json')) as f:
        rows = json.load(f)
    new = {r['model']: r for r in new_rows}
    out = [new.pop(r['model'], r) for r in rows]
    return out + list(new.values())


def _row_line(r):
    if r['status'] != 'ok':
        return '| %s | error | | | | | | | | | %s |' % (r['model'], r['error'])
    agree = '%.2f' % r['top1_agreement'] if 'top1_agreement' in r else '-'
    if r.get('timed', True):
        speed = '%.2f | %.2f | %.2f' % (r['latency_ms_fusion'], r['latency_ms_int8'], r['speedup'])
    else:
        speed = 'not timed (busy machine) | not timed | -'
    chaos = '%.4f' % r['fp32_input8_cosine'] if 'fp32_input8_cosine' in r else '-'
    return '| %s | ok | %.4f | %s | %s | %s | %d/%d | %s | %s |' % (
        r['model'], r['cosine'], chaos, agree, speed, r['int8_layers'], r['fp32_layers'],
        _blamed(r) if not near_floor(r) else '', r['preset'])


def near_floor(r) -> bool:
    """Cosine within 0.02 of the FP32 network's own with an 8-bit input."""
    return r['status'] == 'ok' and 'fp32_input8_cosine' in r and \
        r['cosine'] >= r['fp32_input8_cosine'] - 0.02


def _blamed(r) -> str:
    parts = []
    if 'self_check_worst' in r:
        layer, pattern, steps = r['self_check_worst']
        parts.append('self-check: %s (%s, %.1f steps)' % (layer, pattern, steps))
    if 'report_largest_drop' in r:
        layer, op, drop, sqnr = r['report_largest_drop']
        parts.append('report: %s (%s, SQNR -%.1f dB to %.1f)' % (layer, op, drop, sqnr))
    return '; '.join(parts) or 'not measured'


def _stored_about():
    """The paragraph of docs/zoo_sweep.md that says how its stored rows were run."""
    with open(os.path.join(ROOT, 'docs', 'zoo_sweep.md')) as f:
        paragraphs = f.read().split('\n\n')
    return next(p for p in paragraphs if p.startswith('Random weights'))


def write(rows, mode, merge=False):
    from gluon_int8 import bench
    cls = [r for r in rows if r['model'] in CLASSIFICATION]
    good = [r for r in cls if r['status'] == 'ok' and r['cosine'] >= 0.98
            and r.get('timed', True) and r['speedup'] > 1]
    untimed = [r['model'] for r in rows if r['status'] == 'ok' and not r.get('timed', True)]
    about = _stored_about() if merge else (
        'Random weights, BatchNorm statistics from 16 real images (1 for presets with a '
        'fixed batch size), %s calibration on them; cosine and top-1 agreement of INT8 vs '
        'FP32 on 16 other real images (Fashion-MNIST resized); "FP32, 8-bit input": cosine '
        'of FP32 with only its input rounded to 8 bits (the chaos of the random network '
        'alone); latency at batch 1. Command: `%s python benchmarks/zoo_sweep.py %s`.'
        % (mode, ' '.join('%s=%s' % kv for kv in sorted(bench.environment().items())),
           ' '.join(sys.argv[1:])))
    lines = ['# GluonCV zoo sweep', '', about, '',
             '%d of %d classification models quantize with cosine >= 0.98 and run faster in '
             'INT8 than fused FP32%s; %d of %d are within 0.02 of their floor ("FP32, '
             '8-bit input"), the others name the layers the self-check and the report blame.'
             % (len(good), len(cls), ' (untimed rows not counted)' if untimed else '',
                sum(near_floor(r) for r in cls), len(cls)), '']
    if untimed:
        lines += ['Rows run with `--no-timing` (OMP_NUM_THREADS=%s on a busy machine, `--merge`'
                  ' into the rows above): no latency measured, the other columns are '
                  'comparable: %s.' % (bench.omp_threads(), ', '.join(untimed)), '']
    lines += ['| model | status | cosine | FP32, 8-bit input | top-1 agree | fused FP32 ms | '
              'INT8 ms | speedup | INT8/FP32 layers | short of the floor: blamed | note |',
              '|---|---|---|---|---|---|---|---|---|---|---|']
    lines += [_row_line(r) for r in rows]
    os.makedirs(os.path.join(ROOT, 'results'), exist_ok=True)
    os.makedirs(os.path.join(ROOT, 'docs'), exist_ok=True)
    with open(os.path.join(ROOT, 'results', 'zoo_sweep.json'), 'w') as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(ROOT, 'docs', 'zoo_sweep.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
