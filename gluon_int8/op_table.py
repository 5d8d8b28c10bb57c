"""The INT8 op table: what MXNet 1.9.1's oneDNN INT8 kernels do with u8/s8 inputs, measured.

Every decision the graph pass takes about an INT8 op is read from this table and from
nowhere else. An entry is one INT8 op or fused pattern with the dtypes of its data
inputs, as the quantization pass emits it; its result is a measurement
(:mod:`gluon_int8.conformance` builds a tiny graph per entry and compares the kernel with
an exact oracle):

* ``ok``: the kernel agrees with the oracle to within two steps of its output grid, and
  within a quarter step on average (a kernel that truncates is biased by half a step);
* ``wrong``: it returns numbers, but wrong ones (a misread dtype, int16 saturation);
* ``crash``: it raises.

Input dtype codes: ``s8`` (int8), ``u8`` (uint8). Patterns: ``conv``, ``conv+act``, ``conv+sum``, ``conv+sum+act`` (oneDNN conv
with fused activation / residual sum / activation after the sum; ``gconv...``: the same with a
grouped conv, 1 < groups < filters, which oneDNN runs with other kernels: depthwise convs
are ``conv``); ``fc``, ``fc+act``
(with ``.w7``: 7-bit weights, ``.ch``: per-channel weights quantized by MXNet);
``<conv pattern>.full``: the conv reading uint8 written at its threshold, codes up to 255
(:func:`uint8_range_factor` widens every uint8 range where this is wrong), for a dense conv
(``conv...``) and a depthwise one (``dwconv...``: groups = channels), measured, never
planned;
``pool:max``, ``pool:avg`` (``:global``); ``concat``, ``add``, ``mul``, ``batchnorm``,
``act:relu``, ``flatten``; ``mul.wide``: a multiply whose output range is the product of
its input ranges, so that nothing exceeds it (MXNet's INT8 multiply casts to int8 without
saturating, so a clipped value wraps around; the entry shows that it also truncates);
``add.rq``: an add that emits int32 into a requantize node of its own; ``layout:<op>``: a
plain MXNet layout op (Reshape, SwapAxis, transpose, SliceChannel, expand_dims) run on an
int8 tensor, its output read with its input's range.

Kernels differ between CPUs (oneDNN dispatches on the instruction set), so results are
kept per ISA. :data:`RECORDED` holds the columns measured so far; on a CPU without one the
table is measured once per process when first needed (about a second). The conformance
test measures every entry and fails when a recorded result no longer holds, so a future
MXNet build that fixes a kernel is noticed. ``gluon-int8 op-table`` prints the table of
this machine.

Models: Intel Neural Compressor's per-op capability table for MXNet
(``adaptor/mxnet.yaml``) and PyTorch's ``backend_config/onednn.py``; unlike those, every
row here is measured.
"""
import dataclasses
import functools
import logging
import os
from typing import Dict, Iterable, Mapping, Optional, Tuple

import mxnet as mx

log = logging.getLogger(__name__)

OK, WRONG, CRASH = 'ok', 'wrong', 'crash'
# conformance tolerance: max |kernel - oracle| in steps of the output grid. Correct
# kernels stay below 1.4 (rounding, and the 7-bit weights oneDNN uses for s8 inputs
# without VNNI); every defect found measured 10 steps or more.
TOLERANCE_STEPS = 2.0
# and on average: a kernel that truncates instead of rounding shrinks every value by half a
# step (-0.5); rounding kernels measured within 0.05
BIAS_STEPS = 0.25


@dataclasses.dataclass(frozen=True)
class Entry:
    """One INT8 op or fused pattern with the dtypes of its data inputs."""
    pattern: str
    inputs: Tuple[str, ...]

    @property
    def key(self) -> str:
        return '%s(%s)' % (self.pattern, ','.join(self.inputs))


@dataclasses.dataclass(frozen=True)
class Result:
    """What the kernel of one entry did on one ISA."""
    verdict: str                  # ok | wrong | crash
    error_steps: Optional[float]  # max |kernel - oracle| in output steps (None: crashed)
    output: str                   # dtype of the output: u8, s8, f32 ('-' when it crashed)
    detail: str = ''              # the error of a crash


def _combos(*choices) -> Iterable[Tuple[str, ...]]:
    if not choices:
        yield ()
        return
    for head in choices[0]:
        for tail in _combos(*choices[1:]):
            yield (head,) + tail


DTYPES = ('u8', 's8')

