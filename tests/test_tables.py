"""Calibration tables bound to their network, checked values, tiny activations and the
calib_table argument (issue 14, cases 4-8)."""
import json
import logging
import pathlib

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

import gluon_int8
from gluon_int8 import thresholds
from gluon_int8.collectors import HistogramCollector
from gluon_int8.trace import trace
from conftest import ConvBNAct, PoolBlock, cosine, make_net


@pytest.fixture
def net_and_data():
    net, _ = make_net(PoolBlock, (2, 3, 16, 16))
    return net, mx.nd.random.uniform(-1, 1, shape=(16, 3, 16, 16))


def _saved_table(net, data, tmp_path, **kwargs):
    path = str(tmp_path / 'table.json')
    gluon_int8.quantize_net(net, data, calib_table=path, **kwargs)
    return path


def _edit_table(path, edit):
    with open(path) as f:
        table = json.load(f)
    edit(table)
    with open(path, 'w') as f:
        json.dump(table, f)


# ---------------------------------------------------------------------------------------
# The fingerprint (case 4)
# ---------------------------------------------------------------------------------------

def _fingerprint(net, data):
    from gluon_int8.table import fingerprint
    traced = trace(net, [data])
    return fingerprint(traced.symbol, traced.arg_params, traced.aux_params)


def test_fingerprint_ignores_names_but_not_the_graph_or_a_weight(net_and_data):
    net, data = net_and_data
    first = _fingerprint(net, data)
    assert _fingerprint(net, data) == first  # traced again: other edge versions
    twin, _ = make_net(PoolBlock, (2, 3, 16, 16), seed=1)  # other layer names
    for mine, theirs in zip(net.collect_params().values(), twin.collect_params().values()):
        theirs.set_data(mine.data())
    assert _fingerprint(twin, data) == first
    graph, weights = first.split('-')
    weight = next(iter(twin.collect_params().values()))
    changed = weight.data().asnumpy()
    changed.flat[0] = np.nextafter(changed.flat[0], np.float32(np.inf))
    weight.set_data(mx.nd.array(changed))
    changed_graph, changed_weights = _fingerprint(twin, data).split('-')
    assert changed_graph == graph and changed_weights != weights
    narrow, _ = make_net(lambda: ConvBNAct(8), (2, 3, 16, 16))
    wide, _ = make_net(lambda: ConvBNAct(16), (2, 3, 16, 16))
    assert _fingerprint(narrow, data).split('-')[0] != _fingerprint(wide, data).split('-')[0]


def test_a_table_of_other_weights_is_refused_or_warned_about(net_and_data, tmp_path, caplog):
    """The issue: another network of the same structure accepted the table silently
    (output cosine 0.85)."""
    net, data = net_and_data
    path = _saved_table(net, data, tmp_path)
    other, _ = make_net(PoolBlock, (2, 3, 16, 16), seed=1)
    with pytest.raises(ValueError, match=r"calib_table: '.*table.json' does not belong to this "
                                         r"network: it was calibrated on other weights"):
        gluon_int8.quantize_net(other, calib_table=path)
    with caplog.at_level(logging.WARNING):
        qnet = gluon_int8.quantize_net(other, calib_table=path, allow_table_mismatch=True)
    assert 'calibrated on other weights' in caplog.text
    assert qnet(data).shape == (16, 10)
    gluon_int8.quantize_net(net, calib_table=path)  # its own network takes it


def test_a_table_of_another_graph_with_the_same_layer_names_is_refused(tmp_path):
    narrow, inputs = make_net(lambda: ConvBNAct(8), (4, 3, 16, 16))
    wide, _ = make_net(lambda: ConvBNAct(16), (4, 3, 16, 16))
    path = _saved_table(narrow, inputs[0], tmp_path)
    with pytest.raises(ValueError, match='it was calibrated on another graph'):
        gluon_int8.quantize_net(wide, calib_table=path)


def test_a_table_without_fingerprint_needs_the_option(net_and_data, tmp_path, caplog):
    net, data = net_and_data
    path = _saved_table(net, data, tmp_path)
    _edit_table(path, lambda t: t.pop('fingerprint'))
    with pytest.raises(ValueError, match='it carries no fingerprint of the network'):
        gluon_int8.quantize_net(net, calib_table=path)
    with caplog.at_level(logging.WARNING):
        gluon_int8.quantize_net(net, calib_table=path, allow_table_mismatch=True)
    assert 'carries no fingerprint' in caplog.text


