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

A user error (a missing file, a folder that cannot be written, a bad value) is one line
naming the argument on stderr and exit status 2, checked before any long work starts; a
file that cannot be written or read at run time is one line and exit status 1.
"""
import argparse
import logging
import os
import sys

import numpy as np

from .api import MODES, QUANTIZED_DTYPES
from .quantize_graph import GRANULARITIES


class UsageError(ValueError):
    """A bad command line, reported as one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors raised (one line) instead of printed with the usage."""

    def error(self, message):
        raise UsageError('%s: error: %s' % (self.prog, message))


def _shape(text):
    try:
        shape = tuple(int(v) for v in text.split(','))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError('expected comma-separated positive ints, got %r' % text)
    return shape


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError('got %r; expected a positive int' % text)
    return value


def _writable_folder(option: str, path: str) -> None:
    """Create the folder of ``path`` if needed; UsageError unless it can be written."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise UsageError('%s: folder %r cannot be created (%s)'
                         % (option, folder, err.strerror or err)) from err
    if not os.access(folder, os.W_OK):
        raise UsageError('%s: folder %r is not writable' % (option, folder))


def _load_array(option: str, path: str) -> np.ndarray:
    """The first array of a .npy/.npz file."""
    if not os.path.isfile(path):
        raise UsageError('%s: no such file %r' % (option, path))
    try:
        loaded = np.load(path)
    except (OSError, ValueError) as err:
        raise UsageError('%s: %r is not a .npy/.npz file of arrays (%s)'
                         % (option, path, err)) from err
    if hasattr(loaded, 'files'):
        if not loaded.files:
            raise UsageError('%s: %r holds no arrays' % (option, path))
        return loaded[loaded.files[0]]
    return loaded


def _load_fp32(args):
    if args.prefix:
        import mxnet as mx
        for path in (args.prefix + '-symbol.json', args.prefix + '-0000.params'):
            if not os.path.isfile(path):
                raise UsageError('--prefix: no file %r (an FP32 export is prefix-symbol.json '
                                 'and prefix-0000.params)' % path)
        return mx.gluon.SymbolBlock.imports(args.prefix + '-symbol.json', ['data'],
                                            args.prefix + '-0000.params')
    from . import zoo
    if args.pretrained:
        try:
            zoo.check_pretrained_local(args.model)
        except RuntimeError as err:
            raise UsageError('--pretrained: %s' % str(err).split(': ', 1)[-1]) from err
    return zoo.get_model(args.model, quantized=False, pretrained=args.pretrained)


def _calib_data(args):
    if args.calib_data == 'random':
        rng = np.random.RandomState(0)
        total = args.batch_size * args.num_calib_batches
        return rng.uniform(-1, 1, size=(total,) + args.input_shape).astype(np.float32)
    return _load_array('--calib-data', args.calib_data)


def _batches(array, batch_size):
    return [array[i:i + batch_size] for i in range(0, len(array), batch_size)]


def cmd_quantize(args):
    import gluon_int8
    _writable_folder('--out', args.out)
    if args.calib_table and args.calib_data:
        _writable_folder('--calib-table', args.calib_table)
    calib = _batches(_calib_data(args), args.batch_size) if args.calib_data else None
    net = _load_fp32(args)
    qnet = gluon_int8.quantize_net(
        net, calib, mode=args.mode, quantized_dtype=args.quantized_dtype,
        granularity=args.granularity, exclude_layers=args.exclude_layers,
        exclude_layers_match=args.exclude_layers_match,
        exclude_operators=args.exclude_operators, num_calib_batches=args.num_calib_batches,
        calib_table=args.calib_table, progress=not args.quiet,
        allow_table_mismatch=args.allow_table_mismatch)
    print(qnet.layer_table())
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
        _check_shape(net, shape)
        calib = [mx.nd.random.uniform(-1, 1, shape=(16,) + shape)]
        qnet = gluon_int8.quantize_net(net, calib, mode='naive', **dict(family.quantize_kwargs))
        blocks, title = bench.variants(net, calib, qnet), args.model
    else:
        shape = args.input_shape or (3, 224, 224)
        blocks, title = {'int8': gluon_int8.load(args.prefix)}, args.prefix
        _check_shape(blocks['int8'], shape)
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


