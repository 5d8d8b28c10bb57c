"""The ``gluon-int8`` command line: a thin layer over the library.

    gluon-int8 quantize --model resnet50_v1 --calib-data val/ --num-calib-batches 10 \\
        --batch-size 32 --mode entropy --out model/cq_resnet50
    gluon-int8 quantize --prefix model/resnet50 --calib-data calib.npy --mode naive \\
        --exclude-operators Pooling --out model/cq_resnet50
    gluon-int8 evaluate --prefix model/cq_resnet50 --data val.rec --metric top1,top5
    gluon-int8 evaluate --prefix model/cq_resnet50 --benchmark
    gluon-int8 info model/cq_resnet50
    gluon-int8 report model/cq_resnet50 --data calib.npy --json r.json --png r.png
    gluon-int8 bench --model resnet50_v1        (or --prefix model/cq_resnet50)

``--model`` takes a GluonCV model-zoo name, built and quantized through its zoo preset
(random weights unless ``--pretrained``); ``--prefix`` an FP32 export
(``prefix-symbol.json`` + ``prefix-0000.params``). ``--calib-data`` and ``--data`` take an
image folder (one subfolder per class; a flat folder for calibration) or a RecordIO
``.rec``, read with the preprocessing of ``--preprocess`` and its overrides (default: the
zoo preset of ``--model``, else ``imagenet``); ``--calib-data`` also takes a
``.npy``/``.npz`` file of float32 NCHW batches, or ``random`` (uniform noise: for speed
work only, never for accuracy). ``evaluate`` takes INT8 exports of gluon-int8 and plain
FP32 exports alike. ``op-table`` measures MXNet's INT8 kernels on this machine.

A user error (a missing file, a folder that cannot be written, a bad value) is one line
naming the argument on stderr and exit status 2, checked before any long work starts; a
file that cannot be written or read at run time is one line and exit status 1.
"""
import argparse
import dataclasses
import logging
import os
import re
import sys

import numpy as np

from .api import MODES, QUANTIZE_MODES, QUANTIZED_DTYPES
from .pipeline import SELF_CHECKS
from .datasets import (BAD_IMAGES, CHANNEL_ORDERS, IMAGENET, LAYOUTS, PREPROCESS, ImageSource,
                       Preprocess)
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


def _floats(text):
    try:
        return tuple(float(v) for v in text.split(','))
    except ValueError as err:
        raise argparse.ArgumentTypeError('expected comma-separated numbers, got %r'
                                         % text) from err


def _is_images(path):
    return os.path.isdir(path) or path.endswith('.rec')


_PREPROCESS_FIELDS = ('resize', 'crop', 'mean', 'std', 'channels', 'channel_order', 'layout')


def _preprocess(args, default: Preprocess) -> Preprocess:
    """--preprocess (or ``default``) with the overrides given on the command line."""
    base = PREPROCESS[args.preprocess] if args.preprocess else default
    changes = {k: getattr(args, k) for k in _PREPROCESS_FIELDS if getattr(args, k) is not None}
    for key in ('resize', 'crop'):
        if changes.get(key) == 0:
            changes[key] = None
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as err:  # 'preprocess.channel_order: ...' -> '--channel-order: ...'
        flag = lambda m: '--' + m.group(1).replace('_', '-')  # noqa: E731
        raise ValueError(re.sub(r'^preprocess\.(\w+)', flag, str(err))) from None


def _images(args, path, preprocess, shuffle=False):
    return ImageSource(path, preprocess, args.batch_size, shuffle=shuffle,
                       seed=getattr(args, 'seed', 0), bad_images=args.bad_images,
                       param='--calib-data' if shuffle else '--data')


def _load_fp32(args):
    import mxnet as mx
    for path in (args.prefix + '-symbol.json', args.prefix + '-0000.params'):
        if not os.path.isfile(path):
            raise UsageError('--prefix: no file %r (an FP32 export is prefix-symbol.json '
                             'and prefix-0000.params)' % path)
    return mx.gluon.SymbolBlock.imports(args.prefix + '-symbol.json', ['data'],
                                        args.prefix + '-0000.params')


