"""An export on disk as one unit: deterministic, verified, locked, with a manifest.

An export (its files are named in :mod:`gluon_int8.layout`) is written so that:

* **nothing is replaced until everything is verified.** Every file goes to a temporary
  name in the target folder and is read back: the text files byte for byte, the
  parameters through ``mx.nd.load_frombuffer`` and a comparison of every array (MXNet's
  ``nd.save`` returns normally when its last write fails, on a full disk or past a
  file-size limit). Only then are the files renamed into place; a failure before that
  raises ``OSError`` naming the prefix and leaves the previous export as it was;
* **the sidecar is the manifest, written last.** It records the size and SHA-256 of
  every other file of the unit and a checksum of its own content; :func:`read_export`
  refuses a set whose files do not match it (a crash between the renames, a second
  writer, a copied file), naming the files;
* **writers take turns.** An exclusive ``flock`` on the prefix's lock file is held from
  the first temporary file to the last rename; readers take it shared, so they never
  see a set half replaced. (Advisory: tools that ignore the lock are not stopped.)
* **the same block gives the same bytes.** Every node of an exported graph has a fixed
  name, and the version counters NNVM keeps on graph edges (they count how often a
  variable was used in the process, and differ between two traces of one network) are
  written as 0; MXNet reads them back and runs the graph the same.

Every epoch of a prefix shares the symbol file (MXNet's layout): an export whose graph
differs from the one other epochs were exported with is refused, since it would change
what they run.
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from typing import Dict, List, Mapping, Tuple, Union

import mxnet as mx
import numpy as np

from . import layout
from .errors import first_line
from .sidecar import VERSION as SIDECAR_VERSION

log = logging.getLogger(__name__)

Payload = Union[str, bytes, Mapping[str, mx.nd.NDArray]]  # text, bytes, or arrays for nd.save
CHECKSUM = 'checksum'  # the sidecar's checksum of its own content
FILES = 'files'        # the sidecar's manifest: role -> {'size', 'sha256'}


# ---------------------------------------------------------------------------------------
# Deterministic content
# ---------------------------------------------------------------------------------------

def canonical_graph(symbol: mx.sym.Symbol) -> dict:
    """``symbol`` as a JSON object, with every edge's version counter set to 0."""
    graph = json.loads(symbol.tojson())
    _zero_versions(graph)
    return graph


def canonical_json(symbol: mx.sym.Symbol) -> str:
    """The text of :func:`canonical_graph`, in MXNet's own JSON layout."""
    return mx.sym.load_json(json.dumps(canonical_graph(symbol))).tojson()


def _zero_versions(graph: dict) -> None:
    for node in graph['nodes']:
        for entry in node['inputs']:
            entry[2] = 0
        for sub in node.get('subgraphs', []):
            _zero_versions(sub)
    for entry in graph['heads']:
        entry[2] = 0


def digest(data: bytes) -> dict:
    """What the manifest records of one file."""
    return {'size': len(data), 'sha256': hashlib.sha256(data).hexdigest()}


def _content_checksum(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode('utf-8')).hexdigest()


def seal(meta: dict) -> dict:
    """``meta`` with the checksum of its own content (checked by :func:`read_export`)."""
    return dict(meta, **{CHECKSUM: _content_checksum(meta)})


