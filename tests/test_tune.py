"""Accuracy-aware tuning on a tiny network with an outlier layer that no mode can fix."""
import importlib

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

import gluon_int8
import gluon_int8.pipeline
from gluon_int8.plan import presum_tensors
from gluon_int8.tune import _units
from conftest import ConvBNAct, ConvBNSum, PoolBlock, make_net

TUNE_MODULE = importlib.import_module('gluon_int8.tune')  # gluon_int8.tune is the function

OUTLIER_SCALE = 300.0


class OutlierNet(nn.HybridBlock):
    """Conv-BN-ReLU x2, Conv-ReLU, global pooling, Dense."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.a = ConvBNAct(8)
        self.b = ConvBNAct(16)
        self.c = nn.Conv2D(16, 3, padding=1, activation='relu')
        self.gap = nn.GlobalAvgPool2D()
        self.fc = nn.Dense(10)

    def hybrid_forward(self, F, x):
        return self.fc(F.flatten(self.gap(self.c(self.b(self.a(x))))))


@pytest.fixture(scope='module')
def case():
    """b's channels 0 and 1 x300, c's weights for them / 300: the same FP32 function with
    outlier activations, which one per-tensor scale cannot serve (clip them or crush the
    other channels). eval_fn: cosine of the logits with FP32 on a fixed set."""
    net, _ = make_net(OutlierNet, (2, 3, 12, 12))
    x = mx.nd.random.uniform(-1, 1, shape=(64, 3, 12, 12))
    before = net(x).asnumpy()
    # edited as numpy: slicing a weight that oneDNN holds in a blocked layout stops the
    # process with SIGFPE on an AVX2-only CPU (MXNet 1.9.1)
    gamma, beta, weight = (p.data().asnumpy() for p in (net.b.bn.gamma, net.b.bn.beta,
                                                        net.c.weight))
    gamma[:2] *= OUTLIER_SCALE
    beta[:2] *= OUTLIER_SCALE
    weight[:, :2] /= OUTLIER_SCALE
    net.b.bn.gamma.set_data(mx.nd.array(gamma))
    net.b.bn.beta.set_data(mx.nd.array(beta))
    net.c.weight.set_data(mx.nd.array(weight))
    reference = net(x).asnumpy().astype(np.float64).ravel()
    np.testing.assert_allclose(reference, before.ravel(), atol=1e-5)

    def eval_fn(block):
        out = block(x).asnumpy().astype(np.float64).ravel()
        norm = np.linalg.norm(out) * np.linalg.norm(reference)
        # an all-zero output (naive ranges crush every channel but the outliers) scores 0
        return float(out @ reference / norm) if norm > 0 else 0.0

    return net, x, eval_fn


def test_tune_returns_the_outlier_layer_and_its_consumer_to_fp32(case, monkeypatch):
    net, x, eval_fn = case
    calls, real = [], gluon_int8.pipeline.collect_statistics

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gluon_int8.pipeline, 'collect_statistics', counting)
    result = gluon_int8.tune(net, x, eval_fn, max_drop=0.005)
    assert len(calls) == 1  # one calibration pass served all 8 configs and the fallback
    assert result.baseline == pytest.approx(1.0)
    configs = [t for t in result.trials if t['stage'] == 'config']
    assert len(configs) == 8 and all(t['metric'] < 0.9 for t in configs)  # far off budget
    assert [(t['mode'], t['granularity']) for t in configs[:2]] == [('entropy', 'tensor'),
                                                                   ('entropy', 'channel')]
    assert result.reached and result.best_metric >= result.target == pytest.approx(0.995)
    best = result.best_trial
    assert best['stage'] == 'fallback' and best is result.trials[-1]
    assert len(result.trials) == 9  # the top-ranked unit was enough
    b, c = result.ranking[0]['unit']  # b (the outlier producer) and c (its consumer)
    assert result.ranking[0]['layer'] == b
    tuned = {k: v for k, v in result.block.fp32_layers.items() if v.startswith('tuning')}
    assert tuned == {b: 'tuning: rank 1', c: 'tuning: rank 1 (unit of %s)' % b}
    measured = set(result.block.fp32_layers) - set(tuned)  # kernels wrong on this CPU
    assert all('computes wrong values' in result.block.fp32_layers[k] for k in measured)
    assert eval_fn(result.block) == pytest.approx(result.best_metric, abs=1e-6)
    assert result.ranking[0]['output_sqnr_db'] > result.ranking[1]['output_sqnr_db'] + 20
    assert 'fallback' in result.table() and result.to_dict()['best_trial'] == 9


@pytest.mark.parametrize('mode', ['entropy', 'naive', 'percentile', 'mse'])
def test_config_trials_equal_plain_quantize_net(case, mode):
    """Tables built from the one shared calibration pass are quantize_net's tables."""
    net, x, eval_fn = case
    result = gluon_int8.tune(net, x, eval_fn, max_drop=-1, max_trials=1, modes=[mode],
                             granularities=['channel'])
    plain = gluon_int8.quantize_net(net, x, mode=mode, granularity='channel')
    assert result.block.calib_table.ranges == plain.calib_table.ranges
    assert result.best_metric == pytest.approx(eval_fn(plain), abs=1e-9)


@pytest.mark.parametrize('for_onnx', [False, True])
def test_tune_calibrates_the_values_before_sums_only_for_onnx(for_onnx):
    net, inputs = make_net(ConvBNSum, (8, 3, 12, 12))
    result = gluon_int8.tune(net, inputs[0], lambda block: 1.0, max_drop=1, max_trials=1,
                             modes=['naive'], granularities=['channel'], for_onnx=for_onnx)
    plain = gluon_int8.quantize_net(net, inputs[0], mode='naive', granularity='channel',
                                    for_onnx=for_onnx)
    presum, = presum_tensors(plain.fp32_graph.symbol).values()
    assert result.block.calib_table.ranges == plain.calib_table.ranges
    assert (presum in plain.calib_table.ranges) == for_onnx


