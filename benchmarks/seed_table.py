"""The reference article's appendix table, measured on this machine.

Models: GluonCV resnet50_v1, resnet101_v1, mobilenet1.0, inceptionv3 (3x299x299) and
ssd_300_vgg16_atrous_voc (3x300x300), random weights (speed does not depend on them).
Variants: Base (hybridized FP32), Fusion (FP32 after the oneDNN fusion passes),
Fusion+Quantization (gluon-int8), and MXNet's built-in quantize_net_v2 INT8 as a peer in
the same run. For resnet50_v1, mobilenet1.0 and inceptionv3 also "gluon-int8 -> ORT" and
"gluon-int8 -> OpenVINO": the same INT8 block exported with ``export(prefix,
format='onnx')`` and run by ``gluon_int8.runtimes.load_onnx`` on ONNX Runtime and on
OpenVINO (timed on numpy input, as benchmarks/peers.py times those runtimes; OpenVINO
compiled at each static batch), with each INT8 engine's output cosine against MXNet FP32
on a check batch of 2. Every model is the network benchmarks/export_onnx.py exports for the
peers (``export_onnx.network_and_data``: seeded random weights, BatchNorm statistics from
the first calibration batch), calibrated on the same 2 x 16 uniform(-1, 1) images and
checked on the same batch, so the cosines of this table and of benchmarks/peers.py compare
quantizers on one network.
``--no-onnx`` leaves those rows out. ``--peers`` puts the peers' own INT8 of those models in
the same run and table: after the MXNet rows, benchmarks/export_onnx.py exports the same
networks and benchmarks/peers.py (in ``.venv-peers``) quantizes and times them with ONNX
Runtime (``quantize_static``) and NNCF on OpenVINO, at the same batch, run counts and
threads ("ORT's own", "NNCF's own"). peers.py also runs gluon-int8's own exports of those
models on the same two runtimes beside them, in one process, timed in --rounds rounds that
take the four in turn (the same-run table of seed_table_onnx.md). Latency at batch 1 and throughput at batch 64 (SSD: --ssd-batch, default
16), medians over repeated runs after warm-up, every engine in this one process with the
same OMP_NUM_THREADS.

    OMP_NUM_THREADS=2 MXNET_ENGINE_TYPE=NaiveEngine KMP_AFFINITY=granularity=fine,compact,1,0 \
        KMP_BLOCKTIME=1 python benchmarks/seed_table.py [--models resnet50_v1,...]
    (the settings of gluon_int8.bench.RECOMMENDED_ENV; every MXNet row runs with them)

Writes results/seed_table.json, results/seed_table.md (and results/seed_table_onnx.md) and
results/seed_table_*.png
(speedup from fusion, speedup from quantization, latency: the article's figures 5-7).
"""
import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings

import mxnet as mx
import numpy as np

import export_onnx
import gluon_int8
from gluon_int8 import bench, zoo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ('resnet50_v1', 'resnet101_v1', 'mobilenet1.0', 'inceptionv3', 'ssd_300_vgg16_atrous_voc')
VARIANTS = ('base', 'fusion', 'int8', 'builtin_int8')
ONNX_MODELS = ('resnet50_v1', 'mobilenet1.0', 'inceptionv3')
ONNX_VARIANTS = {'ort_int8': 'onnxruntime', 'ov_int8': 'openvino'}  # gluon-int8 -> runtime
CALIB_BATCHES, CALIB_BATCH_SIZE, CHECK_BATCH = 2, 16, 2  # export_onnx.py's defaults
PEERS_PYTHON = os.path.join(ROOT, '.venv-peers', 'bin', 'python')
PEER_ENGINES = {'ort_own': 'ort_int8', 'nncf_own': 'ov_int8'}  # column -> peers.py engine
# gluon-int8's export timed by peers.py beside the peers' own INT8 (same process, rounds)
SAME_RUN_ENGINES = {'ort_int8': 'gluon_ort', 'ov_int8': 'gluon_ov'}