def _check_shape(block, shape):
    """One batch-1 forward: a shape the network cannot take is the user's --input-shape."""
    import mxnet as mx
    try:
        out = block(mx.nd.zeros((1,) + tuple(shape)))
        for o in out if isinstance(out, (list, tuple)) else [out]:
            o.wait_to_read()
    except mx.base.MXNetError as err:
        from .errors import first_line
        raise UsageError('--input-shape: the model does not take inputs of shape %s (%s)'
                         % (','.join(map(str, shape)), first_line(err))) from err


def cmd_report(args):
    import gluon_int8
    for option in ('--json', '--png'):
        if getattr(args, option[2:]):
            _writable_folder(option, getattr(args, option[2:]))
    data = _load_array('--data', args.data)
    qnet = gluon_int8.load(args.prefix)
    report = qnet.report(_batches(data, args.batch_size), num_batches=args.num_batches)
    print(report.table())
    if args.json:
        report.to_json(args.json)
        print('wrote %s' % args.json)
    if args.png:
        report.save_png(args.png, title='%s: INT8 vs FP32 per layer' % args.prefix)
        print('wrote %s' % args.png)


def build_parser():
    parser = _Parser(prog='gluon-int8', description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', required=True)
    q = sub.add_parser('quantize', help='quantize an FP32 model and export the INT8 model')
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument('--model', help='GluonCV model-zoo name')
    src.add_argument('--prefix', help='FP32 export prefix (prefix-symbol.json, prefix-0000.params)')
    q.add_argument('--pretrained', action='store_true',
                   help='zoo weights already in ~/.mxnet/models (never downloaded)')
    q.add_argument('--calib-data', help=".npy/.npz file of float32 batches, or 'random'")
    q.add_argument('--input-shape', type=_shape, default=(3, 224, 224),
                   help='per-example shape for --calib-data random (default 3,224,224)')
    q.add_argument('--batch-size', type=_positive, default=32)
    q.add_argument('--num-calib-batches', type=_positive, default=5)
    q.add_argument('--mode', default='entropy', choices=MODES)
    q.add_argument('--quantized-dtype', default='auto', choices=QUANTIZED_DTYPES)
    q.add_argument('--granularity', default='tensor', choices=list(GRANULARITIES))
    q.add_argument('--exclude-layers', nargs='*', default=None)
    q.add_argument('--exclude-layers-match', nargs='*', default=None)
    q.add_argument('--exclude-operators', nargs='*', default=None)
    q.add_argument('--calib-table', help='save the table here (or reuse it without data)')
    q.add_argument('--allow-table-mismatch', action='store_true',
                   help='reuse a --calib-table of another network, mode or dtype (warns)')
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
    b.add_argument('--batch', type=_positive, default=64)
    b.add_argument('--runs', type=_positive, default=10)
    b.add_argument('--latency-runs', type=_positive, default=50)
    b.set_defaults(func=cmd_bench)
    r = sub.add_parser('report', help='per-layer error (SQNR, cosine) of an INT8 export '
                                      'against its FP32 graph on data (export it with '
                                      '--with-fp32-reference)')
    r.add_argument('prefix')
    r.add_argument('--data', required=True, help='.npy/.npz file of float32 input batches')
    r.add_argument('--batch-size', type=_positive, default=32)
    r.add_argument('--num-batches', type=_positive, default=None)
    r.add_argument('--json', help='also write the report as JSON here')
    r.add_argument('--png', help='also write a bar chart of the SQNR per layer here')
    r.set_defaults(func=cmd_report)
    i = sub.add_parser('info', help='show the layers and ranges of an INT8 export')
    i.add_argument('prefix')
    i.set_defaults(func=cmd_info)
    return parser


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
    except UsageError as err:
        print(str(err).splitlines()[0], file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    try:
        args.func(args)
    except (ValueError, TypeError) as err:
        print('gluon-int8: error: %s' % _one_line(err), file=sys.stderr)
        return 2
    except OSError as err:
        print('gluon-int8: error: %s' % _one_line(err), file=sys.stderr)
        return 1
    return 0


def _one_line(err: Exception) -> str:
    return ' '.join(str(err).split())


if __name__ == '__main__':
    sys.exit(main())
