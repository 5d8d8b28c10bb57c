"""INT8 accuracy on real data: every Fashion-MNIST family x mode x granularity, with MXNet's
built-in quantizer and the ONNX peers (ONNX Runtime, OpenVINO NNCF) side by side.

Models are the bundled ones trained by examples/fashion_mnist/train.py (a family whose
trained parameters are missing is listed as skipped). Calibration uses 5 batches of 32
training images (the reference article's default), the same 160 images for every engine;
top-1 is measured on the full 10k test set when Debian's dataset-fashion-mnist is
installed, else on the bundled 1000-image slice (the output says which).

Engines (--engines, default all):

  gluon-int8      quantize_net, every mode x granularity; and entropy with
                  bias_correction=True (mode 'entropy+bias-corr')
  mxnet-builtin   mxnet.contrib.quantization.quantize_net_v2, naive and entropy
  ort-minmax      ONNX Runtime quantize_static: QDQ, u8 activations, s8 weights per
  ort-entropy     channel; MinMax / Entropy calibration (Entropy over 2048 histogram bins,
                  128 quantized bins: quantize_static cannot set them, and with its own,
                  128 / 128, Entropy is MinMax)
  nncf            nncf.quantize defaults on the model ov.convert_model reads, run by
                  OpenVINO in f32 (INFERENCE_PRECISION_HINT; bf16 otherwise on this CPU)

The peers quantize the family's FP32 ONNX model, written here in the MXNet venv by
gluon-int8's own FP32 ONNX path (``gluon_int8.onnx_graph.fp32_model`` of the traced
network), and run in ``.venv-peers`` (numpy 2; ``make .venv-peers/.installed`` builds it)
through benchmarks/peers_accuracy.py, which documents their settings. Asking for a peer
engine without that venv stops before any work, saying how to build it or leave the peers
out (``--engines gluon-int8,mxnet-builtin``). Every engine runs on OMP_NUM_THREADS threads
(required when peers run, so that they get the same count). Calibration seconds are wall
time of the whole quantization call (ORT: pre-processing + calibration + quantize_static;
NNCF: convert_model + quantize).

    OMP_NUM_THREADS=2 python benchmarks/accuracy.py [--families resnet,mobilenet,...]
        [--engines gluon-int8,mxnet-builtin,ort-minmax,ort-entropy,nncf]
        [--limit N]      # the first N test images only (development; not for the table)
        [--work DIR]     # keep the peers' ONNX models and arrays there (default: a temp dir)
        [--merge]        # replace only these families x engines in the existing results

Writes results/accuracy.json and results/accuracy.md and prints the markdown table. Below
it, per family, the default (entropy, per-tensor) against the best peer row of the same run,
image by image: how many test images only one of the two gets right, and the exact McNemar
p-value of that split (``fashion_mnist.paired_difference``), which says whether a lead of a
few hundredths of a point is more than chance; and the same against FP32.
"""
import argparse
import json
import logging
import os
import subprocess
import tempfile
import time
import warnings

import mxnet as mx
import numpy as np

import gluon_int8
from gluon_int8 import bench, onnx_graph
from gluon_int8.trace import trace
from gluon_int8_samples import fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ('naive', 'entropy', 'percentile', 'mse')
GRANULARITIES = ('tensor', 'channel')
CALIB_BATCHES, CALIB_BATCH_SIZE = 5, 32
PEER_ENGINES = ('ort-minmax', 'ort-entropy', 'nncf')
ENGINES = ('gluon-int8', 'mxnet-builtin') + PEER_ENGINES
PEERS_PYTHON = os.path.join(ROOT, '.venv-peers', 'bin', 'python')
PEERS_SCRIPT = os.path.join(ROOT, 'benchmarks', 'peers_accuracy.py')
DEFAULT = ('gluon-int8', 'entropy', 'tensor')  # quantize_net(net, calib, mode='entropy')


def calibration_arrays():
    images, labels = (fashion_mnist.load_split('train') if fashion_mnist.debian_available()
                      else fashion_mnist.bundled_slice())
    count = CALIB_BATCHES * CALIB_BATCH_SIZE
    return images[:count], labels[:count]


def ours(family, mode, granularity, calib):
    net = fashion_mnist.get_model(family)
    batches = [mx.nd.array(calib[i:i + CALIB_BATCH_SIZE])
               for i in range(0, len(calib), CALIB_BATCH_SIZE)]
    mode, _, extra = mode.partition('+')
    start = time.perf_counter()
    qnet = gluon_int8.quantize_net(net, batches, mode=mode, granularity=granularity,
                                   bias_correction=extra == 'bias-corr')
    return qnet, time.perf_counter() - start


