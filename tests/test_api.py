"""Tier 2: quantize_net's options, data forms, tables, exclusions and export/load."""
import logging
import os
import re

import mxnet as mx
import numpy as np
import pytest

import gluon_int8
from gluon_int8.collectors import Collector, LayerStats
from conftest import (ConvBNSum, PoolBlock, TwoInputs, as_list, cosine, make_net, node_ops)


@pytest.fixture
def pool_net():
    net, _ = make_net(PoolBlock, (2, 3, 16, 16))
    data = mx.nd.random.uniform(-1, 1, shape=(64, 3, 16, 16))
    return net, data


def assert_ranges_close(a, b):
    assert sorted(a) == sorted(b)
    np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-6)


def naive_ranges(net, calib_data, **kwargs):
    return gluon_int8.quantize_net(net, calib_data, mode='naive', **kwargs).calib_table.ranges


def test_every_calib_data_form_gives_the_same_table(pool_net):
    net, data = pool_net
    labels = mx.nd.zeros(64)
    loader = mx.gluon.data.DataLoader(mx.gluon.data.ArrayDataset(data, labels), batch_size=16)
    reference = naive_ranges(net, loader)
    assert naive_ranges(net, [data[i:i + 16].asnumpy() for i in range(0, 64, 16)]) == reference
    assert naive_ranges(net, [(data[i:i + 16], labels[i:i + 16]) for i in range(0, 64, 16)]) == reference
    assert naive_ranges(net, mx.io.NDArrayIter(data, labels, batch_size=16)) == reference
    assert naive_ranges(net, data) == reference
    assert naive_ranges(net, data.asnumpy().astype(np.float64)) == reference


def test_num_calib_batches_and_examples_limit_the_data(pool_net, caplog):
    net, data = pool_net
    batches = [data[i:i + 16] for i in range(0, 64, 16)]
    assert naive_ranges(net, batches, num_calib_batches=2) == naive_ranges(net, batches[:2])
    assert naive_ranges(net, batches, num_calib_examples=24) == naive_ranges(net, [data[:16], data[16:24]])
    with caplog.at_level(logging.WARNING):
        naive_ranges(net, batches, num_calib_batches=9)
    assert 'num_calib_batches=9' in caplog.text and 'ran out after 4' in caplog.text


def test_user_block_is_left_unchanged(pool_net):
    net, data = pool_net
    before = {k: v.data().asnumpy().copy() for k, v in net.collect_params().items()}
    out_before = net(data[:4]).asnumpy()
    gluon_int8.quantize_net(net, data[:32], mode='entropy')
    assert not net._active and not net._cached_graph
    for k, v in net.collect_params().items():
        np.testing.assert_array_equal(v.data().asnumpy(), before[k])
    np.testing.assert_array_equal(net(data[:4]).asnumpy(), out_before)


def test_any_batch_size_after_calibration(pool_net):
    net, data = pool_net
    qnet = gluon_int8.quantize_net(net, data[:32])
    for n in (1, 3, 17):
        out = qnet(data[:n])
        assert out.shape == (n, 10)
        assert cosine(out, net(data[:n])) > 0.99


def test_calib_table_save_and_reuse_without_data(pool_net, tmp_path):
    net, data = pool_net
    path = str(tmp_path / 't.json')
    qnet = gluon_int8.quantize_net(net, data[:32], calib_table=path)
    again = gluon_int8.quantize_net(net, calib_table=path)
    np.testing.assert_array_equal(qnet(data).asnumpy(), again(data).asnumpy())
    assert_ranges_close(again.calib_table.ranges, qnet.calib_table.ranges)


def test_calib_table_that_does_not_fit_is_refused(pool_net, tmp_path):
    net, data = pool_net
    path = str(tmp_path / 't.json')
    gluon_int8.quantize_net(net, data[:32], calib_table=path)
    other, _ = make_net(ConvBNSum, (2, 3, 16, 16))
    with pytest.raises(ValueError, match=r'does not belong to this network: it was '
                                         r'calibrated on another graph'):
        gluon_int8.quantize_net(other, calib_table=path)
    with pytest.raises(ValueError, match=r'has no range for layers \[.*sg_mkldnn'):
        gluon_int8.quantize_net(other, calib_table=path, allow_table_mismatch=True)


@pytest.mark.parametrize('param, value', [('exclude_layers', 5),
                                          ('exclude_layers_match', [r'^conv', 3]),
                                          ('exclude_operators', {'Pooling': 1})])
def test_exclusions_take_names_or_names_with_reasons(param, value):
    with pytest.raises(TypeError, match=r'%s: got %s; expected a list of str, or a dict of '
                                        r'str -> str' % (param, re.escape(repr(value)))):
        gluon_int8.api.validate(**{param: value})


