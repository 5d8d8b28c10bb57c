"""The ``gluon-int8`` command line: a thin layer over the library.

    gluon-int8 quantize --model resnet50_v1 --calib-data random --out model/cq_resnet50
    gluon-int8 quantize --prefix model/resnet50 --calib-data calib.npy --mode naive \\
        --exclude-operators Pooling --out model/cq_resnet50
    gluon-int8 info model/cq_resnet50
    gluon-int8 report model/cq_resnet50 --data calib.npy --json r.json --png r.png
    gluon-int8 bench --model resnet50_v1        (or --prefix model/cq_resnet50)

``--model`` takes a GluonCV model-zoo name (random weights unless ``--pretrained``);
``--prefix`` an FP32 export (``prefix-symbol.json`` + ``prefix-0000.params``).
``--calib-data`` is a ``.npy``/``.npz`` file of float32 NCHW batches, or ``random``
(uniform noise: for speed work only, never for accuracy).
"""
import argparse
import logging
import os
import sys

import numpy as np

from .api import MODES, QUANTIZED_DTYPES
from .quantize_graph import GRANULARITIES


def _shape(text):
    try:
        return tuple(int(v) for v in text.split(','))
    except ValueError as err:
        raise argparse.ArgumentTypeError('expected comma-separated ints, got %r' % text) from err


def _load_fp32(args):
    import mxnet as mx
    if args.prefix:
        return mx.gluon.SymbolBlock.imports(args.prefix + '-symbol.json', ['data'],
                                            args.prefix + '-0000.params')
    from gluoncv.model_zoo import get_model
    net = get_model(args.model, pretrained=args.pretrained)
    if not args.pretrained:
        net.initialize(mx.init.Xavier())
    return net


def _calib_data(args):
    if args.calib_data == 'random':
        rng = np.random.RandomState(0)
        total = args.batch_size * args.num_calib_batches
        return rng.uniform(-1, 1, size=(total,) + args.input_shape).astype(np.float32)
    if not os.path.isfile(args.calib_data):
        raise SystemExit('--calib-data: no such file %r' % args.calib_data)
    loaded = np.load(args.calib_data)
    return loaded[loaded.files[0]] if hasattr(loaded, 'files') else loaded


def _batches(array, batch_size):
    return [array[i:i + batch_size] for i in range(0, len(array), batch_size)]


def cmd_quantize(args):
    import gluon_int8
    net = _load_fp32(args)
    calib = _batches(_calib_data(args), args.batch_size) if args.calib_data else None
    qnet = gluon_int8.quantize_net(
        net, calib, mode=args.mode, quantized_dtype=args.quantized_dtype,
        granularity=args.granularity, exclude_layers=args.exclude_layers,
        exclude_layers_match=args.exclude_layers_match,
        exclude_operators=args.exclude_operators, num_calib_batches=args.num_calib_batches,
        calib_table=args.calib_table, progress=not args.quiet)
    print(qnet.layer_table())
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    for path in qnet.export(args.out, fp32_reference=args.with_fp32_reference):
        print('wrote %s (%.1f KB)' % (path, os.path.getsize(path) / 1024.0))


def cmd_info(args):
    import gluon_int8
    qnet = gluon_int8.load(args.prefix)
    print(qnet.layer_table())
    if qnet.calib_table is not None:
        print('\ncalibration: mode=%s quantized_dtype=%s' % (qnet.calib_table.mode,
                                                          qnet.calib_table.quantized_dtype))
        for name, (lo, hi) in sorted(qnet.calib_table.ranges.items()):
            print('  %-50s [%.5g, %.5g]' % (name, lo, hi))


def cmd_bench(args):
    import mxnet as mx
    import gluon_int8
    from . import bench, zoo
    if args.model:
        family = zoo.preset(args.model)
        shape = args.input_shape or family.input_shape
        net = zoo.get_model(args.model, quantized=False)
        calib = [mx.nd.random.uniform(-1, 1, shape=(16,) + shape)]
        qnet = gluon_int8.quantize_net(net, calib, mode='naive', **dict(family.quantize_kwargs))
        blocks, title = bench.variants(net, calib, qnet), args.model
    else:
        shape = args.input_shape or (3, 224, 224)
        blocks, title = {'int8': gluon_int8.load(args.prefix)}, args.prefix
    print('%s, input %s, %s' % (title, 'x'.join(map(str, shape)),
                                ' '.join('%s=%s' % kv for kv in bench.environment().items())))
    missing = bench.missing_recommendations()
    if missing:
        print('note: INT8 serves fastest with %s set before the process starts'
              % ' '.join('%s=%s' % kv for kv in missing.items()))
    result = bench.measure(blocks, shape, args.batch, args.runs, args.latency_runs)
    print('| variant | latency ms (batch 1) | img/s (batch %d) |' % args.batch)
    print('|---|---|---|')
    for name in blocks:
        print('| %s | %.2f | %.1f |' % (name, result['latency_ms'][name], result['throughput'][name]))


