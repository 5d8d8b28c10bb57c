"""Tier 2: every bad input gets an exception naming the parameter, value and what is allowed."""
import logging

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

import gluon_int8
from conftest import ConvBNSum, PoolBlock, make_net


@pytest.fixture
def net_and_data():
    net, _ = make_net(PoolBlock, (2, 3, 16, 16))
    return net, mx.nd.random.uniform(-1, 1, shape=(16, 3, 16, 16))


def test_empty_calib_data(net_and_data):
    net, _ = net_and_data
    with pytest.raises(ValueError, match='calib_data: got no batch'):
        gluon_int8.quantize_net(net, [])


def test_wrong_batch_shape(net_and_data):
    net, _ = net_and_data
    with pytest.raises(ValueError, match=r'calib_data: batch 0 with shapes \[\(4, 5, 16, 16\)\]'):
        gluon_int8.quantize_net(net, [mx.nd.ones((4, 5, 16, 16))])


def test_wrong_batch_dtype(net_and_data):
    net, _ = net_and_data
    with pytest.raises(ValueError, match='calib_data: batch 0 input 0 has dtype uint8'):
        gluon_int8.quantize_net(net, [np.zeros((4, 3, 16, 16), dtype=np.uint8)])
    with pytest.raises(TypeError, match='calib_data: batch 0 input 0 is a str'):
        gluon_int8.quantize_net(net, ['not an array'])


@pytest.mark.parametrize('param, value, allowed', [
    ('mode', 'kl', "'naive', 'entropy', 'percentile', 'mse', 'none'"),
    ('quantized_dtype', 'fp8', "'auto', 'int8', 'uint8'"),
    ('granularity', 'channel-wise', "'tensor', 'channel'"),
    ('quantize_mode', 'fast', "'full', 'smart'"),
    ('percentile', 101, '(0, 100]'),
    ('num_calib_batches', 0, 'positive int'),
])
def test_unknown_option_values(net_and_data, param, value, allowed):
    net, data = net_and_data
    with pytest.raises(ValueError) as err:
        gluon_int8.quantize_net(net, data, **{param: value})
    assert str(err.value).startswith(param + ': got %r' % (value,))
    assert allowed in str(err.value)


# bias_correction's is in test_biascorr.py
@pytest.mark.parametrize('param', ['allow_table_mismatch', 'for_onnx'])
def test_a_flag_takes_only_a_bool(net_and_data, param):
    net, data = net_and_data
    with pytest.raises(TypeError, match="^%s: got 'yes'; expected True or False$" % param):
        gluon_int8.quantize_net(net, data, **{param: 'yes'})


def test_mode_that_needs_data_without_data(net_and_data):
    net, _ = net_and_data
    with pytest.raises(ValueError, match="calib_data: got None, but mode='entropy' needs"):
        gluon_int8.quantize_net(net)
    assert gluon_int8.quantize_net(net, mode='none').calib_table is None


def test_fewer_batches_than_asked_warns_and_carries_on(net_and_data, caplog):
    net, data = net_and_data
    with caplog.at_level(logging.WARNING):
        qnet = gluon_int8.quantize_net(net, [data], num_calib_batches=5)
    assert 'ran out after 1 batch' in caplog.text
    assert qnet(data).shape == (16, 10)


def test_nan_in_a_layer_output_names_the_layer(net_and_data):
    net, data = net_and_data
    before = {k: v.data().asnumpy().copy() for k, v in net.collect_params().items()}
    # the FC head: a NaN there is not swallowed by a fused ReLU
    weight = [p for n, p in net.collect_params().items() if n.endswith('weight')][-1]
    bad = weight.data().copy()
    bad[0] = np.nan
    weight.set_data(bad)
    with pytest.raises(ValueError, match=r"layer 'sg_mkldnn_fully_connected_0_output' produced "
                                         r"NaN or Inf on calibration batch 0"):
        gluon_int8.quantize_net(net, data)
    weight.set_data(mx.nd.array(before[weight.name]))
    with pytest.raises(ValueError, match=r"layer 'data' produced NaN or Inf"):
        gluon_int8.quantize_net(net, data * np.inf)


