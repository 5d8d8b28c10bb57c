"""Where quantize_net's time goes, stage by stage: what the fusion check and the self-check
cost beside calibration.

GluonCV model (random weights, fixed seed) on random images in batches of 32, entropy
mode, the stages of :mod:`gluon_int8.pipeline` called one by one as ``quantize_net``
calls them:

  trace        hybrid_forward on symbols
  fuse         the guarded oneDNN passes
  plan         MXNet's quantize pass and the op-table plan
  verify       fused FP32 graph against the traced one, first batch (the fusion check)
  calibrate    statistics over every batch, thresholds, the table
  build        ranges and rewrites into the graph, weights, the block
  crash check  the block called as users do (batch 1 twice, the batch)
  self-check   every INT8 node against its FP32 op on its own inputs
  bias corr.   (only with --bias-correction) the build again, biases corrected

The bare FP32 forward pass over the same images (hybridized, oneDNN-fused) is the scale.

    OMP_NUM_THREADS=2 python benchmarks/stages.py [--model resnet50_v1] [--images 64]

Prints a table and writes results/stages.{json,md}.
"""
import argparse
import json
import logging
import os
import resource
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed(rows, stage, fn, *args, **kwargs):
    """Run one stage: (stage, seconds, peak RSS of the process when it ends)."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    rows.append((stage, time.perf_counter() - start, _peak_mb()))
    return out


def measure(model: str, images: int, batch_size: int, bias_correction: bool):
    import mxnet as mx
    from gluoncv.model_zoo import get_model

    from gluon_int8 import api, pipeline
    from gluon_int8.fuse import fuse, verify
    from gluon_int8.plan import plan_graph
    from gluon_int8.pipeline import Prepared
    from gluon_int8.quantize_graph import graph_nodes
    from gluon_int8.trace import trace

    mx.random.seed(0)
    size = 299 if model.startswith('inception') else 224
    net = get_model(model, pretrained=False)
    net.initialize(mx.init.Xavier())
    data = mx.nd.random.uniform(-1, 1, shape=(images, 3, size, size))
    batches = [data[i:i + batch_size] for i in range(0, images, batch_size)]
    net(data[:1]).wait_to_read()

    fp32 = get_model(model, pretrained=False)
    fp32.initialize(mx.init.Xavier())
    fp32.hybridize(backend='MKLDNN', static_alloc=True, static_shape=True)
    fp32(batches[0]).wait_to_read()
    start = time.perf_counter()
    for b in batches:
        fp32(b).wait_to_read()
    forward = time.perf_counter() - start

    opts = api.validate(mode='entropy', bias_correction=bias_correction)
    before, rows = _peak_mb(), []
    first = [batches[0]]
    traced = _timed(rows, 'trace', trace, net, first)
    fused = _timed(rows, 'fuse', fuse, traced.symbol)
    plan = _timed(rows, 'plan', plan_graph, fused, {}, list(traced.arg_params),
                  traced.data_names, opts.quantized_dtype, opts.quantize_mode, opts.granularity)
    _timed(rows, 'verify', verify, plan.fused, traced.symbol, traced.data_names,
           {**traced.aux_params, **traced.arg_params}, first)
    prepared = Prepared(traced, graph_nodes(plan.fused), {}, plan, opts.quantized_dtype,
                        opts.quantize_mode, opts.granularity)
    table = _timed(rows, 'calibrate', api._calibration_table, prepared,
                   iter([(b,) for b in batches]), opts, None, False, len(batches))
    built, problems = _timed(rows, 'build', pipeline._build, prepared, table)
    if problems:
        raise RuntimeError('build: %s' % problems)
    qnet, qsym, values = built
    _timed(rows, 'crash check', pipeline._crashes, qnet, first)
    checks = _timed(rows, 'self-check', pipeline._self_check, qnet, qsym, values, prepared,
                    first)
    if bias_correction:
        _timed(rows, 'bias corr.', pipeline._build, prepared, table, first)
    return forward, rows, len(qnet.self_check), len(checks), before


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='resnet50_v1')
    parser.add_argument('--images', type=int, default=64)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--bias-correction', action='store_true')
    parser.add_argument('--out', default=os.path.join(ROOT, 'results'))
    args = parser.parse_args()
    warnings.simplefilter('ignore')
    logging.basicConfig(level=logging.ERROR)
    from gluon_int8 import bench

    forward, rows, nodes, defects, before = measure(args.model, args.images, args.batch_size,
                                            args.bias_correction)
    total = sum(s for _, s, _ in rows)
    lines = ['%s, %d random images of batch %d, entropy, OMP_NUM_THREADS=%s; the bare fused '
             'FP32 forward over the same images: %.2f s. Self-check: %d INT8 nodes, %d '
             'defects.' % (args.model, args.images, args.batch_size, bench.omp_threads(),
                           forward, nodes, defects), '',
             '| stage | seconds | x forward | share | peak RSS MB at its end |',
             '|---|---|---|---|---|', '| (model, images, forward) | | | | %.0f |' % before]
    lines += ['| %s | %.2f | %.2f | %.0f%% | %.0f |' % (stage, s, s / forward, 100 * s / total,
                                                       peak) for stage, s, peak in rows]
    lines.append('| **total** | %.2f | %.2f | 100%% | |' % (total, total / forward))
    table = '\n'.join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'stages.json'), 'w') as f:
        json.dump({'model': args.model, 'images': args.images, 'batch_size': args.batch_size,
                   'threads': bench.omp_threads(), 'forward_seconds': forward,
                   'stages': {stage: s for stage, s, _ in rows},
                   'peak_rss_mb': {stage: peak for stage, _, peak in rows}, 'self_check_nodes': nodes,
                   'self_check_defects': defects}, f, indent=1)
    with open(os.path.join(args.out, 'stages.md'), 'w') as f:
        f.write('Command: `OMP_NUM_THREADS=%s python benchmarks/stages.py --model %s --images %d%s`'
                '\n\n%s\n' % (bench.omp_threads(), args.model, args.images,
                              ' --bias-correction' if args.bias_correction else '', table))


if __name__ == '__main__':
    main()