class NumpyTimed:
    """A RuntimeBlock timed the way benchmarks/peers.py times a runtime: the input is
    turned into numpy once, outside the timed call, and outputs stay numpy."""

    def __init__(self, block):
        self.block, self.cached = block, (None, None)

    def __call__(self, *inputs):
        key = tuple(id(x) for x in inputs)
        if self.cached[0] != key:
            self.cached = (key, [x.asnumpy() for x in inputs])
        self.block.run(self.cached[1])
        return []


def onnx_variants(qnet, prefix):
    """gluon-int8 -> ORT / -> OpenVINO: the INT8 block exported to ``prefix``.onnx, on
    each runtime."""
    from gluon_int8 import runtimes
    path = qnet.export(prefix, format='onnx')[0]
    return {variant: runtimes.load_onnx(path, runtime)
            for variant, runtime in ONNX_VARIANTS.items()}


def cosines(net, engines, check):
    """Each engine's output cosine against MXNet FP32 on the check batch."""
    check = mx.nd.array(check)
    want = net(check).asnumpy().astype(np.float64).ravel()
    found = {}
    for name, engine in engines.items():
        got = engine(check).asnumpy().astype(np.float64).ravel()
        found[name] = float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))
    return found


def builtin_int8(net, calib, preset):
    from mxnet.contrib.quantization import quantize_net_v2
    loader = [(b, mx.nd.zeros(b.shape[0])) for b in calib]
    qnet = quantize_net_v2(net, quantized_dtype='auto', calib_mode='naive', calib_data=loader,
                           quantize_mode=dict(preset.quantize_kwargs).get('quantize_mode', 'full'))
    qnet.hybridize(static_alloc=True, static_shape=True)
    return qnet


def measure(name, batch, runs, lat_runs, onnx_dir, with_onnx=True):
    """One model's row; its gluon-int8 ONNX export is written as ``onnx_dir``/<name>.onnx."""
    preset = zoo.preset(name)
    net, _, calib, check, _ = export_onnx.network_and_data(name, CALIB_BATCHES,
                                                           CALIB_BATCH_SIZE, CHECK_BATCH)
    calib = [mx.nd.array(b) for b in calib]
    start = time.perf_counter()
    options = zoo.quantize_options(net, preset)
    qnet = gluon_int8.quantize_net(net, calib, mode='naive', **options)
    calib_seconds = time.perf_counter() - start
    blocks = bench.variants(net, calib[:1], qnet)
    start = time.perf_counter()
    blocks['builtin_int8'] = builtin_int8(net, calib, preset)
    row = {'model': name, 'shape': 'x'.join(map(str, preset.input_shape)), 'batch': batch,
           'calib_seconds': {'int8': calib_seconds,
                             'builtin_int8': time.perf_counter() - start}}
    timed = {v: blocks[v] for v in VARIANTS}
    if with_onnx and name in ONNX_MODELS:
        runtimes = onnx_variants(onnx_source(net, calib, preset),
                                 os.path.join(onnx_dir, name))
        row['cosine_vs_fp32'] = cosines(net, dict(
            int8=qnet, builtin_int8=blocks['builtin_int8'], **runtimes), check)
        print('  cosine vs FP32: %s' % ', '.join('%s %.4f' % kv for kv in
                                              row['cosine_vs_fp32'].items()), flush=True)
        timed.update({v: NumpyTimed(b) for v, b in runtimes.items()})
    row.update(bench.measure(timed, preset.input_shape, batch, runs, lat_runs,
                             report=print_result))
    return row


def onnx_source(net, calib, preset):
    """What the ONNX rows export: the preset's quantization with the values before
    residual sums calibrated (``for_onnx``), and with the stem INT8 where the preset keeps
    it FP32 for MXNet's kernels (on CPUs without VNNI:
    :func:`gluon_int8.zoo.quantize_options`). ONNX Runtime and OpenVINO have kernels of
    their own, and the export carries no MXNet kernel workaround over."""
    int8_stem = zoo.quantize_options(net, preset, exclude_stem=False)
    return gluon_int8.quantize_net(net, calib, mode='naive', for_onnx=True, **int8_stem)


