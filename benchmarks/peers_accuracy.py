"""The peer quantizers' top-1 on the Fashion-MNIST families: the peer half of benchmarks/accuracy.py.

Runs in ``.venv-peers`` (numpy 2) on what ``benchmarks/accuracy.py`` wrote from the MXNet
venv into --work: each family's FP32 ONNX model (``gluon_int8.onnx_graph.fp32_model`` of
the traced network: BatchNorms folded into their convs), the calibration images
gluon-int8 calibrates with (5 x 32 training images) and the test images and labels.
Per family, three engines quantize the same FP32 model on the same images:

  ort-minmax   onnxruntime.quantization: quant_pre_process, then quantize_static, QDQ,
               u8 activations, s8 weights per output channel, MinMax calibration
  ort-entropy  the same with Entropy calibration, its histogram of num_bins=2048
               (--ort-entropy-bins; ORT's default for its other histogram methods, and
               TensorRT's) and ORT's default num_quantized_bins=128
               (--ort-entropy-quantized-bins). quantize_static never passes these two on,
               and with its Entropy defaults (128 / 128) the one candidate threshold is
               the whole range: Entropy = MinMax. So the ranges come from ORT's calibrator
               built with them (``peers.ort_ranges``) and reach quantize_static through
               its calibration cache. ORT's KL search is a python loop: ~1 minute per
               family. (Its histogram is two-sided, [-max|x|, max|x|], as MXNet's; the
               result moves a lot with the bin counts, see the README.)
  nncf         nncf.quantize with its defaults (performance preset, fast bias correction)
               on the model read by ``ov.convert_model`` (NNCF's fast bias correction does
               not act on a model from ``core.read_model``), the 160 calibration images
               as 160 samples of batch 1 (NNCF asks for batch 1: its statistics treat a
               sample's batch axis like a spatial one), subset_size=160

Every engine runs its INT8 model with the same thread count (OMP_NUM_THREADS or
--threads): ONNX Runtime intra-op threads, OpenVINO INFERENCE_NUM_THREADS, and OpenVINO
with INFERENCE_PRECISION_HINT=f32, so that the ops it keeps in floating point do not run
bf16 on this CPU. ORT's calibration runs on that thread count too; NNCF's statistics run on
an OpenVINO model NNCF compiles itself (f32, OpenVINO's default thread count, recorded as
``calib_threads``). Calibration seconds: quant_pre_process + calibration + quantize_static;
convert_model + nncf.quantize. Each family's FP32 ONNX is also run on both runtimes, so a
runtime that differs from MXNet FP32 before quantizing is seen (``onnx_fp32_top1``).

    OMP_NUM_THREADS=1 .venv-peers/bin/python benchmarks/peers_accuracy.py --work DIR

benchmarks/accuracy.py calls it; it writes DIR/peers_accuracy.json (a row per family and
engine, an engine that fails is recorded with its error and the run goes on) and, per row,
which test images the engine got right (DIR/hits_<family>_<engine>.npy, the row's ``hits``),
so that accuracy.py can tell a peer's lead from chance.
"""
import argparse
import json
import os
import sys
import time
import traceback
import warnings

import numpy as np

import peers

ENGINES = ('ort-minmax', 'ort-entropy', 'nncf')
EVAL_BATCH = 500


def hits(run, images, labels, batch=EVAL_BATCH):
    """Per image, whether ``run`` (a batch -> list of outputs) gets its label."""
    found = [np.asarray(run(images[start:start + batch])[0]).argmax(axis=1)
             for start in range(0, len(images), batch)]
    return np.concatenate(found) == labels


def top1(run, images, labels):
    """Top-1 (%) of ``run`` over the images."""
    return 100.0 * float(hits(run, images, labels).mean())


def ov_runner(core, model, entry, sizes, threads):
    """A runner over OpenVINO models compiled (f32) at each batch size in ``sizes``."""
    notes = []
    runners = {b: peers.ov_compiled_runner(core, model, entry['input_name'],
                                           entry['input_shape'], b, threads, 'f32', notes)[0]
               for b in sizes}
    return lambda x: runners[len(x)](x)


def batch_sizes(count, batch=EVAL_BATCH):
    return sorted({min(batch, count)} | ({count % batch} if count % batch else set()))


def ort_row(engine, entry, args, calib, threads):
    method = engine.split('-')[1]
    options = ({'num_bins': args.ort_entropy_bins,
                'num_quantized_bins': args.ort_entropy_quantized_bins}
               if method == 'entropy' else None)
    start = time.perf_counter()
    path, notes = peers.ort_int8(entry, args.work, calib, threads, method=method,
                                 per_channel=True, calib_options=options,
                                 tag=engine.replace('-', '_'))
    seconds = time.perf_counter() - start
    return {'mode': method, 'granularity': 'channel', 'calib_seconds': seconds,
            'calib_threads': threads, 'calib_options': options, 'notes': notes,
            'run': peers.ort_session(path, threads)}


