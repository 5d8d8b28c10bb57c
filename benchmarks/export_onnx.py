"""Export the seed models to ONNX for the peer benchmark (runs in the MXNet venv).

For each GluonCV model (random weights: ``mx.random.seed(0)``, Xavier; SSD with
``pretrained_base=False``; BatchNorm running statistics taken from the first calibration
batch so activations keep a trained-like scale, see ``gluon_int8.zoo.set_batchnorm_statistics``) this
traces the hybridized FP32 graph with gluon-int8's
tracer (the graph the seed table's *Base* row runs), exports it with
``mx.onnx.export_model`` with a dynamic batch axis, and turns the weights, which MXNet's
exporter lists as graph inputs, into initializers only, so ONNX Runtime and OpenVINO can
fold them. Next to each model it saves the random calibration batches the peers quantize
with and one check batch with MXNet's FP32 outputs on it, so ``benchmarks/peers.py``
(in ``.venv-peers``) can tell a peer that computes garbage from one that is right.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/export_onnx.py [--models mobilenet1.0,...]

Writes, under --out (default results/onnx/):
  <model>.onnx         the FP32 graph, input 'data' of shape (N, C, H, W), N dynamic
  <model>.calib.npy    float32 (batches, batch_size, C, H, W), uniform(-1, 1), seed 0
  <model>.check.npz    'data' (a batch of --check-batch) and 'out0', 'out1', ...: MXNet FP32
  manifest.json        per model: status ('ok' or the error), paths, shapes, times, versions

A model that fails to export is recorded with its error and the others go on.
"""
import argparse
import json
import os
import sys
import time
import traceback
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ('resnet50_v1', 'resnet101_v1', 'mobilenet1.0', 'inceptionv3', 'ssd_300_vgg16_atrous_voc')


def build(name):
    """The GluonCV model with seeded random weights (as the seed table builds it), and its
    input shape (C, H, W)."""
    import mxnet as mx
    from gluon_int8 import zoo
    mx.random.seed(0)
    return zoo.get_model(name, quantized=False), tuple(zoo.preset(name).input_shape)


def weights_to_initializers(model):
    """Drop every graph input that has an initializer; returns how many were dropped.

    MXNet's exporter lists each weight both as an initializer and as a graph input. An
    input with an initializer is a *default* the caller may override, so runtimes cannot
    constant-fold it (ONNX IR >= 4 allows initializers that are not inputs).
    """
    weights = {init.name for init in model.graph.initializer}
    keep = [inp for inp in model.graph.input if inp.name not in weights]
    dropped = len(model.graph.input) - len(keep)
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return dropped


def network_and_data(name, calib_batches, calib_batch_size, check_batch, bn_stats='data'):
    """The network (``build``), its calibration images (batches, batch size, C, H, W) and
    check batch, uniform(-1, 1) from seed 0, and how many BatchNorms took their statistics
    from the first calibration batch. benchmarks/seed_table.py takes the same, so its
    engines and the peers quantize one network on the same images and are checked on one
    batch."""
    import mxnet as mx
    from gluon_int8 import zoo
    net, shape = build(name)
    rng = np.random.RandomState(0)
    calib = rng.uniform(-1, 1, size=(calib_batches, calib_batch_size) + shape).astype(np.float32)
    check = rng.uniform(-1, 1, size=(check_batch,) + shape).astype(np.float32)
    recalibrated = zoo.set_batchnorm_statistics(net, mx.nd.array(calib[0])) if bn_stats == 'data' else 0
    return net, shape, calib, check, recalibrated