def print_result(variant, latency, images_per_s):
    print('  %-12s latency %8.2f ms   throughput %8.1f img/s' % (variant, latency, images_per_s),
          flush=True)


def markdown(rows, threads):
    lines = ['%s; latency at batch 1 (ms), throughput (img/s) at the batch shown; medians after '
             'warm-up' % ' '.join('%s=%s' % kv for kv in bench.environment().items()), '',
             '| Model | Shape | BS | Metric | Base | Fusion | Fusion+Quant | Speedup (INT8/Fusion) '
             '| Speedup (INT8/Base) | built-in INT8 |', '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        lat, thr = r['latency_ms'], r['throughput']
        lines.append('| %s | %s | 1 | latency ms | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |'
                     % (r['model'], r['shape'], lat['base'], lat['fusion'], lat['int8'],
                        lat['fusion'] / lat['int8'], lat['base'] / lat['int8'], lat['builtin_int8']))
        lines.append('| | | %d | img/s | %.1f | %.1f | %.1f | %.2f | %.2f | %.1f |'
                     % (r['batch'], thr['base'], thr['fusion'], thr['int8'],
                        thr['int8'] / thr['fusion'], thr['int8'] / thr['base'], thr['builtin_int8']))
    return '\n'.join(lines)


def peer_threads():
    """OMP_NUM_THREADS, for the peers; stops at once when --peers cannot run."""
    threads = os.environ.get('OMP_NUM_THREADS')
    if not os.path.isfile(PEERS_PYTHON) or threads is None:
        raise SystemExit('--peers: needs .venv-peers (%s; `make .venv-peers/.installed`) and '
                         'OMP_NUM_THREADS set, so the peers run the same thread count'
                         % PEERS_PYTHON)
    return threads


def run_peers(models, args, threads, gluon_dir):
    """The peers' own INT8 of ``models`` on the networks this table measured, from
    export_onnx.py and peers.py run now, and gluon-int8's exports in ``gluon_dir`` on the
    same runtimes, timed by peers.py in one process with them in ``args.rounds``
    alternating rounds: {model: {column: peers.py row}} (columns: PEER_ENGINES, and
    'same_run_<variant>' for SAME_RUN_ENGINES)."""
    here = os.path.dirname(os.path.abspath(__file__))
    engines = list(PEER_ENGINES.values()) + list(SAME_RUN_ENGINES.values())
    columns = dict(PEER_ENGINES, **{'same_run_' + v: e for v, e in SAME_RUN_ENGINES.items()})
    with tempfile.TemporaryDirectory() as work:
        subprocess.run([sys.executable, os.path.join(here, 'export_onnx.py'), '--models',
                        ','.join(models), '--out', work, '--calib-batches', str(CALIB_BATCHES),
                        '--calib-batch-size', str(CALIB_BATCH_SIZE), '--check-batch',
                        str(CHECK_BATCH)], check=True)
        subprocess.run([PEERS_PYTHON, os.path.join(here, 'peers.py'), '--models',
                        ','.join(models), '--onnx-dir', work, '--out', work, '--engines',
                        ','.join(engines), '--gluon-int8-dir', gluon_dir, '--threads',
                        threads, '--batch', str(args.batch), '--runs', str(args.runs),
                        '--latency-runs', str(args.latency_runs), '--rounds', str(args.rounds)],
                       check=True)
        with open(os.path.join(work, 'peers.json')) as f:
            found = json.load(f)['rows']
    return {m: {col: r for col, engine in columns.items() for r in found
                if r['model'] == m and r['engine'] == engine and r.get('status') == 'ok'}
            for m in models}


def _peer_cells(rows, key, fmt):
    """Markdown cells of ``key`` from peers.py rows ('-' where a peer has none)."""
    return ''.join(' %s |' % (fmt % row[key] if row else '-') for row in rows)


def onnx_markdown(rows):
    """The gluon-int8 -> ORT / -> OpenVINO rows beside gluon-int8's MXNet INT8 (and the
    peers' own INT8 where --peers ran)."""
    peers = [c for c in PEER_ENGINES if any(c in r.get('peers', {}) for r in rows)]
    head = {'ort_own': "ORT's own", 'nncf_own': "NNCF's own"}
    lines = ['| Model | BS | Metric | gluon-int8 (MXNet) | gluon-int8 -> ORT | '
             'gluon-int8 -> OpenVINO | built-in INT8 |%s' % ''.join(' %s |' % head[c]
                                                               for c in peers),
             '|---|---|---|---|---|---|---|' + '---|' * len(peers)]
    for r in rows:
        if 'cosine_vs_fp32' not in r:
            continue
        lat, thr, cos = r['latency_ms'], r['throughput'], r['cosine_vs_fp32']
        own = [r.get('peers', {}).get(c) for c in peers]
        lines.append('| %s | 1 | latency ms | %.2f | %.2f | %.2f | %.2f |%s'
                     % (r['model'], lat['int8'], lat['ort_int8'], lat['ov_int8'],
                        lat['builtin_int8'], _peer_cells(own, 'latency_ms', '%.2f')))
        lines.append('| | %d | img/s | %.1f | %.1f | %.1f | %.1f |%s'
                     % (r['batch'], thr['int8'], thr['ort_int8'], thr['ov_int8'],
                        thr['builtin_int8'], _peer_cells(own, 'throughput', '%.1f')))
        lines.append('| | %d | output cosine vs MXNet FP32 | %.4f | %.4f | %.4f | %.4f |%s'
                     % (CHECK_BATCH, cos['int8'], cos['ort_int8'], cos['ov_int8'],
                        cos['builtin_int8'], _peer_cells(own, 'check_value', '%.4f')))
    return '\n'.join(lines)


def same_run_markdown(rows):
    """gluon-int8's export against each runtime's own INT8 (ORT quantize_static, NNCF), all
    four timed by peers.py in one process, in alternating rounds: median [lowest, highest
    round]."""
    order = [('same_run_ort_int8', 'gluon-int8 -> ORT'), ('ort_own', "ORT's own"),
             ('same_run_ov_int8', 'gluon-int8 -> OpenVINO'), ('nncf_own', "NNCF's own")]
    lines = ['| Model | BS | Metric |%s' % ''.join(' %s |' % head for _, head in order),
             '|---|---|---|' + '---|' * len(order)]

    def cell(row, key, fmt):
        if not row:
            return ' - |'
        spread = row.get(key + '_rounds', [row[key]])
        return (' %s [%s-%s] |' % (fmt, fmt, fmt)) % (row[key], min(spread), max(spread))
    for r in rows:
        found = [r.get('peers', {}).get(col) for col, _ in order]
        if not any(found[::2]):
            continue
        batch = next(f['batch'] for f in found if f)
        lines.append('| %s | 1 | latency ms |%s' % (r['model'], ''.join(
            cell(f, 'latency_ms', '%.2f') for f in found)))
        lines.append('| | %d | img/s |%s' % (batch, ''.join(
            cell(f, 'throughput', '%.1f') for f in found)))
        lines.append('| | %d | output cosine vs MXNet FP32 |%s' % (CHECK_BATCH, ''.join(
            ' %.4f |' % f['check_value'] if f else ' - |' for f in found)))
    return '\n'.join(lines)


def plots(rows, out_dir):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    names = [r['model'].replace('_atrous_voc', '') for r in rows]
    charts = {
        'fusion_speedup': ('Speedup from fusion (Fusion / Base)',
                           [r['throughput']['fusion'] / r['throughput']['base'] for r in rows],
                           [r['latency_ms']['base'] / r['latency_ms']['fusion'] for r in rows]),
        'quant_speedup': ('Speedup from quantization (INT8 / Fusion)',
                          [r['throughput']['int8'] / r['throughput']['fusion'] for r in rows],
                          [r['latency_ms']['fusion'] / r['latency_ms']['int8'] for r in rows]),
    }
    paths = []
    for key, (title, thr, lat) in charts.items():
        fig, ax = plt.subplots(figsize=(8, 4))
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], thr, 0.4, label='throughput')
        ax.bar([x + 0.2 for x in xs], lat, 0.4, label='latency (batch 1)')
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=15)
        ax.set_ylabel('x')
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        paths.append(os.path.join(out_dir, 'seed_table_%s.png' % key))
        fig.savefig(paths[-1])
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, variant in enumerate(('base', 'fusion', 'int8')):
        ax.bar([x + (i - 1) * 0.27 for x in range(len(names))],
               [r['latency_ms'][variant] for r in rows], 0.27, label=variant)
    ax.set_xticks(list(range(len(names))))
    ax.set_xticklabels(names, rotation=15)
    ax.set_ylabel('ms (batch 1)')
    ax.set_title('Latency')
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, 'seed_table_latency.png'))
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', default=','.join(MODELS))
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--ssd-batch', type=int, default=16)
    parser.add_argument('--runs', type=int, default=10, help='timed throughput runs (median)')
    parser.add_argument('--latency-runs', type=int, default=50)
    parser.add_argument('--out', default=os.path.join(ROOT, 'results'))
    parser.add_argument('--no-onnx', action='store_true',
                        help='leave out the gluon-int8 -> ORT / -> OpenVINO rows')
    parser.add_argument('--peers', action='store_true',
                        help="the peers' own INT8 of the ONNX models in the same run "
                             '(.venv-peers)')
    parser.add_argument('--rounds', type=int, default=5,
                        help='--peers: alternating timing rounds of the runtimes (peers.py)')
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error('--rounds: got %d, must be >= 1' % args.rounds)
    if args.peers and args.no_onnx:
        parser.error('--peers: compares with the gluon-int8 -> ORT / -> OpenVINO rows, which '
                     '--no-onnx leaves out; pass one of them')
    threads = peer_threads() if args.peers else None
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter('ignore')
    rows = []
    with tempfile.TemporaryDirectory() as gluon_dir:  # gluon-int8's ONNX exports
        for name in args.models.split(','):
            print(name, flush=True)
            rows.append(measure(name, args.ssd_batch if name.startswith('ssd') else args.batch,
                                args.runs, args.latency_runs, gluon_dir,
                                with_onnx=not args.no_onnx))
        if args.peers:
            found = run_peers([r['model'] for r in rows if 'cosine_vs_fp32' in r], args,
                              threads, gluon_dir)
            for r in rows:
                r['peers'] = found.get(r['model'], {})
    table = markdown(rows, bench.omp_threads())
    print('\n' + table)
    onnx_table = onnx_markdown(rows)
    if args.peers:
        onnx_table += ('\n\nIn one process (benchmarks/peers.py, .venv-peers), timed in %d '
                       'alternating rounds; median [lowest-highest round]:\n\n%s'
                       % (args.rounds, same_run_markdown(rows)))
    if any('cosine_vs_fp32' in r for r in rows):
        print('\n' + onnx_table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'seed_table.json'), 'w') as f:
        json.dump({'omp_num_threads': bench.omp_threads(), 'environment': bench.environment(),
                   'rows': rows}, f, indent=1)
    with open(os.path.join(args.out, 'seed_table.md'), 'w') as f:
        f.write(table + '\n')
    if any('cosine_vs_fp32' in r for r in rows):
        with open(os.path.join(args.out, 'seed_table_onnx.md'), 'w') as f:
            f.write(onnx_table + '\n')
    for path in plots(rows, args.out):
        print('wrote', path)


if __name__ == '__main__':
    main()
