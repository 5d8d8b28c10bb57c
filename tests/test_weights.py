"""INT8 weights on disk: size, bit-identical round trips, plain MXNet loading."""
import os

import mxnet as mx
import numpy as np
import pytest

import gluon_int8
from gluon_int8.weights import quantize_weight
from conftest import ConvBNSum, make_net


def test_per_channel_weight_quantization_hand_computed():
    w = mx.nd.array([[[[1.0, -0.5]]], [[[0.0, 0.0]]], [[[0.26, -2.54]]]])
    q, scale = quantize_weight(w)
    np.testing.assert_array_equal(q.asnumpy().ravel(), [127, -64, 0, 0, 13, -127])
    np.testing.assert_allclose(scale.asnumpy().ravel(), [1 / 127.0, 1.0, 2.54 / 127], rtol=1e-6)
    assert q.dtype == np.int8


@pytest.mark.parametrize('int8_weights', [True, False])
def test_export_round_trips_bit_identical(tmp_path, int8_weights):
    net, inputs = make_net(ConvBNSum, (4, 3, 16, 16))
    qnet = gluon_int8.quantize_net(net, inputs[0])
    prefix = str(tmp_path / 'cq')
    qnet.export(prefix, int8_weights=int8_weights)
    saved = mx.nd.load(prefix + '-0000.params')
    assert any(v.dtype == np.int8 for v in saved.values()) == int8_weights
    plain = mx.gluon.SymbolBlock.imports(prefix + '-symbol.json', ['data'], prefix + '-0000.params')
    expected = qnet(inputs[0]).asnumpy()
    np.testing.assert_array_equal(plain(inputs[0]).asnumpy(), expected)
    np.testing.assert_array_equal(gluon_int8.load(prefix)(inputs[0]).asnumpy(), expected)


@pytest.mark.slow
def test_resnet50_int8_params_file_is_under_30_percent(tmp_path):
    from gluon_int8 import zoo
    net = zoo.get_model('resnet50_v1', quantized=False)
    x = mx.nd.random.uniform(-1, 1, shape=(1, 3, 224, 224))
    qnet = gluon_int8.quantize_net(net, x, mode='naive')
    net.hybridize()
    net(x)
    net.export(str(tmp_path / 'fp32'))
    qnet.export(str(tmp_path / 'int8'))
    ratio = (os.path.getsize(str(tmp_path / 'int8-0000.params'))
             / os.path.getsize(str(tmp_path / 'fp32-0000.params')))
    assert ratio <= 0.30
    loaded = gluon_int8.load(str(tmp_path / 'int8'))
    np.testing.assert_array_equal(loaded(x).asnumpy(), qnet(x).asnumpy())


def test_fc_int8_weights_are_read_back_at_their_own_scale():
    """MXNet's quantizer writes int8 weights at 127/r but oneDNN reads them at 127.5/r:
    every FC output came out 0.4% small. The stored range compensates."""
    from mxnet.gluon import nn
    mx.random.seed(0)
    net = nn.Dense(6, use_bias=False)
    net.initialize(mx.init.Xavier())
    x = np.random.RandomState(0).normal(size=(96, 20)).astype(np.float32)
    ref = net(mx.nd.array(x)).asnumpy().astype(np.float64)
    out = gluon_int8.quantize_net(net, [x], mode='naive')(mx.nd.array(x)).asnumpy()
    slope = float((out * ref).sum() / (ref * ref).sum())
    assert abs(slope - 1) < 1e-3
