"""Zoo presets for the families that used to stop in MXNet kernel checks (issue #4)."""
import mxnet as mx
import numpy as np
import pytest

from conftest import cosine
from gluon_int8 import zoo

FAMILIES = {
    'se_resnext50_32x4d': 'se_resnext',
    'nasnet_4_1056': 'nasnet',
    'mobilenetv3_large': 'mobilenetv3',
    'mobilenetv3_small': 'mobilenetv3',
    'residualattentionnet56': 'residualattentionnet',
    'faster_rcnn_resnet50_v1b_voc': 'faster_rcnn',
}


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_family_preset_is_picked(name):
    family = zoo.preset(name)
    assert family is zoo.PRESETS[FAMILIES[name]]
    assert family.why != zoo.Preset().why
    assert 'MXNet 1.9.1' in family.why or 'batch' in family.why


def test_fc_failing_families_keep_the_classifier_fp32():
    for key in ('se_resnext', 'nasnet'):
        assert dict(zoo.PRESETS[key].quantize_kwargs)['exclude_operators'] == ('FullyConnected',)


def _mobilenetv3_small(**kwargs):
    """FP32 and INT8 mobilenetv3_small with the same random weights, and a test batch."""
    rng = np.random.RandomState(0)
    batches = [mx.nd.array(rng.uniform(-1, 1, (2, 3, 224, 224))) for _ in range(2)]
    mx.random.seed(0)
    net = zoo.get_model('mobilenetv3_small', quantized=False, bn_batch=batches[0])
    mx.random.seed(0)
    qnet = zoo.get_model('mobilenetv3_small', quantized=True, calib_data=batches, mode='naive',
                         bn_batch=batches[0], **kwargs)
    return net, qnet, mx.nd.array(rng.uniform(-1, 1, (2, 3, 224, 224)))


def _check_runs(net, qnet, x):
    """INT8 convs, finite outputs (batch 2, then batch 1 twice), a cosine that is a number."""
    convs = [l for l in qnet.layers if l.op == '_sg_mkldnn_conv']
    assert convs and all(l.dtype == 'int8' for l in convs)
    out = qnet(x)
    assert np.isfinite(out.asnumpy()).all()
    for _ in range(2):  # batch 1, twice: the static_alloc path the sweep's latency runs take
        assert np.isfinite(qnet(x[:1]).asnumpy()).all()
    assert not np.isnan(cosine(net(x), out))


def test_mobilenetv3_small_quantizes():
    """With its preset: INT8 convs, hard-swish multiplies FP32 for the stated reason."""
    net, qnet, x = _mobilenetv3_small()
    _check_runs(net, qnet, x)
    muls = [l for l in qnet.layers if l.op == 'elemwise_mul']
    assert muls and all(l.dtype == 'fp32' and 'elemwise_mul' in l.reason for l in muls)


def test_mobilenetv3_small_int8_multiplies_run():
    """Without the preset's exclusion the hard-swish multiplies run INT8; they used to stop in
    the kernel (uint8 gate read as int8)."""
    net, qnet, x = _mobilenetv3_small(quantize_kwargs={'exclude_operators': []})
    _check_runs(net, qnet, x)
    muls = [l for l in qnet.layers if l.op == 'elemwise_mul']
    assert muls and all(l.dtype == 'int8' for l in muls)


def test_faster_rcnn_takes_batch_size_1_only():
    batches = [mx.nd.zeros((2, 3, 600, 600))]
    with pytest.raises(ValueError, match='calib_data: batch 0 has 2 examples; this model takes '
                                         'batches of exactly 1'):
        zoo.get_model('faster_rcnn_resnet50_v1b_voc', quantized=True, calib_data=batches)
