"""Exports as one unit: deterministic, verified before any rename, per-epoch sidecars, a
manifest that load checks, a lock that serializes writers (issue 14, cases 1-3, 9, 12)."""
import json
import os
import shutil
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

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


# ---------------------------------------------------------------------------------------
# A failed export leaves the previous one intact (case 1)
# ---------------------------------------------------------------------------------------

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'export_worker.py')
PAGE = 4096


class Wide(nn.HybridBlock):
    """Two convolutions and global pooling: the same graph at any width, so a wide copy
    has a symbol file as small as a narrow one but far larger parameters."""

    def __init__(self, channels=8, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():  # layer names from the block's prefix, not a global count
            self.a = nn.Conv2D(channels, 3, padding=1, activation='relu')
            self.b = nn.Conv2D(channels, 3, padding=1, activation='relu')
            self.head = nn.Conv2D(10, 1)
            self.gap = nn.GlobalAvgPool2D()

    def hybrid_forward(self, F, x):
        return F.flatten(self.gap(self.head(self.b(self.a(x)))))


def _sizes(prefix):
    return {s: os.path.getsize(prefix + s) for s in ('-symbol.json', '-0000.params',
                                                     '-quantization.json')}


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
    """Exports of a narrow model A and a wide model B: B's parameters (11.7 KB) are larger
    than any other file, but small enough that MXNet writes their end at close, where
    a failed write goes unnoticed."""
    folder = tmp_path_factory.mktemp('sources')
    data = mx.nd.random.uniform(-1, 1, shape=(8, 3, 16, 16))
    prefixes = []
    for name, channels in (('a', 8), ('b', 32)):
        mx.random.seed(0)
        net = Wide(channels)
        net.initialize(mx.init.Xavier(magnitude=2.0))
        prefix = str(folder / name)
        gluon_int8.quantize_net(net, data, mode='naive').export(prefix)
        prefixes.append(prefix)
    return prefixes


def _worker_env():
    """This checkout's gluon_int8 first on the path, one OpenMP thread."""
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(gluon_int8.__file__))]
        + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))


def _worker(*args, prefix_cmd=()):
    return subprocess.run(list(prefix_cmd) + [sys.executable, WORKER] + [str(a) for a in args],
                          env=_worker_env(), capture_output=True, text=True, timeout=300)