def _calib_data(args, input_shape, preprocess):
    """Calibration batches: an image source, or arrays cut into --batch-size batches."""
    if args.calib_data is None:
        return None
    if args.calib_data == 'random':
        rng = np.random.RandomState(0)
        total = args.batch_size * args.num_calib_batches
        data = rng.uniform(-1, 1, size=(total,) + tuple(input_shape)).astype(np.float32)
        return _batches(data, args.batch_size)
    if _is_images(args.calib_data):
        return _images(args, args.calib_data, _preprocess(args, preprocess), shuffle=True)
    return _batches(_load_array('--calib-data', args.calib_data), args.batch_size)


def _batches(array, batch_size):
    return [array[i:i + batch_size] for i in range(0, len(array), batch_size)]


def _quantize_options(args):
    """quantize_net's options as given; those left unset keep the preset's or the default."""
    options = dict(quantized_dtype=args.quantized_dtype, granularity=args.granularity,
                   quantize_mode=args.quantize_mode, exclude_layers=args.exclude_layers,
                   exclude_layers_match=args.exclude_layers_match,
                   exclude_operators=args.exclude_operators,
                   num_calib_batches=args.num_calib_batches, percentile=args.percentile,
                   num_bins=args.num_bins, calib_table=args.calib_table,
                   progress=not args.quiet,
                   allow_table_mismatch=args.allow_table_mismatch or None,
                   self_check=args.self_check, bias_correction=args.bias_correction or None,
                   for_onnx=args.format == 'onnx' or None)
    return {k: v for k, v in options.items() if v is not None}


def cmd_quantize(args):
    import gluon_int8
    _writable_folder('--out', args.out)
    if args.format == 'onnx' and args.with_fp32_reference:
        raise UsageError('--with-fp32-reference: an MXNet export option; not with --format onnx')
    if args.calib_table and args.calib_data:
        _writable_folder('--calib-table', args.calib_table)
    options = _quantize_options(args)
    if args.model:  # through the zoo preset: its input shape, preprocessing and options
        from . import zoo
        if args.pretrained:
            try:
                zoo.check_pretrained_local(args.model)
            except RuntimeError as err:
                raise UsageError('--pretrained: %s' % str(err).split(': ', 1)[-1]) from err
        family = zoo.preset(args.model)
        calib = _calib_data(args, args.input_shape or family.input_shape, family.preprocess)
        # the preset's FP32 stem (CPUs without VNNI) is for MXNet's kernels only
        qnet = zoo.get_model(args.model, quantized=True, calib_data=calib, mode=args.mode,
                             pretrained=args.pretrained, quantize_kwargs=options,
                             exclude_stem=False if args.format == 'onnx' else None)
    else:
        calib = _calib_data(args, args.input_shape or IMAGENET.input_shape, IMAGENET)
        qnet = gluon_int8.quantize_net(_load_fp32(args), calib, mode=args.mode, **options)
    print(qnet.layer_table())
    if args.format == 'onnx':
        written = qnet.export(args.out, format='onnx', on_unsupported=args.on_unsupported)
    else:
        written = qnet.export(args.out, fp32_reference=args.with_fp32_reference)
    for path in written:
        print('wrote %s (%.1f KB)' % (path, os.path.getsize(path) / 1024.0))