def test_exclusions_by_name_pattern_and_op(pool_net, caplog):
    net, data = pool_net
    full = gluon_int8.quantize_net(net, data[:32])
    first_conv = full.int8_layers[0]
    inner = next(r.layers[0] for r in full.layers if r.name == first_conv)  # e.g. conv0_fwd
    by_name = gluon_int8.quantize_net(net, data[:32], exclude_layers=[inner])
    assert first_conv in by_name.fp32_layers
    assert by_name.fp32_layers[first_conv] == 'user: exclude_layers=%r' % inner
    with_reason = gluon_int8.quantize_net(net, data[:32], exclude_layers={inner: 'my reason'},
                                          exclude_operators={'Pooling': 'pools'})
    assert with_reason.fp32_layers[first_conv] == 'my reason (exclude_layers=%r)' % inner
    assert all(why == "pools (exclude_operators='Pooling')"
               for n, why in with_reason.fp32_layers.items() if n != first_conv)
    by_glob = gluon_int8.quantize_net(net, data[:32], exclude_layers_match=['*pool*'])
    assert any('pool' in n for n in by_glob.fp32_layers)
    by_regex = gluon_int8.quantize_net(net, data[:32], exclude_layers_match=[r'^sg_mkldnn_fully'])
    assert all(n.startswith('sg_mkldnn_fully') for n in by_regex.fp32_layers)
    assert by_regex.fp32_layers
    by_op = gluon_int8.quantize_net(net, data[:32], exclude_operators=['Convolution'])
    assert not any(r.op == '_sg_mkldnn_conv' and r.dtype == 'int8' for r in by_op.layers)
    with caplog.at_level(logging.WARNING):
        gluon_int8.quantize_net(net, data[:32], exclude_layers=['no_such_layer'])
    assert "'no_such_layer' matches no layer" in caplog.text


def test_custom_collector_ranges_are_used(pool_net):
    net, data = pool_net

    class Fixed(Collector):
        def __init__(self):
            self.names = set()

        def collect(self, name, op_name, arr):
            self.names.add(name)

        def finalize(self):
            return {n: LayerStats(-2.0, 2.0) for n in self.names}

    qnet = gluon_int8.quantize_net(net, data[:32], mode=Fixed)
    assert set(qnet.calib_table.ranges.values()) == {(-2.0, 2.0)}
    assert qnet.calib_table.mode == 'custom'


@pytest.mark.parametrize('dtype', ['int8', 'uint8', 'auto'])
def test_quantized_dtype_sets_the_quantize_nodes(pool_net, dtype):
    net, data = pool_net
    qnet = gluon_int8.quantize_net(net, data[:32], quantized_dtype=dtype)
    quantize_nodes = [attrs for op, _, attrs in node_ops(qnet._cached_graph[1])
                      if op == '_contrib_quantize_v2']
    # the input's quantize node comes first: the requested dtype, unless the op table
    # has its reader take int8 ('auto' pinned); the rest are u8 -> s8 conversions
    notes = ' '.join(r.note for r in qnet.layers)
    pinned = dtype == 'auto' and 'input quantized as int8' in notes
    assert quantize_nodes[0]['out_type'] == ('int8' if pinned else dtype)
    assert len(quantize_nodes) == 1 + notes.count('uint8 input converted to int8')
    assert all(a['out_type'] == 'int8' for a in quantize_nodes[1:])
    # uint8 clips the negative input pixels at the data quantize node, by request
    assert cosine(qnet(data), net(data)) > (0.9 if dtype == 'uint8' else 0.99)
    # ReLU outputs keep a non-negative range whatever the dtype (fused convs emit uint8)
    assert any(lo == 0 for lo, _ in qnet.calib_table.ranges.values())


def test_load_restores_table_and_summary(pool_net, tmp_path):
    net, data = pool_net
    qnet = gluon_int8.quantize_net(net, data[:32], exclude_operators=['Pooling'])
    prefix = str(tmp_path / 'cq_pool')
    written = qnet.export(prefix)
    assert sorted(os.path.basename(f) for f in written) == [
        'cq_pool-0000.params', 'cq_pool-quantization.json', 'cq_pool-symbol.json']
    loaded = gluon_int8.load(prefix)
    assert_ranges_close(loaded.calib_table.ranges, qnet.calib_table.ranges)
    assert loaded.fp32_layers == qnet.fp32_layers and loaded.int8_layers == qnet.int8_layers
    np.testing.assert_array_equal(loaded(data).asnumpy(), qnet(data).asnumpy())
    assert not [f for f in os.listdir(str(tmp_path)) if 'tmp' in f]


def test_two_inputs_from_a_loader_with_labels():
    net, inputs = make_net(TwoInputs, (8, 3, 16, 16), (8, 3, 16, 16))
    loader = mx.gluon.data.DataLoader(
        mx.gluon.data.ArrayDataset(inputs[0], inputs[1], mx.nd.zeros(8)), batch_size=4)
    qnet = gluon_int8.quantize_net(net, loader, progress=True)
    assert sorted(qnet.calib_table.ranges)[:2] == ['data0', 'data1']
    assert cosine(qnet(*inputs), net(*inputs)) > 0.99


def test_deferred_initialization_is_finished_by_the_first_batch():
    net = PoolBlock()
    net.initialize()
    data = mx.nd.random.uniform(shape=(8, 3, 16, 16))
    qnet = gluon_int8.quantize_net(net, data)
    assert qnet(data).shape == (8, 10)
