"""The calibration table: per-layer quantization ranges, with JSON save/load.

A table is what calibration produces and what finalizing the INT8 graph consumes. It can
be saved, inspected, edited and fed back to ``quantize_net(net, calib_table=path)`` to
quantize again without data. A table that does not fit the graph is refused, naming the
layers that are missing or extra.
"""
import dataclasses
import json
import os
from typing import Dict, Iterable, Optional, Tuple

FORMAT_VERSION = 1


@dataclasses.dataclass
class CalibrationTable:
    """Quantization range ``(min, max)`` of each calibrated layer output.

    ``observed`` keeps the calibrated ``(min, max)`` the thresholds were chosen from.
    """
    ranges: Dict[str, Tuple[float, float]]
    mode: str
    quantized_dtype: str
    observed: Dict[str, Tuple[float, float]] = dataclasses.field(default_factory=dict)

    def check_layers(self, required: Iterable[str], known: Optional[Iterable[str]] = None,
                     source: str = 'calib_table') -> None:
        """Raise unless the table has every ``required`` layer and nothing but ``known``
        layers (default: the required ones)."""
        required = set(required)
        known = required if known is None else set(known) | required
        missing = sorted(required - set(self.ranges))
        extra = sorted(set(self.ranges) - known)
        if missing or extra:
            raise ValueError('%s does not fit the graph: missing layers %s; extra layers %s'
                             % (source, missing or 'none', extra or 'none'))

    def to_dict(self) -> dict:
        return {'format_version': FORMAT_VERSION, 'mode': self.mode,
                'quantized_dtype': self.quantized_dtype,
                'layers': {name: {'range': list(rng),
                                  'observed': list(self.observed.get(name, rng))}
                           for name, rng in self.ranges.items()}}

    @classmethod
    def from_dict(cls, data: dict, source: str = 'calib_table') -> 'CalibrationTable':
        if not isinstance(data, dict) or data.get('format_version') != FORMAT_VERSION:
            raise ValueError('%s: not a gluon-int8 calibration table (format_version %r, '
                             'expected %d)' % (source, data.get('format_version')
                                               if isinstance(data, dict) else None,
                                               FORMAT_VERSION))
        try:
            layers = data['layers']
            ranges = {n: (float(v['range'][0]), float(v['range'][1])) for n, v in layers.items()}
            observed = {n: (float(v['observed'][0]), float(v['observed'][1]))
                        for n, v in layers.items()}
            return cls(ranges, str(data['mode']), str(data['quantized_dtype']), observed)
        except (KeyError, TypeError, IndexError, ValueError, AttributeError) as err:
            raise ValueError('%s: malformed calibration table (%s: %s)'
                             % (source, type(err).__name__, err)) from err

    def save(self, path: str) -> None:
        """Write the table as JSON, atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: str) -> 'CalibrationTable':
        try:
            with open(path) as f:
                data = json.load(f)
        except OSError as err:
            raise ValueError('calib_table: cannot read %r (%s)' % (path, err)) from err
        except json.JSONDecodeError as err:
            raise ValueError('calib_table: %r is not valid JSON (%s)' % (path, err)) from err
        return cls.from_dict(data, source='calib_table %r' % path)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = _tmp_path(path)
    try:
        with open(tmp, 'w') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _tmp_path(path: str) -> str:
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, '.%s.tmp-%d' % (base, os.getpid()))


def optional_table(calib_table) -> Optional[CalibrationTable]:
    """A table from a path or a table, or None."""
    if calib_table is None or isinstance(calib_table, CalibrationTable):
        return calib_table
    return CalibrationTable.load(calib_table)
