"""Run an ONNX export on ONNX Runtime or OpenVINO, called like a QuantizedBlock.

::

    qnet.export('model/cq_resnet', format='onnx')               # model/cq_resnet.onnx
    block = gluon_int8.runtimes.load_onnx('model/cq_resnet.onnx', runtime='openvino')
    block(x)              # NDArray in, NDArray out (a list / nested as the network returns)
    block.layer_table()   # the layer table the export wrote, FP32 layers with their reason

Either runtime is imported only when it is used (``pip install gluon-int8[onnx]``). A
file that a runtime cannot load raises :class:`RuntimeLoadError`, which names the runtime,
the file and, where the runtime's message points at one, the node and its op.
:mod:`gluon_int8.distributed` runs a loaded block, or an ``.onnx`` path, on Ray as it
runs an MXNet export.
"""
import logging
import os
import re
from typing import Dict, List, Optional, Sequence

import mxnet as mx
import numpy as np

from . import mxnet_private
from .errors import first_line
from .exporters import read_metadata
from .quantize_graph import LayerInfo, LayerTable
from .table import CalibrationTable

log = logging.getLogger(__name__)

RUNTIMES = ('onnxruntime', 'openvino')


class RuntimeLoadError(ValueError):
    """An ONNX model that a runtime cannot load (or run)."""

    def __init__(self, runtime: str, path: str, node: Optional[str], op: Optional[str],
                 reason: str):
        where = ' at node %r (op %s)' % (node, op) if node else ''
        super().__init__('%s cannot load %r%s: %s' % (runtime, path, where, reason))
        self.runtime, self.path, self.node, self.op = runtime, path, node, op


class RuntimeBlock(LayerTable):
    """An exported ONNX model on one runtime, with the ``__call__`` of a QuantizedBlock
    and the layer table and calibration table the export wrote."""

    def __init__(self, model_bytes: bytes, path: str, runtime: str = 'onnxruntime',
                 threads: Optional[int] = None):
        import onnx  # pylint: disable=import-outside-toplevel
        from google.protobuf.message import DecodeError  # pylint: disable=import-outside-toplevel
        if runtime not in RUNTIMES:
            raise ValueError('runtime: got %r; expected one of %s' % (runtime, list(RUNTIMES)))
        self.path, self.runtime, self.model_bytes = path, runtime, model_bytes
        try:
            model = onnx.load_model_from_string(model_bytes)
        except DecodeError as err:
            raise RuntimeLoadError(runtime, path, None, None,
                                   'not an ONNX model (%s)' % first_line(err)) from err
        self._nodes = {n.name: n.op_type for n in model.graph.node if n.name}
        self._nodes.update({out: n.op_type for n in model.graph.node for out in n.output})
        self._op_nodes: Dict[str, str] = {}  # op type -> its first node
        for n in model.graph.node:
            self._op_nodes.setdefault(n.op_type, n.name or n.output[0])
        meta = read_metadata(model)
        self.data_names: List[str] = meta.get('data_names') or [i.name for i in model.graph.input]
        self.out_format = meta.get('out_format')
        self.input_shapes = [tuple(s) for s in meta.get('input_shapes') or []] or None
        self.layers = [LayerInfo.from_dict(r) for r in meta.get('layers', [])]
        table = meta.get('calib_table')
        self.calib_table = CalibrationTable.from_dict(table, path) if table else None
        self.threads = threads if threads is not None else _omp_threads()
        self._errors: tuple = (RuntimeError, ValueError, TypeError, OSError)
        self._run = self._load(model_bytes)

    # -- loading ---------------------------------------------------------------------------

    def _load(self, model_bytes: bytes):
        loader = _load_ort if self.runtime == 'onnxruntime' else _load_openvino
        try:
            self._errors = _runtime_errors(self.runtime)
            return loader(model_bytes, self.data_names, self.threads)
        except ImportError as err:
            raise ImportError('runtime %r is not installed: pip install "gluon-int8[onnx]" '
                              '(%s)' % (self.runtime, err)) from err
        except self._errors as err:  # pylint: disable=catching-non-exception
            raise self._error(err) from err

    def _error(self, err: Exception) -> RuntimeLoadError:
        """The runtime's error as a RuntimeLoadError naming the node it points at."""
        text = str(err)
        node = _named_node(text, self._nodes) or _node_of_op(text, self._op_nodes)
        return RuntimeLoadError(self.runtime, self.path, node, self._nodes.get(node),
                                _reason(text))

    # -- calling ---------------------------------------------------------------------------

    def __call__(self, *inputs):
        if len(inputs) != len(self.data_names):
            raise ValueError('inputs: got %d arrays; the model takes %d (%s)'
                             % (len(inputs), len(self.data_names), self.data_names))
        outputs = self.run([np.ascontiguousarray(_numpy(x), dtype=np.float32) for x in inputs])
        flat = [mx.nd.array(o, dtype=o.dtype) for o in outputs]
        if self.out_format is not None:
            return mxnet_private.regroup(flat, self.out_format)
        return flat[0] if len(flat) == 1 else flat

    def run(self, arrays: Sequence[np.ndarray]) -> List[np.ndarray]:
        """The runtime itself: float32 numpy arrays in, the flat list of outputs out."""
        try:
            return self._run(list(arrays))
        except self._errors as err:  # pylint: disable=catching-non-exception
            raise self._error(err) from err

    def __repr__(self) -> str:
        return 'RuntimeBlock(%r, runtime=%r)' % (self.path, self.runtime)


