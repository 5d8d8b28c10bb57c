"""The gluon-int8 command line over the library, on a tiny exported FP32 model, and the
reference article's quantize/evaluate flow on an image folder and a .rec."""
import json
import re

import mxnet as mx
import numpy as np
import pytest

import gluon_int8
from gluon_int8 import zoo
from gluon_int8.cli import main
from gluon_int8.datasets import PREPROCESS, ImageSource
from gluon_int8.evaluation import evaluate, load_model
from gluon_int8_samples import fashion_mnist as fm
from conftest import PoolBlock, exported_pool_net, make_net
from image_sets import write_image_sets


def test_quantize_then_info(tmp_path, capsys):
    net, data = exported_pool_net(tmp_path)
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


# -- the reference article's classification flow on images the tests write ------------

FASHION_FLAGS = ['--resize', '0', '--crop', '0', '--channels', '1', '--mean', str(fm.MEAN),
                 '--std', str(fm.STD)]


@pytest.fixture(scope='module')
def image_sets(tmp_path_factory):
    return write_image_sets(str(tmp_path_factory.mktemp('images')), 96)


@pytest.fixture(scope='module')
def fp32_prefix(tmp_path_factory):
    net = fm.get_model('resnet')
    net.hybridize()
    net(mx.nd.zeros((1,) + fm.INPUT_SHAPE))
    prefix = str(tmp_path_factory.mktemp('fp32') / 'fashion_resnet')
    net.export(prefix)
    return prefix


def printed_accuracy(out):
    """{'top1': '93.75%', ...} from the evaluate command's line."""
    return dict(re.findall(r'(top\d+) (\d+\.\d\d%)', out))


def test_quantize_from_a_folder_evaluate_from_a_rec_equals_the_array_path(
        image_sets, fp32_prefix, tmp_path, capsys):
    out = str(tmp_path / 'cq_resnet')
    assert main(['quantize', '--prefix', fp32_prefix, '--calib-data', image_sets['folder'],
                 '--num-calib-batches', '2', '--batch-size', '32', '--mode', 'entropy',
                 '--out', out, '--quiet', '--with-fp32-reference'] + FASHION_FLAGS) == 0
    assert main(['report', out, '--data', image_sets['rec'], '--num-batches', '1']
                + FASHION_FLAGS) == 0  # the per-layer report reads a .rec too
    assert 'SQNR' in capsys.readouterr().out
    images, labels = fm.normalize(image_sets['raw']), image_sets['labels']
    for prefix in (fp32_prefix, out):  # FP32 and INT8 the same way
        expected = evaluate(load_model(prefix), (images, labels), 'top1,top5').accuracy
        for data in (image_sets['rec'], image_sets['folder']):
            assert main(['evaluate', '--prefix', prefix, '--data', data, '--metric',
                         'top1,top5', '--quiet'] + FASHION_FLAGS) == 0
            line = capsys.readouterr().out
            assert '(96 images)' in line
            assert printed_accuracy(line) == {k: '%.2f%%' % (100 * v)
                                              for k, v in expected.items()}, (prefix, data)
    assert gluon_int8.load(out).calib_table.mode == 'entropy'


def test_evaluate_benchmark_and_its_errors(image_sets, fp32_prefix, capsys):
    assert main(['evaluate', '--prefix', fp32_prefix, '--benchmark', '--input-shape', '1,28,28',
                 '--batch-size', '4', '--runs', '2', '--latency-runs', '2']) == 0
    out = capsys.readouterr().out
    assert re.search(r'latency \d+\.\d\d ms \(batch 1\), throughput \d+\.\d img/s \(batch 4\)',
                     out)
    for args, message in (
            (['--benchmark'] + FASHION_FLAGS, '--input-shape: needed for --benchmark'),
            (['--data', image_sets['flat']] + FASHION_FLAGS, 'flat folder'),
            (['--data', image_sets['rec'], '--channels', '1'], '--mean: got'),
            (['--data', image_sets['rec'], '--metric', 'top1,acc'] + FASHION_FLAGS,
             "metric: got 'acc'"),
            ([], '--data: not given')):
        assert main(['evaluate', '--prefix', fp32_prefix] + args) == 2, args
        assert message in capsys.readouterr().err