def cmd_report(args):
    import gluon_int8
    qnet = gluon_int8.load(args.prefix)
    if not os.path.isfile(args.data):
        raise ValueError('--data: no such file %r' % args.data)
    loaded = np.load(args.data)
    data = loaded[loaded.files[0]] if hasattr(loaded, 'files') else loaded
    report = qnet.report(_batches(data, args.batch_size), num_batches=args.num_batches)
    print(report.table())
    if args.json:
        report.to_json(args.json)
        print('wrote %s' % args.json)
    if args.png:
        report.save_png(args.png, title='%s: INT8 vs FP32 per layer' % args.prefix)
        print('wrote %s' % args.png)


def build_parser():
    parser = argparse.ArgumentParser(prog='gluon-int8', description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', required=True)
    q = sub.add_parser('quantize', help='quantize an FP32 model and export the INT8 model')
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument('--model', help='GluonCV model-zoo name')
    src.add_argument('--prefix', help='FP32 export prefix (prefix-symbol.json, prefix-0000.params)')
    q.add_argument('--pretrained', action='store_true', help='load zoo weights (needs internet)')
    q.add_argument('--calib-data', help=".npy/.npz file of float32 batches, or 'random'")
    q.add_argument('--input-shape', type=_shape, default=(3, 224, 224),
                   help='per-example shape for --calib-data random (default 3,224,224)')
    q.add_argument('--batch-size', type=int, default=32)
    q.add_argument('--num-calib-batches', type=int, default=5)
    q.add_argument('--mode', default='entropy', choices=MODES)
    q.add_argument('--quantized-dtype', default='auto', choices=QUANTIZED_DTYPES)
    q.add_argument('--granularity', default='tensor', choices=list(GRANULARITIES))
    q.add_argument('--exclude-layers', nargs='*', default=None)
    q.add_argument('--exclude-layers-match', nargs='*', default=None)
    q.add_argument('--exclude-operators', nargs='*', default=None)
    q.add_argument('--calib-table', help='save the table here (or reuse it without data)')
    q.add_argument('--out', required=True, help='export prefix of the INT8 model')
    q.add_argument('--quiet', action='store_true', help='no progress bar')
    q.add_argument('--with-fp32-reference', action='store_true',
                   help="also export the FP32 values 'gluon-int8 report' compares against")
    q.set_defaults(func=cmd_quantize)
    b = sub.add_parser('bench', help='latency and throughput of FP32 base, fused and INT8')
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument('--model', help='GluonCV model-zoo name (random weights; all variants)')
    src.add_argument('--prefix', help='an INT8 export of gluon-int8 (INT8 only)')
    b.add_argument('--input-shape', type=_shape, default=None,
                   help='per-example shape (default: the zoo preset, else 3,224,224)')
    b.add_argument('--batch', type=int, default=64)
    b.add_argument('--runs', type=int, default=10)
    b.add_argument('--latency-runs', type=int, default=50)
    b.set_defaults(func=cmd_bench)
    r = sub.add_parser('report', help='per-layer error (SQNR, cosine) of an INT8 export '
                                      'against its FP32 graph on data (export it with '
                                      '--with-fp32-reference)')
    r.add_argument('prefix')
    r.add_argument('--data', required=True, help='.npy/.npz file of float32 input batches')
    r.add_argument('--batch-size', type=int, default=32)
    r.add_argument('--num-batches', type=int, default=None)
    r.add_argument('--json', help='also write the report as JSON here')
    r.add_argument('--png', help='also write a bar chart of the SQNR per layer here')
    r.set_defaults(func=cmd_report)
    i = sub.add_parser('info', help='show the layers and ranges of an INT8 export')
    i.add_argument('prefix')
    i.set_defaults(func=cmd_info)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    try:
        args.func(args)
    except (ValueError, TypeError) as err:
        print('gluon-int8: error: %s' % err, file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
