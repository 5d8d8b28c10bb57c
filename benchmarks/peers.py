"""The ONNX peers of gluon-int8 on the same graphs: ONNX Runtime and OpenVINO, FP32 and INT8.

Runs in ``.venv-peers`` (numpy 2; ``make peers`` builds it from requirements-peers.txt)
on what ``benchmarks/export_onnx.py`` wrote from the MXNet venv: the ONNX export of each
seed model's MXNet graph, its calibration batches and one check batch with MXNet's FP32
outputs. Per model, four engines:

  ort_fp32   ONNX Runtime, CPU provider, graph optimizations on
  ort_int8   onnxruntime.quantization: quant_pre_process (shape inference, Conv+BN folding),
             then quantize_static, QDQ format, U8 activations, S8 weights, MinMax
             calibration over the calibration batches on the fixed thread count (S8
             activations are ~3x slower here);
             detectors keep the nodes after the last Conv (decoding, NMS) FP32
  ov_fp32    OpenVINO on the model read from the ONNX file, INFERENCE_PRECISION_HINT=f32
             (without it OpenVINO silently runs bf16 on this AVX512-BF16 CPU)
  ov_int8    nncf.quantize of that OpenVINO model over the same calibration batches
             (NNCF defaults: performance preset, fast bias correction); precision hint left
             at OpenVINO's default, which is what its INT8 ships with (bf16 for the ops
             left in floating point on this CPU; --ov-int8-precision f32 to force f32)

and, with --gluon-int8-dir, gluon-int8's own QDQ export of the model (``<model>.onnx``)
on the same two runtimes, built as ort_int8 / ov_int8 are run:

  gluon_ort  ONNX Runtime session on that file
  gluon_ov   OpenVINO on that file, precision hint as ov_int8's

Every engine runs with the same thread count, taken from OMP_NUM_THREADS (or --threads):
ONNX Runtime intra_op_num_threads (inter-op 1, sequential), OpenVINO
INFERENCE_NUM_THREADS with one stream. OpenVINO models are reshaped to a static batch
before compiling, as MXNet runs them with static_shape (where the CPU plugin cannot
compile that, e.g. SSD, the dynamic-batch model is compiled and the row says so).
A model's engines are built and checked first, then timed together in --rounds rounds
that take the engines in turn, so load changes on the machine reach them alike. Per round
latency is the median of --latency-runs at batch 1 after 10 warm-up runs, throughput the
median of --runs at --batch (SSD: --ssd-batch) after 3 warm-up runs; a row reports the
median over rounds (and keeps the rounds). Calibration wall time is
recorded for the INT8 engines. Each engine's outputs on the check batch are compared with MXNet FP32: cosine
(the worst over the outputs), or for detection models (post-NMS outputs reorder at the
top-k cut-off) the fraction of MXNet's detections reproduced (same class, IoU >= 0.5,
worst image). Below --min-cosine / --min-det-match (FP32: 0.999 / 0.9) a row is marked
INVALID and must not be read as a speed result.

    OMP_NUM_THREADS=2 .venv-peers/bin/python benchmarks/peers.py [--models mobilenet1.0,...]

Writes results/peers.json and results/peers.md. An engine that fails on a model is
recorded with its error and the run goes on.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINES = ('ort_fp32', 'ort_int8', 'ov_fp32', 'ov_int8')
# gluon-int8's own INT8 export (--gluon-int8-dir) on each runtime
GLUON_ENGINES = ('gluon_ort', 'gluon_ov')
FP32_MIN_COSINE = 0.999
FP32_MIN_DET_MATCH = 0.9


def thread_count(value):
    """The fixed thread count: --threads, else OMP_NUM_THREADS."""
    raw = value if value is not None else os.environ.get('OMP_NUM_THREADS')
    if raw is None:
        raise SystemExit('threads: neither --threads nor OMP_NUM_THREADS is set; set one '
                         '(e.g. OMP_NUM_THREADS=2) so every engine runs the same thread count')
    try:
        threads = int(raw)
    except ValueError:
        raise SystemExit('threads: got %r, expected a positive integer' % raw) from None
    if threads < 1:
        raise SystemExit('threads: got %d, expected a positive integer' % threads)
    return threads


def cosine(a, b):
    """Cosine of two flattened arrays (1.0 when both are all zeros)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        return float('nan')
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0 or not np.isfinite(na) or not np.isfinite(nb):
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def box_iou(a, b):
    """IoU of every box in a (N, 4) with every box in b (M, 4), corners (x1, y1, x2, y2)."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area = lambda z: np.prod(np.clip(z[:, 2:] - z[:, :2], 0, None), axis=1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-12)


def detection_match(outs, refs, iou=0.5):
    """Fraction of MXNet's detections a peer reproduces, worst image of the batch.

    Outputs are GluonCV's (class ids, scores, boxes), each (N, K, .), id -1 for none. A
    reference detection counts as reproduced when the peer has one of the same class with
    IoU >= ``iou``.
    """
    ids, _, boxes = outs
    ref_ids, _, ref_boxes = refs
    worst = 1.0
    for i in range(ref_ids.shape[0]):
        keep = ref_ids[i, :, 0] >= 0
        if not keep.any():
            continue
        same = ref_ids[i, keep, 0][:, None] == ids[i, :, 0][None, :]
        best = (box_iou(ref_boxes[i, keep], boxes[i]) * same).max(axis=1)
        worst = min(worst, float((best >= iou).mean()))
    return worst


def timed_median(fn, x, warmup, runs):
    """Median seconds of fn(x) over ``runs`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- ONNX Runtime -------------------------------------------------------------------

def ort_session(path, threads):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name

    def run(x):
        return session.run(None, {name: x})
    return run


def post_processing_nodes(path):
    """Names of the nodes from which no Conv can be reached: a detector's head and NMS.

    nodes_to_exclude matches node names, so unnamed nodes (the pre-processing optimizer
    leaves some) are named first and the model at ``path`` is saved with those names.
    """
    import onnx
    model = onnx.load(path)
    graph = model.graph
    taken = {n.name for n in graph.node}
    unnamed = [n for n in graph.node if not n.name]
    for i, node in enumerate(unnamed):
        name = '%s_unnamed_%d' % (node.op_type, i)
        while name in taken:
            name += '_'
        node.name = name
        taken.add(name)
    if unnamed:
        onnx.save(model, path)
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    feeds_conv = set()
    for node in reversed(graph.node):  # ONNX nodes are topologically sorted
        if any(c.op_type == 'Conv' or id(c) in feeds_conv
               for out in node.output for c in consumers.get(out, [])):
            feeds_conv.add(id(node))
    return [n.name for n in graph.node if n.op_type != 'Conv' and id(n) not in feeds_conv]


ORT_METHODS = ('minmax', 'entropy')


def ort_ranges(model_path, batches, input_name, method, threads, work_dir, calib_options=None):
    """onnxruntime.quantization's calibrator (``method``, a CalibrationMethod) over
    ``batches``: the TensorsData that
    quantize_static would compute itself, but with two settings it does not pass on.

    ``calib_options`` reach the calibrator whole (quantize_static forwards only
    symmetric / moving-average / percentile keys, never the entropy method's 'num_bins' /
    'num_quantized_bins', so its entropy runs with 128 / 128 bins: a single candidate
    threshold, MinMax's); its session runs with ``threads`` intra-op threads (the one
    create_calibrator makes takes ORT's default count).
    """
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import create_calibrator
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    op_types = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))  # quantize_static's default
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        calibrator = create_calibrator(model_path, op_types,
                                       augmented_model_path=os.path.join(tmp, 'augmented.onnx'),
                                       calibrate_method=method,
                                       extra_options=dict(calib_options or {}))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        calibrator.infer_session = ort.InferenceSession(
            calibrator.augmented_model_path, options, providers=['CPUExecutionProvider'])
        calibrator.collect_data(BatchReader(input_name, batches))
        return calibrator.compute_data()


class BatchReader:
    """The calibration batches as an ORT CalibrationDataReader: one feed dict each."""

    def __init__(self, input_name, batches):
        self._it = iter([{input_name: b} for b in batches])

    def get_next(self):
        return next(self._it, None)


def ort_int8(entry, work_dir, calib, threads, method='minmax', per_channel=False,
             calib_options=None, tag='ort_int8'):
    """quant_pre_process + quantize_static (QDQ, U8 activations, S8 weights), calibrated
    by :func:`ort_ranges` with ``method`` ('minmax' or 'entropy') on ``threads`` threads.

    Returns the quantized model's path and notes on fallbacks taken.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in ORT_METHODS:
        raise ValueError('method: got %r; expected one of %s' % (method, ORT_METHODS))
    method = {'minmax': CalibrationMethod.MinMax, 'entropy': CalibrationMethod.Entropy}[method]
    work_dir = os.path.abspath(work_dir)
    stem = os.path.join(work_dir, entry['name'])
    source = os.path.abspath(entry['path'])
    pre = stem + '.ort_pre.onnx'
    out = '%s.%s.onnx' % (stem, tag)
    try:
        # on failure, symbolic shape inference dumps sym_shape_infer_temp.onnx into the cwd
        with contextlib.chdir(work_dir):
            quant_pre_process(source, pre)
        notes = []
    except Exception as err:  # symbolic shape inference gives up on some graphs (SSD's NMS)
        dump = os.path.join(work_dir, 'sym_shape_infer_temp.onnx')
        if os.path.exists(dump):
            os.remove(dump)
        quant_pre_process(source, pre, skip_symbolic_shape=True)
        notes = ['quant_pre_process: symbolic shape inference failed (%s: %s); ran with '
                 'skip_symbolic_shape=True' % (type(err).__name__, str(err)[:200])]
    exclude = None
    if entry.get('kind') == 'detection':
        exclude = post_processing_nodes(pre)
        notes.append('detection: the %d nodes after the last Conv (box decoding, softmax, '
                     'NMS) kept FP32 via nodes_to_exclude, as gluon-int8 does with '
                     "quantize_mode='smart'; quantized, they lose every detection" % len(exclude))
    # quantize_static reads the ranges from this cache instead of calibrating again
    cache = '%s.%s.calib.json' % (stem, tag)
    save_tensors_data(ort_ranges(pre, calib, entry['input_name'], method, threads, work_dir,
                                 calib_options), cache)
    quantize_static(pre, out, None, quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=per_channel, nodes_to_exclude=exclude, calibrate_method=method,
                    calibration_cache_path=cache)
    return out, notes


# ---- OpenVINO -----------------------------------------------------------------------

def ov_compiled_runner(core, model, input_name, shape, batch, threads, precision, notes):
    """Compile ``model`` at a static batch; a runner returning the outputs, and the config.

    Falls back to the dynamic-batch model (and says so in ``notes``) when the CPU plugin
    cannot compile the static one (SSD: 'Can not create StaticMemory object').
    """
    config = {'INFERENCE_NUM_THREADS': threads, 'NUM_STREAMS': 1, 'PERFORMANCE_HINT': 'LATENCY'}
    if precision is not None:
        config['INFERENCE_PRECISION_HINT'] = precision
    static = model.clone()
    static.reshape({input_name: [batch] + list(shape)})
    try:
        compiled = core.compile_model(static, 'CPU', config)
    except RuntimeError as err:
        notes.append('batch %d: static reshape does not compile (%s); compiled the '
                     'dynamic-batch model' % (batch, ' '.join(str(err).split())[-160:]))
        compiled = core.compile_model(model, 'CPU', config)
    request = compiled.create_infer_request()
    outputs = compiled.outputs

    def run(x):
        request.infer({0: x})
        return [request.get_tensor(o).data for o in outputs]
    effective = {}
    for key in ('INFERENCE_NUM_THREADS', 'NUM_STREAMS', 'INFERENCE_PRECISION_HINT'):
        value = compiled.get_property(key)
        effective[key] = value.to_string() if hasattr(value, 'to_string') else str(value)
    return run, effective


def nncf_int8(core, entry, calib):
    """nncf.quantize over the calibration batches (NNCF defaults)."""
    import nncf
    model = core.read_model(entry['path'])
    # subset_size counts dataset items, here whole calibration batches
    return nncf.quantize(model, nncf.Dataset(list(calib)), subset_size=len(calib))


# ---- one model ----------------------------------------------------------------------

def build_engine(engine, entry, calib, check, threads, batch, args, core):
    """Build one engine on one model and check it against MXNet: a result dict (without
    timings) and its runners by batch size."""
    shape = entry['input_shape']
    result = {'engine': engine, 'threads': threads, 'batch': batch, 'calib_seconds': None}
    start = time.perf_counter()
    if engine in ('ort_fp32', 'ort_int8', 'gluon_ort'):
        path = entry['gluon_int8'] if engine == 'gluon_ort' else entry['path']
        if engine == 'ort_int8':
            path, result['notes'] = ort_int8(entry, args.work, calib, threads)
            result['calib_seconds'] = time.perf_counter() - start
        build_start = time.perf_counter()
        run = ort_session(path, threads)
        result['build_seconds'] = time.perf_counter() - build_start
        runners = {b: run for b in (1, batch, check['data'].shape[0])}
        import onnxruntime
        result['config'] = {'intra_op_num_threads': threads, 'inter_op_num_threads': 1,
                            'version': onnxruntime.__version__}
        result['precision'] = 'f32' if engine == 'ort_fp32' else 'QDQ u8 act / s8 wt'
    else:
        if engine == 'ov_int8':
            model = nncf_int8(core, entry, calib)
            result['calib_seconds'] = time.perf_counter() - start
        else:
            model = core.read_model(entry['gluon_int8'] if engine == 'gluon_ov' else entry['path'])
        precision = 'f32' if engine == 'ov_fp32' or args.ov_int8_precision == 'f32' else None
        build_start = time.perf_counter()
        runners, result['notes'] = {}, []
        for b in sorted({1, batch, check['data'].shape[0]}):
            runners[b], effective = ov_compiled_runner(core, model, entry['input_name'], shape, b,
                                                       threads, precision, result['notes'])
        result['build_seconds'] = time.perf_counter() - build_start
        import openvino
        result['config'] = dict(effective, version=openvino.get_version())
        result['precision'] = ('%s' if engine == 'ov_fp32' else 'int8 + %s') % effective[
            'INFERENCE_PRECISION_HINT']

    outs = runners[check['data'].shape[0]](check['data'])
    refs = [check['out%d' % i] for i in range(len(outs))]
    cosines = [cosine(o, r) for o, r in zip(outs, refs)]
    result['cosine_per_output'] = cosines
    fp32 = engine.endswith('fp32')
    if entry.get('kind') == 'detection':
        # post-NMS outputs reorder at the top-k cut-off, so compare detections, not tensors
        result['check_metric'] = 'detection_match'
        result['check_value'] = detection_match(outs, refs)
        limit = FP32_MIN_DET_MATCH if fp32 else args.min_det_match
    else:
        result['check_metric'] = 'cosine'
        result['check_value'] = min(cosines)
        limit = FP32_MIN_COSINE if fp32 else args.min_cosine
    result['check_limit'] = limit
    result['valid'] = bool(result['check_value'] >= limit)
    result['status'] = 'ok'
    return result, runners


def time_engines(built, shape, batch, args):
    """Latency and throughput of every built engine of one model, in ``args.rounds``
    rounds that take the engines in turn (each round: a median over ``args.latency_runs``
    at batch 1 and over ``args.runs`` at ``batch``, after warm-up), so that a change of
    machine load reaches every engine alike. Each row gets the median over the rounds and
    the rounds themselves."""
    rng = np.random.RandomState(1)
    x1 = rng.uniform(-1, 1, size=(1,) + tuple(shape)).astype(np.float32)
    xb = rng.uniform(-1, 1, size=(batch,) + tuple(shape)).astype(np.float32)
    for result, _ in built:
        result['latency_ms_rounds'], result['throughput_rounds'] = [], []
    for _ in range(args.rounds):
        for result, runners in built:
            result['latency_ms_rounds'].append(
                1000.0 * timed_median(runners[1], x1, 10, args.latency_runs))
            result['throughput_rounds'].append(
                batch / timed_median(runners[batch], xb, 3, args.runs))
    for result, _ in built:
        result['latency_ms'] = statistics.median(result['latency_ms_rounds'])
        result['throughput'] = statistics.median(result['throughput_rounds'])


def measure_model(name, entry, threads, args, core):
    """Every engine of ``args.engines`` on one model: built and checked one by one, then
    timed together (:func:`time_engines`)."""
    calib = np.load(entry['calib'])
    check = dict(np.load(entry['check']))
    batch = args.ssd_batch if name.startswith('ssd') else args.batch
    rows, built = [], []
    for engine in args.engines.split(','):
        try:
            row, runners = build_engine(engine, entry, calib, check, threads, batch, args, core)
            built.append((row, runners))
        except Exception as err:  # a runtime or quantizer that cannot take this graph
            row = {'engine': engine, 'status': 'failed', 'threads': threads, 'batch': batch,
                   'error': '%s: %s' % (type(err).__name__, str(err)[:2000]),
                   'traceback': traceback.format_exc(limit=-4)}
        row['model'] = name
        rows.append(row)
    time_engines(built, entry['input_shape'], batch, args)
    for row in rows:
        print_row(row)
    return rows


def check_text(row):
    """'cosine 0.99' / 'detection_match 0.97', with INVALID when below the limit."""
    return '%s %.5f%s' % (row['check_metric'], row['check_value'],
                          '' if row['valid'] else ' INVALID (< %g)' % row['check_limit'])


def print_row(row):
    if row['status'] != 'ok':
        print('  %-9s FAILED %s' % (row['engine'], row['error'].splitlines()[0][:300]), flush=True)
        return
    calib = '' if row['calib_seconds'] is None else 'calib %6.1f s  ' % row['calib_seconds']
    print('  %-9s %-16s %slatency %8.2f ms   throughput %8.1f img/s (batch %d)   %s'
          % (row['engine'], row['precision'], calib, row['latency_ms'], row['throughput'],
             row['batch'], check_text(row)), flush=True)
    for note in row.get('notes', []):
        print('            note: %s' % note, flush=True)


def markdown(rows, threads, seed_rows):
    lines = ['threads: %d for every engine; latency at batch 1 (ms), throughput (img/s) at the '
             'batch shown; medians after warm-up. Check: agreement with MXNet FP32 on one batch '
             '(cosine of outputs; detection models: fraction of its detections reproduced); '
             'INVALID: below the limit, not a speed result' % threads, '',
             '| Model | Engine | Precision | Calib s | Latency ms (BS 1) | BS | img/s '
             '| Check vs MXNet FP32 |',
             '|---|---|---|---|---|---|---|---|']
    for r in rows:
        if r['status'] != 'ok':
            error = r['error'].splitlines()[0][:120].replace('|', '/')
            lines.append('| %s | %s | | failed: %s | | | | |' % (r['model'], r['engine'], error))
            continue
        lines.append('| %s | %s | %s | %s | %.2f | %d | %.1f | %s |'
                     % (r['model'], r['engine'], r['precision'],
                        '' if r['calib_seconds'] is None else '%.1f' % r['calib_seconds'],
                        r['latency_ms'], r['batch'], r['throughput'], check_text(r)))
    if seed_rows:
        lines += ['', 'MXNet rows from results/seed_table.json (a separate run, same thread '
                  'count; calibration time for gluon-int8 only):', '',
                  '| Model | Engine | Calib s | Latency ms (BS 1) | BS | img/s |',
                  '|---|---|---|---|---|---|']
        for s in seed_rows:
            for variant in ('fusion', 'int8', 'builtin_int8'):
                if variant in s['latency_ms']:
                    calib = s.get('calib_seconds_gluon_int8') if variant == 'int8' else None
                    lines.append('| %s | mxnet_%s | %s | %.2f | %d | %.1f |'
                                 % (s['model'], variant, '' if calib is None else '%.1f' % calib,
                                    s['latency_ms'][variant], s['batch'], s['throughput'][variant]))
    return '\n'.join(lines)


def seed_table_rows(models, threads):
    """Rows of results/seed_table.json for these models, if it ran with the same threads."""
    path = os.path.join(ROOT, 'results', 'seed_table.json')
    if not os.path.exists(path):
        return []
    with open(path) as f:
        seed = json.load(f)
    if str(seed.get('omp_num_threads')) != str(threads):
        print('note: results/seed_table.json ran with OMP_NUM_THREADS=%s, not %d: not merged'
              % (seed.get('omp_num_threads'), threads))
        return []
    return [r for r in seed.get('rows', []) if r.get('model') in models]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', default=None,
                        help='comma-separated names (default: every model exported ok)')
    parser.add_argument('--engines', default=','.join(ENGINES))
    parser.add_argument('--onnx-dir', default=os.path.join(ROOT, 'results', 'onnx'))
    parser.add_argument('--work', default=None,
                        help='where quantized models go (default: --onnx-dir/peers)')
    parser.add_argument('--threads', default=None, help='default: OMP_NUM_THREADS')
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--ssd-batch', type=int, default=16)
    parser.add_argument('--runs', type=int, default=10, help='timed throughput runs (median)')
    parser.add_argument('--latency-runs', type=int, default=50)
    parser.add_argument('--rounds', type=int, default=1,
                        help='time the engines of a model in this many alternating rounds '
                             '(each of --runs / --latency-runs); the median over rounds counts')
    parser.add_argument('--gluon-int8-dir', default=None,
                        help="gluon-int8's INT8 export of each model, <model>.onnx (written "
                             "by export(prefix, format='onnx')), for the engines %s"
                             % ', '.join(GLUON_ENGINES))
    parser.add_argument('--min-cosine', type=float, default=0.95,
                        help='INT8 rows below this cosine vs MXNet FP32 are INVALID (default 0.95)')
    parser.add_argument('--min-det-match', type=float, default=0.5,
                        help='detection models: INT8 rows reproducing fewer of MXNet FP32 '
                             "detections (same class, IoU >= 0.5) are INVALID (default 0.5)")
    parser.add_argument('--ov-int8-precision', choices=('default', 'f32'), default='default',
                        help="INFERENCE_PRECISION_HINT for ov_int8's non-INT8 ops: 'default' "
                             "(OpenVINO's choice: bf16 on this CPU) or 'f32'")
    parser.add_argument('--out', default=os.path.join(ROOT, 'results'))
    args = parser.parse_args()
    threads = thread_count(args.threads)
    engines = args.engines.split(',')
    unknown = set(engines) - set(ENGINES + GLUON_ENGINES)
    if unknown:
        parser.error('--engines: unknown %s; allowed: %s'
                     % (sorted(unknown), ', '.join(ENGINES + GLUON_ENGINES)))
    if set(engines) & set(GLUON_ENGINES) and not args.gluon_int8_dir:
        parser.error('--engines: %s need --gluon-int8-dir'
                     % ', '.join(e for e in engines if e in GLUON_ENGINES))
    for flag in ('batch', 'ssd_batch', 'runs', 'latency_runs', 'rounds'):
        if getattr(args, flag) < 1:
            parser.error('--%s: got %d, must be >= 1'
                         % (flag.replace('_', '-'), getattr(args, flag)))
    args.work = args.work or os.path.join(args.onnx_dir, 'peers')
    os.makedirs(args.work, exist_ok=True)
    warnings.simplefilter('ignore')

    manifest_path = os.path.join(args.onnx_dir, 'manifest.json')
    if not os.path.exists(manifest_path):
        raise SystemExit('--onnx-dir: %s has no manifest.json; run benchmarks/export_onnx.py '
                         'in the MXNet venv first (make peers does both)' % args.onnx_dir)
    with open(manifest_path) as f:
        manifest = json.load(f)
    exported = manifest['models']
    names = args.models.split(',') if args.models else list(exported)
    missing = [n for n in names if n not in exported]
    if missing:
        parser.error('--models: %s not in %s; exported: %s'
                     % (', '.join(missing), manifest_path, ', '.join(exported)))

    import openvino as ov
    core = ov.Core()
    rows, skipped = [], {}
    for name in names:
        entry = dict(exported[name], name=name)
        if entry['status'] != 'ok':
            skipped[name] = entry
            print('%s: skipped, export failed: %s' % (name, entry['error'].splitlines()[0]))
            continue
        for key in ('onnx', 'calib', 'check'):
            entry[key] = os.path.join(args.onnx_dir, entry[key])
        entry['path'] = entry['onnx']
        if args.gluon_int8_dir:
            entry['gluon_int8'] = os.path.join(args.gluon_int8_dir, name + '.onnx')
        print('%s (threads %d)' % (name, threads), flush=True)
        rows.extend(measure_model(name, entry, threads, args, core))

    table = markdown(rows, threads, seed_table_rows(names, threads))
    print('\n' + table)
    import nncf
    import onnxruntime
    os.makedirs(args.out, exist_ok=True)
    result = {'threads': threads, 'omp_num_threads': os.environ.get('OMP_NUM_THREADS'),
              'versions': {'onnxruntime': onnxruntime.__version__, 'openvino': ov.get_version(),
                           'nncf': nncf.__version__, 'numpy': np.__version__,
                           'exported_with': {k: manifest.get(k) for k in ('mxnet', 'onnx')}},
              'settings': {'latency_runs': args.latency_runs, 'runs': args.runs,
                           'rounds': args.rounds,
                           'latency_warmup': 10, 'throughput_warmup': 3,
                           'min_cosine_int8': args.min_cosine, 'min_cosine_fp32': FP32_MIN_COSINE,
                           'calib': {k: manifest.get(k) for k in
                                     ('calib_batches', 'calib_batch_size', 'calib_distribution')}},
              'export_failed': {n: e['error'] for n, e in skipped.items()},
              'rows': rows}
    with open(os.path.join(args.out, 'peers.json'), 'w') as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, 'peers.md'), 'w') as f:
        f.write(table + '\n')
    print('wrote %s' % os.path.join(args.out, 'peers.json'))
    return 0 if any(r['status'] == 'ok' for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main())