def builtin(family, mode, calib, labels):
    from mxnet.contrib.quantization import quantize_net_v2
    net = fashion_mnist.get_model(family)
    loader = mx.gluon.data.DataLoader(
        mx.gluon.data.ArrayDataset(mx.nd.array(calib), mx.nd.array(labels)),
        batch_size=CALIB_BATCH_SIZE)
    start = time.perf_counter()
    qnet = quantize_net_v2(net, quantized_dtype='auto', calib_mode=mode, calib_data=loader,
                           num_calib_examples=len(calib))
    return qnet, time.perf_counter() - start


# ---- the peers ----------------------------------------------------------------------

def export_fp32(family, net, calib, work):
    """Write the family's FP32 ONNX model into ``work``; its manifest entry."""
    import onnx
    traced = trace(net, [mx.nd.array(calib[:1])])
    shapes = {traced.data_names[0]: (1,) + calib.shape[1:]}
    model, folded = onnx_graph.fp32_model(traced.symbol,
                                          {**traced.arg_params, **traced.aux_params}, shapes)
    onnx.checker.check_model(model)
    name = '%s.onnx' % family
    onnx.save(model, os.path.join(work, name))
    return {'onnx': name, 'input_name': traced.data_names[0],
            'input_shape': list(calib.shape[1:]), 'batchnorms_folded': folded}


def run_peers(work, families, calib, images, labels, engines, threads):
    """Run benchmarks/peers_accuracy.py in .venv-peers on what ``work`` holds; its result."""
    np.save(os.path.join(work, 'calib.npy'),
            calib.reshape((CALIB_BATCHES, CALIB_BATCH_SIZE) + calib.shape[1:]))
    np.savez(os.path.join(work, 'test.npz'), images=images, labels=labels)
    with open(os.path.join(work, 'manifest.json'), 'w') as f:
        json.dump({'calib': 'calib.npy', 'test': 'test.npz', 'families': families}, f, indent=1)
    subprocess.run([PEERS_PYTHON, PEERS_SCRIPT, '--work', work, '--threads', threads,
                    '--engines', ','.join(engines)], check=True)
    with open(os.path.join(work, 'peers_accuracy.json')) as f:
        return json.load(f)


def check_peers(engines):
    """Stop before any work when peer engines are asked for and cannot run; their threads."""
    if not any(e in PEER_ENGINES for e in engines):
        return None
    if not os.path.isfile(PEERS_PYTHON):
        raise SystemExit('--engines: %s run in .venv-peers, which is missing (%s); build it '
                         'with `make .venv-peers/.installed`, or leave the peers out: '
                         '--engines gluon-int8,mxnet-builtin'
                         % (', '.join(e for e in engines if e in PEER_ENGINES), PEERS_PYTHON))
    threads = os.environ.get('OMP_NUM_THREADS')
    if threads is None:
        raise SystemExit('OMP_NUM_THREADS is not set: set it (e.g. OMP_NUM_THREADS=2) so the '
                         'peers run the same thread count as MXNet')
    return threads


# ---- the table ----------------------------------------------------------------------

def markdown(rows, where, peers):
    lines = ['Fashion-MNIST top-1 (%%) on the %s; calibration %d x %d training images (the '
             'same for every engine); OMP_NUM_THREADS=%s'
             % (where, CALIB_BATCHES, CALIB_BATCH_SIZE, bench.omp_threads()),
             '', '| family | engine | mode | granularity | FP32 | INT8 | delta | calib s |',
             '|---|---|---|---|---|---|---|---|']
    for r in rows:
        if 'skipped' in r:
            lines.append('| %s | skipped: %s | | | | | | |' % (r['family'], r['skipped']))
        elif r.get('status', 'ok') != 'ok':
            error = r['error'].splitlines()[0][:120].replace('|', '/')
            lines.append('| %s | %s | %s | %s | %.2f | failed: %s | | |'
                         % (r['family'], r['engine'], r.get('mode', ''), r.get('granularity', ''),
                            r['fp32_top1'], error))
        else:
            lines.append('| %s | %s | %s | %s | %.2f | %.2f | %+.2f | %.2f |'
                         % (r['family'], r['engine'], r['mode'], r['granularity'],
                            r['fp32_top1'], r['int8_top1'], r['delta'], r['calib_seconds']))
    if peers:
        v = peers['versions']
        checks = ', '.join('%s %.2f / %.2f' % (f, c['onnxruntime'], c['openvino'])
                           for f, c in peers['onnx_fp32_top1'].items())
        lines += ['', 'Peers: onnxruntime %s, openvino %s, nncf %s (benchmarks/peers_accuracy.py); '
                  'ort-entropy with num_bins=%d, num_quantized_bins=%d. Their FP32 ONNX model '
                  'on ONNX Runtime / OpenVINO f32: %s.'
                  % (v['onnxruntime'], v['openvino'], v['nncf'], peers['ort_entropy']['num_bins'],
                     peers['ort_entropy']['num_quantized_bins'], checks)]
    return '\n'.join(lines)