def _result(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_previous_model_kept(result, prefix):
    assert result['raised'] is not None, 'the export of B returned normally'
    assert result['raised'].startswith("OSError: prefix: cannot write the export '%s': "
                                       "'%s-0000.params': " % (prefix, prefix))
    assert result['raised'].endswith('; the files at that prefix are unchanged')
    assert result['a_loads'] is True and result['a_imports'] is True
    assert result['leftovers'] == []


def test_export_past_a_file_size_limit_raises_and_keeps_the_previous_model(sources, tmp_path):
    """MXNet's nd.save returns normally when its last write fails: B's params were
    truncated, the export returned, and neither loader could load anything."""
    a, b = sources
    limit = 1 + max(list(_sizes(a).values()) + [_sizes(b)['-symbol.json'],
                                                _sizes(b)['-quantization.json']])
    assert _sizes(b)['-0000.params'] > limit
    prefix = str(tmp_path / 'cq')
    _check_previous_model_kept(_result(_worker('full-disk', a, b, prefix, limit)), prefix)


def _can_mount_tmpfs(folder):
    if not shutil.which('unshare'):
        return 'no unshare command to make a private mount namespace'
    probe = subprocess.run(['unshare', '-m', 'mount', '-t', 'tmpfs', '-o', 'size=64k', 'none',
                            str(folder)], capture_output=True, text=True)
    return None if probe.returncode == 0 else probe.stderr.strip() or 'mount failed'


def test_export_on_a_full_tmpfs_raises_and_keeps_the_previous_model(sources, tmp_path):
    """The issue's setup: a small tmpfs holding A, then a larger B exported over it."""
    a, b = sources
    mount_point = tmp_path / 'disk'
    mount_point.mkdir()
    reason = _can_mount_tmpfs(mount_point)
    if reason:
        pytest.skip('cannot mount a small tmpfs here (%s)' % reason)
    pages = lambda n: -(-n // PAGE)  # noqa: E731
    # room for A, B's symbol and all but the last page of B's params
    room = (sum(pages(n) for n in _sizes(a).values()) + pages(_sizes(b)['-symbol.json'])
            + pages(_sizes(b)['-0000.params']) - 1)
    prefix = str(mount_point / 'cq')
    script = 'mount -t tmpfs -o size=%dk none "$0" && exec "$@"' % (room * PAGE // 1024)
    result = _result(_worker('full-disk', a, b, prefix,
                             prefix_cmd=('unshare', '-m', 'sh', '-c', script, str(mount_point))))
    _check_previous_model_kept(result, prefix)


# ---------------------------------------------------------------------------------------
# One unit: a manifest that load checks, and a lock (case 3)
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def twins(tmp_path_factory):
    """Exports of two networks with one graph (same layer names) and other weights, so
    that any mix of their files loads and runs, silently, unless it is checked."""
    folder = tmp_path_factory.mktemp('twins')
    data = mx.nd.random.uniform(-1, 1, shape=(8, 3, 16, 16))
    prefixes = []
    for seed in (0, 1):
        mx.random.seed(seed)
        net = Wide(8, prefix='twin_')
        net.initialize(mx.init.Xavier(magnitude=2.0))
        prefixes.append(str(folder / ('twin%d' % seed)))
        gluon_int8.quantize_net(net, data, mode='naive').export(prefixes[-1])
    return prefixes


def _copy_export(src, dst):
    for suffix in ('-symbol.json', '-0000.params', '-quantization.json'):
        shutil.copyfile(src + suffix, dst + suffix)


@pytest.mark.parametrize('suffix', ['-symbol.json', '-0000.params'])
def test_load_refuses_files_of_two_exports(twins, tmp_path, suffix):
    """What a crash between two renames, or a second writer, leaves behind."""
    a, b = twins
    prefix = str(tmp_path / 'cq')
    _copy_export(a, prefix)
    shutil.copyfile(b + suffix, prefix + suffix)
    with pytest.raises(ValueError, match=r"prefix: '.*cq%s' is truncated or corrupted, or "
                                         r"comes from another export" % suffix):
        gluon_int8.load(prefix)


def test_two_processes_exporting_to_one_prefix_leave_one_whole_model(twins, tmp_path):
    """The issue's run: two writers, 20 exports each; once the prefix ended with the
    symbol of one and the sidecar of the other, and both reported success."""
    a, b = twins
    prefix = str(tmp_path / 'cq')
    procs = [subprocess.Popen([sys.executable, WORKER, 'writer', mine, other, prefix, '20'],
                              env=_worker_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for mine, other in ((a, b), (b, a))]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        results.append(_result(subprocess.CompletedProcess(proc.args, proc.returncode, out, err)))
    for result in results:
        assert result == {'exports': 20, 'mixed': 0, 'refused': []}
    x = mx.nd.array(np.random.RandomState(0).uniform(-1, 1, size=(4, 3, 16, 16)))
    loaded = gluon_int8.load(prefix)(x).asnumpy()
    plain = mx.gluon.SymbolBlock.imports(prefix + '-symbol.json', ['data'],
                                         prefix + '-0000.params')(x).asnumpy()
    np.testing.assert_array_equal(loaded, plain)
    assert any(np.array_equal(loaded, gluon_int8.load(p)(x).asnumpy()) for p in twins)
    assert [f for f in os.listdir(str(tmp_path)) if 'tmp' in f] == []


# ---------------------------------------------------------------------------------------
# Epochs (case 2)
# ---------------------------------------------------------------------------------------

def test_each_epoch_has_its_own_sidecar(qnet_and_data, tmp_path):
    qnet, data = qnet_and_data
    prefix = str(tmp_path / 'cq')
    qnet.export(prefix, epoch=0)
    written = qnet.export(prefix, epoch=1, fp32_reference=True)
    assert sorted(os.path.basename(f) for f in written) == [
        'cq-0001-fp32.params', 'cq-0001-quantization.json', 'cq-0001.params',
        'cq-symbol.json']
    assert gluon_int8.load(prefix, epoch=0).fp32_graph is None
    assert gluon_int8.load(prefix, epoch=1).fp32_graph is not None
    for epoch in (0, 1):
        np.testing.assert_array_equal(gluon_int8.load(prefix, epoch)(data).asnumpy(),
                                      qnet(data).asnumpy())


def test_another_graph_at_a_new_epoch_is_refused(twins, qnet_and_data, tmp_path):
    """Export A at epoch 0, B at epoch 1: load(prefix, epoch=0) ran B's graph and
    thresholds. Every epoch shares the symbol file, so B is refused."""
    qnet, data = qnet_and_data
    prefix = str(tmp_path / 'cq')
    qnet.export(prefix)
    other = gluon_int8.load(twins[0])
    with pytest.raises(ValueError, match=r"prefix: '.*cq' holds epoch\(s\) \[0\] of another "
                                         r"graph.*at epoch 1 would change what they run"):
        other.export(prefix, epoch=1)
    np.testing.assert_array_equal(gluon_int8.load(prefix)(data).asnumpy(), qnet(data).asnumpy())
    assert sorted(os.listdir(str(tmp_path))) == [
        '.cq.lock', 'cq-0000.params', 'cq-quantization.json', 'cq-symbol.json']
    other.export(prefix, epoch=0)  # replacing the one epoch there is is fine
    assert gluon_int8.load(prefix).int8_layers == other.int8_layers


def test_bad_epoch():
    block = gluon_int8.load  # any entry point that takes an epoch checks it
    with pytest.raises(ValueError, match=r"epoch: got -1; expected an int from 0 to 9999"):
        block('cq', epoch=-1)


# ---------------------------------------------------------------------------------------
# A corrupt or unreadable export gets a message naming the file (cases 9 and 11)
# ---------------------------------------------------------------------------------------

def _edit_sidecar(prefix, field, value, reseal):
    from gluon_int8.store import seal
    path = prefix + '-quantization.json'
    with open(path) as f:
        meta = json.load(f)
    if value is KeyError:
        del meta[field]
    else:
        meta[field] = value
    with open(path, 'w') as f:
        json.dump(seal(meta) if reseal else meta, f)


@pytest.mark.parametrize('field, value, message', [
    ('data_names', KeyError, "its field 'data_names' is 'missing'; expected a non-empty list"),
    ('data_names', ['image'], r"names inputs \['image'\] that the graph does not have"),
    ('out_format', 'x', "its field 'out_format' is 'x'; expected gluon's output format"),
    ('out_format', [1, 1], 'describes 2 outputs; the graph has 1'),
    ('layers', [1], "its field 'layers' is \\[1\\]"),
    ('int8_weights', 5, "its field 'int8_weights' is 5"),
    ('graph', {'nodes': 5}, "its field 'graph' is not an MXNet graph"),
    ('fp32_graph', [], "its field 'fp32_graph' is \\[\\]"),
    ('calib_table', {'format_version': 1, 'layers': 3}, 'malformed calibration table'),
])
def test_a_corrupt_sidecar_is_refused_naming_the_file(qnet_and_data, tmp_path, field, value,
                                                      message):
    """Before: KeyError, TypeError, MXNetError, or a RecursionError on every call (a
    string as output format)."""
    qnet, _ = qnet_and_data
    prefix = str(tmp_path / 'cq')
    qnet.export(prefix)
    _edit_sidecar(prefix, field, value, reseal=False)
    with pytest.raises(ValueError, match=r"prefix: '.*cq-quantization.json' was modified or "
                                         r"corrupted after the export"):
        gluon_int8.load(prefix)
    qnet.export(prefix)
    _edit_sidecar(prefix, field, value, reseal=True)  # a tool that recomputed the checksum
    with pytest.raises(ValueError, match=r"prefix: '.*cq-quantization.json'.*" + message):
        gluon_int8.load(prefix)


def test_an_unreadable_file_is_not_called_corrupted(qnet_and_data, tmp_path, monkeypatch):
    qnet, _ = qnet_and_data
    prefix = str(tmp_path / 'cq')
    qnet.export(prefix)
    from gluon_int8 import store
    real = store._read_back

    def denied(path):  # chmod 000 does not stop root, who runs these tests in CI
        if path.endswith('.params'):
            raise PermissionError(13, 'Permission denied', path)
        return real(path)

    monkeypatch.setattr(store, '_read_back', denied)
    with pytest.raises(OSError, match=r"prefix: cannot read '.*cq-0000.params' "
                                      r"\(Permission denied\)"):
        gluon_int8.load(prefix)


def test_an_export_made_before_manifests_still_loads(qnet_and_data, tmp_path, caplog):
    qnet, data = qnet_and_data
    prefix = str(tmp_path / 'cq')
    qnet.export(prefix)
    path = prefix + '-quantization.json'
    with open(path) as f:
        meta = json.load(f)
    for key in ('files', 'checksum'):
        del meta[key]
    meta['format_version'] = 1
    with open(path, 'w') as f:
        json.dump(meta, f)
    np.testing.assert_array_equal(gluon_int8.load(prefix)(data).asnumpy(), qnet(data).asnumpy())
    assert 'written before exports had a manifest; it loads unverified' in caplog.text
