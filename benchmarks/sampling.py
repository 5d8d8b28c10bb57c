"""How far entropy thresholds move when the histogram's sample changes: why calibration
keeps the exact sample positions it has.

The entropy histogram of a tensor takes about 1M of its values per batch
(``HistogramCollector(max_samples=1 << 20)``): every ``stride``-th value of the batch's
output flattened in C order, from the first. Issue 12 lets calibration change how it
reads tensors only if the thresholds stay within one histogram bin. This benchmark runs
the same images through the same graph and takes the histogram from other samples, each
as valid as the first:

  shift   the same stride, from value ``stride // 2`` (C order)
  grid    every a-th row and column of each (example, channel) plane, a = round(sqrt(stride)):
          what a reader of oneDNN's blocked layout could take without reordering it
  all     every value (``max_samples=None``)

and prints, per model, how far each moves the entropy thresholds, in bins of the
reference histogram (1024 bins over its range). Tensors of up to 1M values per batch
are histogrammed whole by every sample and are left out.

GluonCV models with random weights and BatchNorm statistics from the first batch, on
random images in batches of 32, as ``benchmarks/calibration.py`` builds them (its saved
weights when they exist).

    OMP_NUM_THREADS=2 python benchmarks/sampling.py [--models resnet50_v1,mobilenet1.0] [--images 64]

Prints a table and writes results/sampling.{json,md}.
"""
import argparse
import json
import logging
import math
import os
import sys
import tempfile
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

VARIANTS = ('shift', 'grid', 'all')
MAX_SAMPLES = 1 << 20


def variant_collector(how: str):
    """A HistogramCollector whose sample of each (whole) batch is the variant ``how``."""
    import numpy as np
    from gluon_int8.collectors import HistogramCollector

    class Variant(HistogramCollector):
        def collect_part(self, name, op_name, arr, lo, hi, part):
            if part.start != 0 or not part.is_last(arr.size):
                raise RuntimeError('expected whole batches (max_bytes unbounded)')
            stride = self._stride(part.total)
            if how == 'all' or stride == 1:
                sample = arr
            elif how == 'shift':
                sample = arr.reshape(-1)[stride // 2::stride]
            elif how == 'grid' and arr.ndim == 4:
                step = max(1, int(round(math.sqrt(stride))))
                sample = arr[:, :, ::step, ::step]
            else:  # grid of a tensor without planes: the reference's sample
                sample = arr.reshape(-1)[::stride]
            self._hist(name).add(np.ascontiguousarray(sample), float(lo), float(hi),
                                 arr.size / sample.size)

    return Variant(max_samples=MAX_SAMPLES)


def measure(model: str, images: int, batch_size: int):
    import mxnet as mx
    import numpy as np
    from calibration import WORK, base_batch, build_net, image_batches
    from gluon_int8 import pipeline, zoo
    from gluon_int8.calibrate import collect_statistics, make_table
    from gluon_int8.collectors import HistogramCollector

    shape = tuple(zoo.preset(model).input_shape)
    base = base_batch(shape, batch_size)
    saved = os.path.join(WORK, model + '.params')
    if os.path.exists(saved):
        net = build_net(model, saved)
    else:
        net = build_net(model, os.path.join(tempfile.mkdtemp(), model + '.params'), base)
    batches = [[mx.nd.array(b)] for b in image_batches(base, images)]
    prep = pipeline.prepare(net, batches[0], 'auto', 'smart', 'tensor')
    layers = [n for n in prep.statistics_layers() if n not in prep.data_names]

    def table(collector, max_bytes=None):
        extra = {} if max_bytes is None else {'max_bytes': max_bytes}
        stats = collect_statistics(prep.calibration_graph, prep.data_names,
                                   prep.traced.arg_params, prep.traced.aux_params, layers,
                                   batches, collector, **extra)
        return stats, make_table(stats, 'entropy', 'auto')

    ref_stats, ref = table(HistogramCollector(max_samples=MAX_SAMPLES))
    internals = prep.calibration_graph.get_internals()
    shapes = dict(zip(internals.list_outputs(), internals.infer_shape(
        **{prep.data_names[0]: batches[0][0].shape})[1]))
    sampled = [n for n in layers if np.prod(shapes[n]) > MAX_SAMPLES]
    rows = []
    for how in VARIANTS:
        _, other = table(variant_collector(how), max_bytes=1 << 60)
        moves = np.array([abs(other.ranges[n][1] - ref.ranges[n][1])
                          / (ref_stats[n].hist_max / len(ref_stats[n].hist)) for n in sampled])
        rows.append({'model': model, 'variant': how, 'tensors': len(sampled),
                     'over_one_bin': int((moves > 1).sum()),
                     'median_bins': float(np.median(moves)), 'max_bins': float(moves.max())})
    return rows


def markdown(rows, command):
    lines = ['Entropy thresholds from other samples of the same tensors, against the '
             "calibration's (every stride-th value in C order, from the first), in bins of "
             'its histogram (`%s`):' % command, '',
             '| model | sample | tensors | moved > 1 bin | median bins | max bins |',
             '|---|---|---|---|---|---|']
    for r in rows:
        lines.append('| %s | %s | %d | %d | %.1f | %.1f |' % (
            r['model'], r['variant'], r['tensors'], r['over_one_bin'], r['median_bins'],
            r['max_bins']))
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', default='resnet50_v1,mobilenet1.0,inceptionv3')
    parser.add_argument('--images', type=int, default=64)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--out', default=os.path.join(ROOT, 'results', 'sampling'))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter('ignore')
    command = 'OMP_NUM_THREADS=%s python benchmarks/sampling.py --models %s --images %d' % (
        os.environ.get('OMP_NUM_THREADS', ''), args.models, args.images)
    rows = []
    for model in args.models.split(','):
        rows += measure(model, args.images, args.batch_size)
    text = markdown(rows, command)
    print(text)
    with open(args.out + '.json', 'w') as f:
        json.dump({'command': command, 'rows': rows}, f, indent=1)
    with open(args.out + '.md', 'w') as f:
        f.write(text + '\n')


if __name__ == '__main__':
    main()
