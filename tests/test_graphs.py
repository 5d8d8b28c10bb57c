"""Tier 2: fusion and quantization of tiny inline HybridBlocks."""
import json

import pytest

from conftest import (ConcatBlock, ConvBNAct, ConvBNReLUFunctional, ConvBNSum, DenseBlock,
                      DepthwiseBlock, PoolBlock, TwoInputs, TwoOutputs, check_fusion,
                      check_quantize, make_net)

CONV = '_sg_mkldnn_conv'
FC = '_sg_mkldnn_fully_connected'

CASES = {
    'conv_bn_relu': (ConvBNAct, [(4, 3, 16, 16)],
                     [(CONV, ['Convolution', 'BatchNorm', 'Activation'])], [CONV]),
    'conv_bn_F.relu': (ConvBNReLUFunctional, [(4, 3, 16, 16)],
                       [(CONV, ['Convolution', 'BatchNorm', 'Activation'])], [CONV]),
    'residual_sum': (ConvBNSum, [(4, 3, 16, 16)],
                     [(CONV, ['Convolution', 'BatchNorm', 'elemwise_add', 'Activation'])], [CONV]),
    'concat': (ConcatBlock, [(4, 3, 16, 16)], [(CONV, ['Convolution'])],
               [CONV, '_contrib_quantized_concat']),
    'depthwise': (DepthwiseBlock, [(4, 3, 16, 16)],
                  [(CONV, ['Convolution', 'BatchNorm', 'Activation'])], [CONV]),
    'dense': (DenseBlock, [(8, 20)], [(FC, ['FullyConnected', 'Activation'])], [FC]),
    'pooling': (PoolBlock, [(4, 3, 16, 16)], [(CONV, ['Convolution', 'BatchNorm'])],
                [CONV, '_contrib_quantized_pooling', FC]),
    'two_inputs': (TwoInputs, [(4, 3, 16, 16), (4, 3, 16, 16)],
                   [(CONV, ['Convolution', 'BatchNorm'])], [CONV]),
    'two_outputs': (TwoOutputs, [(4, 3, 16, 16)],
                    [(CONV, ['Convolution', 'BatchNorm', 'elemwise_add'])], [CONV, FC]),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_fuse_and_quantize(case, tmp_path):
    cls, shapes, fused, int8_ops = CASES[case]
    net, inputs = make_net(cls, *shapes)
    check_fusion(net, inputs, fused)
    qnet = check_quantize(net, inputs, int8_ops, tmp_path)
    assert qnet.int8_layers


@pytest.mark.parametrize('mode', ['naive', 'entropy', 'percentile', 'mse', 'none'])
@pytest.mark.parametrize('granularity', ['tensor', 'channel'])
def test_modes_and_granularity(mode, granularity, tmp_path):
    net, inputs = make_net(ConvBNSum, (8, 3, 16, 16))
    check_quantize(net, inputs, [CONV], tmp_path, mode=mode, granularity=granularity,
                   min_cosine=0.98)


MUL = '_contrib_quantized_elemwise_mul'


def test_int8_multiply_stays_fp32_with_its_reason(tmp_path):
    """MXNet 1.9.1's INT8 elemwise_mul reads int8 only, casts a*b*scale to int8 without
    rounding or saturating (the op table measures it: a clipped value wraps around, and
    every value is half a step short); hard-swish's and a gate's multiplies stay FP32 and
    say why, and the rest of the network runs INT8."""
    from conftest import GatedReLU, HardSwish
    for cls in (HardSwish, GatedReLU):
        net, inputs = make_net(cls, (4, 3, 16, 16))
        qnet = check_quantize(net, inputs, [CONV], tmp_path, min_cosine=0.995)
        (mul,) = [l for l in qnet.layers if l.op == 'elemwise_mul']
        assert mul.dtype == 'fp32' and 'INT8 mul(' in mul.reason
        assert 'computes wrong values' in mul.reason or 'fails' in mul.reason


def test_relu_of_uint8_add_is_removed(tmp_path):
    """MXNet 1.9.1's INT8 Activation declares int8 output and never checks its input: fed
    the uint8 output of an INT8 add it read values above 127 as negative and zeroed them
    (se_resnext50's cosine fell to 0.77 from it). A ReLU of a uint8 tensor is the identity:
    it is taken out of the INT8 graph, and the layer table says why."""
    from conftest import SumOfReLUsReLU
    net, inputs = make_net(SumOfReLUsReLU, (4, 3, 16, 16))
    qnet = check_quantize(net, inputs, [CONV], tmp_path, min_cosine=0.999)  # was 0.9936
    (act,) = [l for l in qnet.layers if l.op == 'Activation']
    assert act.dtype == 'int8' and act.note.startswith('removed: the ReLU of a uint8 tensor')
    ops = [n['op'] for n in json.loads(qnet._cached_graph[1].tojson())['nodes']]
    assert '_contrib_quantized_act' not in ops


def test_two_nodes_of_one_name_quantize_and_skip_the_self_check(tmp_path):
    """GluonCV's DLA names six max-poolings 'pool0_fwd': the plan reads the graph node by
    node, not by name, and the self-check leaves out the nodes whose tensors it cannot
    tell apart instead of comparing one pooling's output with another's."""
    import mxnet as mx
    from mxnet.gluon import nn

    class SameNames(nn.HybridBlock):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.a, self.b = ConvBNAct(8), ConvBNAct(16)

        def hybrid_forward(self, F, x):
            x = F.Pooling(self.a(x), kernel=(2, 2), stride=(2, 2), pool_type='max', name='pool')
            return F.Pooling(self.b(x), kernel=(2, 2), stride=(2, 2), pool_type='max', name='pool')

    net, inputs = make_net(SameNames, (4, 3, 16, 16))
    qnet = check_quantize(net, inputs, [CONV, '_contrib_quantized_pooling'], tmp_path,
                          min_cosine=0.99)
    checked = {c.layer for c in qnet.self_check}
    assert checked and 'pool' not in checked  # a conv, not the poolings
    assert isinstance(qnet(*inputs), mx.nd.NDArray)
