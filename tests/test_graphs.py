"""Tier 2: fusion and quantization of tiny inline HybridBlocks."""
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