def versus_peers(rows, hits, fp32_hits):
    """Per family with a default row and ok peer rows in ``hits`` (this run): the default
    against the best of them and against FP32, image by image."""
    found = []
    for family in fp32_hits:
        ours = hits.get((family,) + DEFAULT)
        peers = [r for r in rows if r['family'] == family and r.get('engine') in PEER_ENGINES
                 and (family, r['engine'], r['mode'], r['granularity']) in hits]
        if ours is None or not peers:
            continue
        best = max(peers, key=lambda r: r['int8_top1'])
        peer = fashion_mnist.paired_difference(
            hits[(family, best['engine'], best['mode'], best['granularity'])], ours)
        fp32 = fashion_mnist.paired_difference(fp32_hits[family], ours)
        found.append({'family': family, 'ours_top1': 100 * float(ours.mean()),
                      'fp32_top1': 100 * float(fp32_hits[family].mean()),
                      'best_peer': best['engine'], 'best_peer_top1': best['int8_top1'],
                      'only_peer': peer['only_a'], 'only_ours': peer['only_b'],
                      'p_peer': peer['p_value'], 'only_fp32': fp32['only_a'],
                      'only_int8': fp32['only_b'], 'p_fp32': fp32['p_value']})
    return found


def _p(value):
    return '%.2f' % value if value >= 0.01 else '%.0e' % value


