"""Throughput of INT8 batch inference on Ray (gluon_int8.distributed) against one process.

The same exported INT8 model runs over the same images three ways:
  single process   gluon_int8.load + a loop over batches, all cores as OpenMP threads
                   (a fresh child process with gluon_int8.bench.RECOMMENDED_ENV);
  Ray, 1 actor     batch_predict, one actor with all cores as threads;
  Ray, N actors    batch_predict, one actor per core, one thread each.
Each Ray row is timed end to end (actor start, model load, data through the object
store, outputs back in order) and, separately, the fixed cost: the same call on one
batch. The difference is the streaming throughput. Medians of --repeat runs.

    python benchmarks/scale.py                         # shipped Fashion-MNIST resnet, 10k real test images
    python benchmarks/scale.py --model resnet50_v1 --images 512   # GluonCV, random weights and images
    python benchmarks/scale.py --address auto          # an existing cluster (ray start --head ...)

On a cluster, --actors-per-node style sizing is Ray's: pass --threads-per-actor and
--actors; the default is one actor per CPU of the cluster. Prints a table and writes
results/scale.json and results/scale.md.
"""
import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def build_model(model: str, images: int, prefix: str):
    """Quantize and export ``model``; return the evaluation images."""
    import mxnet as mx
    import gluon_int8
    from gluon_int8 import zoo
    from gluon_int8_samples import fashion_mnist
    if model in fashion_mnist.MODELS:
        data, _, source = fashion_mnist.default_data('test')
        data = data[:images]
        net = fashion_mnist.get_model(model)
        logging.info('%d Fashion-MNIST test images (%s)', len(data), source)
    else:
        shape = zoo.preset(model).input_shape
        mx.random.seed(0)
        data = np.random.RandomState(0).uniform(-1, 1, (images,) + tuple(shape)).astype('float32')
        net = zoo.get_model(model, quantized=False)
    qnet = gluon_int8.quantize_net(net, [mx.nd.array(data[i:i + 32]) for i in range(0, 64, 32)])
    qnet.export(prefix)
    return data


def single_process(prefix: str, data_path: str, batch_size: int) -> float:
    """Child process: seconds to run every batch through gluon_int8.load(prefix)."""
    import mxnet as mx
    import gluon_int8
    data = np.load(data_path)
    block = gluon_int8.load(prefix)
    block(mx.nd.array(data[:batch_size])).wait_to_read()  # warm-up: shapes, primitives
    start = time.perf_counter()
    outs = [block(mx.nd.array(data[i:i + batch_size])).asnumpy()
            for i in range(0, len(data), batch_size)]
    seconds = time.perf_counter() - start
    assert sum(len(o) for o in outs) == len(data)
    return seconds


def time_single(prefix, data_path, batch_size, threads) -> float:
    from gluon_int8.bench import RECOMMENDED_ENV
    env = dict(os.environ, **RECOMMENDED_ENV, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, __file__, '--child', prefix, data_path,
                          str(batch_size)], env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def time_ray(prefix, data, batch_size, actors, threads, address) -> float:
    from gluon_int8 import distributed
    start = time.perf_counter()
    out = distributed.batch_predict(prefix, data, batch_size=batch_size, num_actors=actors,
                                    threads_per_actor=threads, address=address)
    seconds = time.perf_counter() - start
    assert len(out) == len(data)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='resnet')
    parser.add_argument('--images', type=int, default=10000)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--address', default=None)
    parser.add_argument('--out', default=os.path.join(ROOT, 'results', 'scale'))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    import ray
    from gluon_int8 import distributed
    with tempfile.TemporaryDirectory() as tmp:
        prefix, data_path = os.path.join(tmp, 'cq_model'), os.path.join(tmp, 'data.npy')
        data = build_model(args.model, args.images, prefix)
        np.save(data_path, data)
        distributed.init(args.address)
        cpus = int(ray.cluster_resources()['CPU'])
        local = os.cpu_count()
        rows = [('single process', 1, local,
                 [time_single(prefix, data_path, args.batch_size, local)
                  for _ in range(args.repeat)], None)]
        for actors, threads in ((1, cpus), (cpus, 1)):
            label = 'Ray, %d actor%s x %d thread%s' % (actors, 's' * (actors > 1), threads,
                                                       's' * (threads > 1))
            fixed = [time_ray(prefix, data[:args.batch_size], args.batch_size, actors, threads,
                              args.address) for _ in range(args.repeat)]
            walls = [time_ray(prefix, data, args.batch_size, actors, threads, args.address)
                     for _ in range(args.repeat)]
            rows.append((label, actors, threads, walls, fixed))
    results = report(rows, len(data), args, cpus)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + '.json', 'w') as fobj:
        json.dump(results, fobj, indent=1)
    with open(args.out + '.md', 'w') as fobj:
        fobj.write(results['table'] + '\n')
    print(results['table'])


def report(rows, images, args, cpus) -> dict:
    header = ('| run | wall s | img/s end to end | fixed cost s (1 batch) | img/s streaming |\n'
              '|---|---|---|---|---|')
    lines, entries = [header], []
    for label, actors, threads, walls, fixed in rows:
        wall = statistics.median(walls)
        cost = statistics.median(fixed) if fixed else 0.0
        streaming = images / (wall - cost) if wall > cost else float('nan')
        entries.append({'run': label, 'actors': actors, 'threads_per_actor': threads,
                        'wall_s': walls, 'fixed_cost_s': fixed, 'images': images,
                        'img_per_s': images / wall, 'streaming_img_per_s': streaming})
        lines.append('| %s | %.2f | %.0f | %s | %.0f |' % (
            label, wall, images / wall, '%.2f' % cost if fixed else '-', streaming))
    note = ('%s, %d images, batch %d, median of %d; %d CPUs in the Ray cluster; command: '
            'python benchmarks/scale.py %s' % (args.model, images, args.batch_size, args.repeat,
                                               cpus, ' '.join(sys.argv[1:])))
    return {'model': args.model, 'batch_size': args.batch_size, 'rows': entries,
            'table': '\n'.join(lines) + '\n\n' + note}


if __name__ == '__main__':
    if len(sys.argv) == 5 and sys.argv[1] == '--child':
        print(single_process(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    else:
        main()