def test_the_recorded_mode_and_dtype_are_compared(net_and_data, tmp_path):
    net, data = net_and_data
    path = _saved_table(net, data, tmp_path, mode='naive')
    with pytest.raises(ValueError, match=r"it was made with mode='naive'; this call has "
                                         r"mode='entropy'"):
        gluon_int8.quantize_net(net, calib_table=path)
    with pytest.raises(ValueError, match=r"it was made with quantized_dtype='auto'; this call "
                                         r"has quantized_dtype='int8'"):
        gluon_int8.quantize_net(net, mode='naive', quantized_dtype='int8', calib_table=path)
    again = gluon_int8.quantize_net(net, mode='naive', calib_table=path)
    assert again.calib_table.mode == 'naive'


def test_a_table_an_export_carries_is_bound_too(net_and_data, tmp_path):
    net, data = net_and_data
    qnet = gluon_int8.quantize_net(net, data)
    qnet.export(str(tmp_path / 'cq'))
    table = gluon_int8.load(str(tmp_path / 'cq')).calib_table
    assert table.fingerprint == qnet.calib_table.fingerprint == _fingerprint(net, data)
    other, _ = make_net(PoolBlock, (2, 3, 16, 16), seed=1)
    with pytest.raises(ValueError, match='calibrated on other weights'):
        gluon_int8.quantize_net(other, calib_table=table)


@pytest.mark.parametrize('bad, problem', [
    ([0.0, 0.0], 'zero width'),
    ([1.0, -1.0], r'inverted \(min > max\)'),
    ([float('nan'), 1.0], 'not finite'),
    ([-float('inf'), 1.0], 'not finite'),
    ([-1e30, 1e30], '1e\\+30 times wider than every value calibration observed'),
    ([-1e-7, 1e-7], 'narrower than 1e-05'),
])
def test_invalid_ranges_are_refused_naming_the_layer(net_and_data, tmp_path, bad, problem):
    """A [0, 0] range on the input gave an all-zero model; NaN and 1e30 were taken."""
    net, data = net_and_data
    path = _saved_table(net, data, tmp_path)

    def edit(table):
        table['layers']['data']['range'] = bad
    _edit_table(path, edit)
    with pytest.raises(ValueError, match=r"calib_table: '.*table.json': layer 'data' has range "
                                         r"\[.*\]: " + problem):
        gluon_int8.quantize_net(net, calib_table=path, allow_table_mismatch=True)


def test_a_signed_table_with_uint8_is_refused_at_build_time(net_and_data, tmp_path):
    """It built a model whose every call raised 'Expect int8 when data_min < 0.0'."""
    net, data = net_and_data
    path = _saved_table(net, data, tmp_path)
    with pytest.raises(ValueError, match=r"calib_table: '.*table.json': layers \['data'\] have "
                                         r"negative ranges.*quantized_dtype='uint8'"):
        gluon_int8.quantize_net(net, quantized_dtype='uint8', calib_table=path,
                                allow_table_mismatch=True)


# ---------------------------------------------------------------------------------------
# Tiny activations (case 5)
# ---------------------------------------------------------------------------------------

