"""Collectors: stream per-layer statistics of layer outputs during calibration.

A collector has a two-method contract (as in PyTorch's observers and MXNet's
``collect(name, op_name, arr)`` hooks): :meth:`Collector.collect` is called with layer
outputs as calibration reads them, :meth:`Collector.finalize` returns the statistics.
Collectors keep running statistics only, never whole activations, so memory does not
grow with the number of calibration batches. Choosing thresholds from the statistics is
a separate, pure step (:mod:`gluon_int8.thresholds`).

Calibration may read a batch in parts (sub-batches, to bound memory: see
:mod:`gluon_int8.calibrate`). It then calls :meth:`Collector.collect_part` with each
part and a :class:`Part` saying where it sits in the batch's output; by default that is
:meth:`Collector.collect` on the part. The built-in collectors give the same statistics
whether a batch comes whole or in parts: min/max do not care, and
:class:`HistogramCollector` samples the parts as it would the whole batch and bins them
when the batch is complete.

A user collector subclasses :class:`Collector`; its ``finalize`` returns ``LayerStats``
whose ``min``/``max`` are taken as the quantization range of each layer.
"""
import abc
import dataclasses
import math
from typing import Dict, List, Optional

import numpy as np


@dataclasses.dataclass
class LayerStats:
    """Statistics of one layer output over all calibration batches.

    ``hist`` (optional) counts ``|x|`` in ``num_bins`` equal bins over ``[0, hist_max]``;
    ``zeros`` of the counts in ``hist[0]`` are exact zeros (ReLU outputs have many), which
    every threshold represents exactly.
    """
    min: float
    max: float
    hist: Optional[np.ndarray] = None
    hist_max: float = 0.0
    zeros: float = 0.0


@dataclasses.dataclass(frozen=True)
class Part:
    """Where a part of one batch's layer output sits in the whole output.

    ``start`` is the index, in the whole output flattened in C order, of the part's first
    element; ``total`` the number of elements of the whole output. A batch read whole is
    one part with ``start == 0`` and ``total == arr.size``.
    """
    start: int
    total: int

    def is_last(self, size: int) -> bool:
        """True for the part (of ``size`` elements) that completes the batch."""
        return self.start + size == self.total


class Collector(abc.ABC):
    """Base class of all collectors: ``collect`` gathers, ``finalize`` reports.

    Calls for one layer always come in order. A collector whose ``layers_in_parallel``
    is True may get calls for different layers at the same time, from threads
    (calibration reads the tensors of one forward pass on every core); the default,
    False, keeps every call on one thread, as a user collector may need."""

    layers_in_parallel = False

    @abc.abstractmethod
    def collect(self, name: str, op_name: str, arr: np.ndarray) -> None:
        """Take one float32 output ``arr`` of layer ``name`` (produced by op ``op_name``):
        a batch's output, or a part of it (a sub-batch) when calibration splits batches."""

    @abc.abstractmethod
    def finalize(self) -> Dict[str, LayerStats]:
        """Statistics of every layer seen so far."""

    def collect_range(self, name: str, op_name: str, arr: np.ndarray, lo: float,
                      hi: float) -> None:
        """:meth:`collect` with ``arr``'s min and max already known (calibration computes
        them to check for NaN/Inf); the built-in collectors skip their own pass."""
        self.collect(name, op_name, arr)

    def collect_part(self, name: str, op_name: str, arr: np.ndarray, lo: float, hi: float,
                     part: Part) -> None:
        """:meth:`collect_range` on one part of a batch's output (see :class:`Part`).

        ``arr`` may be a read-only view of memory the next forward pass reuses: this
        default hands :meth:`collect_range` a copy, which the collector may keep."""
        self.collect_range(name, op_name, np.array(arr), lo, hi)


class MinMaxCollector(Collector):
    """Running min and max of every layer output (enough for ``mode='naive'``)."""

    layers_in_parallel = True  # one list per layer, made by the layer's first call

    def __init__(self):
        self._ranges: Dict[str, list] = {}

    def collect(self, name, op_name, arr):
        self.collect_range(name, op_name, arr, arr.min(), arr.max())

    def collect_range(self, name, op_name, arr, lo, hi):
        lo, hi = float(lo), float(hi)
        seen = self._ranges.get(name)
        if seen is None:
            self._ranges[name] = [lo, hi]
        else:
            seen[0], seen[1] = min(seen[0], lo), max(seen[1], hi)

    def collect_part(self, name, op_name, arr, lo, hi, part):
        self.collect_range(name, op_name, arr, lo, hi)  # reads nothing but lo and hi

    def finalize(self):
        return {name: LayerStats(lo, hi) for name, (lo, hi) in self._ranges.items()}