def test_quantize_model_goes_through_the_zoo_preset(image_sets, tmp_path, monkeypatch):
    calls = []

    def fake_get_model(name, **kwargs):
        calls.append((name, kwargs))
        net, inputs = make_net(PoolBlock, (2, 3, 16, 16))
        return gluon_int8.quantize_net(net, inputs[0], mode='naive')

    monkeypatch.setattr(zoo, 'get_model', fake_get_model)
    base = ['quantize', '--model', 'ssd_300_vgg16_atrous_voc', '--calib-data',
            image_sets['folder'], '--batch-size', '8', '--out', str(tmp_path / 'cq'), '--quiet']
    assert main(base) == 0
    assert main(base + ['--quantize-mode', 'full', '--mode', 'percentile', '--percentile',
                        '99.9', '--num-bins', '2048', '--seed', '3']) == 0
    assert main(base + ['--format', 'onnx']) == 0
    (name, preset), (_, given), (_, onnx) = calls
    # the preset chooses the stem for MXNet; ONNX runtimes have kernels of their own
    assert preset['exclude_stem'] is None and onnx['exclude_stem'] is False
    assert name == 'ssd_300_vgg16_atrous_voc'
    source = preset['calib_data']
    assert isinstance(source, ImageSource) and source.shuffle and source.seed == 0
    assert source.preprocess == PREPROCESS['ssd_300'] and source.batch_size == 8
    assert 'quantize_mode' not in preset['quantize_kwargs']  # the preset's 'smart' holds
    assert given['mode'] == 'percentile' and given['calib_data'].seed == 3
    assert {k: given['quantize_kwargs'][k] for k in ('quantize_mode', 'percentile', 'num_bins')} \
        == {'quantize_mode': 'full', 'percentile': 99.9, 'num_bins': 2048}


@pytest.mark.slow
def test_the_article_commands_on_a_zoo_model(image_sets, tmp_path, capsys):
    """The reference flow verbatim on a small zoo model (random weights): 224x224 ImageNet
    preprocessing of the 28x28 grayscale PNGs, preset options, progress bars."""
    out = str(tmp_path / 'cq_mobilenet')
    assert main(['quantize', '--model', 'mobilenet0.25', '--calib-data', image_sets['folder'],
                 '--num-calib-batches', '2', '--batch-size', '16', '--mode', 'entropy',
                 '--out', out]) == 0
    qnet = gluon_int8.load(out)
    assert len(qnet.int8_layers) > 20 and qnet.calib_table.mode == 'entropy'
    lines = []
    for data in (image_sets['rec'], image_sets['folder']):
        capsys.readouterr()
        assert main(['evaluate', '--prefix', out, '--data', data, '--metric', 'top1,top5']) == 0
        lines.append(capsys.readouterr())
    assert '(96 images)' in lines[0].out and 'evaluate' in lines[0].err  # the progress bar
    assert printed_accuracy(lines[0].out) == printed_accuracy(lines[1].out)
# ---------------------------------------------------------------------------------------
# User errors: one line naming the argument, exit status 2, no traceback (issue 14, case 10)
# ---------------------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    """An FP32 export, calibration data, and an INT8 export (with its FP32 reference)."""
    net, data = exported_pool_net(tmp_path)
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


def test_quantize_passes_self_check_and_bias_correction(tmp_path, monkeypatch):
    net, data = exported_pool_net(tmp_path, examples=8)
    seen, real = {}, gluon_int8.quantize_net
    monkeypatch.setattr(gluon_int8, 'quantize_net',
                        lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    assert main(['quantize', '--prefix', str(tmp_path / 'fp32'), '--calib-data',
                 str(tmp_path / 'calib.npy'), '--batch-size', '8', '--self-check', 'fallback',
                 '--bias-correction', '--out', str(tmp_path / 'cq'), '--quiet']) == 0
    assert seen['self_check'] == 'fallback' and seen['bias_correction'] is True
