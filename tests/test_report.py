"""Per-layer report: figures against numpy oracles, rows, reasons, JSON, PNG, export, CLI."""
import json
import math
import os

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

import gluon_int8
from gluon_int8 import op_table
from gluon_int8.cli import main
from gluon_int8.report import LayerRow, Report
from conftest import ConvBNAct, PoolBlock, ShuffleBlock, make_net


def sqnr_cos(ref, val):
    """The oracle: both figures straight from the definitions, in float64."""
    ref, val = np.asarray(ref, np.float64).ravel(), np.asarray(val, np.float64).ravel()
    sqnr = 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - val) ** 2))
    return sqnr, float(ref @ val / np.sqrt((ref @ ref) * (val @ val)))


def batches_of(array, size=32):
    return [array[i:i + size] for i in range(0, len(array), size)]


@pytest.fixture
def dense():
    """One Dense layer without bias (its INT8 output is float: dequantize fused)."""
    mx.random.seed(0)
    net = nn.Dense(6, use_bias=False)
    net.initialize(mx.init.Xavier())
    x = np.random.RandomState(0).normal(size=(96, 20)).astype(np.float32)
    net(mx.nd.array(x))
    return net, x


def test_dense_figures_match_a_numpy_simulation_of_the_int8_kernel(dense):
    net, x = dense
    qnet = gluon_int8.quantize_net(net, batches_of(x), mode='naive', granularity='tensor')
    report = qnet.report(batches_of(x))
    # simulate: data quantized at 127.5 / T (MXNet's kInt8Range), the stored int8 weights
    # read at 127.5 / max|W|, float output
    params = {p.name: p.data().asnumpy() for p in qnet.collect_params().values()}
    name = next(k for k in params if k.endswith('weight_quantize'))
    w_range = max(abs(params[name + '_min'][0]), abs(params[name + '_max'][0]))
    t_data = qnet.calib_table.ranges['data'][1]
    x_q = np.clip(np.rint(x.astype(np.float64) * 127.5 / t_data), -128, 127)
    simulated = (x_q @ params[name].astype(np.float64).T) * (t_data / 127.5) * (w_range / 127.5)
    np.testing.assert_allclose(qnet(mx.nd.array(x)).asnumpy(), simulated, rtol=0, atol=1e-5)
    fp32 = x.astype(np.float64) @ net.weight.data().asnumpy().astype(np.float64).T
    sqnr, cos = sqnr_cos(fp32, simulated)
    (row,) = report.rows
    assert row.sqnr_db == pytest.approx(sqnr, abs=1e-4)
    assert row.cosine == pytest.approx(cos, abs=1e-9)
    assert 35 < row.sqnr_db < 45  # int8 data x int8 weights, 20 terms
    assert (row.dtype, row.out, row.granularity) == ('int8', 'f32', 'tensor')
    assert (report.num_batches, report.num_examples) == (3, 96)


def test_conv_relu_output_is_uint8_on_the_calibrated_grid():
    net, _ = make_net(ConvBNAct, (2, 3, 12, 12))
    x = mx.nd.random.uniform(-1, 1, shape=(48, 3, 12, 12))
    qnet = gluon_int8.quantize_net(net, x, mode='entropy')
    report = qnet.report(x, num_batches=2)  # 2 batches of 32: 48 examples
    (row,) = report.rows
    lo, hi = qnet.calib_table.ranges[row.name + '_output']
    assert (row.out, row.range, row.threshold) == ('u8', (lo, hi), hi) and lo == 0.0
    # the network output is the dequantized uint8 layer output: on the grid T / 255.5,
    # T the range written into the graph (twice the threshold on a CPU without VNNI)
    out = qnet(x).asnumpy().astype(np.float64)
    codes = out * 255.5 / (hi * op_table.uint8_range_factor())
    np.testing.assert_allclose(codes, np.rint(codes), atol=1e-3)
    assert codes.min() >= 0 and codes.max() <= 255 + 1e-3
    sqnr, cos = sqnr_cos(net(x).asnumpy(), out)
    assert row.sqnr_db == pytest.approx(sqnr, abs=1e-4)
    assert row.cosine == pytest.approx(cos, abs=1e-9)
    assert report.num_examples == 48


