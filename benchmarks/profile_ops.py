"""Where the time of one model goes: per-op (MXNet profiler) and per-primitive (oneDNN
verbose) profiles of the fused FP32 and the INT8 graph.

    python benchmarks/profile_ops.py --model ssd_300_vgg16_atrous_voc --batch 16
    python benchmarks/profile_ops.py --model mobilenet1.0 --batch 1 --runs 50

For each variant it runs --runs forward passes after warm-up and reports:
  * MXNet's aggregate profile: total ms per op type and its share of the forward time;
  * oneDNN's verbose log (DNNL_VERBOSE=1, in a child process): ms per primitive kind
    (convolution, inner_product, reorder, pooling, ...) and per data type, so reorders
    between layouts and the FP32 islands show up.
Writes results/profile_<model>_bs<batch>.md (and .json). Run it on a quiet machine with
the settings of gluon_int8.bench.RECOMMENDED_ENV for figures that match the seed table.
"""
import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def build(model: str, batch: int):
    import mxnet as mx
    import gluon_int8
    from gluon_int8 import bench, zoo
    preset = zoo.preset(model)
    mx.random.seed(0)
    calib = [mx.nd.random.uniform(-1, 1, shape=(16,) + preset.input_shape) for _ in range(2)]
    net = zoo.get_model(model, quantized=False, bn_batch=calib[0])
    qnet = gluon_int8.quantize_net(net, calib, mode='naive', **zoo.quantize_options(net, preset))
    blocks = bench.variants(net, calib[:1], qnet)
    x = mx.nd.random.uniform(-1, 1, shape=(batch,) + preset.input_shape)
    return {'fusion': blocks['fusion'], 'int8': blocks['int8']}, x


def _run(block, x, runs: int) -> float:
    outs = block(x)
    for out in outs if isinstance(outs, (list, tuple)) else [outs]:
        out.wait_to_read()
    start = time.perf_counter()
    for _ in range(runs):
        outs = block(x)
        for out in outs if isinstance(outs, (list, tuple)) else [outs]:
            out.wait_to_read()
    return (time.perf_counter() - start) / runs * 1000


def mxnet_profile(block, x, runs: int):
    """(ms per forward, {op: ms per forward}) from MXNet's aggregate profiler."""
    import mxnet as mx
    ms = _run(block, x, runs)
    mx.profiler.set_config(profile_all=True, aggregate_stats=True,
                           filename=os.devnull)
    mx.profiler.set_state('run')
    _run(block, x, runs)
    mx.profiler.set_state('stop')
    table = json.loads(mx.profiler.dumps(reset=True, format='json'))
    ops = {}
    for domain, entries in table.get('Time', {}).items():
        if domain.startswith('operator'):
            for name, stat in entries.items():
                ops[name] = ops.get(name, 0.0) + stat['Total'] / runs
    return ms, ops


VERBOSE = re.compile(r'^(?:onednn|dnnl)_verbose,(?:[^,]*,)*?exec,cpu,([^,]+),([^,]*),[^,]*,'
                     r'([^,]*),.*,([0-9.]+)$')


def onednn_profile(model: str, batch: int, variant: str, runs: int) -> dict:
    """{(primitive kind, data types): ms per forward} from a child with DNNL_VERBOSE=1."""
    env = dict(os.environ, DNNL_VERBOSE='1', ONEDNN_VERBOSE='1')
    out = subprocess.run([sys.executable, __file__, '--child', model, str(batch), variant,
                          str(runs)], env=env, check=True, capture_output=True, text=True)
    totals = collections.Counter()
    counting = False
    for line in out.stdout.splitlines():
        if line == 'PROFILE-START':
            counting = True
            continue
        match = VERBOSE.match(line) if counting else None
        if match:
            kind, _, dtypes, ms = match.groups()
            src = re.search(r'src_(\w+?)::', dtypes)
            totals['%s %s' % (kind, src.group(1) if src else '')] += float(ms) / runs
    return dict(totals.most_common())


def child(model: str, batch: int, variant: str, runs: int) -> None:
    blocks, x = build(model, batch)
    _run(blocks[variant], x, 2)
    print('PROFILE-START', flush=True)
    _run(blocks[variant], x, runs)


def markdown(model, batch, results) -> str:
    lines = ['# %s, batch %d' % (model, batch), '',
             'command: python benchmarks/profile_ops.py %s; OMP_NUM_THREADS=%s, '
             'MXNET_ENGINE_TYPE=%s' % (' '.join(sys.argv[1:]),
                                       os.environ.get('OMP_NUM_THREADS', '(unset)'),
                                       os.environ.get('MXNET_ENGINE_TYPE', '(default)')), '']
    for variant, res in results.items():
        kernels = sum(res['onednn'].values())
        lines += ['## %s: %.2f ms per forward' % (variant, res['ms']), '',
                  'oneDNN primitives: %.2f ms (%.1f%%); the rest, %.2f ms, is MXNet and '
                  'Python around them.' % (kernels, 100 * kernels / res['ms'],
                                           res['ms'] - kernels), '',
                  '| MXNet op (bulked segments not listed: their times overlap) | ms | share |',
                  '|---|---|---|']
        single = {op: ms for op, ms in res['ops'].items() if ',' not in op}
        for op, ms in sorted(single.items(), key=lambda kv: -kv[1])[:15]:
            lines.append('| %s | %.2f | %.1f%% |' % (op, ms, 100 * ms / res['ms']))
        lines += ['', '| oneDNN primitive (src type) | ms | share |', '|---|---|---|']
        for kind, ms in list(res['onednn'].items())[:12]:
            lines.append('| %s | %.2f | %.1f%% |' % (kind, ms, 100 * ms / res['ms']))
        lines.append('')
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='ssd_300_vgg16_atrous_voc')
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--runs', type=int, default=5)
    parser.add_argument('--out', default=os.path.join(ROOT, 'results'))
    args = parser.parse_args()
    blocks, x = build(args.model, args.batch)
    results = {}
    for variant, block in blocks.items():
        ms, ops = mxnet_profile(block, x, args.runs)
        results[variant] = {'ms': ms, 'ops': ops,
                            'onednn': onednn_profile(args.model, args.batch, variant, args.runs)}
    text = markdown(args.model, args.batch, results)
    base = os.path.join(args.out, 'profile_%s_bs%d' % (args.model, args.batch))
    with open(base + '.md', 'w') as fobj:
        fobj.write(text)
    with open(base + '.json', 'w') as fobj:
        json.dump(results, fobj, indent=1)
    print(text)


if __name__ == '__main__':
    if len(sys.argv) == 6 and sys.argv[1] == '--child':
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    else:
        main()