# ---------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def locked(prefix: str, shared: bool = False):
    """Hold the prefix's lock: exclusive to write, shared to read.

    A reader that cannot open the lock file (none yet, or a read-only folder) reads
    without it and relies on the manifest alone.
    """
    path = layout.lock_file(prefix)
    try:
        fd = os.open(path, os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        if not shared:
            raise OSError('prefix: cannot create the lock file %r of export prefix %r (%s)'
                          % (path, prefix, err.strerror)) from err
        fd = None
    if fd is None:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------

def _read_back(path: str) -> bytes:
    with open(path, 'rb') as f:
        return f.read()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _same_arrays(saved, arrays: Mapping[str, mx.nd.NDArray]) -> bool:
    saved = saved or {}  # nd.save of no arrays loads back as an empty list
    if not isinstance(saved, dict) or set(saved) != set(arrays):
        return False
    for name, value in arrays.items():
        back = saved[name]
        if back.dtype != value.dtype or back.shape != value.shape:
            return False
        if np.ascontiguousarray(back.asnumpy()).tobytes() != \
                np.ascontiguousarray(value.asnumpy()).tobytes():
            return False
    return True


def _write_verified(path: str, payload: Payload) -> bytes:
    """Write ``payload`` to ``path``, make it durable, and return the bytes read back
    from disk after checking they hold exactly ``payload``."""
    if isinstance(payload, (str, bytes)):
        expected = payload.encode('utf-8') if isinstance(payload, str) else payload
        with open(path, 'wb') as f:
            f.write(expected)
        _fsync(path)
        data = _read_back(path)
        if data != expected:
            raise OSError(errno.EIO, 'wrote %d bytes, read back %d that differ'
                          % (len(expected), len(data)))
        return data
    mx.nd.save(path, dict(payload))
    _fsync(path)
    data = _read_back(path)
    try:
        saved = mx.nd.load_frombuffer(data)
    except mx.base.MXNetError as err:
        raise OSError(errno.EIO, 'the %d bytes read back are not a whole parameter file (%s)'
                      % (len(data), first_line(err))) from err
    if not _same_arrays(saved, payload):
        raise OSError(errno.EIO, 'the arrays read back differ from those written')
    return data


def _check_other_epochs(prefix: str, epoch: int, symbol_text: str) -> None:
    """Refuse a new graph while other epochs of the prefix use the shared symbol file."""
    path = layout.symbol_file(prefix)
    if not os.path.isfile(path) or _read_back(path) == symbol_text.encode('utf-8'):
        return
    others = [e for e in layout.epochs(prefix) if e != epoch]
    if others:
        raise ValueError(
            'prefix: %r holds epoch(s) %s of another graph, and every epoch of a prefix '
            'shares %r (MXNet\'s layout): exporting this graph at epoch %d would change '
            'what they run. Export to another prefix, or remove the files of those epochs '
            'first' % (prefix, others, path, epoch))


def write_export(prefix: str, epoch: int, payloads: Dict[str, Payload],
                 sidecar: dict) -> List[str]:
    """Write one export unit: ``payloads`` (role -> text or arrays, at least the symbol
    text) and ``sidecar``, which gets the manifest of the others and is written last.
    Returns the written paths. Raises OSError naming the prefix and the file when one
    cannot be written; unless it happened during the final renames, the files at the
    prefix are then as they were."""
    paths = layout.export_files(prefix, epoch)
    temps: Dict[str, str] = {}
    with locked(prefix):
        _check_other_epochs(prefix, epoch, payloads[layout.SYMBOL])
        try:
            manifest = {role: _stage(prefix, paths[role], payload, temps, role)
                        for role, payload in payloads.items()}
            meta = seal(dict(sidecar, **{FILES: manifest}))
            _stage(prefix, paths[layout.SIDECAR], json.dumps(meta, indent=1), temps,
                   layout.SIDECAR)
            _commit(prefix, paths, temps, payloads)
        finally:
            for tmp in temps.values():
                if os.path.exists(tmp):
                    os.remove(tmp)
    return [paths[role] for role in temps]


def write_file(prefix: str, path: str, data: bytes) -> str:
    """Write one file of an export (the ONNX model) the way :func:`write_export` writes a
    unit: under the prefix's lock, verified on disk under a temporary name, then renamed
    into place; OSError naming the prefix and the file, the old file unchanged."""
    temps: Dict[str, str] = {}
    with locked(prefix):
        try:
            _stage(prefix, path, data, temps, 'file')
            try:
                os.replace(temps['file'], path)
            except OSError as err:
                raise _write_error(prefix, path, err, 'the file there is unchanged') from err
            _fsync(os.path.dirname(os.path.abspath(path)))
        finally:
            for tmp in temps.values():
                if os.path.exists(tmp):
                    os.remove(tmp)
    return path


def _stage(prefix: str, final: str, payload: Payload, temps: Dict[str, str], role: str) -> dict:
    """``payload`` written and verified under a temporary name next to ``final``
    (recorded in ``temps``); returns its manifest entry."""
    try:
        folder, name = os.path.split(os.path.abspath(final))
        fd, temps[role] = tempfile.mkstemp(prefix='.%s.' % name, suffix='.tmp', dir=folder)
        os.close(fd)
        return digest(_write_verified(temps[role], payload))
    except (OSError, mx.base.MXNetError) as err:
        raise _write_error(prefix, final, err, 'the files at that prefix are unchanged') from err


def _commit(prefix: str, paths: Dict[str, str], temps: Dict[str, str], payloads) -> None:
    """Rename every staged file into place, the sidecar last: it commits the unit."""
    for role, tmp in temps.items():
        try:
            os.replace(tmp, paths[role])
        except OSError as err:
            raise _write_error(prefix, paths[role], err, 'the export is incomplete and load() '
                               'refuses it: export again') from err
    stale = paths[layout.FP32]  # the FP32 reference of an earlier export at this epoch
    if layout.FP32 not in payloads and os.path.isfile(stale):
        os.remove(stale)
    _fsync(os.path.dirname(os.path.abspath(prefix)))


def _write_error(prefix: str, path: str, err: Exception, state: str) -> OSError:
    reason = err.strerror if isinstance(err, OSError) and err.strerror else first_line(err)
    return OSError('prefix: cannot write the export %r: %r: %s; %s'
                   % (prefix, path, reason, state))


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------

def _read(path: str) -> bytes:
    try:
        return _read_back(path)
    except OSError as err:
        raise OSError('prefix: cannot read %r (%s)' % (path, err.strerror or err)) from err


def _parse_sidecar(path: str, data: bytes) -> dict:
    try:
        meta = json.loads(data.decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError('prefix: %r is truncated or corrupted (%s)' % (path, err)) from err
    if not isinstance(meta, dict) or meta.get('format_version') not in (1, SIDECAR_VERSION):
        raise ValueError('prefix: %r is not a gluon-int8 sidecar' % path)
    return meta


def _mismatches(meta: dict, paths: Dict[str, str], blobs: Dict[str, bytes]) -> List[str]:
    wrong = []
    for role, blob in blobs.items():
        recorded, found = meta[FILES][role], digest(blob)
        if found != recorded:
            wrong.append('%r is truncated or corrupted, or comes from another export (%d '
                         'bytes, sha256 %s...; the manifest records %d bytes, sha256 %s...)'
                         % (paths[role], found['size'], found['sha256'][:12],
                            recorded.get('size', -1), str(recorded.get('sha256'))[:12]))
    return wrong


def _check_manifest(meta: dict, sidecar_path: str) -> None:
    files = meta.get(FILES)
    if meta.get(CHECKSUM) != _content_checksum(meta) or not isinstance(files, dict) \
            or not all(isinstance(v, dict) for v in files.values()) \
            or not {layout.SYMBOL, layout.PARAMS} <= set(files):
        raise ValueError('prefix: %r was modified or corrupted after the export (its '
                         'checksum does not match its content); export the model again'
                         % sidecar_path)


def read_export(prefix: str, epoch: int = 0) -> Tuple[dict, Dict[str, bytes]]:
    """The sidecar (as a dict) and the bytes of every file of one export unit
    (role -> bytes; the optional FP32 reference only when its file exists), verified
    against the manifest under the shared lock. Raises ValueError naming the files
    that are missing, corrupted or from another export."""
    paths = layout.export_files(prefix, epoch)
    for role in (layout.SYMBOL, layout.PARAMS, layout.SIDECAR):
        if not os.path.isfile(paths[role]):
            raise ValueError('prefix: %r has no file %r' % (prefix, paths[role]))
    with locked(prefix, shared=True):
        blobs = {layout.SIDECAR: _read(paths[layout.SIDECAR])}
        meta = _parse_sidecar(paths[layout.SIDECAR], blobs[layout.SIDECAR])
        legacy = meta['format_version'] == 1
        if legacy:
            log.warning('prefix: %r was written before exports had a manifest; it loads '
                        'unverified (export it again to have it checked)',
                        paths[layout.SIDECAR])
        else:
            _check_manifest(meta, paths[layout.SIDECAR])
        roles = [layout.SYMBOL, layout.PARAMS]
        if os.path.isfile(paths[layout.FP32]) and (legacy or layout.FP32 in meta[FILES]):
            roles.append(layout.FP32)
        blobs.update((role, _read(paths[role])) for role in roles)
    if not legacy:
        wrong = _mismatches(meta, paths, {r: blobs[r] for r in roles})
        if wrong:
            raise ValueError('prefix: %s' % '; '.join(wrong))
    return meta, blobs