def _numpy(x) -> np.ndarray:
    return x.asnumpy() if isinstance(x, mx.nd.NDArray) else np.asarray(x)


def _omp_threads() -> Optional[int]:
    """OMP_NUM_THREADS (read, never written): both runtimes then use as many threads as
    MXNet would."""
    raw = os.environ.get('OMP_NUM_THREADS', '')
    return int(raw) if raw.isdigit() and int(raw) > 0 else None


def _runtime_errors(runtime: str) -> tuple:
    """The exception classes a runtime raises for a model it cannot load or run (ONNX
    Runtime's derive from Exception directly)."""
    found = [RuntimeError, ValueError, TypeError, OSError]
    if runtime == 'onnxruntime':
        from onnxruntime.capi import onnxruntime_pybind11_state as state  # pylint: disable=import-outside-toplevel
        found += [v for v in vars(state).values()
                  if isinstance(v, type) and issubclass(v, Exception)]
    return tuple(found)


def _load_ort(model_bytes: bytes, data_names: Sequence[str], threads: Optional[int]):
    import onnxruntime as ort  # pylint: disable=import-outside-toplevel
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: ORT's warnings go to stderr, not logging
    session = ort.InferenceSession(model_bytes, options, providers=['CPUExecutionProvider'])
    names = [o.name for o in session.get_outputs()]

    def run(arrays):
        return session.run(names, dict(zip(data_names, arrays)))
    return run


def _load_openvino(model_bytes: bytes, data_names: Sequence[str], threads: Optional[int]):
    """Read now (an op OpenVINO cannot convert fails here); compiled on the first call
    with each input shape, at that static shape (as MXNet runs with static_shape, and
    OpenVINO runs fastest), one stream."""
    import openvino as ov  # pylint: disable=import-outside-toplevel
    core = ov.Core()
    model = core.read_model(model_bytes)
    config = {'NUM_STREAMS': 1, 'PERFORMANCE_HINT': 'LATENCY'}
    if threads:
        config['INFERENCE_NUM_THREADS'] = threads
    compiled = {}

    def request_for(shapes):
        if shapes not in compiled:
            static = model.clone()
            static.reshape(dict(zip(data_names, [list(s) for s in shapes])))
            try:
                done = core.compile_model(static, 'CPU', config)
            except RuntimeError as err:  # a model the CPU plugin cannot make static
                log.info('OpenVINO: static shapes %s do not compile (%s); dynamic batch',
                         shapes, first_line(err))
                done = core.compile_model(model, 'CPU', config)
            compiled[shapes] = (done.create_infer_request(), list(done.outputs))
        return compiled[shapes]

    def run(arrays):
        request, outputs = request_for(tuple(a.shape for a in arrays))
        request.infer(dict(zip(data_names, arrays)))
        return [np.array(request.get_tensor(o).data) for o in outputs]
    return run


def _named_node(text: str, nodes: Dict[str, str]) -> Optional[str]:
    """The model node the runtime's message names: ONNX Runtime writes ``Node (name)``,
    OpenVINO the node's name or output; the longest name found in the text."""
    match = re.search(r'[Nn]ode \(([^)]+)\)', text)
    if match and match.group(1) in nodes:
        return match.group(1)
    found = [n for n in nodes if len(n) > 2 and re.search(r'(?<![\w.])%s(?![\w.])' % re.escape(n),
                                                          text)]
    return max(found, key=len) if found else None


def _node_of_op(text: str, op_nodes: Dict[str, str]) -> Optional[str]:
    """OpenVINO names the op types it cannot convert (``operations: NoSuchOp-13``), not
    the nodes: the first node of such an op."""
    match = re.search(r'operations?: ([\w.\-]+(?:, [\w.\-]+)*)', text)
    for op in (match.group(1).split(', ') if match else []):
        node = op_nodes.get(re.sub(r'-\d+$', '', op))
        if node is not None:
            return node
    return None


def _reason(text: str) -> str:
    """The runtime's message without the locations in its own source that open it, on
    one line."""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    useful = [l for l in lines if not l.startswith(('Check ', 'Exception from src', 'To '))]
    reason = ' '.join(useful or lines or ['unknown error'])
    return reason if len(reason) <= 400 else reason[:397] + '...'


def load_onnx(path, runtime: str = 'onnxruntime', threads: Optional[int] = None) -> RuntimeBlock:
    """The ONNX model at ``path`` (a ``.onnx`` file, or the prefix it was exported to) on
    ``runtime`` ('onnxruntime' or 'openvino'), with ``threads`` threads (default:
    OMP_NUM_THREADS, else the runtime's own default)."""
    from . import layout  # pylint: disable=import-outside-toplevel
    path = os.fspath(path)
    if not layout.is_onnx(path):
        path = layout.onnx_file(path)
    if runtime not in RUNTIMES:
        raise ValueError('runtime: got %r; expected one of %s' % (runtime, list(RUNTIMES)))
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as err:
        raise ValueError('path: cannot read %r (%s)' % (path, err.strerror or err)) from err
    return RuntimeBlock(data, path, runtime, threads)