ENTRIES: Tuple[Entry, ...] = tuple(
    [Entry(g + p, c) for g in ('', 'g')
     for p in ('conv', 'conv+act', 'conv+act.s', 'conv+act.clip') for c in _combos(DTYPES)]
    + [Entry(g + p, c) for g in ('', 'g') for p in ('conv+sum', 'conv+sum+act', 'conv+sum+act.s')
       for c in _combos(DTYPES, DTYPES)]
    + [Entry(h + p + '.full', ('u8',)) for h in ('', 'dw')
       for p in ('conv', 'conv+act', 'conv+act.s', 'conv+act.clip')]
    + [Entry(p, c) for p in ('fc', 'fc+act', 'fc.w7', 'fc+act.w7', 'fc.ch', 'fc+act.ch')
       for c in _combos(DTYPES)]
    + [Entry(p, c) for p in ('pool:max', 'pool:avg', 'pool:max:global', 'pool:avg:global',
                             'batchnorm', 'act:relu', 'flatten') for c in _combos(DTYPES)]
    + [Entry(p, c) for p in ('add', 'add.rq', 'mul', 'mul.wide')
       for c in _combos(DTYPES, DTYPES)]
    + [Entry('concat', c) for c in (('u8',), ('s8',), ('s8', 'u8'))]
    + [Entry('layout:' + op, c) for op in ('Reshape', 'SwapAxis', 'transpose', 'SliceChannel',
                                          'expand_dims', 'slice') for c in _combos(DTYPES)])
ENTRY_KEYS = frozenset(e.key for e in ENTRIES)
_PATTERN_NAMES = frozenset(e.pattern for e in ENTRIES)

