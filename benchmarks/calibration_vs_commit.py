"""Calibration time of this tree against an earlier commit's, on the same machine and run.

Issue 16 asks that better thresholds keep calibration within 1.5x of the time it took when
the issue was filed, for the same mode. This checks out ``--against`` (default 288a470,
the tree the issue was filed on) into a temporary git worktree and times, in a fresh
process per tree and with the same thread count, ``quantize_net(net, batches,
mode=MODE)`` on:

  resnet, mobilenet, inception   the shipped Fashion-MNIST families (the ones that tree
                                 has), 5 x 32 training images (or the bundled slice)
  resnet50_v1                    GluonCV, random weights, 2 x 32 random 224x224 images

Two figures per tree: the calibration stage (``gluon_int8.api._calibration_table``:
statistics over every batch, thresholds, the table; both trees have it) and the whole
``quantize_net`` call (which, in this tree, also runs the fusion check, the crash check
and the self-check that the earlier one lacks). Medians of --repeat calls.

    OMP_NUM_THREADS=2 python benchmarks/calibration_vs_commit.py [--against 288a470]
        [--models resnet,mobilenet,inception,resnet50_v1] [--repeat 3] [--mode entropy]

Prints a table and writes results/calibration_vs_commit.{json,md}.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ('resnet', 'mobilenet', 'inception', 'resnet50_v1')

# Runs in the tree under test (first on sys.path): prints one JSON line of timings.
WORKER = r'''
import json, logging, statistics, sys, time, warnings
import mxnet as mx
import numpy as np
import gluon_int8
from gluon_int8 import api
try:
    from gluon_int8_samples import fashion_mnist
except ImportError:  # trees before the samples package moved out
    from gluon_int8 import fashion_mnist
warnings.simplefilter('ignore')
logging.basicConfig(level=logging.ERROR)
models, repeat, mode = sys.argv[1].split(','), int(sys.argv[2]), sys.argv[3]
stage, calibration = api._calibration_table, []
def timed(*args, **kwargs):
    start = time.perf_counter()
    table = stage(*args, **kwargs)
    calibration.append(time.perf_counter() - start)
    return table
api._calibration_table = timed
images, _ = (fashion_mnist.load_split('train') if fashion_mnist.debian_available()
             else fashion_mnist.bundled_slice())
small = [mx.nd.array(images[i:i + 32]) for i in range(0, 160, 32)]
def network(name):
    if name != 'resnet50_v1':
        return fashion_mnist.get_model(name), small
    from gluoncv import model_zoo
    mx.random.seed(0)
    net = model_zoo.get_model(name, pretrained=False)
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 3, 224, 224)))
    rng = np.random.RandomState(0)
    return net, [mx.nd.array(rng.randn(32, 3, 224, 224).astype('float32')) for _ in range(2)]
found = {'tree': gluon_int8.__file__}
for name in models:
    whole = []
    for _ in range(repeat):
        net, batches = network(name)
        start = time.perf_counter()
        gluon_int8.quantize_net(net, batches, mode=mode)
        whole.append(time.perf_counter() - start)
    found[name] = {'quantize_net': statistics.median(whole),
                   'calibration': statistics.median(calibration[-repeat:])}
print('RESULT ' + json.dumps(found))
'''


def run_tree(tree, models, repeat, mode):
    env = dict(os.environ, PYTHONPATH=tree)
    done = subprocess.run([sys.executable, '-c', WORKER, ','.join(models), str(repeat), mode],
                          env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True)
    lines = [l for l in done.stdout.splitlines() if l.startswith('RESULT ')]
    if done.returncode or not lines:
        raise SystemExit('timing the tree at %s failed (rc %d):\n%s'
                         % (tree, done.returncode, done.stderr[-3000:]))
    found = json.loads(lines[-1][len('RESULT '):])
    if not found['tree'].startswith(tree):
        raise SystemExit('the worker imported %s, not the tree at %s' % (found['tree'], tree))
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--against', default='288a470')
    parser.add_argument('--models', default=','.join(MODELS))
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--mode', default='entropy')
    parser.add_argument('--out', default=os.path.join(ROOT, 'results'))
    args = parser.parse_args()
    models = args.models.split(',')
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error('--models: unknown %s; allowed: %s' % (unknown, ', '.join(MODELS)))
    if args.repeat < 1:
        parser.error('--repeat: got %d, must be >= 1' % args.repeat)
    threads = os.environ.get('OMP_NUM_THREADS')
    if threads is None:
        raise SystemExit('OMP_NUM_THREADS is not set: set it so both trees run the same '
                         'thread count')
    head = subprocess.run(['git', '-C', ROOT, 'rev-parse', '--short', 'HEAD'],
                          capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        old = os.path.join(tmp, 'tree')
        subprocess.run(['git', '-C', ROOT, 'worktree', 'add', '--detach', old, args.against],
                       check=True, capture_output=True)
        try:
            before = run_tree(old, models, args.repeat, args.mode)
        finally:
            subprocess.run(['git', '-C', ROOT, 'worktree', 'remove', '--force', old],
                           check=True, capture_output=True)
    now = run_tree(ROOT, models, args.repeat, args.mode)

    lines = ['`quantize_net(mode=%r)` at %s (this tree) against %s, medians of %d calls, '
             'OMP_NUM_THREADS=%s; seconds' % (args.mode, head, args.against, args.repeat,
                                              threads), '',
             '| model | calibration %s | calibration %s | ratio | quantize_net %s | '
             'quantize_net %s | ratio |' % (args.against, head, args.against, head),
             '|---|---|---|---|---|---|---|']
    for name in models:
        a, b = before[name], now[name]
        lines.append('| %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |'
                     % (name, a['calibration'], b['calibration'],
                        b['calibration'] / a['calibration'], a['quantize_net'],
                        b['quantize_net'], b['quantize_net'] / a['quantize_net']))
    table = '\n'.join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'calibration_vs_commit.json'), 'w') as f:
        json.dump({'against': args.against, 'head': head, 'mode': args.mode,
                   'repeat': args.repeat, 'omp_num_threads': threads,
                   'before': before, 'now': now}, f, indent=1)
    with open(os.path.join(args.out, 'calibration_vs_commit.md'), 'w') as f:
        f.write(table + '\n')


if __name__ == '__main__':
    main()
