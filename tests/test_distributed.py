"""Ray batch inference and evaluation on a real local Ray with 2 CPUs: outputs equal the
single-process INT8 outputs exactly and in order, a killed actor loses no row, metrics
equal the single-process ones."""
import os
import signal
import subprocess
import sys
import threading
import time

import mxnet as mx
import numpy as np
import pytest
import ray

import gluon_int8
from gluon_int8 import distributed
from gluon_int8.datasets import ImageSource
from gluon_int8_samples import fashion_mnist
from image_sets import FASHION, write_image_sets

BATCH = 32


# The single-process reference runs in a process of its own with the actors' settings
# (one OpenMP thread, gluon_int8.bench.RECOMMENDED_ENV): on some CPUs oneDNN picks kernels
# by thread count, and outputs of 1 and 2 threads differ in float rounding.
REFERENCE = """
import sys
import mxnet as mx
import numpy as np
import gluon_int8
images = np.load(sys.argv[2])
block = gluon_int8.load(sys.argv[1])
np.save(sys.argv[3], np.concatenate([block(mx.nd.array(images[i:i + %d])).asnumpy()
                                     for i in range(0, len(images), %d)]))
""" % (BATCH, BATCH)


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    images, labels = fashion_mnist.bundled_slice()
    qnet = gluon_int8.quantize_net(fashion_mnist.get_model('resnet'),
                                   [mx.nd.array(images[:64])], mode='entropy')
    folder = tmp_path_factory.mktemp('export')
    prefix = str(folder / 'cq_resnet')
    qnet.export(prefix)
    np.save(str(folder / 'images.npy'), images)
    env = dict(os.environ, **distributed._actor_env(1, None))
    done = subprocess.run([sys.executable, '-c', REFERENCE, prefix, str(folder / 'images.npy'),
                           str(folder / 'reference.npy')], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    reference = np.load(str(folder / 'reference.npy'))
    in_process = np.concatenate([gluon_int8.load(prefix)(mx.nd.array(images[i:i + BATCH])).asnumpy()
                                 for i in range(0, len(images), BATCH)])
    cosine = (reference * in_process).sum() / np.linalg.norm(reference) / np.linalg.norm(in_process)
    assert cosine > 0.9999  # the same model, whatever the thread count
    return prefix, qnet, images, labels, reference


def test_batch_predict_equals_single_process_in_order(local_ray, exported):
    prefix, _, images, _, reference = exported
    out = distributed.batch_predict(prefix, images, batch_size=BATCH, num_actors=2)
    assert out.shape == reference.shape == (1000, 10)  # 1000 = 31 batches of 32 + 8
    np.testing.assert_array_equal(out, reference)


def test_ray_dataset_input_and_block_model(local_ray, exported):
    _, qnet, images, _, reference = exported
    ds = ray.data.from_numpy(images[:200])  # column 'data', the model's input name
    out = distributed.batch_predict(qnet, ds, batch_size=BATCH, num_actors=2)
    np.testing.assert_array_equal(out, reference[:200])


def _actor_pids():
    pids = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open('/proc/%s/cmdline' % entry, 'rb') as fobj:
                    if b'MapBatches(_Predictor)' in fobj.read():
                        pids.append(int(entry))
            except OSError:  # the process ended while we looked
                continue
    return pids


def test_killed_actor_is_retried_without_losing_or_duplicating_rows(local_ray, exported):
    prefix, _, images, _, reference = exported
    images, reference = np.tile(images, (6, 1, 1, 1)), np.tile(reference, (6, 1))
    result, killed = {}, {}

    def run():
        result['out'] = distributed.batch_predict(prefix, images, batch_size=4, num_actors=2)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 120
    while len(_actor_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # both actors loaded the model and are working through the batches
    pids = _actor_pids()
    assert pids, 'no actor process found'
    killed['running'] = worker.is_alive()
    os.kill(pids[0], signal.SIGKILL)
    worker.join(300)
    assert killed['running'], 'the run ended before the kill: make it longer'
    assert pids[0] not in _actor_pids()
    np.testing.assert_array_equal(result['out'], reference)  # every row once, in order


def test_evaluate_equals_single_process(local_ray, exported):
    prefix, qnet, images, labels, _ = exported
    single = fashion_mnist.evaluate(qnet, images, labels, batch_size=BATCH)
    assert single > 0.85
    assert distributed.evaluate(prefix, images, labels, batch_size=BATCH) == single
    top5 = distributed.evaluate(prefix, images, labels, metric='top5', batch_size=BATCH)
    assert single < top5 <= 1.0
    metric = mx.metric.Accuracy()
    assert distributed.evaluate(prefix, images, labels, metric=metric, batch_size=BATCH) == single

    ds = ray.data.from_numpy(images).zip(ray.data.from_numpy(labels).rename_columns(
        {'data': 'label'}))
    mean_correct = distributed.evaluate(
        prefix, ds, 'label', metric=lambda y, out: np.mean(out.argmax(1) == y),
        batch_size=BATCH)
    assert mean_correct == pytest.approx(single, abs=1e-12)


@pytest.mark.parametrize('runtime', ['onnxruntime', 'openvino'])
def test_an_onnx_export_runs_on_its_runtime(local_ray, exported, tmp_path, runtime):
    from gluon_int8 import runtimes
    _, qnet, images, labels, _ = exported
    images, labels = images[:256], labels[:256]
    path = qnet.export(str(tmp_path / 'cq'), format='onnx')[0]
    block = runtimes.load_onnx(path, runtime, threads=1)
    reference = np.concatenate([block(images[i:i + BATCH]).asnumpy()
                                for i in range(0, len(images), BATCH)])
    model = path if runtime == 'onnxruntime' else block  # a path runs on ONNX Runtime
    out = distributed.batch_predict(model, images, batch_size=BATCH, num_actors=2)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
    single = fashion_mnist.evaluate(block, images, labels, batch_size=BATCH)
    assert distributed.evaluate(model, images, labels, batch_size=BATCH) == single


@pytest.mark.parametrize('kwargs, match', [
    (dict(batch_size=0), 'batch_size: got 0'),
    (dict(num_actors=-1), 'num_actors: got -1'),
    (dict(output='pandas'), "output: got 'pandas'"),
    (dict(env={'A': 1}), 'env: got'),
])
def test_batch_predict_bad_options(local_ray, exported, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        distributed.batch_predict(exported[0], exported[2][:10], **kwargs)


def test_bad_model_data_and_labels(local_ray, exported, tmp_path):
    prefix, _, images, labels, _ = exported
    with pytest.raises(ValueError, match='model: export prefix .* has no file'):
        distributed.batch_predict(str(tmp_path / 'nothing'), images)
    with pytest.raises(TypeError, match='data: got list'):
        distributed.batch_predict(prefix, [[1, 2]])
    with pytest.raises(ValueError, match=r'data: got 2 arrays; the model has 1 inputs'):
        distributed.batch_predict(prefix, (images, images))
    with pytest.raises(ValueError, match='data: the Ray Dataset has columns'):
        distributed.batch_predict(prefix, ray.data.from_items([{'x': 1}]))
    with pytest.raises(ValueError, match='labels: got shape'):
        distributed.evaluate(prefix, images, labels[:10])
    with pytest.raises(ValueError, match="metric: got 'f1'"):
        distributed.evaluate(prefix, images, labels, metric='f1')


def test_more_actors_than_cpus_is_refused(local_ray, exported):
    cpus = int(local_ray.cluster_resources()['CPU'])
    with pytest.raises(ValueError, match='num_actors: got %d actors x 1 threads_per_actor, '
                                         'more than the %d CPUs' % (cpus + 1, cpus)):
        distributed.batch_predict(exported[0], exported[2][:10], num_actors=cpus + 1)


def test_evaluate_reads_a_rec(local_ray, exported, tmp_path):
    """An image folder or .rec (here a .rec the test writes) gives the array path's number."""
    prefix, qnet, _, _, _ = exported
    sets = write_image_sets(str(tmp_path), 100)
    single = fashion_mnist.evaluate(qnet, fashion_mnist.normalize(sets['raw']), sets['labels'])
    source = ImageSource(sets['rec'], FASHION, BATCH)
    assert distributed.evaluate(prefix, source, batch_size=BATCH) == single
    with pytest.raises(ValueError, match='^labels: got a ndarray'):
        distributed.evaluate(prefix, source, sets['labels'], batch_size=BATCH)
