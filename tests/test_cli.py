"""The gluon-int8 command line over the library, on a tiny exported FP32 model."""
import json

import mxnet as mx
import numpy as np
import pytest

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


# ---------------------------------------------------------------------------------------
# User errors: one line naming the argument, exit status 2, no traceback (issue 14, case 10)
# ---------------------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    """An FP32 export, calibration data, and an INT8 export (with its FP32 reference)."""
    net, _ = make_net(PoolBlock, (2, 3, 16, 16))
    net.hybridize()
    data = mx.nd.random.uniform(-1, 1, shape=(16, 3, 16, 16))
    net(data)
    net.export(str(tmp_path / 'fp32'))
    np.save(str(tmp_path / 'calib.npy'), data.asnumpy())
    gluon_int8.quantize_net(net, data).export(str(tmp_path / 'cq'), fp32_reference=True)
    (tmp_path / 'a_file').write_text('not a folder')
    return tmp_path


def _one_line_error(argv, capsys, names):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    assert len(err.strip().splitlines()) == 1, err
    assert names in err, err


def test_quantize_of_a_missing_model(files, capsys):
    _one_line_error(['quantize', '--prefix', str(files / 'nothing'), '--calib-data',
                     str(files / 'calib.npy'), '--out', str(files / 'q')], capsys, '--prefix')


def test_quantize_with_an_empty_npz(files, capsys):
    np.savez(str(files / 'empty.npz'))
    _one_line_error(['quantize', '--prefix', str(files / 'fp32'), '--calib-data',
                     str(files / 'empty.npz'), '--out', str(files / 'q')], capsys,
                    "--calib-data: '%s' holds no arrays" % (files / 'empty.npz'))


def test_quantize_to_an_out_that_cannot_be_written(files, capsys):
    _one_line_error(['quantize', '--prefix', str(files / 'fp32'), '--calib-data',
                     str(files / 'calib.npy'), '--out', str(files / 'a_file' / 'q')], capsys,
                    '--out: ')


def test_quantize_pretrained_without_the_weights(files, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))  # an empty ~/.mxnet/models
    _one_line_error(['quantize', '--model', 'resnet18_v1', '--pretrained', '--calib-data',
                     'random', '--out', str(files / 'q')], capsys,
                    '--pretrained: the weights of')


@pytest.mark.parametrize('option', ['--batch-size', '--num-calib-batches'])
def test_quantize_with_a_negative_count(files, capsys, option):
    """--batch-size -4 reported 'got no batch'."""
    _one_line_error(['quantize', '--prefix', str(files / 'fp32'), '--calib-data',
                     str(files / 'calib.npy'), option, '-4', '--out', str(files / 'q')],
                    capsys, "argument %s: got '-4'; expected a positive int" % option)


@pytest.mark.parametrize('option', ['--png', '--json'])
def test_report_to_a_path_that_cannot_be_written(files, capsys, option):
    _one_line_error(['report', str(files / 'cq'), '--data', str(files / 'calib.npy'), option,
                     str(files / 'a_file' / 'r')], capsys, '%s: folder' % option)


@pytest.mark.parametrize('argv, names', [
    (['--input-shape', '5,16,16'], '--input-shape: the model does not take inputs of shape'),
    (['--input-shape', '3,x'], "argument --input-shape: expected comma-separated positive"),
    (['--batch', '0'], "argument --batch: got '0'; expected a positive int"),
])
def test_bench_with_bad_arguments(files, capsys, argv, names):
    _one_line_error(['bench', '--prefix', str(files / 'cq')] + argv, capsys, names)


def test_info_on_a_sidecar_without_data_names(files, capsys):
    path = files / 'cq-quantization.json'
    meta = json.loads(path.read_text())
    del meta['data_names']
    path.write_text(json.dumps(meta))
    _one_line_error(['info', str(files / 'cq')], capsys, "prefix: '%s'" % path)


def test_a_missing_subcommand_argument_is_one_line_too(capsys):
    _one_line_error(['info'], capsys, 'gluon-int8 info: error: the following arguments are '
                                      'required: prefix')
