"""Exports as one unit: deterministic, verified before any rename, per-epoch sidecars, a
manifest that load checks, a lock that serializes writers (issue 14, cases 1-3, 9, 12)."""
import os

import mxnet as mx
import numpy as np
import pytest

import gluon_int8
from conftest import PoolBlock, make_net


@pytest.fixture(scope='module')
def qnet_and_data():
    net, _ = make_net(PoolBlock, (2, 3, 16, 16))
    data = mx.nd.random.uniform(-1, 1, shape=(16, 3, 16, 16))
    return gluon_int8.quantize_net(net, data, mode='naive'), data


def _read(path):
    with open(path, 'rb') as f:
        return f.read()


def test_the_same_block_exported_twice_gives_identical_files(qnet_and_data, tmp_path):
    """Case 12: generated node names (cast0 / cast2) made every export differ."""
    qnet, data = qnet_and_data
    first = qnet.export(str(tmp_path / 'a'))
    second = qnet.export(str(tmp_path / 'b'))
    assert len(first) == len(second) == 3
    for a, b in zip(sorted(first), sorted(second)):
        assert _read(a) == _read(b), os.path.basename(a)
    # a loaded block exports the same graph again
    again = gluon_int8.load(str(tmp_path / 'a')).export(str(tmp_path / 'c'))
    assert _read(str(tmp_path / 'c-symbol.json')) == _read(str(tmp_path / 'a-symbol.json'))
    assert len(again) == 3


def test_the_same_network_quantized_twice_exports_the_same_graph(tmp_path):
    """Version counters on the graph's edges differ between two traces of one network."""
    net, _ = make_net(PoolBlock, (2, 3, 16, 16))
    data = mx.nd.random.uniform(-1, 1, shape=(16, 3, 16, 16))
    for name in ('a', 'b'):
        gluon_int8.quantize_net(net, data, mode='naive').export(str(tmp_path / name))
    for suffix in ('-symbol.json', '-0000.params', '-quantization.json'):
        assert _read(str(tmp_path / 'a') + suffix) == _read(str(tmp_path / 'b') + suffix), suffix
