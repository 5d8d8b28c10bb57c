"""Shared test helpers: tiny inline HybridBlocks and check_fusion / check_quantize."""
import json
import os
import warnings

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

import gluon_int8
from gluon_int8.fuse import fuse
from gluon_int8.quantize_graph import graph_nodes
from gluon_int8.trace import trace
from gluon_int8_samples import fashion_mnist as fm

warnings.filterwarnings('ignore', category=UserWarning, module='mxnet')
warnings.filterwarnings('ignore', category=DeprecationWarning)

#: Marks a full-dataset test: it runs where the whole Fashion-MNIST dataset is installed
#: (.ci/run installs it) and says what to install where it is not.
requires_fashion_mnist = pytest.mark.skipif(
    not fm.debian_available(), reason='needs the full Fashion-MNIST dataset under %s: %s'
    % (fm.dataset_root(), fm.INSTALL_HINT))


class ConvBNAct(nn.HybridBlock):
    def __init__(self, channels=16, act='relu', **kwargs):
        super().__init__(**kwargs)
        self.conv = nn.Conv2D(channels, 3, padding=1, use_bias=False)
        self.bn = nn.BatchNorm()
        self.act = act

    def hybrid_forward(self, F, x):
        return F.Activation(self.bn(self.conv(x)), act_type=self.act)


class ConvBNReLUFunctional(ConvBNAct):
    """The same block written with F.relu (not fused by MXNet's own passes)."""

    def hybrid_forward(self, F, x):
        return F.relu(self.bn(self.conv(x)))


class ConvBNSum(nn.HybridBlock):
    """Residual block: relu(x + bn(conv(relu(bn(conv(x))))))."""

    def __init__(self, channels=16, **kwargs):
        super().__init__(**kwargs)
        self.stem = ConvBNAct(channels)
        self.conv = nn.Conv2D(channels, 3, padding=1, use_bias=False)
        self.bn = nn.BatchNorm()

    def hybrid_forward(self, F, x):
        y = self.stem(x)
        return F.Activation(self.bn(self.conv(y)) + y, act_type='relu')


class ConcatBlock(nn.HybridBlock):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.a = ConvBNAct(8)
        self.b = nn.Conv2D(8, 1)
        self.c = nn.Conv2D(8, 1)

    def hybrid_forward(self, F, x):
        y = self.a(x)
        return F.concat(self.b(y), self.c(y), y, dim=1)


class DepthwiseBlock(nn.HybridBlock):
    """MobileNet-style: pointwise, then depthwise 3x3 (groups = channels), then pointwise."""

    def __init__(self, channels=16, **kwargs):
        super().__init__(**kwargs)
        self.expand = ConvBNAct(channels)
        self.dw = nn.Conv2D(channels, 3, padding=1, groups=channels, use_bias=False)
        self.bn = nn.BatchNorm()
        self.project = nn.Conv2D(channels, 1)

    def hybrid_forward(self, F, x):
        y = F.Activation(self.bn(self.dw(self.expand(x))), act_type='relu')
        return self.project(y)


class DenseBlock(nn.HybridBlock):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fc1 = nn.Dense(32, activation='relu')
        self.fc2 = nn.Dense(10)

    def hybrid_forward(self, F, x):
        return self.fc2(self.fc1(x))


class PoolBlock(nn.HybridBlock):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.a = ConvBNAct(16)
        self.pool = nn.MaxPool2D(2)
        self.b = ConvBNAct(16)
        self.gap = nn.GlobalAvgPool2D()
        self.fc = nn.Dense(10)

    def hybrid_forward(self, F, x):
        return self.fc(F.flatten(self.gap(self.b(self.pool(self.a(x))))))