def test_all_zero_layer_quantizes_sanely():
    net, inputs = make_net(ConvBNSum, (4, 3, 16, 16))
    for name, param in net.collect_params().items():
        if name.endswith('gamma') or name.endswith('beta'):
            param.set_data(mx.nd.zeros(param.shape))  # every BN output is exactly 0
    qnet = gluon_int8.quantize_net(net, inputs[0])
    out = qnet(inputs[0]).asnumpy()
    assert np.isfinite(out).all() and np.abs(out).max() == 0
    assert all(hi > 0 for _, hi in qnet.calib_table.ranges.values())


def test_block_that_cannot_be_hybridized():
    class NotHybrid(nn.HybridBlock):
        def __init__(self):
            super().__init__()
            self.fc = nn.Dense(4)

        def hybrid_forward(self, F, x):
            return self.fc(x) * float(x.asnumpy().mean())

    net = NotHybrid()
    net.initialize()
    net(mx.nd.ones((2, 3)))
    with pytest.raises(ValueError, match='block: NotHybrid cannot be hybridized'):
        gluon_int8.quantize_net(net, mx.nd.ones((2, 3)))
    with pytest.raises(TypeError, match='block: expected a gluon HybridBlock, got Sequential'):
        seq = nn.Sequential()
        seq.add(nn.Dense(2))
        seq.initialize()
        gluon_int8.quantize_net(seq, mx.nd.ones((2, 3)))


def test_export_path_that_cannot_be_written(net_and_data, tmp_path):
    net, data = net_and_data
    qnet = gluon_int8.quantize_net(net, data)
    with pytest.raises(ValueError, match='prefix: folder .*no_such_dir.* does not exist'):
        qnet.export(str(tmp_path / 'no_such_dir' / 'cq'))
    (tmp_path / 'a_file').write_text('x')
    with pytest.raises(ValueError, match='prefix: folder .*a_file.* does not exist'):
        qnet.export(str(tmp_path / 'a_file' / 'cq'))


@pytest.mark.parametrize('suffix', ['-symbol.json', '-0000.params', '-quantization.json'])
def test_truncated_export_is_refused_by_load(net_and_data, tmp_path, suffix):
    net, data = net_and_data
    prefix = str(tmp_path / 'cq')
    gluon_int8.quantize_net(net, data).export(prefix)
    path = prefix + suffix
    with open(path, 'rb') as f:
        content = f.read()
    with open(path, 'wb') as f:
        f.write(content[:len(content) // 2])
    with pytest.raises(ValueError, match=r"prefix: '.*cq%s' is truncated or corrupted" % suffix):
        gluon_int8.load(prefix)


def test_load_of_missing_files(tmp_path):
    with pytest.raises(ValueError, match="prefix: '.*nothing' has no file"):
        gluon_int8.load(str(tmp_path / 'nothing'))


def test_a_tuple_of_data_and_labels_is_explained(net_and_data):
    """calib_data=(X, y) was reported as 'batch 1 with shapes [(16,)] does not fit'."""
    net, data = net_and_data
    with pytest.raises(ValueError, match=r'calib_data: got a tuple of 2 arrays with shapes '
                                         r'\[\(16, 3, 16, 16\), \(16,\)\]; a tuple or list is '
                                         r'read as a sequence of batches'):
        gluon_int8.quantize_net(net, (data.asnumpy(), np.zeros(16, np.float32)))


def test_mxnet_errors_keep_their_first_real_line(net_and_data, tmp_path):
    """MXNet's messages start with 'Traceback (most recent call last):', and that line
    alone was quoted: "is truncated or corrupted (Traceback (most recent call last):)"."""
    import json
    net, data = net_and_data
    prefix = str(tmp_path / 'cq')
    gluon_int8.quantize_net(net, data).export(prefix)
    with open(prefix + '-quantization.json') as f:  # an export made before manifests
        meta = json.load(f)
    meta = {k: v for k, v in meta.items() if k not in ('files', 'checksum')}
    meta['format_version'] = 1
    with open(prefix + '-quantization.json', 'w') as f:
        json.dump(meta, f)
    with open(prefix + '-0000.params', 'rb') as f:
        content = f.read()
    with open(prefix + '-0000.params', 'wb') as f:
        f.write(content[:len(content) // 2])
    with pytest.raises(ValueError) as err:
        gluon_int8.load(prefix)
    assert 'cq-0000.params\' is truncated or corrupted (' in str(err.value)
    assert 'Traceback' not in str(err.value) and 'Check failed' in str(err.value)