# Measured columns: ``gluon-int8 op-table --python`` prints one for the CPU it runs on. Keyed by oneDNN's ISA name (see cpu_isa).
RECORDED: Dict[str, Dict[str, Result]] = {
    # AMD EPYC, AVX2 without VNNI (no AVX-512): u8*s8 products saturate in int16 pairs
    'mxnet-1.9.1/avx2': {
        'conv(u8)': Result('ok', 0.63, 's8'),
        'conv(s8)': Result('ok', 0.5, 's8'),
        'conv+act(u8)': Result('ok', 0.66, 'u8'),
        'conv+act(s8)': Result('ok', 0.5, 'u8'),
        'conv+act.s(u8)': Result('ok', 0.61, 's8'),
        'conv+act.s(s8)': Result('ok', 0.5, 's8'),
        'conv+act.clip(u8)': Result('wrong', 72.5, 'u8'),
        'conv+act.clip(s8)': Result('wrong', 72.5, 'u8'),
        'conv.full(u8)': Result('wrong', 26.27, 's8'),
        'conv+act.full(u8)': Result('wrong', 28.18, 'u8'),
        'conv+act.s.full(u8)': Result('wrong', 26.93, 's8'),
        'conv+act.clip.full(u8)': Result('wrong', 72.5, 'u8'),
        'dwconv.full(u8)': Result('ok', 0.94, 's8'),
        'dwconv+act.full(u8)': Result('ok', 1.2, 'u8'),
        'dwconv+act.s.full(u8)': Result('ok', 1.03, 's8'),
        'dwconv+act.clip.full(u8)': Result('wrong', 19.5, 'u8'),
        'gconv(u8)': Result('wrong', 8.12, 's8'),
        'gconv(s8)': Result('wrong', 8.34, 's8'),
        'gconv+act(u8)': Result('wrong', 5.26, 'u8'),
        'gconv+act(s8)': Result('wrong', 6.43, 'u8'),
        'gconv+act.s(u8)': Result('wrong', 5.47, 's8'),
        'gconv+act.s(s8)': Result('wrong', 8.11, 's8'),
        'gconv+act.clip(u8)': Result('wrong', 72.5, 'u8'),
        'gconv+act.clip(s8)': Result('wrong', 72.5, 'u8'),
        'conv+sum(u8,u8)': Result('wrong', 255.5, 's8'),
        'conv+sum(u8,s8)': Result('ok', 0.65, 's8'),
        'conv+sum(s8,u8)': Result('wrong', 255.5, 's8'),
        'conv+sum(s8,s8)': Result('ok', 0.5, 's8'),
        'conv+sum+act(u8,u8)': Result('ok', 0.68, 'u8'),
        'conv+sum+act(u8,s8)': Result('wrong', 55.08, 'u8'),
        'conv+sum+act(s8,u8)': Result('ok', 0.5, 'u8'),
        'conv+sum+act(s8,s8)': Result('wrong', 55.39, 'u8'),
        'conv+sum+act.s(u8,u8)': Result('wrong', 255.5, 's8'),
        'conv+sum+act.s(u8,s8)': Result('ok', 0.63, 's8'),
        'conv+sum+act.s(s8,u8)': Result('wrong', 253.5, 's8'),
        'conv+sum+act.s(s8,s8)': Result('ok', 0.5, 's8'),
        'gconv+sum(u8,u8)': Result('wrong', 255.5, 's8'),
        'gconv+sum(u8,s8)': Result('wrong', 11.01, 's8'),
        'gconv+sum(s8,u8)': Result('wrong', 251.63, 's8'),
        'gconv+sum(s8,s8)': Result('wrong', 4.51, 's8'),
        'gconv+sum+act(u8,u8)': Result('wrong', 7.46, 'u8'),
        'gconv+sum+act(u8,s8)': Result('wrong', 55.65, 'u8'),
        'gconv+sum+act(s8,u8)': Result('wrong', 9.79, 'u8'),
        'gconv+sum+act(s8,s8)': Result('wrong', 55.36, 'u8'),
        'gconv+sum+act.s(u8,u8)': Result('wrong', 255.5, 's8'),
        'gconv+sum+act.s(u8,s8)': Result('wrong', 6.4, 's8'),
        'gconv+sum+act.s(s8,u8)': Result('wrong', 255.5, 's8'),
        'gconv+sum+act.s(s8,s8)': Result('wrong', 9.39, 's8'),
        'fc(u8)': Result('ok', 0.0, 'f32'),
        'fc(s8)': Result('wrong', 17.74, 'f32'),
        'fc+act(u8)': Result('ok', 0.48, 'u8'),
        'fc+act(s8)': Result('wrong', 43.08, 'u8'),
        'fc.w7(u8)': Result('ok', 0.0, 'f32'),
        'fc.w7(s8)': Result('ok', 0.0, 'f32'),
        'fc+act.w7(u8)': Result('ok', 0.5, 'u8'),
        'fc+act.w7(s8)': Result('ok', 0.5, 'u8'),
        'fc.ch(u8)': Result('ok', 0.11, 'f32'),
        'fc.ch(s8)': Result('wrong', 31.67, 'f32'),
        'fc+act.ch(u8)': Result('ok', 0.85, 'u8'),
        'fc+act.ch(s8)': Result('wrong', 54.49, 'u8'),
        'pool:max(u8)': Result('ok', 0.0, 'u8'),
        'pool:max(s8)': Result('ok', 0.0, 's8'),
        'pool:avg(u8)': Result('ok', 0.44, 'u8'),
        'pool:avg(s8)': Result('ok', 0.44, 's8'),
        'pool:max:global(u8)': Result('ok', 0.0, 'u8'),
        'pool:max:global(s8)': Result('ok', 0.0, 's8'),
        'pool:avg:global(u8)': Result('ok', 0.5, 'u8'),
        'pool:avg:global(s8)': Result('ok', 0.48, 's8'),
        'batchnorm(u8)': Result('wrong', 2.12, 's8'),
        'batchnorm(s8)': Result('ok', 0.5, 's8'),
        'act:relu(u8)': Result('wrong', 63.62, 's8'),
        'act:relu(s8)': Result('ok', 0.0, 's8'),
        'flatten(u8)': Result('ok', 0.0, 'u8'),
        'flatten(s8)': Result('ok', 0.0, 's8'),
        'add(u8,u8)': Result('wrong', 73.21, 'u8', 'reuses the oneDNN primitive it cached for another output range'),
        'add(u8,s8)': Result('wrong', 18.92, 's8'),
        'add(s8,u8)': Result('wrong', 42.47, 's8', 'reuses the oneDNN primitive it cached for another output range'),
        'add(s8,s8)': Result('wrong', 36.62, 's8', 'reuses the oneDNN primitive it cached for another output range'),
        'add.rq(u8,u8)': Result('wrong', 0.96, 'u8', 'biased: every value -0.25 steps off on average (truncation)'),
        'add.rq(u8,s8)': Result('wrong', 105.88, 's8'),
        'add.rq(s8,u8)': Result('wrong', 78.79, 's8'),
        'add.rq(s8,s8)': Result('ok', 0.96, 's8'),
        'mul(u8,u8)': Result('crash', None, '-', 'MXNetError: Check failed: mshadow: :DataType<DType>::kFlag == type_flag_: TBlob.get_with_shape: data type do not match specified type.Expected: unsigned char v.s. given char'),
        'mul(u8,s8)': Result('crash', None, '-', 'MXNetError: Check failed: mshadow: :DataType<DType>::kFlag == type_flag_: TBlob.get_with_shape: data type do not match specified type.Expected: unsigned char v.s. given char'),
        'mul(s8,u8)': Result('crash', None, '-', 'MXNetError: Check failed: mshadow: :DataType<DType>::kFlag == type_flag_: TBlob.get_with_shape: data type do not match specified type.Expected: unsigned char v.s. given char'),
        'mul(s8,s8)': Result('wrong', 255.5, 's8'),
        'mul.wide(u8,u8)': Result('crash', None, '-', 'MXNetError: Check failed: mshadow: :DataType<DType>::kFlag == type_flag_: TBlob.get_with_shape: data type do not match specified type.Expected: unsigned char v.s. given char'),
        'mul.wide(u8,s8)': Result('crash', None, '-', 'MXNetError: Check failed: mshadow: :DataType<DType>::kFlag == type_flag_: TBlob.get_with_shape: data type do not match specified type.Expected: unsigned char v.s. given char'),
        'mul.wide(s8,u8)': Result('crash', None, '-', 'MXNetError: Check failed: mshadow: :DataType<DType>::kFlag == type_flag_: TBlob.get_with_shape: data type do not match specified type.Expected: unsigned char v.s. given char'),
        'mul.wide(s8,s8)': Result('wrong', 1.0, 's8', 'biased: every value -0.50 steps off on average (truncation)'),
        'concat(u8)': Result('ok', 0.5, 'u8'),
        'concat(s8)': Result('ok', 0.5, 's8'),
        'concat(s8,u8)': Result('ok', 0.5, 's8'),
        'layout:Reshape(u8)': Result('ok', 0.5, 'u8'),
        'layout:Reshape(s8)': Result('ok', 0.5, 's8'),
        'layout:SwapAxis(u8)': Result('ok', 0.5, 'u8'),
        'layout:SwapAxis(s8)': Result('ok', 0.5, 's8'),
        'layout:transpose(u8)': Result('ok', 0.5, 'u8'),
        'layout:transpose(s8)': Result('ok', 0.5, 's8'),
        'layout:SliceChannel(u8)': Result('ok', 0.5, 'u8'),
        'layout:SliceChannel(s8)': Result('ok', 0.5, 's8'),
        'layout:expand_dims(u8)': Result('ok', 0.5, 'u8'),
        'layout:expand_dims(s8)': Result('ok', 0.5, 's8'),
        'layout:slice(u8)': Result('ok', 0.5, 'u8'),
        'layout:slice(s8)': Result('ok', 0.5, 's8'),
    },
    # AMD EPYC with AVX-512 VNNI: differs from avx2 only where int16 pair sums saturated
    # there (full-range uint8 inputs, int8-input FCs, uint8 BatchNorm)
    'mxnet-1.9.1/avx512_core_vnni': {
        'conv(u8)': Result('ok', 0.63, 's8'),
        'conv(s8)': Result('ok', 0.63, 's8'),
        'conv+act(u8)': Result('ok', 0.88, 'u8'),
        'conv+act(s8)': Result('ok', 0.71, 'u8'),
        'conv+act.s(u8)': Result('ok', 0.63, 's8'),
        'conv+act.s(s8)': Result('ok', 0.63, 's8'),
        'conv+act.clip(u8)': Result('wrong', 1.37, 'u8', 'biased: every value -0.34 steps off on average (truncation)'),
        'conv+act.clip(s8)': Result('wrong', 1.4, 'u8', 'biased: every value -0.29 steps off on average (truncation)'),
        'gconv(u8)': Result('wrong', 7.93, 's8'),
        'gconv(s8)': Result('wrong', 8.75, 's8'),
        'gconv+act(u8)': Result('wrong', 11.5, 'u8'),
        'gconv+act(s8)': Result('wrong', 9.2, 'u8'),
        'gconv+act.s(u8)': Result('wrong', 5.6, 's8'),
        'gconv+act.s(s8)': Result('wrong', 7.84, 's8'),
        'gconv+act.clip(u8)': Result('wrong', 16.42, 'u8'),
        'gconv+act.clip(s8)': Result('wrong', 31.8, 'u8'),
        'conv+sum(u8,u8)': Result('wrong', 255.5, 's8'),
        'conv+sum(u8,s8)': Result('ok', 0.65, 's8'),
        'conv+sum(s8,u8)': Result('wrong', 254.98, 's8'),
        'conv+sum(s8,s8)': Result('ok', 0.62, 's8'),
        'conv+sum+act(u8,u8)': Result('ok', 0.89, 'u8'),
        'conv+sum+act(u8,s8)': Result('wrong', 128.5, 'u8'),
        'conv+sum+act(s8,u8)': Result('ok', 0.76, 'u8'),
        'conv+sum+act(s8,s8)': Result('wrong', 128.5, 'u8'),
        'conv+sum+act.s(u8,u8)': Result('wrong', 255.5, 's8'),
        'conv+sum+act.s(u8,s8)': Result('ok', 0.61, 's8'),
        'conv+sum+act.s(s8,u8)': Result('wrong', 255.5, 's8'),
        'conv+sum+act.s(s8,s8)': Result('ok', 0.6, 's8'),
        'gconv+sum(u8,u8)': Result('wrong', 255.5, 's8'),
        'gconv+sum(u8,s8)': Result('wrong', 13.6, 's8'),
        'gconv+sum(s8,u8)': Result('wrong', 255.5, 's8'),
        'gconv+sum(s8,s8)': Result('wrong', 4.29, 's8'),
        'gconv+sum+act(u8,u8)': Result('wrong', 12.44, 'u8'),
        'gconv+sum+act(u8,s8)': Result('wrong', 128.5, 'u8'),
        'gconv+sum+act(s8,u8)': Result('wrong', 16.13, 'u8'),
        'gconv+sum+act(s8,s8)': Result('wrong', 128.5, 'u8'),
        'gconv+sum+act.s(u8,u8)': Result('wrong', 255.5, 's8'),
        'gconv+sum+act.s(u8,s8)': Result('wrong', 6.82, 's8'),
        'gconv+sum+act.s(s8,u8)': Result('wrong', 255.35, 's8'),
        'gconv+sum+act.s(s8,s8)': Result('wrong', 8.87, 's8'),
        'conv.full(u8)': Result('ok', 0.65, 's8'),
        'conv+act.full(u8)': Result('ok', 0.8, 'u8'),
        'conv+act.s.full(u8)': Result('ok', 0.64, 's8'),
        'conv+act.clip.full(u8)': Result('wrong', 1.38, 'u8', 'biased: every value -0.36 steps off on average (truncation)'),
        'dwconv.full(u8)': Result('ok', 0.94, 's8'),
        'dwconv+act.full(u8)': Result('ok', 1.89, 'u8'),
        'dwconv+act.s.full(u8)': Result('ok', 1.03, 's8'),
        'dwconv+act.clip.full(u8)': Result('ok', 1.48, 'u8'),
        'fc(u8)': Result('ok', 0.0, 'f32'),
        'fc(s8)': Result('ok', 0.0, 'f32'),
        'fc+act(u8)': Result('ok', 0.5, 'u8'),
        'fc+act(s8)': Result('ok', 0.5, 'u8'),
        'fc.w7(u8)': Result('ok', 0.0, 'f32'),
        'fc.w7(s8)': Result('ok', 0.0, 'f32'),
        'fc+act.w7(u8)': Result('ok', 0.5, 'u8'),
        'fc+act.w7(s8)': Result('ok', 0.5, 'u8'),
        'fc.ch(u8)': Result('ok', 0.11, 'f32'),
        'fc.ch(s8)': Result('ok', 0.15, 'f32'),
        'fc+act.ch(u8)': Result('ok', 1.36, 'u8'),
        'fc+act.ch(s8)': Result('ok', 1.1, 'u8'),
        'pool:max(u8)': Result('ok', 0.0, 'u8'),
        'pool:max(s8)': Result('ok', 0.0, 's8'),
        'pool:avg(u8)': Result('ok', 0.44, 'u8'),
        'pool:avg(s8)': Result('ok', 0.44, 's8'),
        'pool:max:global(u8)': Result('ok', 0.0, 'u8'),
        'pool:max:global(s8)': Result('ok', 0.0, 's8'),
        'pool:avg:global(u8)': Result('ok', 0.5, 'u8'),
        'pool:avg:global(s8)': Result('ok', 0.48, 's8'),
        'batchnorm(u8)': Result('ok', 1.44, 's8'),
        'batchnorm(s8)': Result('ok', 0.5, 's8'),
        'act:relu(u8)': Result('wrong', 191.87, 's8'),
        'act:relu(s8)': Result('ok', 0.0, 's8'),
        'flatten(u8)': Result('ok', 0.0, 'u8'),
        'flatten(s8)': Result('ok', 0.0, 's8'),
        'add(u8,u8)': Result('wrong', 0.5, 'u8', 'biased: every value -0.26 steps off on average (truncation)'),
        'add(u8,s8)': Result('wrong', 21.07, 's8'),
        'add(s8,u8)': Result('wrong', 41.94, 's8', 'reuses the oneDNN primitive it cached for another output range'),
        'add(s8,s8)': Result('wrong', 36.62, 's8', 'reuses the oneDNN primitive it cached for another output range'),
        'add.rq(u8,u8)': Result('wrong', 0.99, 'u8', 'biased: every value -0.35 steps off on average (truncation)'),
        'add.rq(u8,s8)': Result('wrong', 105.64, 's8'),
        'add.rq(s8,u8)': Result('wrong', 79.27, 's8'),
        'add.rq(s8,s8)': Result('ok', 0.96, 's8'),
        'mul(u8,u8)': Result('crash', None, '-', 'MXNetError: Check failed: mshadow: :DataType<DType>::kFlag == type_flag_: TBlob.get_with_shape: data type do not match specified type.Expected: unsigned char v.s. given char'),
        'mul(u8,s8)': Result('crash', None, '-', 'MXNetError: Check failed: mshadow: :DataType<DType>::kFlag == type_flag_: TBlob.get_with_shape: data type do not match specified type.Expected: unsigned char v.s. given char'),
        'mul(s8,u8)': Result('crash', None, '-', 'MXNetError: Check failed: mshadow: :DataType<DType>::kFlag == type_flag_: TBlob.get_with_shape: data type do not match specified type.Expected: unsigned char v.s. given char'),
        'mul(s8,s8)': Result('wrong', 255.5, 's8'),
        'mul.wide(u8,u8)': Result('crash', None, '-', 'MXNetError: Check failed: mshadow: :DataType<DType>::kFlag == type_flag_: TBlob.get_with_shape: data type do not match specified type.Expected: unsigned char v.s. given char'),
        'mul.wide(u8,s8)': Result('crash', None, '-', 'MXNetError: Check failed: mshadow: :DataType<DType>::kFlag == type_flag_: TBlob.get_with_shape: data type do not match specified type.Expected: unsigned char v.s. given char'),
        'mul.wide(s8,u8)': Result('crash', None, '-', 'MXNetError: Check failed: mshadow: :DataType<DType>::kFlag == type_flag_: TBlob.get_with_shape: data type do not match specified type.Expected: unsigned char v.s. given char'),
        'mul.wide(s8,s8)': Result('wrong', 1.0, 's8', 'biased: every value -0.50 steps off on average (truncation)'),
        'concat(u8)': Result('ok', 0.5, 'u8'),
        'concat(s8)': Result('ok', 0.5, 's8'),
        'concat(s8,u8)': Result('ok', 0.5, 's8'),
        'layout:Reshape(u8)': Result('ok', 0.76, 'u8'),
        'layout:Reshape(s8)': Result('ok', 0.62, 's8'),
        'layout:SwapAxis(u8)': Result('ok', 0.73, 'u8'),
        'layout:SwapAxis(s8)': Result('ok', 0.61, 's8'),
        'layout:transpose(u8)': Result('ok', 0.78, 'u8'),
        'layout:transpose(s8)': Result('ok', 0.63, 's8'),
        'layout:SliceChannel(u8)': Result('ok', 0.74, 'u8'),
        'layout:SliceChannel(s8)': Result('ok', 0.63, 's8'),
        'layout:expand_dims(u8)': Result('ok', 0.74, 'u8'),
        'layout:expand_dims(s8)': Result('ok', 0.63, 's8'),
        'layout:slice(u8)': Result('ok', 0.7, 'u8'),
        'layout:slice(s8)': Result('ok', 0.59, 's8'),
    },
}