def cmd_evaluate(args):
    from . import bench
    from .evaluation import evaluate, load_model
    if not args.data and not args.benchmark:
        raise ValueError('--data: not given; pass an image folder or a .rec for accuracy, '
                         'and/or --benchmark for speed on synthetic data')
    block = load_model(args.prefix, runtime=args.runtime)
    preprocess = _preprocess(args, IMAGENET)
    if args.data:
        source = _images(args, args.data, preprocess)
        result = evaluate(block, source, args.metric, num_batches=args.num_batches,
                          progress=not args.quiet)
        print('%s on %s: %s (%d images%s)' % (
            args.prefix, args.data,
            '  '.join('%s %.2f%%' % (k, 100 * v) for k, v in result.accuracy.items()),
            result.num_images, ', %d unreadable skipped' % len(result.skipped)
            if result.skipped else ''))
    if args.benchmark:
        shape = args.input_shape or preprocess.input_shape
        if shape is None:
            raise ValueError('--input-shape: needed for --benchmark when the preprocessing '
                             'gives no fixed image size (no --crop, shorter-side resize)')
        timing = bench.measure({'model': block}, shape, args.batch_size, args.runs,
                               args.latency_runs)
        print('%s benchmark on synthetic %s input: latency %.2f ms (batch 1), throughput '
              '%.1f img/s (batch %d), %s' % (
                  args.prefix, 'x'.join(map(str, shape)), timing['latency_ms']['model'],
                  timing['throughput']['model'], args.batch_size,
                  ' '.join('%s=%s' % kv for kv in bench.environment().items())))


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
        qnet = gluon_int8.quantize_net(net, calib, mode='naive', **zoo.quantize_options(net, family))
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
    if _is_images(args.data):
        batches = _images(args, args.data, _preprocess(args, IMAGENET))
    else:
        batches = _batches(_load_array('--data', args.data), args.batch_size)
    qnet = gluon_int8.load(args.prefix)
    report = qnet.report(batches, num_batches=args.num_batches)
    print(report.table())
    if args.json:
        report.to_json(args.json)
        print('wrote %s' % args.json)
    if args.png:
        report.save_png(args.png, title='%s: INT8 vs FP32 per layer' % args.prefix)
        print('wrote %s' % args.png)


def _add_image_args(parser):
    """Options for images read from a folder or a .rec."""
    group = parser.add_argument_group(
        'images from a folder or a .rec', 'preprocessing: --preprocess, then the overrides')
    group.add_argument('--preprocess', choices=sorted(PREPROCESS),
                       help='named preprocessing (default: the zoo preset of --model, else '
                            'imagenet: shorter side 256, center crop 224, ImageNet mean/std)')
    group.add_argument('--resize', type=int, help='shorter side in pixels (0: no resize)')
    group.add_argument('--crop', type=int, help='center crop side in pixels (0: no crop)')
    group.add_argument('--mean', type=_floats, help='per-channel mean of pixels in [0, 1]')
    group.add_argument('--std', type=_floats, help='per-channel std of pixels in [0, 1]')
    group.add_argument('--channels', type=int, choices=(1, 3), help='1: grayscale')
    group.add_argument('--channel-order', choices=CHANNEL_ORDERS)
    group.add_argument('--layout', choices=LAYOUTS)
    group.add_argument('--bad-images', choices=BAD_IMAGES, default='skip',
                       help='unreadable images: report and skip them, or stop (default skip)')


def cmd_op_table(args):
    from . import conformance, op_table
    found = conformance.measure_all()
    recorded = op_table.RECORDED.get(op_table.machine())
    print('INT8 op table of %s (%s)' % (op_table.machine(), 'recorded column holds'
                                        if recorded is not None and all(
                                            found[k].verdict == recorded[k].verdict
                                            for k in found)
                                        else 'no recorded column' if recorded is None
                                        else 'DIFFERS from the recorded column'))
    print(conformance.python_literal(found) if args.python else conformance.markdown(found))


