"""The calibration table: per-layer quantization ranges, bound to the network they came from.

A table is what calibration produces and what finalizing the INT8 graph consumes. It can
be saved, inspected, edited and fed back to ``quantize_net(net, calib_table=path)`` to
quantize again without data. Its layer names are the generic names of the fused graph
(``data``, ``sg_mkldnn_conv_bn_act_0_output``), which any network of the same structure
shares, so a table also records

* the **fingerprint** of the network it was calibrated on (:func:`fingerprint`: the
  traced graph's structure and every weight), compared with the network it is used on;
* the calibration **mode** and **quantized_dtype**, compared with the call's;
* per range, the name of the same **tensor in the traced graph** (``tensors``:
  ``conv0_relu_fwd_output`` for ``sg_mkldnn_conv_bn_act_0_output``), so that an exporter
  working on the unfused graph (the ONNX QDQ export) puts each range on its tensor.

A mismatch is refused, or only logged as a warning with
``quantize_net(..., allow_table_mismatch=True)``. A table that cannot work is always
refused, naming the layer: missing or extra layers, ranges that are not finite, inverted,
of zero width, narrower than MXNet's kernels compute with, or so wide that every value
calibration saw would round to 0; and negative ranges where ``quantized_dtype='uint8'``
makes the quantize nodes unsigned.
"""
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

from . import thresholds

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2 adds the fingerprint; tables of version 1 are read without one
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_INT8_LEVELS = 127


@dataclasses.dataclass
class CalibrationTable:
    """Quantization range ``(min, max)`` of each calibrated layer output.

    ``observed`` keeps the calibrated ``(min, max)`` the thresholds were chosen from;
    ``fingerprint`` is :func:`fingerprint` of the network calibrated (None: unknown);
    ``tensors`` maps a layer to its tensor's name in the traced graph (where known).
    """
    ranges: Dict[str, Tuple[float, float]]
    mode: str
    quantized_dtype: str
    observed: Dict[str, Tuple[float, float]] = dataclasses.field(default_factory=dict)
    fingerprint: Optional[str] = None
    tensors: Dict[str, str] = dataclasses.field(default_factory=dict)

    def check_layers(self, required: Iterable[str], source: str = 'calib_table') -> None:
        """Raise unless the table has every ``required`` layer. Other layers are allowed:
        a table keeps the ranges of every tensor any plan of its network may need."""
        missing = sorted(set(required) - set(self.ranges))
        if missing:
            raise ValueError('%s does not fit the graph: it has no range for layers %s'
                             % (source, missing))

    def to_dict(self) -> dict:
        return {'format_version': FORMAT_VERSION, 'mode': self.mode,
                'quantized_dtype': self.quantized_dtype, 'fingerprint': self.fingerprint,
                'layers': {name: dict({'range': list(rng),
                                       'observed': list(self.observed.get(name, rng))},
                                      **({'tensor': self.tensors[name]}
                                         if name in self.tensors else {}))
                           for name, rng in self.ranges.items()}}

    @classmethod
    def from_dict(cls, data: dict, source: str = 'calib_table') -> 'CalibrationTable':
        version = data.get('format_version') if isinstance(data, dict) else None
        if version not in (1, FORMAT_VERSION):
            raise ValueError('%s: not a gluon-int8 calibration table (format_version %r, '
                             'expected %d)' % (source, version, FORMAT_VERSION))
        try:
            layers = data['layers']
            ranges = {n: (float(v['range'][0]), float(v['range'][1])) for n, v in layers.items()}
            observed = {n: (float(v['observed'][0]), float(v['observed'][1]))
                        for n, v in layers.items()}
            stamp = data.get('fingerprint')
            if stamp is not None and not isinstance(stamp, str):
                raise TypeError('fingerprint is %r, not a string' % (stamp,))
            tensors = {n: v['tensor'] for n, v in layers.items() if 'tensor' in v}
            if not all(isinstance(t, str) for t in tensors.values()):
                raise TypeError('a layer\'s tensor is not a string')
            return cls(ranges, str(data['mode']), str(data['quantized_dtype']), observed, stamp,
                       tensors)
        except (KeyError, TypeError, IndexError, ValueError, AttributeError) as err:
            raise ValueError('%s: malformed calibration table (%s: %s)'
                             % (source, type(err).__name__, err)) from err

    def save(self, path) -> None:
        """Write the table as JSON, atomically; OSError naming ``path`` on failure."""
        try:
            atomic_write_text(os.fspath(path), json.dumps(self.to_dict(), indent=1,
                                                          sort_keys=True))
        except OSError as err:
            raise OSError('calib_table: %s' % err) from err

    @classmethod
    def load(cls, path) -> 'CalibrationTable':
        path = os.fspath(path)
        try:
            with open(path) as f:
                data = json.load(f)
        except OSError as err:
            raise ValueError('calib_table: cannot read %r (%s)' % (path, err)) from err
        except json.JSONDecodeError as err:
            raise ValueError('calib_table: %r is not valid JSON (%s)' % (path, err)) from err
        return cls.from_dict(data, source='calib_table %r' % path)


