"""Calibration speed and peak memory: gluon-int8 vs MXNet's built-in quantize_net_v2.

Entropy calibration of GluonCV resnet50_v1 (random weights, fixed seed) on 64 random
images of 3x224x224 in batches of 32. Each engine runs in its own fresh process, so the
peak resident memory (ru_maxrss) of one does not hide the other's; both processes build
the same model and data before the clock starts. The bare FP32 forward pass over the
same images is timed as the floor.

    python benchmarks/calibration.py [--model resnet50_v1] [--images 64] [--repeat 1]

Prints a table and writes results/calibration.json.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _setup(model, images, batch_size):
    import mxnet as mx
    from gluoncv.model_zoo import get_model
    mx.random.seed(0)
    net = get_model(model, pretrained=False)
    net.initialize(mx.init.Xavier())
    data = mx.nd.random.uniform(-1, 1, shape=(images, 3, 224, 224))
    loader = mx.gluon.data.DataLoader(
        mx.gluon.data.ArrayDataset(data, mx.nd.zeros(images)), batch_size=batch_size)
    net(data[:1]).wait_to_read()
    return net, data, loader


def run_engine(engine, model, images, batch_size):
    """Child process: time one engine, report seconds and peak RSS as JSON."""
    import logging
    import warnings
    warnings.simplefilter('ignore')
    logging.disable(logging.WARNING)
    import mxnet as mx
    net, data, loader = _setup(model, images, batch_size)
    start = time.perf_counter()
    if engine == 'fp32-forward':
        net.hybridize()
        for x, _ in loader:
            net(x).wait_to_read()
    elif engine == 'mxnet-builtin':
        from mxnet.contrib.quantization import quantize_net_v2
        qnet = quantize_net_v2(net, quantized_dtype='auto', calib_mode='entropy',
                               calib_data=loader, num_calib_examples=images)
        qnet(data[:1]).wait_to_read()
    elif engine == 'gluon-int8':
        sys.path.insert(0, ROOT)
        import gluon_int8
        qnet = gluon_int8.quantize_net(net, loader, mode='entropy')
        qnet(data[:1]).wait_to_read()
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({'engine': engine, 'seconds': seconds, 'peak_rss_mb': peak_mb}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='resnet50_v1')
    parser.add_argument('--images', type=int, default=64)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--repeat', type=int, default=1, help='runs per engine (median kept)')
    parser.add_argument('--out', default=os.path.join(ROOT, 'results', 'calibration.json'))
    parser.add_argument('--engine', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        run_engine(args.engine, args.model, args.images, args.batch_size)
        return
    threads = os.environ.get('OMP_NUM_THREADS', '(mxnet default)')
    rows = {}
    for engine in ('fp32-forward', 'mxnet-builtin', 'gluon-int8'):
        runs = []
        for _ in range(args.repeat):
            out = subprocess.run([sys.executable, __file__, '--engine', engine, '--model',
                                  args.model, '--images', str(args.images), '--batch-size',
                                  str(args.batch_size)], check=True, capture_output=True,
                                 text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        runs.sort(key=lambda r: r['seconds'])
        rows[engine] = runs[len(runs) // 2]
    builtin, ours = rows['mxnet-builtin'], rows['gluon-int8']
    result = {'model': args.model, 'images': args.images, 'batch_size': args.batch_size,
              'omp_num_threads': threads, 'repeat': args.repeat, 'engines': rows,
              'time_ratio_ours_over_builtin': ours['seconds'] / builtin['seconds'],
              'peak_ratio_ours_over_builtin': ours['peak_rss_mb'] / builtin['peak_rss_mb']}
    print('entropy calibration, %s, %d images of 3x224x224, batch %d, OMP_NUM_THREADS=%s'
          % (args.model, args.images, args.batch_size, threads))
    print('| engine | seconds | peak RSS MB |')
    print('|---|---|---|')
    for engine, row in rows.items():
        print('| %s | %.2f | %.0f |' % (engine, row['seconds'], row['peak_rss_mb']))
    print('gluon-int8 / built-in: time %.3f (target <= 0.2), peak memory %.3f (target <= 1)'
          % (result['time_ratio_ours_over_builtin'], result['peak_ratio_ours_over_builtin']))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)


if __name__ == '__main__':
    main()
