"""The INT8 op table: the conformance matrix (one probe per entry), and the plan's choices.

The conformance test is generated from the table: every entry is measured on this
machine. Where the table has a recorded column for this CPU, each result must still hold
(a future MXNet that fixes a kernel, or a CPU that behaves otherwise, fails here and says
which entry). Where it has none, the library measures the table at run time, and the
test checks that every entry was measured and that every combination that is not ``ok``
is remedied or kept FP32 by quantize_net.
"""
import json

import mxnet as mx
import numpy as np
import pytest

import gluon_int8
from gluon_int8 import conformance, mxnet_private, op_table, plan
from gluon_int8.op_table import CRASH, OK, WRONG, Entry, Result
from conftest import ConvBNAct, make_net

RECORDED = op_table.RECORDED.get(op_table.machine())


@pytest.fixture(scope='module')
def measured():
    return conformance.measure_all()


@pytest.mark.parametrize('entry', op_table.ENTRIES, ids=[e.key for e in op_table.ENTRIES])
def test_conformance(entry, measured):
    found = measured[entry.key]
    assert found.verdict in (OK, WRONG, CRASH)
    if found.verdict == OK:
        assert found.error_steps <= op_table.TOLERANCE_STEPS
    if RECORDED is None:
        pytest.skip('no recorded column for %s; measured: %s' % (op_table.machine(), found))
    want = RECORDED[entry.key]
    assert (found.verdict, found.output) == (want.verdict, want.output), \
        '%s on %s: recorded %s, measured %s' % (entry.key, op_table.machine(), want, found)


def test_every_entry_has_a_probe_and_a_recorded_result():
    for isa, column in op_table.RECORDED.items():
        assert set(column) == op_table.ENTRY_KEYS, isa
    assert len(op_table.ENTRY_KEYS) == len(op_table.ENTRIES)


def test_known_defects_stay_measured_as_defects(measured):
    """The defects every CPU shares (they are in MXNet's own code, not in oneDNN)."""
    assert measured['conv+sum(s8,u8)'].verdict == WRONG     # sum buffer u8, output s8
    assert measured['conv+sum+act(s8,s8)'].verdict == WRONG  # sum buffer s8, output u8
    assert measured['act:relu(u8)'].verdict == WRONG        # reads its input as int8
    assert measured['mul(u8,s8)'].verdict == CRASH          # int8 inputs only
    assert measured['mul(s8,s8)'].verdict == WRONG          # casts to int8, no saturation
    assert measured['mul.wide(s8,s8)'].verdict == WRONG     # ... and truncates
    assert measured['mul.wide(s8,s8)'].detail.startswith('biased: every value -0.5')
    assert measured['add.rq(s8,s8)'].verdict == OK
    assert measured['conv+sum(s8,s8)'].verdict == OK
    assert measured['conv+sum+act(s8,u8)'].verdict == OK


@pytest.mark.skipif(op_table.has_vnni(), reason='VNNI: uint8 at its full range is correct')
def test_uint8_at_twice_its_threshold_is_what_keeps_a_conv_reading_it_correct(monkeypatch):
    """Without VNNI, full-range uint8 codes saturate the int16 pair sums of u8 x s8
    products; below 128 they cannot, so the graph writes uint8 ranges twice as wide."""
    assert op_table.uint8_range_factor() == 2.0
    entries = [Entry(pattern, ('u8',)) for pattern in ('conv', 'conv+act', 'fc')]
    for entry in entries:
        assert conformance.measure(entry).verdict == OK, entry
    # the depthwise kernel adds no int16 pairs: it takes full-range codes (the table's
    # .full rows, which measure the same thing with the range written at the threshold)
    assert conformance.measure(Entry('dwconv+act.full', ('u8',))).verdict == OK
    assert conformance.measure(Entry('conv+act.full', ('u8',))).verdict == WRONG
    monkeypatch.setattr(op_table, 'uint8_range_factor', lambda: 1.0)
    for entry in entries:
        found = conformance.measure(entry)
        assert found.verdict == WRONG and found.error_steps > 10, (entry, found)


def test_uint8_ranges_widen_and_an_int8_quantize_node_keeps_its_range():
    """quantized_dtype='int8': the input's quantize node emits int8 at the threshold
    (no kernel saturates on int8); the conv+ReLU's uint8 output is written at
    uint8_range_factor times its threshold."""
    net, _ = make_net(ConvBNAct, (2, 3, 12, 12))
    x = mx.nd.random.uniform(0, 1, shape=(16, 3, 12, 12))
    qnet = gluon_int8.quantize_net(net, x, quantized_dtype='int8')
    ranges = qnet.calib_table.ranges
    written = {n['op']: n['attrs'] for n in
               json.loads(mxnet_private.cached_graph(qnet)[1].tojson())['nodes']
               if 'max_calib_range' in n.get('attrs', {})}
    assert written['_contrib_quantize_v2']['out_type'] == 'int8'
    assert float(written['_contrib_quantize_v2']['max_calib_range']) == \
        pytest.approx(ranges['data'][1], rel=1e-6)
    (out,) = [hi for name, (lo, hi) in ranges.items() if name != 'data']
    assert float(written['_sg_mkldnn_conv']['min_calib_range']) == 0.0
    assert float(written['_sg_mkldnn_conv']['max_calib_range']) == \
        pytest.approx(op_table.uint8_range_factor() * out, rel=1e-6)


# -- the plan's choices, on a table given by hand ----------------------------------------