# ---------------------------------------------------------------------------------------
# The fingerprint of a network
# ---------------------------------------------------------------------------------------

def _structure(graph: dict) -> list:
    """The graph without names: ops, their attributes and edges by node index.

    Layer and variable names come from gluon's global counters (a second instance of a
    network is ``conv5_`` instead of ``conv0_``), generated op names count ops made so
    far, and NNVM's edge versions count variable uses: none of them is the network.
    Attributes starting with ``__`` (shapes, initializers, learning-rate multipliers of
    variables, profiler scopes) are left out as well: the weights carry the shapes.
    """
    nodes = []
    for node in graph['nodes']:
        attrs = sorted((k, v) for k, v in node.get('attrs', {}).items() if not k.startswith('__'))
        nodes.append([node['op'], attrs, [entry[:2] for entry in node['inputs']],
                      [_structure(sub) for sub in node.get('subgraphs', [])]])
    return [nodes, [entry[:2] for entry in graph['heads']]]


def fingerprint(symbol, arg_params, aux_params) -> str:
    """``'<graph>-<weights>'``: two 16-hex-digit SHA-256 prefixes identifying a network.

    ``<graph>`` hashes the structure of ``symbol`` (ops, attributes, edges; no names);
    ``<weights>`` hashes dtype, shape and bytes of every parameter of ``arg_params`` /
    ``aux_params``, in the order the graph uses them. Computed from what every pipeline
    has: the traced symbol and its parameters.
    """
    graph = json.loads(symbol.tojson())
    structure = hashlib.sha256(json.dumps(_structure(graph)).encode('utf-8'))
    values = hashlib.sha256()
    for node in graph['nodes']:
        value = arg_params.get(node['name'], aux_params.get(node['name']))
        if node['op'] != 'null' or value is None:
            continue
        array = np.ascontiguousarray(value.asnumpy())
        values.update(('%s%s' % (array.dtype.str, array.shape)).encode('ascii'))
        values.update(array.reshape(-1).view(np.uint8))  # no second copy of the weights
    return '%s-%s' % (structure.hexdigest()[:16], values.hexdigest()[:16])


# ---------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------

def _range_problem(lo: float, hi: float, observed: Optional[Tuple[float, float]]) -> str:
    """What makes ``(lo, hi)`` unusable, or ''."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return 'not finite'
    peak = max(abs(lo), abs(hi))
    if peak > _FLOAT32_MAX:
        return 'beyond float32, which MXNet passes ranges in'
    if lo > hi:
        return 'inverted (min > max)'
    if hi == lo:
        return 'zero width: every value would quantize to one level'
    if peak < thresholds.MIN_THRESHOLD:
        return ('narrower than %g, the smallest range MXNet 1.9.1\'s INT8 kernels compute '
                'with (they output zeros below about 1e-6)' % thresholds.MIN_THRESHOLD)
    if observed is not None:
        seen = max(abs(observed[0]), abs(observed[1]), thresholds.MIN_THRESHOLD)
        if seen * _INT8_LEVELS / peak < 0.5:
            return ('%.3g times wider than every value calibration observed (up to %.3g): '
                    'each of them would quantize to 0' % (peak / seen, seen))
    return ''


def check_ranges(table: CalibrationTable, source: str = 'calib_table') -> None:
    """Refuse a table with a range no INT8 graph can work with, naming the layer."""
    for name, (lo, hi) in sorted(table.ranges.items()):
        problem = _range_problem(lo, hi, table.observed.get(name))
        if problem:
            raise ValueError('%s: layer %r has range [%g, %g]: %s' % (source, name, lo, hi,
                                                                      problem))


def warn_tiny_ranges(table: CalibrationTable) -> None:
    """Name the layers whose calibrated values stay below the threshold floor
    (:data:`gluon_int8.thresholds.MIN_THRESHOLD`): they are quantized over the floor
    and keep few of their levels. MXNet 1.9.1's kernels give zeros for smaller ranges,
    so raising the floor is the best this table can do; rescaling the data is the fix."""
    floor = thresholds.MIN_THRESHOLD
    tiny = sorted((name, max(abs(lo), abs(hi))) for name, (lo, hi) in table.observed.items()
                  if 0 < max(abs(lo), abs(hi)) < floor / 2)
    if not tiny:
        return
    name, peak = tiny[0]
    log.warning('%d layer output(s) have calibrated values below %g, the smallest range '
                "MXNet 1.9.1's INT8 kernels compute with (they output zeros for smaller "
                'ranges): %s. They are quantized over [-%g, %g] and keep few of their '
                'levels (%r: values up to %.3g use %d of %d). Scale the network input up '
                '(normalize it), or exclude the layers that read these outputs',
                len(tiny), floor, ', '.join(repr(n) for n, _ in tiny[:10])
                + (' and %d more' % (len(tiny) - 10) if len(tiny) > 10 else ''),
                floor, floor, name, peak, round(peak / floor * _INT8_LEVELS), _INT8_LEVELS)


def _check_unsigned(table: CalibrationTable, quantize_inputs: Iterable[str],
                    quantized_dtype: str, source: str) -> None:
    """quantized_dtype='uint8' makes every quantize node unsigned; fed a negative range,
    MXNet's INT8 kernels raise 'Expect int8 when data_min < 0' on every call."""
    if quantized_dtype != 'uint8':
        return
    signed = sorted(n for n in set(quantize_inputs) if table.ranges.get(n, (0.0,))[0] < 0)
    if signed:
        raise ValueError("%s: layers %s have negative ranges (the table was made with "
                         "quantized_dtype=%r), but quantized_dtype='uint8' makes their "
                         "quantize nodes uint8, which MXNet's INT8 kernels refuse on every "
                         "call; quantize with quantized_dtype=%r, or calibrate again with "
                         "'uint8'" % (source, signed, table.quantized_dtype,
                                      table.quantized_dtype))