def build_parser():
    parser = _Parser(prog='gluon-int8', description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', required=True)
    q = sub.add_parser('quantize', help='quantize an FP32 model and export the INT8 model')
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument('--model', help='GluonCV model-zoo name')
    src.add_argument('--prefix', help='FP32 export prefix (prefix-symbol.json, prefix-0000.params)')
    q.add_argument('--pretrained', action='store_true',
                   help='zoo weights already in ~/.mxnet/models (never downloaded)')
    q.add_argument('--calib-data', help="image folder, .rec, .npy/.npz file of float32 "
                                        "batches, or 'random'")
    q.add_argument('--input-shape', type=_shape, default=None,
                   help='per-example shape for --calib-data random (default: the zoo '
                        'preset, else 3,224,224)')
    q.add_argument('--batch-size', type=_positive, default=32)
    q.add_argument('--num-calib-batches', type=_positive, default=5)
    q.add_argument('--seed', type=int, default=0, help='shuffling of calibration images')
    q.add_argument('--mode', default='entropy', choices=MODES)
    q.add_argument('--quantize-mode', choices=QUANTIZE_MODES,
                   help='full or smart (default: the zoo preset, else full)')
    q.add_argument('--percentile', type=float, help="for --mode percentile (default 99.99)")
    q.add_argument('--num-bins', type=int, help='histogram bins (default 1024)')
    q.add_argument('--quantized-dtype', default='auto', choices=QUANTIZED_DTYPES)
    q.add_argument('--granularity', default='tensor', choices=list(GRANULARITIES))
    q.add_argument('--exclude-layers', nargs='*', default=None)
    q.add_argument('--exclude-layers-match', nargs='*', default=None)
    q.add_argument('--exclude-operators', nargs='*', default=None)
    q.add_argument('--calib-table', help='save the table here (or reuse it without data)')
    q.add_argument('--allow-table-mismatch', action='store_true',
                   help='reuse a --calib-table of another network, mode or dtype (warns)')
    q.add_argument('--self-check', choices=SELF_CHECKS,
                   help='warn (default), fallback (defective layers back to FP32), or off')
    q.add_argument('--bias-correction', action='store_true',
                   help='correct the mean shift of every INT8 conv/FC in its bias')
    q.add_argument('--out', required=True, help='export prefix of the INT8 model')
    q.add_argument('--quiet', action='store_true', help='no progress bar')
    q.add_argument('--with-fp32-reference', action='store_true',
                   help="also export the FP32 values 'gluon-int8 report' compares against")
    q.add_argument('--format', choices=('mxnet', 'onnx'), default='mxnet',
                   help="'mxnet' (default): prefix-symbol.json + prefix-0000.params + "
                        "sidecar; 'onnx': prefix.onnx, a QDQ model for ONNX Runtime and "
                        "OpenVINO (calibrated with for_onnx=True)")
    q.add_argument('--on-unsupported', choices=('fp32', 'raise'), default='fp32',
                   help="--format onnx: an INT8 layer the ONNX graph cannot hold stays FP32 "
                        "there ('fp32', with a warning) or stops the export ('raise')")
    _add_image_args(q)
    q.set_defaults(func=cmd_quantize)
    e = sub.add_parser('evaluate', help='top-k accuracy of an export (INT8 or FP32) on an '
                                        'image folder or .rec, and/or its speed')
    e.add_argument('--prefix', required=True,
                   help='export prefix: a gluon-int8 INT8 export or a plain FP32 one; or '
                        'an ONNX export (path ending in .onnx)')
    e.add_argument('--runtime', choices=('onnxruntime', 'openvino'), default='onnxruntime',
                   help='for an .onnx --prefix: the runtime that runs it')
    e.add_argument('--data', help='image folder (one subfolder per class) or .rec')
    e.add_argument('--metric', default='top1', help='comma-separated: top1,top5,... '
                                                    '(default top1)')
    e.add_argument('--batch-size', type=_positive, default=32)
    e.add_argument('--num-batches', type=_positive, default=None, help='stop after this many')
    e.add_argument('--benchmark', action='store_true',
                   help='latency (batch 1) and throughput (--batch-size) on synthetic data')
    e.add_argument('--input-shape', type=_shape, default=None,
                   help='per-example shape for --benchmark (default: from the preprocessing)')
    e.add_argument('--runs', type=_positive, default=10)
    e.add_argument('--latency-runs', type=_positive, default=50)
    e.add_argument('--quiet', action='store_true', help='no progress bar')
    _add_image_args(e)
    e.set_defaults(func=cmd_evaluate)
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
    r.add_argument('--data', required=True,
                   help='.npy/.npz file of float32 input batches, image folder or .rec')
    r.add_argument('--batch-size', type=_positive, default=32)
    r.add_argument('--num-batches', type=_positive, default=None)
    r.add_argument('--json', help='also write the report as JSON here')
    r.add_argument('--png', help='also write a bar chart of the SQNR per layer here')
    _add_image_args(r)
    r.set_defaults(func=cmd_report)
    i = sub.add_parser('info', help='show the layers and ranges of an INT8 export')
    i.add_argument('prefix')
    i.set_defaults(func=cmd_info)
    t = sub.add_parser('op-table', help="measure MXNet's INT8 kernels on this machine (the op "
                                        'table gluon-int8 plans with)')
    t.add_argument('--python', action='store_true',
                   help='print the column as the literal gluon_int8.op_table.RECORDED holds')
    t.set_defaults(func=cmd_op_table)
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