class Tiny(nn.HybridBlock):
    """No BatchNorm and zero biases: every activation scales with the input."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.a = nn.Conv2D(16, 3, padding=1, activation='relu')
        self.b = nn.Conv2D(8, 3, padding=1)

    def hybrid_forward(self, F, x):
        return self.b(self.a(x))


@pytest.fixture(scope='module')
def tiny():
    mx.random.seed(0)
    net = Tiny()
    net.initialize(mx.init.Xavier(magnitude=2.0))
    data = mx.nd.random.uniform(-1, 1, shape=(16, 3, 16, 16))
    net(data)
    return net, data


@pytest.mark.parametrize('scale', [1e-7, 1e-37])
def test_tiny_activations_are_warned_about_naming_the_layers(tiny, scale, caplog):
    """Thresholds are floored at 1e-5: at 1e-7 the INT8 cosine was 0.34 here (0.70 in the
    issue), at 1e-37 nothing survives, and nobody was told."""
    net, data = tiny
    x = data * scale
    with caplog.at_level(logging.WARNING):
        qnet = gluon_int8.quantize_net(net, x, mode='naive')
    assert "calibrated values below 1e-05" in caplog.text
    for layer in ('data', 'sg_mkldnn_conv_act_0_output', 'sg_mkldnn_conv_1_output'):
        assert "'%s'" % layer in caplog.text
    assert qnet(x).shape == (16, 8, 16, 16)


def test_activations_above_the_floor_quantize_well_and_silently(tiny, caplog):
    net, data = tiny
    x = data * 1e-4
    with caplog.at_level(logging.WARNING):
        qnet = gluon_int8.quantize_net(net, x, mode='naive')
    assert 'below 1e-05' not in caplog.text
    assert cosine(qnet(x), net(x)) > 0.999


def test_mxnet_int8_kernels_cannot_run_below_the_floor(tiny, monkeypatch):
    """Why warn instead of scaling: without the floor, MXNet 1.9.1's INT8 graph outputs
    zeros at 1e-7 (its kernels stop resolving ranges below about 1e-6)."""
    net, data = tiny
    x = data * 1e-7
    monkeypatch.setattr(thresholds, 'MIN_THRESHOLD', 1e-45)
    qnet = gluon_int8.quantize_net(net, x, mode='naive')
    assert qnet.calib_table.ranges['data'][1] == pytest.approx(float(x.abs().max().asscalar()))
    assert np.abs(qnet(x).asnumpy()).max() == 0


# ---------------------------------------------------------------------------------------
# The calib_table argument (cases 6 and 9) and num_bins (case 8)
# ---------------------------------------------------------------------------------------

def test_a_path_like_table_is_saved(net_and_data, tmp_path):
    net, data = net_and_data
    path = tmp_path / 'table.json'
    qnet = gluon_int8.quantize_net(net, data, calib_table=path)
    assert path.is_file()
    again = gluon_int8.quantize_net(net, calib_table=pathlib.Path(path))
    np.testing.assert_array_equal(again(data).asnumpy(), qnet(data).asnumpy())


def test_a_table_object_with_data_is_an_error(net_and_data):
    net, data = net_and_data
    table = gluon_int8.quantize_net(net, data).calib_table
    with pytest.raises(ValueError, match=r'calib_table: got a CalibrationTable together with '
                                         r'calib_data'):
        gluon_int8.quantize_net(net, data, calib_table=table)
    with pytest.raises(TypeError, match=r'calib_table: got int; expected a path'):
        gluon_int8.quantize_net(net, data, calib_table=3)


def test_a_table_path_that_cannot_be_written_is_refused_before_calibrating(net_and_data,
                                                                          tmp_path):
    net, data = net_and_data
    seen = []

    def batches():
        for i in range(0, 16, 4):
            seen.append(i)
            yield data[i:i + 4]
    with pytest.raises(ValueError, match=r"calib_table: folder '.*missing' of '.*table.json' "
                                         r"does not exist"):
        gluon_int8.quantize_net(net, batches(), calib_table=tmp_path / 'missing' / 'table.json')
    assert seen == []


def test_a_failed_table_write_names_the_file(net_and_data, tmp_path):
    net, data = net_and_data
    table = gluon_int8.quantize_net(net, data).calib_table
    with pytest.raises(OSError, match=r"calib_table: cannot write '.*missing.*table.json'"):
        table.save(tmp_path / 'missing' / 'table.json')


@pytest.mark.parametrize('num_bins', [1000, 8001])
def test_num_bins_must_be_a_power_of_two(net_and_data, num_bins):
    """1000 or MXNet's 8001 crashed mid-calibration with numpy's reshape error."""
    net, _ = net_and_data
    batches = [mx.nd.random.uniform(-1, 1, shape=(4, 3, 16, 16)) * s for s in (1, 3, 10, 30)]
    with pytest.raises(ValueError, match=r'num_bins: got %d; expected a power of two >= 256'
                                         % num_bins):
        gluon_int8.quantize_net(net, batches, num_bins=num_bins)
    with pytest.raises(ValueError, match=r'num_bins: got %d; expected a power of two >= 256'
                                         % num_bins):
        HistogramCollector(num_bins=num_bins)