def fake_table(monkeypatch, ok):
    """A table where exactly the keys in ``ok`` are correct."""
    results = {e.key: Result(OK if e.key in ok else WRONG, 0.0 if e.key in ok else 50.0, 's8')
               for e in op_table.ENTRIES}
    monkeypatch.setattr(op_table, 'results', lambda: results)


def test_remedies_take_the_cheapest_correct_choice(monkeypatch):
    fake_table(monkeypatch, {'conv(s8)', 'conv+sum(s8,s8)', 'mul(s8,s8)', 'add(u8,u8)',
                             'add(u8,s8)', 'add(s8,u8)', 'add(s8,s8)'})
    assert plan._remedies('conv', ['s8']) == (None,)
    assert plan._remedies('conv', ['u8']) == ('converts',)
    assert plan._remedies('conv', ['auto']) == ('pins',)            # pinning beats converting
    assert plan._remedies('conv+sum', ['u8', 'u8']) == ('converts', 'converts')
    assert plan._remedies('conv+sum', ['s8', 'auto']) == (None, 'pins')
    assert plan._remedies('mul', ['auto', 'u8']) == ('pins', 'converts')
    assert plan._remedies('add', ['auto', 'auto']) == (None, None)
    assert plan._remedies('conv+sum+act', ['s8', 's8']) is None      # only a split helps
    assert plan._failing('mul', ['auto', 's8']) == ('u8', 's8')


def test_concat_is_measured_by_the_set_of_its_input_dtypes():
    assert op_table.normalize_inputs('concat', ('u8', 's8', 'u8')) == ('s8', 'u8')
    assert op_table.normalize_inputs('conv+sum', ('u8', 's8')) == ('u8', 's8')


def test_the_table_drives_the_plan(monkeypatch):
    """The same residual block under three (fake) tables: all correct, nothing is done;
    conv+sum+ReLU wrong with a uint8 sum, the sum input is made int8 (its ReLU'd producer
    emits int8, or it is converted); wrong with
    every sum dtype, the layer stays FP32 and says why."""
    from conftest import ConvBNSum, make_net
    net, inputs = make_net(ConvBNSum, (4, 3, 16, 16))
    everything = {e.key for e in op_table.ENTRIES}

    def residual(ok):
        fake_table(monkeypatch, ok)
        qnet = gluon_int8.quantize_net(net, [tuple(inputs)], mode='naive')
        (row,) = [r for r in qnet.layers if r.op == '_sg_mkldnn_conv' and 'add' in r.name]
        return qnet, row

    qnet, row = residual(everything)
    assert all(r.dtype == 'int8' and not r.note for r in qnet.layers)
    u8_sum = {k for k in everything if k.startswith('conv+sum+act(') and k.endswith(',u8)')}
    qnet, row = residual(everything - u8_sum)
    assert row.dtype == 'int8' and 'conv+sum+act(u8,u8)' in row.note
    assert row.note.startswith(('its uint8 input comes signed', 'uint8 input converted'))
    qnet, row = residual(everything - {k for k in everything if k.startswith('conv+sum+act')})
    assert row.dtype == 'fp32' and 'conv+sum+act(u8,u8)' in row.reason


def test_an_unmeasured_op_stays_fp32(monkeypatch):
    results = {k: v for k, v in op_table.results().items() if not k.startswith('pool:max(')}
    monkeypatch.setattr(op_table, 'results', lambda: results)
    from conftest import PoolBlock, make_net
    net, inputs = make_net(PoolBlock, (4, 3, 16, 16))
    qnet = gluon_int8.quantize_net(net, [tuple(inputs)], mode='naive')
    pools = [r for r in qnet.layers if r.op == 'Pooling']
    assert [r.dtype for r in pools] == ['fp32', 'int8']  # the max pool, then the global avg
    assert 'pool:max(u8) is not in the op table' in pools[0].reason


# -- every probe network through quantize_net: never silently wrong ----------------------

@pytest.mark.parametrize('pattern', sorted({e.pattern.split('.')[0] for e in op_table.ENTRIES}))
def test_probe_networks_quantize_correctly(pattern):
    """Each probe network, quantized the normal way on every input dtype mix: where the
    table says a kernel is wrong the plan avoids it, so the output stays within a few
    output steps of FP32 and the self-check finds no defect."""
    for entry in [e for e in op_table.ENTRIES if e.pattern.split('.')[0] == pattern
]:
        rng = np.random.RandomState(0)
        dtypes = conformance._inputs(entry)
        fn, children, shape, _ = conformance.network(entry)
        cls = conformance._Probe2 if len(dtypes) == 2 else conformance._Probe
        block = cls(fn, len(dtypes), **{k: f() for k, f in children.items()})
        conformance._set_params(block, rng)
        inputs = [mx.nd.array(conformance._grid(rng, (8,) + shape, d, 2.0)) for d in dtypes]
        qnet = gluon_int8.quantize_net(block, [tuple(inputs)], mode='naive',
                                       self_check='warn')
        assert not [c for c in qnet.self_check if c.defect], entry.key
        ref = block(*inputs).asnumpy().astype(np.float64)
        out = qnet(*inputs).asnumpy().astype(np.float64)
        cosine = float((ref * out).sum() / np.linalg.norm(ref) / np.linalg.norm(out))
        assert cosine > 0.995, '%s: cosine %.4f\n%s' % (entry.key, cosine, qnet.layer_table())