# -- what the graph passes of MXNet 1.9.1 do with ops (read from its source) -------------

# fused ops that carry weights (conv, FC: the INT8 nodes whose weights are quantized)
WEIGHT_OPS = ('_sg_mkldnn_conv', '_sg_mkldnn_fully_connected')
# FP32 ops with an INT8 kernel: when one stays FP32 without an exclusion, the pass chose
# so (unsupported attributes such as Concat on dim=-1, FP32 neighbours under 'smart')
INT8_CAPABLE = frozenset(['_sg_mkldnn_conv', '_sg_mkldnn_fully_connected', 'Convolution',
                          'FullyConnected', 'Pooling', 'Concat', 'Flatten', 'elemwise_add',
                          'elemwise_mul', 'Activation', 'BatchNorm', 'Embedding'])
# INT8 nodes whose output carries the range (and dtype) of their data input(s), and the
# FP32 ops they come from or that would (layout ops have no INT8 kernel in 1.9.1)
PASS_THROUGH = frozenset(['_contrib_quantized_pooling', '_contrib_quantized_flatten',
                          '_contrib_quantized_act', '_contrib_quantized_concat'])
RANGE_CARRYING = frozenset(['Pooling', 'Flatten', 'Concat', 'concat', 'Reshape', 'reshape',
                            'transpose', 'expand_dims', 'squeeze', 'slice', 'SliceChannel'])
