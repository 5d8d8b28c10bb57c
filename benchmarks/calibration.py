"""Calibration speed and peak memory: gluon-int8 against its forward pass and its peers.

One model per command (GluonCV, random weights with BatchNorm statistics from the first
batch, as the seed table builds them), entropy calibration of the same images in
batches of --batch-size by:

  forward       the bare fused FP32 forward pass of those images: the graph calibration
                runs, in a static block, after one warm-up batch (the floor)
  gluon-int8    gluon_int8.quantize_net(mode='entropy'); the calibration stage (statistics
                and thresholds: pipeline.calibrate and the table) is timed inside it too,
                and the peak RSS when it ends
  mxnet-builtin mxnet.contrib.quantization.quantize_net_v2(calib_mode='entropy')
  ort           ONNX Runtime's quant_pre_process + quantize_static (MinMax, QDQ) on the
                ONNX export of the same network and images, in .venv-peers (as
                benchmarks/peers.py drives it)
  nncf          nncf.quantize (defaults) of the same ONNX export, in .venv-peers

Each engine runs in a fresh process (its peak RSS, ru_maxrss, is its own) after the
model is built and loaded; the images are made batch by batch (one random batch rolled
by one pixel per batch), so no engine holds the data set and peak memory can be flat in
the number of batches. The MXNet engines run at every --images count (memory flat in
the number of batches: 64 and 512), the peers at the first. --repeat N runs each
engine N times and keeps the median. --profile writes a cProfile of gluon-int8's
calibration stage (what stands in the way of a target).

    OMP_NUM_THREADS=2 python benchmarks/calibration.py --model resnet50_v1 [--repeat 3]

Prints a table with the command that produced it, writes results/calibration_<model>.json.
Needs the onnx package in this venv (requirements-export.txt) and .venv-peers for the
peer rows (make peers builds both); --no-peers skips them.
"""
import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MXNET_ENGINES = ('forward', 'gluon-int8', 'mxnet-builtin')
PEER_ENGINES = ('ort', 'nncf')
PEERS_PY = os.path.join(ROOT, '.venv-peers', 'bin', 'python')
WORK = os.path.join(ROOT, 'results', 'onnx', 'calibration')  # the models' weights, ONNX exports


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---- the model and the images (MXNet venv) ---------------------------------------------

def base_batch(shape, batch_size):
    import numpy as np
    return np.random.RandomState(0).uniform(-1, 1, (batch_size,) + tuple(shape)).astype('float32')