def _mismatches(table: CalibrationTable, stamp: str, mode: str, quantized_dtype: str) -> list:
    found = []
    if table.fingerprint is None:
        found.append('it carries no fingerprint of the network it was calibrated on (made '
                     'by hand or by gluon-int8 before tables had one)')
    elif table.fingerprint != stamp:
        same_graph = table.fingerprint.split('-')[0] == stamp.split('-')[0]
        found.append('it was calibrated on %s (fingerprint %s, this network %s)'
                     % ('other weights of this graph' if same_graph else 'another graph',
                        table.fingerprint, stamp))
    if table.mode != mode:
        found.append('it was made with mode=%r; this call has mode=%r' % (table.mode, mode))
    if table.quantized_dtype != quantized_dtype:
        found.append('it was made with quantized_dtype=%r; this call has quantized_dtype=%r'
                     % (table.quantized_dtype, quantized_dtype))
    return found


def check_reuse(table: CalibrationTable, layers: Iterable[str], quantize_inputs: Iterable[str],
                stamp: str, mode: str, quantized_dtype: str, allow_mismatch: bool,
                source: str = 'calib_table') -> None:
    """Check a table given to ``quantize_net`` against the network and the call: it has
    a range for each of ``layers``.

    What cannot work is always refused; a table of another network (``stamp`` is the
    network's :func:`fingerprint`), mode or dtype is refused unless ``allow_mismatch``,
    which logs it as a warning instead.
    """
    found = _mismatches(table, stamp, mode, quantized_dtype)
    if found and not allow_mismatch:
        raise ValueError('%s does not belong to this network: %s. Quantize with matching '
                         'options, calibrate again, or pass allow_table_mismatch=True to use '
                         'it anyway' % (source, '; '.join(found)))
    if found:
        log.warning('%s does not belong to this network (allow_table_mismatch=True): %s',
                    source, '; '.join(found))
    table.check_layers(layers, source)
    check_ranges(table, source)
    _check_unsigned(table, quantize_inputs, quantized_dtype, source)
    warn_tiny_ranges(table)


# ---------------------------------------------------------------------------------------
# Files and the calib_table argument
# ---------------------------------------------------------------------------------------

def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, fsynced,
    and a rename: ``path`` is never left half-written. OSError naming ``path``."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix='.%s.' % name, suffix='.tmp', dir=folder)
        with os.fdopen(fd, 'w') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise OSError('cannot write %r (%s)' % (path, err.strerror or err)) from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def check_table_argument(calib_table, has_data: bool):
    """``quantize_net``'s ``calib_table`` checked before any work: with data, a path
    (str or path-like) where the table will be saved, in a writable folder; without, a
    path or a :class:`CalibrationTable` to quantize from. Returns it, paths as str."""
    if calib_table is None or isinstance(calib_table, CalibrationTable):
        if has_data and calib_table is not None:
            raise ValueError('calib_table: got a CalibrationTable together with calib_data; '
                             'pass calib_data (and a path to save the table to) to calibrate, '
                             'or the table without calib_data to quantize from it')
        return calib_table
    if not isinstance(calib_table, (str, os.PathLike)):
        raise TypeError('calib_table: got %s; expected a path (str or os.PathLike) or a '
                        'CalibrationTable' % type(calib_table).__name__)
    path = os.fspath(calib_table)
    folder = os.path.dirname(os.path.abspath(path))
    if has_data and not os.path.isdir(folder):
        raise ValueError('calib_table: folder %r of %r does not exist' % (folder, path))
    if has_data and not os.access(folder, os.W_OK):
        raise ValueError('calib_table: folder %r of %r is not writable' % (folder, path))
    return path


def optional_table(calib_table) -> Optional[CalibrationTable]:
    """A table from a path or a table, or None."""
    if calib_table is None or isinstance(calib_table, CalibrationTable):
        return calib_table
    return CalibrationTable.load(calib_table)


def table_source(calib_table) -> str:
    """How messages name a ``calib_table`` argument."""
    if calib_table is None or isinstance(calib_table, CalibrationTable):
        return 'calib_table'
    return 'calib_table: %r' % os.fspath(calib_table)