def test_tune_stops_at_max_trials_when_the_budget_cannot_be_reached(case):
    net, x, eval_fn = case
    result = gluon_int8.tune(net, x, eval_fn, max_drop=-1, max_trials=3)
    assert len(result.trials) == 3 and not result.reached
    assert result.best_metric == max(t['metric'] for t in result.trials)
    assert eval_fn(result.block) == pytest.approx(result.best_metric, abs=1e-6)
    assert result.target == pytest.approx(2.0)


def test_fallback_runs_to_max_trials_and_keeps_the_best(case):
    net, x, eval_fn = case
    result = gluon_int8.tune(net, x, eval_fn, max_drop=-1, max_trials=10,
                             modes=['naive'], granularities=['tensor'])
    stages = [t['stage'] for t in result.trials]
    assert stages[0] == 'config' and set(stages[1:]) == {'fallback'} and not result.reached
    fp32_counts = [len(t['fp32_layers']) for t in result.trials]
    assert fp32_counts == sorted(fp32_counts) and fp32_counts[-1] > fp32_counts[1]  # cumulative
    assert result.best_metric == max(t['metric'] for t in result.trials) > 0.999


def test_a_timeout_still_runs_one_trial(case):
    net, x, eval_fn = case
    result = gluon_int8.tune(net, x, eval_fn, timeout=1e-6)
    assert len(result.trials) == 1 and result.block is not None


def test_user_exclusions_keep_their_reason(case):
    net, x, eval_fn = case
    result = gluon_int8.tune(net, x, eval_fn, max_trials=1, exclude_operators=['Pooling'])
    (pool,) = [n for n, why in result.block.fp32_layers.items()]
    assert result.block.fp32_layers[pool] == "user: exclude_operators='Pooling'"


def test_units_follow_range_carrying_ops():
    net, inputs = make_net(PoolBlock, (2, 3, 16, 16))
    qnet = gluon_int8.quantize_net(net, inputs[0])
    conv0, pool0, conv1, pool1, flatten, fc = [r.name for r in qnet.layers]
    units = _units(qnet.fp32_graph.symbol, set(qnet.int8_layers))
    assert units[conv0] == [conv0, pool0, conv1]
    assert units[conv1] == [conv1, pool1, flatten, fc]
    assert units[fc] == [fc]


@pytest.mark.parametrize('kwargs, error, message', [
    ({'max_drop': 'a lot'}, ValueError, "max_drop: got 'a lot'; expected a finite number"),
    ({'max_trials': 0}, ValueError, 'max_trials: got 0; expected a positive int'),
    ({'timeout': -1}, ValueError, 'timeout: got -1; expected a positive number'),
    ({'modes': ['kl']}, ValueError, r"modes: got \['kl'\]; expected a non-empty list drawn"),
    ({'granularities': 'channel'}, ValueError, "granularities: got 'channel'"),
    ({'mode': 'naive'}, TypeError, r"quantize_kwargs: got \['mode'\]; tune passes on only"),
    ({'quantized_dtype': 'int4'}, ValueError, 'quantized_dtype: got'),
])
def test_bad_arguments_are_named(case, kwargs, error, message):
    net, x, eval_fn = case
    with pytest.raises(error, match=message):
        gluon_int8.tune(net, x, eval_fn, **kwargs)


def test_bad_eval_fn_is_named(case):
    net, x, _ = case
    with pytest.raises(TypeError, match='eval_fn: got 3; expected a callable'):
        gluon_int8.tune(net, x, 3)
    with pytest.raises(ValueError, match='eval_fn: returned nan for the FP32 net'):
        gluon_int8.tune(net, x, lambda block: float('nan'))


def test_ray_executor_gives_the_serial_result_for_the_same_seed(case, local_ray):
    """Trials run as Ray tasks in waves of 2; eval_fn scores a random half of the set, so
    only the seed makes the trials agree across processes."""
    net, x, _ = case
    reference = net(x).asnumpy().astype(np.float64)

    def sampled_cosine(block):
        rows = np.random.choice(len(reference), len(reference) // 2, replace=False)
        out = block(x).asnumpy().astype(np.float64)[rows].ravel()
        ref = reference[rows].ravel()
        norm = np.linalg.norm(out) * np.linalg.norm(ref)
        return float(out @ ref / norm) if norm > 0 else 0.0

    runs = [gluon_int8.tune(net, x, sampled_cosine, max_drop=0.005, seed=7, **kwargs)
            for kwargs in ({}, {'executor': 'ray', 'num_workers': 2})]
    serial, parallel = [r.to_dict() for r in runs]
    for run in (serial, parallel):
        for trial in run['trials']:
            trial.pop('seconds')
    assert parallel == serial and serial['reached'] and len(serial['trials']) == 9
    np.testing.assert_array_equal(runs[0].block(x).asnumpy(), runs[1].block(x).asnumpy())
    assert runs[1].block.fp32_layers == runs[0].block.fp32_layers


def test_unknown_executor_is_named(case):
    net, x, eval_fn = case
    with pytest.raises(ValueError, match="executor: got 'dask'; expected 'serial' or 'ray'"):
        gluon_int8.tune(net, x, eval_fn, executor='dask')
    with pytest.raises(ValueError, match='num_workers: got 0'):
        gluon_int8.tune(net, x, eval_fn, executor='ray', num_workers=0)