def versus_markdown(versus):
    lines = ['', 'The default (gluon-int8 entropy, per-tensor) against the best peer row of the '
             'same run and against FP32, image by image: test images only one of the two gets '
             'right, and the exact McNemar p-value of that split (chance alone splits '
             'disagreements this unevenly with probability p).', '',
             '| family | best peer | best peer - ours (pt) | only peer right | only ours right '
             '| p | FP32 - ours (pt) | only FP32 right | only ours right | p |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for v in versus:
        lines.append('| %s | %s | %+.2f | %d | %d | %s | %+.2f | %d | %d | %s |'
                     % (v['family'], v['best_peer'], v['best_peer_top1'] - v['ours_top1'],
                        v['only_peer'], v['only_ours'], _p(v['p_peer']),
                        v['fp32_top1'] - v['ours_top1'], v['only_fp32'], v['only_int8'],
                        _p(v['p_fp32'])))
    return lines


def merged(path, rows, engines, peers, versus):
    """The rows of ``path`` with those of the families and engines just run replaced by
    ``rows``; its peers notes where no peer ran now; its comparisons with the peers for the
    families not run now (a family run now is compared only if its peers ran too)."""
    with open(path) as f:
        old = json.load(f)
    ran = {(r['family'], e) for r in rows for e in list(engines) + [None]}  # None: skipped
    kept = [r for r in old['rows'] if (r['family'], r.get('engine')) not in ran]
    families = {r['family'] for r in rows}
    versus = [v for v in old.get('versus_peers', []) if v['family'] not in families] + versus
    return kept + rows, peers or old.get('peers'), versus


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--families', default=','.join(sorted(fashion_mnist.MODELS)))
    parser.add_argument('--engines', default=','.join(ENGINES))
    parser.add_argument('--limit', type=int, default=None,
                        help='evaluate on the first N test images only (development)')
    parser.add_argument('--work', default=None,
                        help="folder for the peers' ONNX models and arrays (default: a "
                             'temporary one, removed)')
    parser.add_argument('--out', default=os.path.join(ROOT, 'results'))
    parser.add_argument('--merge', action='store_true',
                        help="replace only the rows of --families x --engines in --out's "
                             'accuracy.json and keep the others (with their peers notes)')
    args = parser.parse_args()
    engines = args.engines.split(',')
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error('--engines: unknown %s; allowed: %s' % (unknown, ', '.join(ENGINES)))
    families = args.families.split(',')
    for family in families:
        if family not in fashion_mnist.MODELS:
            parser.error('--families: unknown %r; allowed: %s'
                         % (family, ', '.join(sorted(fashion_mnist.MODELS))))
    if args.limit is not None and args.limit < 1:
        parser.error('--limit: got %d, must be >= 1' % args.limit)
    peer_threads = check_peers(engines)
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter('ignore')

    calib, calib_labels = calibration_arrays()
    images, labels, source = fashion_mnist.default_data('test')
    images, labels = images[:args.limit], labels[:args.limit]
    runs = [('gluon-int8', m, g) for m in MODES for g in GRANULARITIES]
    runs += [('gluon-int8', 'entropy+bias-corr', 'tensor')]
    runs += [('mxnet-builtin', m, 'tensor') for m in ('naive', 'entropy')]
    runs = [r for r in runs if r[0] in engines]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        os.makedirs(work, exist_ok=True)
        rows, fp32, exported, hits, fp32_hits = [], {}, {}, {}, {}
        for family in families:
            if not os.path.isfile(fashion_mnist.params_path(family)):
                rows.append({'family': family, 'skipped': 'no trained parameters at %s'
                             % fashion_mnist.params_path(family)})
                print('%-10s skipped: %s' % (family, rows[-1]['skipped']), flush=True)
                continue
            net = fashion_mnist.get_model(family)
            fp32_hits[family] = fashion_mnist.predict(net, images) == labels
            fp32[family] = 100 * float(fp32_hits[family].mean())
            if peer_threads:
                exported[family] = export_fp32(family, net, calib, work)
            for engine, mode, granularity in runs:
                try:  # the built-in crashes on some families (MobileNetV3: TBlob dtype)
                    if engine == 'gluon-int8':
                        qnet, seconds = ours(family, mode, granularity, calib)
                    else:
                        qnet, seconds = builtin(family, mode, calib, calib_labels)
                    correct = fashion_mnist.predict(qnet, images) == labels
                    int8 = 100 * float(correct.mean())
                except mx.base.MXNetError as err:
                    error = ' '.join(str(err).split())
                    rows.append({'family': family, 'engine': engine, 'mode': mode,
                                 'granularity': granularity, 'fp32_top1': fp32[family],
                                 'status': 'failed', 'error': error[error.find('Check failed'):]
                                 if 'Check failed' in error else error[:300]})
                    print('%-10s %-13s %-10s failed: %s' % (family, engine, mode,
                                                           rows[-1]['error'][:120]), flush=True)
                    continue
                hits[(family, engine, mode, granularity)] = correct
                rows.append({'family': family, 'engine': engine, 'mode': mode,
                             'granularity': granularity, 'fp32_top1': fp32[family],
                             'int8_top1': int8, 'delta': int8 - fp32[family],
                             'calib_seconds': seconds})
                print('%-10s %-13s %-10s %-7s fp32 %.2f int8 %.2f delta %+.2f calib %.2fs'
                      % (family, engine, mode, granularity, fp32[family], int8,
                         int8 - fp32[family], seconds), flush=True)
        peers = None
        if exported:
            peers = run_peers(work, exported, calib, images, labels,
                              [e for e in engines if e in PEER_ENGINES], peer_threads)
            for row in peers['rows']:
                row['fp32_top1'] = fp32[row['family']]
                if row['status'] == 'ok':
                    row['delta'] = row['int8_top1'] - row['fp32_top1']
                    hits[(row['family'], row['engine'], row['mode'], row['granularity'])] = \
                        np.load(os.path.join(work, row.pop('hits')))
                rows.append(row)
    versus = versus_peers(rows, hits, fp32_hits)
    if args.merge:
        rows, peers, versus = merged(os.path.join(args.out, 'accuracy.json'), rows, engines,
                                     peers, versus)
    order = families + sorted({r['family'] for r in rows} - set(families))
    rows.sort(key=lambda r: order.index(r['family']))  # stable: a family's rows together

    where = 'full test set' if source == 'debian' else 'bundled test slice'
    where = ('first %d images of the %s' if args.limit else '%d-image %s') % (len(labels), where)
    table = '\n'.join([markdown(rows, where, peers)] + versus_markdown(versus))
    print('\n' + table)
    os.makedirs(args.out, exist_ok=True)
    result = {'test_source': source, 'test_images': len(labels), 'limit': args.limit,
              'omp_num_threads': os.environ.get('OMP_NUM_THREADS'), 'rows': rows,
              'versus_peers': versus}
    if peers:
        result['peers'] = {k: v for k, v in peers.items() if k != 'rows'}
    with open(os.path.join(args.out, 'accuracy.json'), 'w') as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, 'accuracy.md'), 'w') as f:
        f.write(table + '\n')


if __name__ == '__main__':
    main()