# FP32 ops that only move bytes: run on an int8 tensor they give the same values, with
# their input's range (gluon-int8 rewrites them onto the int8 tensor where the table says
# the plain MXNet op does so exactly)
LAYOUT_OPS = frozenset(['Reshape', 'SwapAxis', 'transpose', 'SliceChannel', 'expand_dims',
                        'squeeze', 'slice_axis', 'slice'])
QUANTIZE, DEQUANTIZE, REQUANTIZE = ('_contrib_quantize_v2', '_contrib_dequantize',
                                    '_contrib_requantize')
CONVERSIONS = frozenset([QUANTIZE, DEQUANTIZE, REQUANTIZE])
# detection ops whose inputs must stay FP32 (quantize_mode='full' breaks them)
DETECTION_OPS = frozenset(['_contrib_box_nms', '_contrib_MultiBoxDetection'])
# the oneDNN fusion passes fuse these consumers into a preceding head (mkldnn_conv_property.h,
# mkldnn_fc_property.h)
FUSION_HEADS = frozenset(['Convolution', 'FullyConnected'])
FUSABLE_CONSUMERS = frozenset(['BatchNorm', 'Activation', 'LeakyReLU', 'clip', 'elemwise_add',
                               'square', 'sqrt', 'exp', 'abs'])