class ShuffleBlock(nn.HybridBlock):
    """conv -> channel shuffle (MXNet's reshape codes -4/-3/-2) -> conv, as ShuffleNet."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.a = ConvBNAct(8)
        self.b = nn.Conv2D(8, 1)

    def hybrid_forward(self, F, x):
        y = self.a(x)
        y = F.reshape(y, shape=(0, -4, 2, -1, -2))
        return self.b(F.reshape(F.swapaxes(y, 1, 2), shape=(0, -3, -2)))


class TwoInputs(nn.HybridBlock):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.a = ConvBNAct(8)
        self.b = ConvBNAct(8)

    def hybrid_forward(self, F, x, y):
        return self.a(x) + self.b(y)


class TwoOutputs(nn.HybridBlock):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.body = ConvBNSum(8)
        self.head1 = nn.Conv2D(4, 1)
        self.head2 = nn.Dense(10)

    def hybrid_forward(self, F, x):
        y = self.body(x)
        return self.head1(y), self.head2(y)


class SumOfReLUsReLU(nn.HybridBlock):
    """relu(relu(conv_a(x)) + relu(conv_b(x))), as in SE blocks where the gate's multiply
    keeps the residual add out of the conv's sum fusion: an INT8 elemwise_add of two
    uint8 tensors emits uint8 and a standalone ReLU follows it."""

    def __init__(self, channels=16, **kwargs):
        super().__init__(**kwargs)
        self.a = nn.Conv2D(channels, 3, padding=1, activation='relu')
        self.b = nn.Conv2D(channels, 3, padding=1, activation='relu')
        self.project = nn.Conv2D(channels, 1)

    def hybrid_forward(self, F, x):
        return self.project(F.relu(self.a(x) + self.b(x)))


class HardSwish(nn.HybridBlock):
    """MobileNetV3's activation after a conv: x * relu6(x + 3) / 6. The gate is >= 0, so
    with quantized_dtype='auto' it calibrates to uint8 while x (no ReLU) is int8."""

    def __init__(self, channels=16, **kwargs):
        super().__init__(**kwargs)
        self.conv = nn.Conv2D(channels, 3, padding=1, use_bias=False)
        self.bn = nn.BatchNorm()
        self.project = nn.Conv2D(channels, 1)

    def hybrid_forward(self, F, x):
        y = self.bn(self.conv(x))
        return self.project(y * (F.clip(y + 3.0, 0.0, 6.0) / 6.0))


class GatedReLU(nn.HybridBlock):
    """relu(conv(x)) * (1 + sigmoid(conv(x))): a conv with a fused ReLU emits uint8 and the
    INT8 add of a value >= 1 emits uint8; neither can be made int8 by a quantize node."""

    def __init__(self, channels=16, **kwargs):
        super().__init__(**kwargs)
        self.a = ConvBNAct(channels)
        self.b = nn.Conv2D(channels, 1)
        self.project = nn.Conv2D(channels, 1)

    def hybrid_forward(self, F, x):
        return self.project(self.a(x) * (F.sigmoid(self.b(x)) + 1.0))


def make_net(cls, *shapes, seed=0):
    """An initialized block with BN statistics that keep activations alive."""
    mx.random.seed(seed)
    net = cls()
    net.initialize(mx.init.Xavier(magnitude=2.0))
    inputs = [mx.nd.random.uniform(-1, 1, shape=s) for s in shapes]
    net(*inputs)
    for name, param in net.collect_params().items():
        if name.endswith('running_var'):
            param.set_data(mx.nd.random.uniform(0.5, 1.5, shape=param.shape))
        elif name.endswith('running_mean'):
            param.set_data(mx.nd.random.uniform(-0.1, 0.1, shape=param.shape))
    return net, inputs


def exported_pool_net(tmp_path, examples=16):
    """A hybridized PoolBlock exported as ``tmp_path/fp32`` with ``examples`` random images
    saved as ``tmp_path/calib.npy``, as the CLI tests read them: (net, images)."""
    net, _ = make_net(PoolBlock, (2, 3, 16, 16))
    net.hybridize()
    data = mx.nd.random.uniform(-1, 1, shape=(examples, 3, 16, 16))
    net(data)
    net.export(str(tmp_path / 'fp32'))
    np.save(str(tmp_path / 'calib.npy'), data.asnumpy())
    return net, data


def cosine(a, b):
    a, b = a.asnumpy().ravel().astype(np.float64), b.asnumpy().ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def as_list(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def node_ops(symbol):
    """(op, name, attrs) of every compute node."""
    return [(n['op'], n['name'], n.get('attrs', {}))
            for n in json.loads(symbol.tojson())['nodes'] if n['op'] != 'null']


def check_fusion(net, inputs, expected):
    """The fused FP32 graph holds a node of each expected (op, inner ops) pattern."""
    nodes = graph_nodes(fuse(trace(net, inputs).symbol))
    for op, inner in expected:
        assert any(n.op == op and set(inner) <= set(n.inner_ops) for n in nodes), \
            'no %s fusing %s in %s' % (op, inner, [(n.op, n.inner_ops) for n in nodes])
    return nodes


def check_quantize(net, inputs, int8_ops, tmp_path, mode='entropy', min_cosine=0.99, **kwargs):
    """Quantize; check INT8 ops, agreement with FP32 and a bit-identical export round trip."""
    calib = [tuple(inputs)] * 2
    qnet = gluon_int8.quantize_net(net, calib, mode=mode, **kwargs)
    ops = node_ops(qnet._cached_graph[1])
    for op in int8_ops:
        assert any(o == op and (name.startswith('quantized_') or op.startswith('_contrib_q'))
                   for o, name, _ in ops), 'no INT8 %s in %s' % (op, [o for o, _, _ in ops])
    ref, out = as_list(net(*inputs)), as_list(qnet(*inputs))
    assert len(ref) == len(out)
    for r, o in zip(ref, out):
        assert r.shape == o.shape
        assert cosine(r, o) >= min_cosine
    prefix = os.path.join(str(tmp_path), 'cq')
    qnet.export(prefix)
    names = [s.name for s in qnet._cached_graph[0]]
    loaded = mx.gluon.SymbolBlock.imports(prefix + '-symbol.json', names, prefix + '-0000.params')
    for a, b in zip(out, as_list(loaded(*inputs))):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())
    return qnet


@pytest.fixture(scope='session')
def slice_data():
    """The bundled 1000-image Fashion-MNIST test slice (images, labels); read only."""
    return fm.bundled_slice()


@pytest.fixture
def conv_net():
    return make_net(ConvBNSum, (4, 3, 16, 16))


@pytest.fixture(scope='session')
def local_ray():
    """A real local Ray with the machine's CPUs, started once for the session."""
    import ray
    from gluon_int8 import distributed
    started = not ray.is_initialized()
    distributed.init()
    yield ray
    if started:
        ray.shutdown()