def nncf_row(core, entry, calib, threads):
    import nncf
    import openvino as ov
    samples = [image[None] for batch in calib for image in batch]  # batch 1, as NNCF asks
    start = time.perf_counter()
    model = nncf.quantize(ov.convert_model(entry['path']), nncf.Dataset(samples),
                          subset_size=len(samples))
    seconds = time.perf_counter() - start
    # NNCF's statistics run on OpenVINO's default CPU config: record its thread count
    default = core.compile_model(ov.convert_model(entry['path']), 'CPU')
    return {'mode': 'defaults', 'granularity': 'channel', 'calib_seconds': seconds,
            'calib_threads': int(default.get_property('INFERENCE_NUM_THREADS')),
            'subset_size': len(samples), 'model': model}


def measure(family, entry, args, calib, images, labels, threads, core):
    """The FP32 checks and one row per engine for one family."""
    sizes = batch_sizes(len(labels))
    import openvino as ov
    checks = {'onnxruntime': top1(peers.ort_session(entry['path'], threads), images, labels),
              'openvino': top1(ov_runner(core, ov.convert_model(entry['path']), entry, sizes,
                                         threads), images, labels)}
    print('%-13s FP32 ONNX: ORT %.2f  OpenVINO %.2f' % (family, checks['onnxruntime'],
                                                       checks['openvino']), flush=True)
    rows = []
    for engine in args.engines.split(','):
        row = {'family': family, 'engine': engine}
        try:
            if engine.startswith('ort'):
                found = ort_row(engine, entry, args, calib, threads)
                run = found.pop('run')
            else:
                found = nncf_row(core, entry, calib, threads)
                run = ov_runner(core, found.pop('model'), entry, sizes, threads)
            correct = hits(run, images, labels)
            row.update(found, status='ok', int8_top1=100.0 * float(correct.mean()),
                       hits='hits_%s_%s.npy' % (family, engine))
            np.save(os.path.join(args.work, row['hits']), correct)
            print('%-13s %-12s int8 %.2f calib %.2fs' % (family, engine, row['int8_top1'],
                                                         row['calib_seconds']), flush=True)
        except Exception as err:  # a quantizer that cannot take this graph: record, go on
            row.update(status='failed', error='%s: %s' % (type(err).__name__, str(err)[:2000]),
                       traceback=traceback.format_exc(limit=-4))
            print('%-13s %-12s FAILED %s' % (family, engine, row['error'].splitlines()[0][:300]),
                  flush=True)
        rows.append(row)
    return checks, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--work', required=True,
                        help='the folder benchmarks/accuracy.py exported to (manifest.json)')
    parser.add_argument('--engines', default=','.join(ENGINES))
    parser.add_argument('--threads', default=None, help='default: OMP_NUM_THREADS')
    parser.add_argument('--ort-entropy-bins', type=int, default=2048)
    parser.add_argument('--ort-entropy-quantized-bins', type=int, default=128)
    args = parser.parse_args()
    threads = peers.thread_count(args.threads)
    unknown = set(args.engines.split(',')) - set(ENGINES)
    if unknown:
        parser.error('--engines: unknown %s; allowed: %s' % (sorted(unknown), ', '.join(ENGINES)))
    if not 0 < args.ort_entropy_quantized_bins <= args.ort_entropy_bins:
        parser.error('--ort-entropy-quantized-bins: got %d, must be in 1..--ort-entropy-bins '
                     '(%d)' % (args.ort_entropy_quantized_bins, args.ort_entropy_bins))
    manifest_path = os.path.join(args.work, 'manifest.json')
    if not os.path.exists(manifest_path):
        raise SystemExit('--work: %s has no manifest.json; benchmarks/accuracy.py writes it'
                         % args.work)
    with open(manifest_path) as f:
        manifest = json.load(f)
    warnings.simplefilter('ignore')

    import nncf
    import onnxruntime
    import openvino as ov
    nncf.set_log_level(40)  # its INFO lines per algorithm step would bury the table
    calib = np.load(os.path.join(args.work, manifest['calib']))
    test = np.load(os.path.join(args.work, manifest['test']))
    images, labels = test['images'], test['labels'].astype(np.int64)
    core = ov.Core()
    result = {'threads': threads,
              'versions': {'onnxruntime': onnxruntime.__version__, 'openvino': ov.get_version(),
                           'nncf': nncf.__version__, 'numpy': np.__version__},
              'ort_entropy': {'num_bins': args.ort_entropy_bins,
                              'num_quantized_bins': args.ort_entropy_quantized_bins},
              'onnx_fp32_top1': {}, 'rows': []}
    for family, entry in manifest['families'].items():
        entry = dict(entry, name=family, path=os.path.join(args.work, entry['onnx']))
        checks, rows = measure(family, entry, args, calib, images, labels, threads, core)
        result['onnx_fp32_top1'][family] = checks
        result['rows'].extend(rows)
    out = os.path.join(args.work, 'peers_accuracy.json')
    with open(out, 'w') as f:
        json.dump(result, f, indent=1)
    print('wrote %s' % out, flush=True)
    return 0 if any(r['status'] == 'ok' for r in result['rows']) else 1


if __name__ == '__main__':
    sys.exit(main())
