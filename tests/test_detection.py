"""Detection: a small GluonCV SSD quantizes with box decoding and NMS in FP32, and its
export loads back with identical outputs."""
import mxnet as mx
import numpy as np
from gluoncv.model_zoo.ssd.ssd import SSD
from mxnet.gluon import nn

import gluon_int8
from gluon_int8 import zoo


class TinyFeatures(nn.HybridBlock):
    """Two feature maps (stride 8 and 16) for a 64x64 SSD."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stage1, self.stage2 = nn.HybridSequential(), nn.HybridSequential()
        for channels in (16, 32, 32):
            self.stage1.add(nn.Conv2D(channels, 3, strides=2, padding=1), nn.BatchNorm(),
                            nn.Activation('relu'))
        self.stage2.add(nn.Conv2D(64, 3, strides=2, padding=1), nn.BatchNorm(),
                        nn.Activation('relu'))

    def hybrid_forward(self, F, x):
        a = self.stage1(x)
        return [a, self.stage2(a)]


def tiny_ssd():
    mx.random.seed(0)
    net = SSD(None, base_size=64, features=lambda **kwargs: TinyFeatures(), num_filters=[],
              sizes=[16, 32, 48],
              ratios=[[1, 2, 0.5]] * 2, steps=[8, 16], classes=['a', 'b', 'c'],
              pretrained=False, nms_topk=50, post_nms=20)
    net.initialize(zoo.RandomInit())
    images = mx.nd.random.uniform(-1, 1, shape=(16, 3, 64, 64))
    zoo.set_batchnorm_statistics(net, images)
    return net, images


def test_ssd_quantizes_exports_and_loads_identically(tmp_path):
    net, images = tiny_ssd()
    qnet = gluon_int8.quantize_net(net, [images[:8]], **dict(zoo.preset('ssd_300').quantize_kwargs))
    ids, scores, boxes = qnet(images[8:])
    ref_ids, ref_scores, ref_boxes = net(images[8:])
    assert ids.shape == ref_ids.shape and boxes.shape == ref_boxes.shape
    # the feature extractor and heads run INT8; decoding and NMS stay FP32
    ops = {r.op: r.dtype for r in qnet.layers}
    assert ops['_sg_mkldnn_conv'] == 'int8' and ops['_contrib_box_nms'] == 'fp32'
    assert all(r.dtype == 'fp32' for r in qnet.layers if r.op in ('_contrib_box_nms', 'slice_axis'))
    prefix = str(tmp_path / 'cq_ssd')
    qnet.export(prefix)
    for loaded in (gluon_int8.load(prefix),
                   mx.gluon.SymbolBlock.imports(prefix + '-symbol.json', ['data'],
                                                prefix + '-0000.params')):
        for a, b in zip(loaded(images[8:]), (ids, scores, boxes)):
            np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())


def test_full_mode_on_a_detector_warns(caplog):
    net, images = tiny_ssd()
    with caplog.at_level('WARNING', logger='gluon_int8.api'):
        gluon_int8.quantize_net(net, [images[:8]], quantize_mode='full')
    assert "quantize_mode='full' on a graph with _contrib_box_nms" in caplog.text
    caplog.clear()
    with caplog.at_level('WARNING', logger='gluon_int8.api'):
        gluon_int8.quantize_net(net, [images[:8]], quantize_mode='smart')
    assert "quantize_mode='full'" not in caplog.text