def export(name, out_dir, calib_batches, calib_batch_size, check_batch, bn_stats):
    """Export one model; returns its manifest entry."""
    import mxnet as mx
    import onnx
    from gluon_int8.trace import trace

    net, shape, calib, check, recalibrated = network_and_data(
        name, calib_batches, calib_batch_size, check_batch, bn_stats)
    traced = trace(net, [mx.nd.array(check)])
    if traced.num_inputs != 1:
        raise ValueError('model %s: the peer benchmark handles one input, the graph has %d (%s)'
                         % (name, traced.num_inputs, traced.data_names))
    outs = net(mx.nd.array(check))
    outs = [o.asnumpy() for o in (outs if isinstance(outs, (list, tuple)) else [outs])]

    path = os.path.join(out_dir, name + '.onnx')
    params = dict(traced.arg_params)
    params.update(traced.aux_params)
    start = time.perf_counter()
    # dynamic_input_shapes: None marks the batch axis dynamic, so batch 1 and 64 both run
    mx.onnx.export_model(traced.symbol, params, in_shapes=[(1,) + shape], in_types=[np.float32],
                         onnx_file_path=path, dynamic=True,
                         dynamic_input_shapes=[(None,) + shape])
    model = onnx.load(path)
    dropped = weights_to_initializers(model)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    export_seconds = time.perf_counter() - start

    calib_path = os.path.join(out_dir, name + '.calib.npy')
    check_path = os.path.join(out_dir, name + '.check.npz')
    np.save(calib_path, calib)
    np.savez(check_path, data=check, **{'out%d' % i: o for i, o in enumerate(outs)})
    return {
        'status': 'ok',
        # GluonCV detectors return (class ids, scores, boxes) after NMS
        'kind': 'detection' if len(outs) == 3 and outs[2].shape[-1] == 4 else 'classification',
        'onnx': os.path.relpath(path, out_dir),
        'calib': os.path.relpath(calib_path, out_dir),
        'check': os.path.relpath(check_path, out_dir),
        'input_name': model.graph.input[0].name,
        'input_shape': list(shape),
        'outputs': [o.name for o in model.graph.output],
        'mxnet_output_shapes': [list(o.shape) for o in outs],
        'opset': max(op.version for op in model.opset_import if op.domain in ('', 'ai.onnx')),
        'weights_moved_to_initializers': dropped,
        'batchnorm_stats_from_data': recalibrated,
        'mxnet_output_abs_mean': [float(np.abs(o).mean()) for o in outs],
        'export_seconds': round(export_seconds, 3),
        'onnx_bytes': os.path.getsize(path),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', default=','.join(MODELS),
                        help='comma-separated GluonCV names (default: the five seed models)')
    parser.add_argument('--out', default=os.path.join(ROOT, 'results', 'onnx'))
    parser.add_argument('--calib-batches', type=int, default=2,
                        help='calibration batches (default 2, as benchmarks/seed_table.py)')
    parser.add_argument('--calib-batch-size', type=int, default=16,
                        help='calibration batch size (default 16, as benchmarks/seed_table.py)')
    parser.add_argument('--check-batch', type=int, default=2,
                        help='batch size of the accuracy check batch (default 2)')
    parser.add_argument('--bn-stats', choices=('data', 'init'), default='data',
                        help="BatchNorm running stats: 'data' (default) from the first "
                             "calibration batch, so activations keep a trained-like scale; "
                             "'init' leaves mean 0 / var 1 (activations vanish, see "
                             'gluon_int8.zoo.set_batchnorm_statistics)')
    args = parser.parse_args()
    for flag in ('calib_batches', 'calib_batch_size', 'check_batch'):
        if getattr(args, flag) < 1:
            parser.error('--%s: got %d, must be >= 1'
                         % (flag.replace('_', '-'), getattr(args, flag)))
    warnings.simplefilter('ignore')
    import mxnet as mx
    import onnx

    os.makedirs(args.out, exist_ok=True)
    manifest_path = os.path.join(args.out, 'manifest.json')
    manifest = {'models': {}}
    if os.path.exists(manifest_path):  # keep entries of models not exported this time
        with open(manifest_path) as f:
            manifest = json.load(f)
    manifest.update({'mxnet': mx.__version__, 'onnx': onnx.__version__,
                     'calib_batches': args.calib_batches,
                     'calib_batch_size': args.calib_batch_size,
                     'calib_distribution': 'uniform(-1, 1), numpy RandomState(0)',
                     'weights': 'random: mx.random.seed(0), mx.init.Xavier()',
                     'batchnorm_stats': args.bn_stats})
    failed = []
    for name in args.models.split(','):
        print('%s: exporting' % name, flush=True)
        try:
            entry = export(name, args.out, args.calib_batches, args.calib_batch_size,
                           args.check_batch, args.bn_stats)
        except Exception as err:  # any converter error: record it, go on with the others
            entry = {'status': 'failed', 'stage': 'export',
                     'error': '%s: %s' % (type(err).__name__, err),
                     'traceback': traceback.format_exc(limit=-4)}
            failed.append(name)
        manifest['models'][name] = entry
        print('  %s' % (entry['status'] if entry['status'] == 'ok' else entry['error']), flush=True)
        with open(manifest_path, 'w') as f:
            json.dump(manifest, f, indent=1)
    print('wrote %s' % manifest_path)
    if failed:
        print('failed to export: %s' % ', '.join(failed))
    return 0 if len(failed) < len(args.models.split(',')) else 1


if __name__ == '__main__':
    sys.exit(main())