def test_an_inner_layer_matches_the_same_layer_quantized_alone():
    mx.random.seed(3)
    net = nn.HybridSequential()
    net.add(nn.Conv2D(8, 3), nn.Conv2D(8, 3))
    net.initialize()
    x = mx.nd.random.uniform(-1, 1, shape=(32, 3, 12, 12))
    net(x)
    report = gluon_int8.quantize_net(net, x, mode='naive').report(x)
    first = report.rows[0]
    # naive ranges of data and of the first conv are the same in the one-layer network,
    # whose output is that layer's int8 output dequantized
    alone = gluon_int8.quantize_net(net[0], x, mode='naive')
    sqnr, cos = sqnr_cos(net[0](x).asnumpy(), alone(x).asnumpy())
    assert first.out == 's8' and first.range[0] == -first.range[1]
    assert first.sqnr_db == pytest.approx(sqnr, abs=1e-4)
    assert first.cosine == pytest.approx(cos, abs=1e-9)
    assert report.rows[1].sqnr_db < first.sqnr_db  # error accumulates


def test_layout_ops_on_int8_are_read_with_the_range_they_carry():
    """A channel shuffle runs on the int8 tensor (no min/max outputs of its own): its rows
    are INT8 with the SQNR of the conv output they move, which they do not change."""
    net, x = make_net(ShuffleBlock, (4, 3, 8, 8))
    qnet = gluon_int8.quantize_net(net, [x], mode='naive')
    rows = {r.name: r for r in qnet.report([x]).rows}
    layout = [r for r in rows.values() if r.op in ('Reshape', 'SwapAxis')]
    assert len(layout) == 3 and all(r.dtype == 'int8' and r.out in ('s8', 'u8') for r in layout)
    conv = next(r for r in rows.values() if r.op == '_sg_mkldnn_conv' and r.dtype == 'int8')
    assert conv.sqnr_db > 30
    assert all(r.sqnr_db == pytest.approx(conv.sqnr_db, abs=1e-6) for r in layout)


def test_rows_cover_the_layers_and_fp32_layers_say_why():
    net, _ = make_net(PoolBlock, (2, 3, 16, 16))
    x = mx.nd.random.uniform(-1, 1, shape=(32, 3, 16, 16))
    full = gluon_int8.quantize_net(net, x)
    pool = next(r.name for r in full.layers if r.op == 'Pooling')
    qnet = gluon_int8.quantize_net(net, x, exclude_layers=[pool])
    report = qnet.report(x)
    assert [r.name for r in report.rows] == [r.name for r in qnet.layers]
    assert [r.op for r in report.rows] == [r.op for r in qnet.layers]
    (fp32,) = [r for r in report.rows if r.dtype == 'fp32']
    assert fp32.name == pool and fp32.out == 'f32'
    assert fp32.reason == "user: exclude_layers=%r" % pool
    for row in report.rows:
        assert 25 < row.sqnr_db < 60 and 0.99 < row.cosine <= 1.0
    weighted = {r.name: r.granularity for r in report.rows if r.op.startswith('_sg_mkldnn')}
    assert set(weighted.values()) <= {'channel', 'tensor'} and len(weighted) == 3
    assert all(r.granularity == '-' for r in report.rows if r.name not in weighted)
    assert pool in report.table() and 'exclude_layers' in report.table()