_PATTERNS = {'_contrib_quantized_concat': 'concat', '_contrib_quantized_flatten': 'flatten',
             '_contrib_quantized_batch_norm': 'batchnorm', '_contrib_quantized_elemwise_add': 'add',
             '_contrib_quantized_elemwise_mul': 'mul'}


def _true(attrs: Mapping[str, str], key: str) -> bool:
    return str(attrs.get(key, 'false')).lower() == 'true'


# the slope of the leaky ReLU the plan gives a ReLU'd conv so that it emits int8 (see
# gluon_int8.plan): a negative input x gives SIGNED_SLOPE * x, below half a step of any
# 8-bit grid whose range is above 2.6e-4 * |x| (MXNet counts it a signed activation)
SIGNED_SLOPE = 1e-6
# the activation fused into a conv or FC -> the pattern's suffix: ReLU (uint8 output)
# none, a leaky ReLU ``.s`` (int8 output), a clip at 0 (ReLU6) ``.clip``
_ACT_FORMS = {('Activation', 'relu'): '', ('LeakyReLU', 'leaky'): '.s'}


def act_form(node: dict) -> Optional[str]:
    """The suffix of the activation fused into ``node`` (a fused conv or FC): the last
    one of its subgraph; None for an activation the table never measured."""
    inner = [n for n in node['subgraphs'][0]['nodes']
             if n['op'] in ('Activation', 'LeakyReLU', 'clip')]
    if not inner:
        return None
    act = inner[-1]
    attrs = act.get('attrs', {})
    if act['op'] == 'clip':
        return '.clip' if float(attrs.get('a_min', 'nan')) == 0.0 else None
    return _ACT_FORMS.get((act['op'], attrs.get('act_type')))


