"""Speed measurement: the reference article's three variants and their timings.

``variants`` builds, from one FP32 network, the article's *Base* (the hybridized FP32
graph), *Fusion* (the same graph after the oneDNN FP32 fusion passes) and, given a
quantized block, *Fusion+Quantization*. ``latency_ms`` and ``throughput`` time a block
as medians over repeated runs after warm-up. All blocks run with ``static_alloc`` and
``static_shape``, as a deployment would.

The number of OpenMP threads is whatever the process was started with
(``OMP_NUM_THREADS``); :func:`omp_threads` reports it so every table can state it.

MXNet reads its engine and OpenMP settings when it starts, so a library cannot apply
them (and gluon-int8 never writes the environment). :data:`RECOMMENDED_ENV` is what we
measured to serve INT8 inference best on this 2-core VNNI machine: the NaiveEngine runs
ops in the calling thread (no scheduler hand-off per op) and compact affinity with a
1 ms spin keeps the OpenMP team warm; ResNet50 INT8 went from 16.6 to 10.9 ms at batch 1
and 92 to 105 img/s at batch 64, MobileNet from 4.1 to 2.1 ms.
"""
import os
import statistics
import time
from typing import Dict, Sequence

import mxnet as mx

from .fuse import FP32_BACKEND, fuse
from .trace import build_symbol_block, trace


RECOMMENDED_ENV = {
    'MXNET_ENGINE_TYPE': 'NaiveEngine',
    'KMP_AFFINITY': 'granularity=fine,compact,1,0',
    'KMP_BLOCKTIME': '1',
}


def environment() -> Dict[str, str]:
    """The engine/thread settings of this process that the tables should state."""
    keys = ['OMP_NUM_THREADS'] + sorted(RECOMMENDED_ENV)
    return {k: os.environ.get(k, '(unset)') for k in keys}


def missing_recommendations() -> Dict[str, str]:
    """Recommended settings this process runs without."""
    return {k: v for k, v in RECOMMENDED_ENV.items() if os.environ.get(k) != v}


def omp_threads() -> str:
    """The thread count MXNet's OpenMP runs with in this process, as configured."""
    return os.environ.get('OMP_NUM_THREADS', 'mxnet default (physical cores)')


def _deploy(block):
    block.hybridize(static_alloc=True, static_shape=True)
    return block


def variants(net, example_inputs: Sequence[mx.nd.NDArray], qnet=None) -> Dict[str, object]:
    """{'base': FP32, 'fusion': fused FP32[, 'int8': qnet]} as deployable blocks."""
    traced = trace(net, example_inputs)
    out = {}
    for name, symbol in (('base', traced.symbol), ('fusion', fuse(traced.symbol, FP32_BACKEND))):
        out[name] = _deploy(build_symbol_block(symbol, traced.data_names, traced.arg_params,
                                               traced.aux_params))
    if qnet is not None:
        out['int8'] = qnet
    return out


def _run(block, inputs):
    outs = block(*inputs)
    for o in outs if isinstance(outs, (list, tuple)) else [outs]:
        o.wait_to_read()


def _timings(block, inputs, warmup: int, runs: int):
    for _ in range(warmup):
        _run(block, inputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        _run(block, inputs)
        times.append(time.perf_counter() - start)
    return times


def latency_ms(block, shapes: Sequence[tuple], warmup: int = 10, runs: int = 50) -> float:
    """Median milliseconds of one forward pass on inputs of ``shapes`` (batch 1)."""
    inputs = [mx.nd.random.uniform(-1, 1, shape=s) for s in shapes]
    return 1000.0 * statistics.median(_timings(block, inputs, warmup, runs))


def throughput(block, shapes: Sequence[tuple], warmup: int = 3, runs: int = 10) -> float:
    """Median examples per second at the batch size of ``shapes``."""
    inputs = [mx.nd.random.uniform(-1, 1, shape=s) for s in shapes]
    return shapes[0][0] / statistics.median(_timings(block, inputs, warmup, runs))


def measure(blocks: Dict[str, object], input_shape: tuple, batch: int, runs: int = 10,
            latency_runs: int = 50, report=None) -> Dict[str, Dict[str, float]]:
    """Latency at batch 1 and throughput at ``batch`` of every block, in order.

    ``report(name, latency_ms, images_per_s)`` is called after each block (for progress).
    """
    result = {'latency_ms': {}, 'throughput': {}}
    for name, block in blocks.items():
        result['latency_ms'][name] = latency_ms(block, [(1,) + tuple(input_shape)], runs=latency_runs)
        result['throughput'][name] = throughput(block, [(batch,) + tuple(input_shape)], runs=runs)
        if report is not None:
            report(name, result['latency_ms'][name], result['throughput'][name])
    return result