def test_json_round_trip_and_png(tmp_path):
    net, _ = make_net(PoolBlock, (2, 3, 16, 16))
    x = mx.nd.random.uniform(-1, 1, shape=(16, 3, 16, 16))
    report = gluon_int8.quantize_net(net, x, exclude_operators=['Pooling']).report(x)
    report.rows.append(LayerRow('same', 'Flatten', 'int8', 'u8', '-', None, None, None,
                                math.inf, 1.0))
    path = str(tmp_path / 'r.json')
    text = report.to_json(path)
    assert Report.from_dict(json.loads(text)) == report
    with open(path) as f:
        assert Report.from_dict(json.load(f)) == report
    assert json.loads(text)['layers'][-1]['sqnr_db'] == 'inf'
    png = report.save_png(str(tmp_path / 'r.png'))
    with open(png, 'rb') as f:
        head = f.read(8)
    assert head == b'\x89PNG\r\n\x1a\n' and os.path.getsize(png) > 5000
    with pytest.raises(ValueError, match='report: not a gluon-int8 report'):
        Report.from_dict({'layers': []})


def test_a_loaded_export_reports_the_same(tmp_path):
    net, _ = make_net(PoolBlock, (2, 3, 16, 16))
    x = mx.nd.random.uniform(-1, 1, shape=(32, 3, 16, 16))
    qnet = gluon_int8.quantize_net(net, x)
    prefix = str(tmp_path / 'cq')
    qnet.export(prefix, fp32_reference=True)
    assert gluon_int8.load(prefix).report(x) == qnet.report(x)
    # the FP32 extras live in their own file: plain MXNet still loads the export
    plain = mx.gluon.SymbolBlock.imports(prefix + '-symbol.json', ['data'], prefix + '-0000.params')
    np.testing.assert_array_equal(plain(x).asnumpy(), qnet(x).asnumpy())
    qnet.export(str(tmp_path / 'bare'), fp32_reference=False)
    with pytest.raises(ValueError, match='qnet: this QuantizedBlock carries no FP32 graph'):
        gluon_int8.load(str(tmp_path / 'bare')).report(x)


def test_fp32_reference_holds_copies_not_the_users_arrays(dense):
    net, x = dense
    qnet = gluon_int8.quantize_net(net, x, mode='naive')
    (name,) = qnet.fp32_graph.params
    assert name == net.weight.name
    before = qnet.report(x)
    net.weight.set_data(net.weight.data() * 2)  # the user goes on training
    assert qnet.report(x) == before


def test_bad_report_arguments():
    net, _ = make_net(ConvBNAct, (2, 3, 12, 12))
    x = mx.nd.random.uniform(-1, 1, shape=(8, 3, 12, 12))
    qnet = gluon_int8.quantize_net(net, x)
    with pytest.raises(ValueError, match='data: got no batch'):
        qnet.report([])
    with pytest.raises(ValueError, match=r'num_batches: got 0; expected a positive int'):
        qnet.report(x, num_batches=0)
    with pytest.raises(ValueError, match=r'data: batch 0 with shapes \[\(2, 5, 12, 12\)\]'):
        qnet.report(mx.nd.ones((2, 5, 12, 12)))


def test_cli_report(tmp_path, capsys):
    net, _ = make_net(PoolBlock, (2, 3, 16, 16))
    x = mx.nd.random.uniform(-1, 1, shape=(24, 3, 16, 16))
    qnet = gluon_int8.quantize_net(net, x)
    prefix = str(tmp_path / 'cq')
    qnet.export(prefix, fp32_reference=True)
    np.save(str(tmp_path / 'x.npy'), x.asnumpy())
    out_json, out_png = str(tmp_path / 'r.json'), str(tmp_path / 'r.png')
    assert main(['report', prefix, '--data', str(tmp_path / 'x.npy'), '--batch-size', '8',
                 '--json', out_json, '--png', out_png]) == 0
    printed = capsys.readouterr().out
    assert 'SQNR dB' in printed and '(24 examples in 3 batches)' in printed
    with open(out_json) as f:
        saved = Report.from_dict(json.load(f))
    expected = qnet.report([x[i:i + 8] for i in range(0, 24, 8)])
    assert [r.sqnr_db for r in saved.rows] == pytest.approx([r.sqnr_db for r in expected.rows])
    assert os.path.getsize(out_png) > 5000
    assert main(['report', prefix, '--data', str(tmp_path / 'missing.npy')]) == 2
    assert "--data: no such file" in capsys.readouterr().err