def grouped(node: dict) -> bool:
    """Whether a fused conv node's conv is grouped and not depthwise (1 < groups <
    filters)."""
    conv = next(n for n in node['subgraphs'][0]['nodes'] if n['op'] == 'Convolution')
    groups = int(conv['attrs'].get('num_group', '1'))
    return 1 < groups < int(conv['attrs']['num_filter'])


def pattern_of(node: dict, variant: str = '') -> Optional[str]:
    """The pattern of an INT8 node of a quantized graph (None: not an op the table
    knows). ``variant``: the form the plan gave it ('.w7', '.wide', '.rq'), where that
    form exists for its op (``.wide`` is measured, never planned: it truncates)."""
    op, attrs = node['op'], node.get('attrs', {})
    if op == '_sg_mkldnn_conv':
        if _true(attrs, 'with_act') and _true(attrs, 'with_sum'):
            return None  # conv+act+sum: MXNet 1.9.1 does not support it
        head = 'gconv' if grouped(node) else 'conv'
        if not (_true(attrs, 'with_act') or _true(attrs, 'with_postsum_act')):
            return head + ('+sum' if _true(attrs, 'with_sum') else '')
        form = act_form(node)
        base = head + ('+sum+act' if _true(attrs, 'with_sum') else '+act')
        return base + form if form is not None and base + form in _PATTERN_NAMES else None
    if op == '_sg_mkldnn_fully_connected':
        if _true(attrs, 'with_eltwise') and act_form(node) != '':
            return None  # an FC with another activation than ReLU: never measured
        base = 'fc+act' if _true(attrs, 'with_eltwise') else 'fc'
        return base + ('.ch' if _true(attrs, 'channel_wise_quantize') else variant)
    if op == '_contrib_quantized_pooling':
        return 'pool:%s%s' % (attrs.get('pool_type', 'max'),
                              ':global' if _true(attrs, 'global_pool') else '')
    if op == '_contrib_quantized_act':
        return 'act:%s' % attrs.get('act_type', 'relu')
    base = _PATTERNS.get(op)
    return base + variant if base in ('add', 'mul') else base


