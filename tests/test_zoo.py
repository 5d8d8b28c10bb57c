"""Zoo presets: what a family needs besides its kernels (input shape, preprocessing, the
detectors' FP32 decoding, batch size). Kernel defects are the op table's and the
self-check's business: the families that used to need a preset for one run without."""
import mxnet as mx
import numpy as np
import pytest

from conftest import cosine
from gluon_int8 import op_table, zoo

FAMILIES = {
    'se_resnext50_32x4d': '',
    'nasnet_4_1056': '',
    'mobilenetv3_small': '',
    'inceptionv3': 'inceptionv3',
    'ssd_300_vgg16_atrous_voc': 'ssd_300',
    'faster_rcnn_resnet50_v1b_voc': 'faster_rcnn',
}


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_family_preset_is_picked(name):
    assert zoo.preset(name) is zoo.PRESETS[FAMILIES[name]]


def test_no_preset_works_around_a_kernel():
    """Excluding ops by hand for a kernel is the op table's job now."""
    for key, family in zoo.PRESETS.items():
        assert 'exclude_operators' not in dict(family.quantize_kwargs), key


class _TwoConvs(mx.gluon.HybridBlock):
    def __init__(self):
        super().__init__()
        self.first = mx.gluon.nn.Conv2D(4, 3, in_channels=3)
        self.second = mx.gluon.nn.Conv2D(4, 3, in_channels=4)

    def hybrid_forward(self, F, x):
        return self.second(F.relu(self.first(x)))


@pytest.mark.parametrize('vnni, override, preset_choice, fp32', [
    (False, None, None, True), (True, None, None, False),      # the preset leaves it to the CPU
    (False, False, None, False), (True, True, None, True),     # the caller decides
    (False, None, False, False), (True, None, True, True)])    # the preset decides
def test_stem_fp32(monkeypatch, vnni, override, preset_choice, fp32):
    """The stem (here the first conv: the second one's output is smaller) is excluded by
    its traced names where it stays FP32; the other options pass through, the caller's
    exclusions kept."""
    monkeypatch.setattr(zoo, 'has_vnni', lambda: vnni)
    net = _TwoConvs()
    net.initialize()
    family = zoo.Preset((3, 8, 8), (('quantize_mode', 'smart'),), preset_choice)
    options = zoo.quantize_options(net, family, override, {'exclude_layers': ['mine']})
    first, = zoo.stem_convs(net, family)
    assert first.startswith(net.first.name) and zoo.first_conv(net, family) == first
    why = ('exclude_stem=True' if override else 'zoo preset: stem_fp32=True'
           if preset_choice else zoo.STEM_REASON)
    assert options == {'quantize_mode': 'smart',
                       'exclude_layers': {'mine': '', first: why} if fp32 else ['mine']}


def test_exclude_stem_takes_a_bool():
    with pytest.raises(TypeError, match=r"exclude_stem: got 'yes'; expected True, False "
                                        r"or None"):
        zoo.quantize_options(None, zoo.Preset(), 'yes')


class _DeepStem(mx.gluon.HybridBlock):
    """A strided conv, a conv and a depthwise conv at its output's resolution, a pooling
    that halves it, a conv: the stem is the first three convs."""

    def __init__(self):
        super().__init__()
        self.stem = [mx.gluon.nn.Conv2D(8, 3, strides=2, padding=1, in_channels=3),
                     mx.gluon.nn.Conv2D(8, 3, padding=1, in_channels=8),
                     mx.gluon.nn.Conv2D(8, 3, padding=1, groups=8, in_channels=8)]
        for k, conv in enumerate(self.stem):
            self.register_child(conv, 'stem%d' % k)
        self.body = mx.gluon.nn.Conv2D(8, 3, padding=1, in_channels=8)

    def hybrid_forward(self, F, x):
        for conv in self.stem:
            x = F.relu(conv(x))
        return self.body(F.Pooling(x, kernel=(2, 2), stride=(2, 2), pool_type='max'))


def test_stem_is_the_convs_at_the_first_conv_resolution():
    net = _DeepStem()
    net.initialize()
    stem = zoo.stem_convs(net, zoo.Preset((3, 16, 16)))
    assert [name.rsplit('_', 1)[0] for name in stem] == [c.name for c in net.stem]


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
    """INT8 convs (the first FP32 on a CPU without VNNI: the preset's), finite outputs
    (batch 2, then batch 1 twice), a cosine that is a number."""
    first, *convs = [l for l in qnet.layers if l.op == '_sg_mkldnn_conv']
    assert convs and all(l.dtype == 'int8' for l in convs)
    assert first.dtype == ('int8' if op_table.has_vnni() else 'fp32')
    assert op_table.has_vnni() or first.reason.startswith(zoo.STEM_REASON)
    out = qnet(x)
    assert np.isfinite(out.asnumpy()).all()
    for _ in range(2):  # batch 1, twice: the static_alloc path the sweep's latency runs take
        assert np.isfinite(qnet(x[:1]).asnumpy()).all()
    assert not np.isnan(cosine(net(x), out))


def test_mobilenetv3_small_quantizes():
    """No preset: INT8 convs; the hard-swish and SE multiplies stay FP32, each saying why
    (the op table measures MXNet's INT8 multiply: int8 inputs only, no rounding, no
    saturation); every call runs, batch 1 twice included."""
    net, qnet, x = _mobilenetv3_small()
    _check_runs(net, qnet, x)
    muls = [l for l in qnet.layers if l.op == 'elemwise_mul']
    assert muls and all(l.dtype == 'fp32' and 'INT8 mul(' in l.reason for l in muls)
    assert not [c for c in qnet.self_check if c.defect]


def test_faster_rcnn_takes_batch_size_1_only():
    batches = [mx.nd.zeros((2, 3, 600, 600))]
    with pytest.raises(ValueError, match='calib_data: batch 0 has 2 examples; this model takes '
                                         'batches of exactly 1'):
        zoo.get_model('faster_rcnn_resnet50_v1b_voc', quantized=True, calib_data=batches)
