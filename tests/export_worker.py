"""A separate process for tests/test_export.py: exports under a file-size limit, inside a
small tmpfs, or concurrently with another writer. Prints one JSON line with what it saw.

    python export_worker.py full-disk SRC_A SRC_B PREFIX [FSIZE_LIMIT]
    python export_worker.py writer SRC SRC_OTHER PREFIX ROUNDS

``SRC_*`` are exports to load the blocks from; outputs are compared on a fixed batch.
"""
import json
import os
import resource
import signal
import sys

import mxnet as mx
import numpy as np

import gluon_int8

X = mx.nd.array(np.random.RandomState(0).uniform(-1, 1, size=(4, 3, 16, 16)))


def _same(block, expected) -> bool:
    return bool(np.array_equal(block(X).asnumpy(), expected))


def full_disk(src_a, src_b, prefix, limit=None):
    """Export A, then B, which does not fit; report whether B's export raised and
    whether A still loads, with gluon_int8.load and with plain MXNet."""
    a, b = gluon_int8.load(src_a), gluon_int8.load(src_b)
    expected = a(X).asnumpy()
    a.export(prefix)
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    if limit is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), hard))
    result = {'raised': None}
    try:
        b.export(prefix)
    except (OSError, ValueError) as err:
        result['raised'] = '%s: %s' % (type(err).__name__, err)
    if limit is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    try:
        result['a_loads'] = _same(gluon_int8.load(prefix), expected)
    except (OSError, ValueError) as err:
        result['a_loads'] = 'load: %s' % err
    try:
        plain = mx.gluon.SymbolBlock.imports(prefix + '-symbol.json', ['data'],
                                             prefix + '-0000.params')
        result['a_imports'] = _same(plain, expected)
    except mx.base.MXNetError as err:
        result['a_imports'] = 'imports: %s' % str(err).splitlines()[0]
    folder = os.path.dirname(os.path.abspath(prefix))
    result['leftovers'] = sorted(f for f in os.listdir(folder) if 'tmp' in f)
    result['files'] = {f: os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)}
    return result


def writer(src, src_other, prefix, rounds):
    """Export ``src`` to ``prefix`` ``rounds`` times while another process does the same
    with ``src_other``; after each export, load the prefix: it must be one of the two
    models, whole."""
    mine, other = gluon_int8.load(src), gluon_int8.load(src_other)
    expected = [mine(X).asnumpy(), other(X).asnumpy()]
    result = {'exports': 0, 'mixed': 0, 'refused': []}
    for _ in range(int(rounds)):
        mine.export(prefix)
        result['exports'] += 1
        try:
            out = gluon_int8.load(prefix)(X).asnumpy()
        except (OSError, ValueError) as err:
            result['refused'].append(str(err))
            continue
        if not any(np.array_equal(out, e) for e in expected):
            result['mixed'] += 1
    return result


def main(argv):
    command, args = argv[0], argv[1:]
    result = full_disk(*args) if command == 'full-disk' else writer(*args)
    print(json.dumps(result))


if __name__ == '__main__':
    main(sys.argv[1:])