# -- results -------------------------------------------------------------------------------

def cpu_isa() -> str:
    """The instruction set oneDNN dispatches int8 kernels on, from /proc/cpuinfo.

    Capped by ``DNNL_MAX_CPU_ISA`` when the environment sets it (read, never written).
    'unknown' where /proc/cpuinfo is not readable: the table is then measured.
    """
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line.split(':', 1)[1].split() for line in f
                          if line.startswith('flags')), [])
    except OSError:
        return 'unknown'
    flags = set(flags)
    order = ['sse41', 'avx', 'avx2', 'avx2_vnni', 'avx512_core', 'avx512_core_vnni']
    if {'avx512f', 'avx512bw', 'avx512vl', 'avx512dq'} <= flags:
        isa = 'avx512_core_vnni' if 'avx512_vnni' in flags else 'avx512_core'
    elif 'avx2' in flags:
        isa = 'avx2_vnni' if 'avx_vnni' in flags else 'avx2'
    elif 'avx' in flags:
        isa = 'avx'
    elif 'sse4_1' in flags:
        isa = 'sse41'
    else:
        return 'unknown'
    cap = os.environ.get('DNNL_MAX_CPU_ISA', os.environ.get('MKLDNN_MAX_CPU_ISA', ''))
    cap = cap.lower().replace('avx512_core_amx', 'avx512_core_vnni')
    if cap in order and order.index(cap) < order.index(isa):
        isa = cap
    return isa


def has_vnni() -> bool:
    """Whether oneDNN's int8 kernels here have VNNI (int32 dot products). Without it, x86
    u8 x s8 products are added in pairs in int16 and saturate, and oneDNN halves the
    weight scale of a conv whose source is s8 (7-bit weights)."""
    return 'vnni' in cpu_isa()


def uint8_range_factor() -> float:
    """How much wider than its calibrated threshold a uint8 tensor's range is written.

    2 on a CPU without VNNI: there the u8 x s8 products of a conv or FC are added in
    pairs in int16, which full-range uint8 codes saturate (2 * 255 * 127 > 32767). At
    twice the range, every value up to the threshold has a code below 128, and
    2 * 127 * 127 < 32767: nothing within the calibrated range can saturate, and the conv
    keeps 8-bit weights (with an int8 source oneDNN halves them). What lies between the
    threshold and twice it (clipped by entropy, or unseen in calibration) keeps its
    value; the self-check measures whether it saturates on the calibration batch. 1 with
    VNNI (int32 dot products)."""
    return 1.0 if has_vnni() else 2.0


def machine() -> str:
    """The key of this machine's column: MXNet version and ISA."""
    return 'mxnet-%s/%s' % (mx.__version__, cpu_isa())


@functools.lru_cache(maxsize=None)
def results() -> Dict[str, Result]:
    """This machine's results: the recorded column, else measured now (once per process)."""
    recorded = RECORDED.get(machine())
    if recorded is not None:
        return recorded
    from .conformance import measure_all  # pylint: disable=import-outside-toplevel
    log.info('no recorded INT8 op table for %s: measuring its %d entries', machine(),
             len(ENTRIES))
    return measure_all()


def lookup(pattern: str, inputs: Tuple[str, ...]) -> Optional[Result]:
    """The result of ``pattern`` with these input dtypes on this machine (None: the
    combination is not in the table, so nothing is known about it)."""
    return results().get(Entry(pattern, normalize_inputs(pattern, inputs)).key)


def normalize_inputs(pattern: str, inputs: Tuple[str, ...]) -> Tuple[str, ...]:
    """Concat is measured by the set of its input dtypes; others by position."""
    if pattern == 'concat':
        return tuple(sorted(set(inputs)))
    return tuple(inputs)


def is_ok(pattern: str, inputs: Tuple[str, ...]) -> bool:
    found = lookup(pattern, inputs)
    return found is not None and found.verdict == OK


def describe(pattern: str, inputs: Tuple[str, ...]) -> str:
    """Why a combination may not run INT8, for the layer table."""
    found = lookup(pattern, inputs)
    key = Entry(pattern, normalize_inputs(pattern, inputs)).key
    if found is None:
        return 'INT8 %s is not in the op table (never measured)' % key
    if found.verdict == CRASH:
        return 'INT8 %s fails in MXNet %s on %s: %s' % (key, mx.__version__, cpu_isa(),
                                                        found.detail)
    return ('INT8 %s computes wrong values in MXNet %s on %s (%.0f output steps off in '
            'the conformance probe)' % (key, mx.__version__, cpu_isa(), found.error_steps))
