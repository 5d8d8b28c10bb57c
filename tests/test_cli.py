"""The gluon-int8 command line over the library, on a tiny exported FP32 model."""
import mxnet as mx
import numpy as np

import gluon_int8
from gluon_int8.cli import main
from conftest import PoolBlock, make_net


def test_quantize_then_info(tmp_path, capsys):
    net, _ = make_net(PoolBlock, (2, 3, 16, 16))
    net.hybridize()
    data = mx.nd.random.uniform(-1, 1, shape=(16, 3, 16, 16))
    net(data)
    net.export(str(tmp_path / 'fp32'))
    np.save(str(tmp_path / 'calib.npy'), data.asnumpy())
    out = str(tmp_path / 'cq')
    assert main(['quantize', '--prefix', str(tmp_path / 'fp32'), '--calib-data',
                 str(tmp_path / 'calib.npy'), '--batch-size', '8', '--mode', 'naive',
                 '--exclude-operators', 'Pooling', '--out', out, '--quiet']) == 0
    qnet = gluon_int8.load(out)
    assert qnet.calib_table.mode == 'naive'
    assert all('exclude_operators' in why for why in qnet.fp32_layers.values())
    assert np.allclose(qnet(data).asnumpy(), net(data).asnumpy(), atol=0.05)
    assert main(['info', out]) == 0
    assert 'calibration: mode=naive' in capsys.readouterr().out


def test_bad_option_is_reported_not_raised(tmp_path, capsys):
    assert main(['info', str(tmp_path / 'missing')]) == 2
    assert "prefix: '" in capsys.readouterr().err


def test_bench_on_an_int8_export(tmp_path, capsys):
    net, inputs = make_net(PoolBlock, (4, 3, 16, 16))
    prefix = str(tmp_path / 'cq')
    gluon_int8.quantize_net(net, inputs[0]).export(prefix)
    assert main(['bench', '--prefix', prefix, '--input-shape', '3,16,16', '--batch', '4',
                 '--runs', '2', '--latency-runs', '2']) == 0
    out = capsys.readouterr().out
    assert '| int8 |' in out and 'img/s (batch 4)' in out
