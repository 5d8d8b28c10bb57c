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


def test_int8_mul_gets_int8_inputs(tmp_path):
    """MXNet 1.9.1's INT8 elemwise_mul reads int8 only; the uint8 gate of hard-swish used to
    stop it ("data type do not match specified type. Expected: unsigned char v.s. given
    char"). Its quantize node is made int8 and the multiply runs INT8."""
    from conftest import HardSwish
    net, inputs = make_net(HardSwish, (4, 3, 16, 16))
    qnet = check_quantize(net, inputs, [CONV, MUL], tmp_path, min_cosine=0.98)
    mul = [l for l in qnet.layers if l.op == 'elemwise_mul']
    assert [l.dtype for l in mul] == ['int8']


def test_mul_fed_uint8_gets_int8_inputs(tmp_path):
    """MXNet 1.9.1's INT8 multiply reads int8 only. Its input from a conv with a fused ReLU
    is uint8 whatever the ranges: a dequantize + int8 quantize pair converts it, and the
    gate's quantize node (1 + sigmoid >= 1: 'auto' would give uint8) is made int8. The
    layer table says so."""
    from conftest import GatedReLU
    net, inputs = make_net(GatedReLU, (4, 3, 16, 16))
    qnet = check_quantize(net, inputs, [CONV, MUL], tmp_path, min_cosine=0.995)
    (mul,) = [l for l in qnet.layers if l.op == 'elemwise_mul']
    assert mul.dtype == 'int8'
    assert 'uint8 input converted to int8' in mul.note and 'mul(u8,' in mul.note
    assert 'output range widened' in mul.note
    ops = [n['op'] for n in json.loads(qnet._cached_graph[1].tojson())['nodes']]
    assert ops.count('_contrib_dequantize') >= 1


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