def image_batches(base, images):
    """Batch k is the base batch rolled by k pixels along the width: distinct batches at
    the cost of one copy each, never the whole data set in memory."""
    import numpy as np
    batch_size = base.shape[0]
    for k in range(-(-images // batch_size)):
        yield np.roll(base, k, axis=-1)[:images - k * batch_size]


def loader(base, images):
    """A gluon DataLoader of (image, label) over :func:`image_batches`, made on the fly."""
    import mxnet as mx
    import numpy as np

    class Images(mx.gluon.data.Dataset):
        def __len__(self):
            return images

        def __getitem__(self, i):
            k, j = divmod(i, base.shape[0])
            return np.roll(base[j], k, axis=-1), np.float32(0)

    return mx.gluon.data.DataLoader(Images(), batch_size=base.shape[0])


def build_net(model, params_path=None, base=None):
    """The model with its random weights: made and saved (``base`` given), or loaded."""
    import mxnet as mx
    from gluon_int8 import zoo
    if base is not None:
        mx.random.seed(0)
        net = zoo.get_model(model, quantized=False, bn_batch=mx.nd.array(base))
        net.save_parameters(params_path)
        return net
    from gluoncv.model_zoo import get_model
    net = get_model(model, pretrained=False)
    net.load_parameters(params_path, ctx=mx.cpu())
    return net


def setup(args):
    """Make the network's weights, and with peers its ONNX export and their images."""
    import mxnet as mx
    import numpy as np
    from gluon_int8 import zoo
    shape = tuple(zoo.preset(args.model).input_shape)
    base = base_batch(shape, args.batch_size)
    net = build_net(args.model, _params_path(args), base)
    info = {'input_shape': list(shape)}
    if args.peers:
        sys.path.insert(0, HERE)
        import onnx
        from export_onnx import weights_to_initializers
        from gluon_int8.trace import trace
        traced = trace(net, [mx.nd.array(base[:1])])
        path = os.path.join(args.work, args.model + '.onnx')
        mx.onnx.export_model(traced.symbol, {**traced.arg_params, **traced.aux_params},
                             in_shapes=[(1,) + shape], in_types=[np.float32],
                             onnx_file_path=path, dynamic=True,
                             dynamic_input_shapes=[(None,) + shape])
        exported = onnx.load(path)
        weights_to_initializers(exported)
        onnx.save(exported, path)
        images = args.images[0]
        batches = list(image_batches(base, images))
        if len({b.shape for b in batches}) != 1:
            raise SystemExit('--images: %d is not a multiple of --batch-size %d (the peers take '
                             'equal batches)' % (images, args.batch_size))
        np.save(os.path.join(args.work, args.model + '.calib.npy'), np.stack(batches))
        info.update(onnx=path, input_name=exported.graph.input[0].name)
    print(json.dumps(info))


def _params_path(args):
    return os.path.join(args.work, args.model + '.params')


# ---- one engine, in its own process ------------------------------------------------------

def run_forward(net, base, images):
    import mxnet as mx
    from gluon_int8 import pipeline
    from gluon_int8.trace import build_symbol_block
    first = (mx.nd.array(base),)
    prepared = pipeline.prepare(net, first, 'auto', 'smart', 'channel')
    block = build_symbol_block(prepared.plan.fused, prepared.data_names, prepared.params, {})
    block.hybridize(static_alloc=True, static_shape=True)
    block(*first).wait_to_read()  # warm-up: memory planned, oneDNN primitives made
    start = time.perf_counter()
    for x, _ in loader(base, images):
        block(x)
    mx.nd.waitall()
    return {'seconds': time.perf_counter() - start}


def run_gluon_int8(net, base, images, profile_path=None):
    """quantize_net, with its calibration stage timed (and profiled) from inside."""
    import gluon_int8
    from gluon_int8 import pipeline
    stage = {}
    calibrate = pipeline.calibrate

    def timed_calibrate(*args, **kwargs):
        profiler = _profiler() if profile_path else None
        start = time.perf_counter()
        stats = calibrate(*args, **kwargs)
        stage['calibrate_seconds'] = time.perf_counter() - start
        stage['calibrate_peak_rss_mb'] = peak_mb()
        if profiler is not None:
            _write_profile(profiler, profile_path, stage['calibrate_seconds'])
        return stats

    pipeline.calibrate = timed_calibrate
    start = time.perf_counter()
    gluon_int8.quantize_net(net, loader(base, images), mode='entropy')
    return dict(stage, seconds=time.perf_counter() - start)


def _profiler():
    import cProfile
    profiler = cProfile.Profile()
    profiler.enable()
    return profiler


def _write_profile(profiler, path, seconds):
    import io
    import pstats
    profiler.disable()
    out = io.StringIO()
    out.write('gluon-int8 calibration stage: %.2f s wall; cProfile of the Python thread\n'
              "(wait_to_read: waiting for MXNet's forward and copies; numpy: statistics)\n\n"
              % seconds)
    pstats.Stats(profiler, stream=out).sort_stats('tottime').print_stats(25)
    with open(path, 'w') as f:
        f.write(out.getvalue())


def run_builtin(net, base, images):
    from mxnet.contrib.quantization import quantize_net_v2
    start = time.perf_counter()
    quantize_net_v2(net, quantized_dtype='auto', calib_mode='entropy',
                    calib_data=loader(base, images), num_calib_examples=images)
    return {'seconds': time.perf_counter() - start}


def run_peer(engine, args):
    """ORT or NNCF (in .venv-peers) on the ONNX export and the saved images."""
    import numpy as np
    sys.path.insert(0, HERE)
    import peers
    with open(os.path.join(args.work, args.model + '.setup.json')) as f:
        entry = json.load(f)
    entry.update(name=args.model, path=entry['onnx'])
    calib = np.load(os.path.join(args.work, args.model + '.calib.npy'))
    start = time.perf_counter()
    if engine == 'ort':  # on the thread count every engine runs with
        peers.ort_int8(entry, args.work, calib, int(os.environ.get('OMP_NUM_THREADS', '2')))
    else:
        import openvino as ov
        peers.nncf_int8(ov.Core(), entry, calib)
    return {'seconds': time.perf_counter() - start}


def run_engine(args):
    import warnings
    warnings.simplefilter('ignore')
    if args.engine in PEER_ENGINES:
        result = run_peer(args.engine, args)
    else:
        import logging
        logging.disable(logging.WARNING)
        with open(os.path.join(args.work, args.model + '.setup.json')) as f:
            shape = json.load(f)['input_shape']
        base = base_batch(shape, args.batch_size)
        net = build_net(args.model, _params_path(args))
        images = args.images[0]
        if args.engine == 'forward':
            result = run_forward(net, base, images)
        elif args.engine == 'gluon-int8':
            result = run_gluon_int8(net, base, images, args.profile_path)
        else:
            result = run_builtin(net, base, images)
    result.update(engine=args.engine, peak_rss_mb=peak_mb())
    print(json.dumps(result))


# ---- the parent: runs every engine, prints and writes the table ---------------------------

def child(args, engine, images, python=sys.executable, profile_path=None):
    command = [python, os.path.abspath(__file__), '--engine', engine, '--model', args.model,
               '--images', str(images), '--batch-size', str(args.batch_size),
               '--work', args.work]
    if profile_path:
        command += ['--profile-path', profile_path]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {'engine': engine, 'status': 'failed', 'error': done.stderr.strip()[-2000:]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), status='ok')


def median_run(args, engine, images, python=sys.executable, profile_path=None):
    runs = [child(args, engine, images, python, profile_path if i == 0 else None)
            for i in range(args.repeat)]
    good = sorted((r for r in runs if r['status'] == 'ok'), key=lambda r: r['seconds'])
    if not good:
        return runs[0]
    row = dict(good[len(good) // 2], runs=[r['seconds'] for r in good])
    if 'calibrate_seconds' in row:
        row['calibrate_seconds'] = statistics.median(r['calibrate_seconds'] for r in good)
    return row


def measure(args):
    setup_out = subprocess.run([sys.executable, os.path.abspath(__file__), '--setup', '--model',
                                args.model, '--images', ','.join(map(str, args.images)),
                                '--batch-size', str(args.batch_size), '--work', args.work]
                               + ([] if args.peers else ['--no-peers']),
                               capture_output=True, text=True)
    if setup_out.returncode != 0:
        raise SystemExit('setup failed:\n' + setup_out.stderr[-3000:])
    with open(os.path.join(args.work, args.model + '.setup.json'), 'w') as f:
        f.write(setup_out.stdout.strip().splitlines()[-1])
    rows = []
    for images in args.images:
        for engine in MXNET_ENGINES:
            profile = (os.path.join(args.out_dir, 'calibration_%s_profile.txt' % args.model)
                       if args.profile and engine == 'gluon-int8' and images == args.images[0]
                       else None)
            rows.append(dict(median_run(args, engine, images, profile_path=profile),
                             images=images))
            print(_row_line(rows[-1]), flush=True)
        if args.peers and images == args.images[0]:
            for engine in PEER_ENGINES:
                rows.append(dict(median_run(args, engine, images, PEERS_PY), images=images))
                print(_row_line(rows[-1]), flush=True)
    return rows


def _row_line(row):
    if row['status'] != 'ok':
        return '%s, %d images: FAILED %s' % (row['engine'], row['images'],
                                             row['error'].splitlines()[-1])
    return '%s, %d images: %.2f s, peak %.0f MB' % (row['engine'], row['images'], row['seconds'],
                                                   row['peak_rss_mb'])


def summarize(rows, images):
    """Ratios of the first --images count: gluon-int8 against the forward and the others."""
    at = {r['engine']: r for r in rows if r['images'] == images and r['status'] == 'ok'}
    ours, forward = at.get('gluon-int8'), at.get('forward')
    found = {}
    if ours and forward:
        found['calibrate_over_forward'] = ours['calibrate_seconds'] / forward['seconds']
        found['quantize_net_over_forward'] = ours['seconds'] / forward['seconds']
    for peer in ('mxnet-builtin',) + PEER_ENGINES:
        if ours and peer in at:
            found['quantize_net_over_%s' % peer] = ours['seconds'] / at[peer]['seconds']
            found['peak_over_%s' % peer] = ours['peak_rss_mb'] / at[peer]['peak_rss_mb']
    return found


def table(rows, images, command):
    lines = ['`%s`' % command, '',
             '| engine | images | seconds | x forward | peak RSS MB | calibration stage s '
             '(x forward) | peak RSS MB at its end |', '|---|---|---|---|---|---|---|']
    forward = {r['images']: r['seconds'] for r in rows
               if r['engine'] == 'forward' and r['status'] == 'ok'}
    for r in rows:
        if r['status'] != 'ok':
            lines.append('| %s | %d | failed: %s | | | | |' % (
                r['engine'], r['images'], r['error'].splitlines()[-1][:80]))
            continue
        base = forward.get(r['images'])
        ratio = '%.2f' % (r['seconds'] / base) if base else '-'
        stage = ('%.2f (%.2f)' % (r['calibrate_seconds'], r['calibrate_seconds'] / base)
                 if 'calibrate_seconds' in r and base else '')
        stage_peak = '%.0f' % r['calibrate_peak_rss_mb'] if 'calibrate_peak_rss_mb' in r else ''
        lines.append('| %s | %d | %.2f | %s | %.0f | %s | %s |' % (
            r['engine'], r['images'], r['seconds'], ratio, r['peak_rss_mb'], stage, stage_peak))
    ratios = summarize(rows, images)
    lines += ['', 'At %d images: %s' % (images, ', '.join(
        '%s %.3f' % (k, v) for k, v in ratios.items())),
        'Targets (issue 12): calibration <= 2x the forward, quantize_net <= 1/6 of the '
        "built-in's time and faster than ort and nncf, peak memory <= the built-in's and flat "
        'in the number of images.']
    return '\n'.join(lines), ratios


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='resnet50_v1')
    parser.add_argument('--images', default='64,512',
                        help='comma-separated counts; the first is the timed comparison '
                             '(default 64,512)')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--repeat', type=int, default=1, help='runs per engine (median kept)')
    parser.add_argument('--no-peers', dest='peers', action='store_false',
                        help='skip ONNX Runtime and NNCF (no .venv-peers, no ONNX export)')
    parser.add_argument('--profile', action='store_true',
                        help="write results/calibration_<model>_profile.txt: cProfile of "
                             "gluon-int8's calibration stage")
    parser.add_argument('--work', default=WORK, help='scratch folder (default results/onnx/'
                                                     'calibration)')
    parser.add_argument('--out-dir', default=os.path.join(ROOT, 'results'))
    parser.add_argument('--engine', help=argparse.SUPPRESS)
    parser.add_argument('--setup', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--profile-path', help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        args.images = [int(n) for n in args.images.split(',')]
    except ValueError:
        parser.error('--images: got %r; expected comma-separated counts' % args.images)
    if any(n < 1 for n in args.images) or args.batch_size < 1 or args.repeat < 1:
        parser.error('--images, --batch-size and --repeat must be positive')
    return args


def main():
    args = parse_args()
    if args.setup:
        return setup(args)
    if args.engine:
        return run_engine(args)
    if args.peers and not os.path.exists(PEERS_PY):
        raise SystemExit('.venv-peers is missing: make it with `make peers` (or python3 -m venv '
                         '.venv-peers && .venv-peers/bin/pip install -r requirements-peers.txt), '
                         'or pass --no-peers')
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out_dir, exist_ok=True)
    command = 'OMP_NUM_THREADS=%s python %s' % (
        os.environ.get('OMP_NUM_THREADS', '(unset)'),
        ' '.join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + sys.argv[1:]))
    rows = measure(args)
    text, ratios = table(rows, args.images[0], command)
    print('\n' + text)
    path = os.path.join(args.out_dir, 'calibration_%s.json' % args.model)
    with open(path, 'w') as f:
        json.dump({'command': command, 'model': args.model, 'images': args.images,
                   'batch_size': args.batch_size, 'repeat': args.repeat,
                   'omp_num_threads': os.environ.get('OMP_NUM_THREADS'), 'rows': rows,
                   'ratios': ratios}, f, indent=1)
    print('wrote %s' % path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
