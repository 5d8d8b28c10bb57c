"""Bias correction: the shift formula by hand, the zero biases, and the effect on tiny nets."""
import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

import gluon_int8
from gluon_int8 import biascorr
from gluon_int8.trace import trace
from conftest import ConvBNSum, make_net


def test_shift_is_the_mean_of_exact_minus_rounded_outputs_by_hand():
    """W = [1, .5], W^ = [1, .4], inputs (1, 1) and (0, 0) on a uint8 grid of range 1:
    1 reads as 255 / 255.5 (256 clips to 255), so the shift is
    ((1 + .5) - (1 + .4) * 255 / 255.5) / 2 = 0.051370."""
    x = np.array([[1.0, 1.0], [0.0, 0.0]])
    fc = biascorr._Layer('FullyConnected', {'num_hidden': '1'}, 'x', (1.0, 'u8'),
                         np.array([[1.0, 0.5]]), np.array([[1.0, 0.4]]), 'b')
    assert fc.shift(x) == pytest.approx([0.5 * (1.5 - 1.4 * 255 / 255.5)], abs=1e-6)
    # the same as a 1x1 conv with two output channels, channels on axis 1; int8 grid of
    # range 2: 1 is 63.75 steps -> 64 -> 64 * 2 / 127.5
    conv = biascorr._Layer('Convolution', {'kernel': '(1, 1)', 'num_filter': '2'}, 'x',
                           (2.0, 's8'), np.array([[1.0, 0.5], [0.0, -0.5]]).reshape(2, 2, 1, 1),
                           np.array([[1.0, 0.4], [0.0, -0.5]]).reshape(2, 2, 1, 1), 'b')
    read = 64 * 2 / 127.5
    assert conv.shift(x.reshape(2, 2, 1, 1)) == pytest.approx(
        [0.5 * (1.5 - 1.4 * read), 0.5 * (-0.5 + 0.5 * read)], abs=1e-6)


class NoBias(nn.HybridBlock):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = nn.Conv2D(8, 3, use_bias=False)
        self.fc = nn.Dense(4, use_bias=False)
        self.fc2 = nn.Dense(3)

    def hybrid_forward(self, F, x):
        return self.fc2(F.relu(self.fc(self.conv(x))))


def test_with_biases_adds_zero_biases_and_keeps_function_and_fingerprint():
    net, inputs = make_net(NoBias, (2, 3, 6, 6))
    traced = trace(net, inputs)
    biased = biascorr.with_biases(traced)
    added = sorted(set(biased.arg_params) - set(traced.arg_params))
    assert len(added) == 2 and all(n.endswith('_bias') for n in added)
    assert all(not biased.arg_params[n].asnumpy().any() for n in added)
    assert biased.fingerprint() == traced.fingerprint()
    run = lambda t: mx.gluon.SymbolBlock(t.symbol, [mx.sym.var('data')]) # noqa: E731
    for t in (traced, biased):
        block = run(t)
        block.collect_params().load_dict({**t.arg_params, **t.aux_params}, ignore_extra=True)
        np.testing.assert_allclose(block(*inputs).asnumpy(), net(*inputs).asnumpy(),
                                   rtol=1e-5, atol=1e-6)
    assert biascorr.with_biases(biased) is biased  # nothing left to add


class TwoDense(nn.HybridBlock):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fc1 = nn.Dense(64, in_units=64)
        self.fc2 = nn.Dense(8, in_units=64)

    def hybrid_forward(self, F, x):
        return self.fc2(F.relu(self.fc1(x)))


def _output_shift(net, inputs, **kwargs):
    qnet = gluon_int8.quantize_net(net, [tuple(inputs)], mode='naive', **kwargs)
    error = qnet(*inputs).asnumpy() - net(*inputs).asnumpy()
    return float(np.abs(error.mean(axis=0)).max()), qnet


def test_correction_removes_most_of_the_mean_shift_of_the_outputs():
    net, _ = make_net(TwoDense, (1, 64))
    inputs = [mx.nd.array(np.random.RandomState(3).rand(512, 64) + 0.5)]  # mean 1
    plain, _ = _output_shift(net, inputs)
    corrected, qnet = _output_shift(net, inputs, bias_correction=True)
    assert corrected < 0.1 * plain  # measured: 0.0082 -> 0.00019
    # only the INT8 block's biases moved: the user's and the FP32 reference's did not
    assert (net.fc2.bias.data() == qnet.fp32_graph.params[net.fc2.bias.name]).asnumpy().all()


def test_a_fused_batchnorm_takes_the_shift_in_its_beta(monkeypatch):
    found, real = {}, biascorr.shifts
    monkeypatch.setattr(biascorr, 'shifts', lambda *args: found.update(real(*args)) or found)
    net, inputs = make_net(ConvBNSum, (8, 3, 12, 12))
    qnet = gluon_int8.quantize_net(net, [tuple(inputs)], bias_correction=True)
    betas = sorted(p.name for p in net.collect_params().values() if p.name.endswith('beta'))
    assert sorted(found) == betas and len(betas) == 2
    params = {p.name: p.data().asnumpy() for p in qnet.collect_params().values()}
    for name in betas:
        assert np.abs(found[name]).max() > 0
        np.testing.assert_allclose(params[name], net.collect_params()[name].data().asnumpy()
                                   + found[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('kwargs, error, match', [
    ({'bias_correction': 'yes'}, TypeError, r"bias_correction: got 'yes'; expected True or"),
    ({'bias_correction': True, 'mode': 'none'}, ValueError, r"bias_correction: got True "
                                                            r"with mode='none'"),
])
def test_bias_correction_is_validated(kwargs, error, match):
    net, inputs = make_net(TwoDense, (4, 64))
    with pytest.raises(error, match=match):
        gluon_int8.quantize_net(net, [tuple(inputs)], **kwargs)


def test_bias_correction_needs_the_data(tmp_path):
    net, inputs = make_net(TwoDense, (4, 64))
    path = str(tmp_path / 'table.json')
    gluon_int8.quantize_net(net, [tuple(inputs)], calib_table=path)
    with pytest.raises(ValueError, match='bias_correction: got True without calib_data'):
        gluon_int8.quantize_net(net, calib_table=path, bias_correction=True)