class _RunningHistogram:
    """A histogram of |x| over [0, hist_max] whose range doubles as needed.

    Growing by powers of two keeps every old bin inside exactly one new bin, so merging
    is exact: no counts are smeared over a re-binned range.
    """

    def __init__(self, num_bins: int):
        self.counts = np.zeros(num_bins, dtype=np.float64)
        self.hist_max = 0.0
        self.zeros = 0.0
        self.min = math.inf
        self.max = -math.inf

    def _grow_to(self, value: float) -> None:
        if self.hist_max == 0.0:
            self.hist_max = value
            return
        doublings = max(0, math.ceil(math.log2(value / self.hist_max)))
        while self.hist_max * 2 ** doublings < value:  # guard float rounding of log2
            doublings += 1
        if doublings == 0:
            return
        factor = 2 ** doublings
        num_bins = len(self.counts)
        if factor >= num_bins:
            merged = np.zeros(num_bins)
            merged[0] = self.counts.sum()
        else:
            merged = np.zeros(num_bins)
            merged[:num_bins // factor] = self.counts.reshape(-1, factor).sum(axis=1)
        self.counts = merged
        self.hist_max *= factor

    def add(self, sample: np.ndarray, lo: float, hi: float, weight: float) -> None:
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        peak = max(abs(lo), abs(hi))
        if peak > self.hist_max:
            self._grow_to(peak)
        num_bins = len(self.counts)
        if self.hist_max == 0.0:  # all zeros so far: everything sits in bin 0
            self.counts[0] += sample.size * weight
            self.zeros += sample.size * weight
            return
        magnitude = np.abs(sample) if lo < 0 else sample
        idx = (magnitude * (num_bins / self.hist_max)).astype(np.int32)
        np.minimum(idx, num_bins - 1, out=idx)
        self.counts += np.bincount(idx.ravel(), minlength=num_bins) * weight
        # counting ``sample == 0`` (NaN is not zero either way) is ~15x faster than
        # count_nonzero on floats
        self.zeros += np.count_nonzero(sample == 0) * weight


DEFAULT_NUM_BINS = 1024


class HistogramCollector(Collector):
    """Exact min/max plus a running histogram of |x| per layer.

    Parameters
    ----------
    num_bins : int
        Bins of the |x| histogram. The KL search counts spreading a level over the bins
        it spans as information lost, so more bins per level push the entropy threshold
        down: with 8192 bins our Fashion-MNIST ResNet lost 7.9 points of top-1, with 2048
        (TensorRT's count, which it pairs with 128 levels) 0.5, with 1024 0.17 (3000 test
        images; MobileNet 0.3 / 0.0, Inception 0.17 / 0.1). Hence 1024.
    max_samples : int or None
        Histogram at most this many elements of one output per batch: a fixed stride over
        the flattened tensor, each taken element weighted by the stride. Min and max stay
        exact over every element. ``None`` histograms everything (slower: about 5 ns per
        element on one core, against 0.3 ns for min/max).
    """

    layers_in_parallel = True  # state per layer (``_hist``/``_pending`` entries)

    def __init__(self, num_bins: int = DEFAULT_NUM_BINS, max_samples: Optional[int] = 1 << 20):
        if num_bins < 256 or num_bins & (num_bins - 1):  # _grow_to merges 2**k bins
            raise ValueError('num_bins: got %r; expected a power of two >= 256 (255 uint8 '
                             'levels to resolve, bins merged in pairs)' % (num_bins,))
        self.num_bins = num_bins
        self.max_samples = max_samples
        self._hists: Dict[str, _RunningHistogram] = {}
        self._pending: Dict[str, _PendingBatch] = {}

    def collect(self, name, op_name, arr):
        self.collect_range(name, op_name, arr, arr.min(), arr.max())

    def collect_range(self, name, op_name, arr, lo, hi):
        self.collect_part(name, op_name, arr, lo, hi, Part(0, arr.size))

    def collect_part(self, name, op_name, arr, lo, hi, part):
        """Sample the part as the whole batch would be sampled (the stride over the whole
        output, from the part's position); bin the samples once the batch is complete,
        when its min/max, which place the histogram's range, are known."""
        flat = arr.reshape(-1)
        stride = self._stride(part.total)
        sample = flat[-part.start % stride::stride]
        if part.start == 0 and part.is_last(flat.size):  # a whole batch: bin it now
            self._hist(name).add(sample, float(lo), float(hi), float(stride))
            return
        pending = self._pending.get(name)
        if part.start == 0:
            pending = self._pending[name] = _PendingBatch()
        elif pending is None or pending.next_start != part.start:
            raise RuntimeError('collect_part: layer %r got a part starting at element %d, '
                               'expected %s' % (name, part.start, pending and pending.next_start))
        pending.add(np.array(sample), float(lo), float(hi), part.start + flat.size)
        if part.is_last(flat.size):
            del self._pending[name]
            self._hist(name).add(np.concatenate(pending.samples), pending.lo, pending.hi,
                                 float(stride))

    def _stride(self, total: int) -> int:
        if self.max_samples is not None and total > self.max_samples:
            return -(-total // self.max_samples)
        return 1

    def _hist(self, name: str) -> _RunningHistogram:
        hist = self._hists.get(name)
        if hist is None:
            hist = self._hists[name] = _RunningHistogram(self.num_bins)
        return hist

    def finalize(self):
        if self._pending:
            raise RuntimeError('finalize: layers %s have a batch whose last part never came'
                               % sorted(self._pending))
        return {name: LayerStats(h.min, h.max, h.counts.copy(), h.hist_max, h.zeros)
                for name, h in self._hists.items()}


class _PendingBatch:
    """The samples, min and max of the parts of one batch seen so far."""

    def __init__(self):
        self.samples: List[np.ndarray] = []
        self.lo, self.hi = math.inf, -math.inf
        self.next_start = 0

    def add(self, sample: np.ndarray, lo: float, hi: float, next_start: int) -> None:
        self.samples.append(sample)
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.next_start = next_start
