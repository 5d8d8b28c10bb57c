"""INT8 batch inference and evaluation on Ray (``pip install gluon-int8[ray]``).

An exported INT8 model runs over a large dataset with Ray Data's ``map_batches`` and a
fixed pool of actors::

    preds = distributed.batch_predict('model/cq_resnet50', images, batch_size=64)
    top1 = distributed.evaluate('model/cq_resnet50', images, labels)

* The model files travel through Ray's object store, so actors on other machines need
  no shared file system; each actor loads the model once, with
  :func:`gluon_int8.load` (or plain ``SymbolBlock.imports`` for an FP32 export). An ONNX
  export (an ``.onnx`` path, or a :class:`gluon_int8.runtimes.RuntimeBlock`) runs on
  ONNX Runtime, or on the runtime the block was loaded on (OpenVINO).
* Each actor reserves ``threads_per_actor`` CPUs and runs MXNet with that many OpenMP
  threads and the engine settings of :data:`gluon_int8.bench.RECOMMENDED_ENV`, set in
  the actor's own environment (never in the caller's), so actors never oversubscribe
  the cores.
* Numpy input is cut into the same batches a single process would use; one Ray row is
  one batch, so outputs equal the single-process outputs exactly, whatever the number
  of actors. Every output row carries its input row number: results come back in input
  order, and a lost or duplicated row raises instead of passing silently. A killed
  actor is restarted by Ray and its batch retried (Ray Data's default for actor pools).
* A Ray Dataset is also accepted as input (its columns named by the model's input
  names); its order is kept with Ray Data's ``preserve_order``. :func:`evaluate` also
  takes an image folder or a ``.rec`` (a path or a
  :class:`gluon_int8.datasets.ImageSource`), read into memory in this process first.
* With no ``address`` a local Ray sized to the machine is started when none is running;
  ``address='auto'`` or ``'ray://host:10001'`` joins an existing cluster.

Ray is imported only when one of these functions is called.
"""
import dataclasses
import logging
import os
import tempfile
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from . import layout

log = logging.getLogger(__name__)

ID = '__row'  # output column: the input row of each output row
BATCHES_PER_TASK = 4  # numpy input: model batches per Ray task
_METRICS = ('accuracy', 'top5')
_RUN_OPTIONS = ('num_actors', 'threads_per_actor', 'address', 'env', 'input_columns')


# ---------------------------------------------------------------------------
# Ray and the model files
# ---------------------------------------------------------------------------

def _ray():
    try:
        import ray  # pylint: disable=import-outside-toplevel
        import ray.data  # noqa: F401  pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise ImportError('gluon_int8.distributed needs Ray Data: pip install '
                          '"gluon-int8[ray]" (ray[data] with pyarrow<18 for numpy 1.23.5)') from err
    return ray


def init(address: Optional[str] = None):
    """Connect to Ray: the running instance, the cluster at ``address``, or a new local
    instance with one CPU per core. Returns the ``ray`` module."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    if address is None:
        log.info('starting a local Ray with %d CPUs', os.cpu_count())
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    return ray


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """An export's files in memory, to ship to actors through the object store."""
    files: Dict[str, bytes]  # layout role -> content
    data_names: List[str]
    runtime: Optional[str] = None  # an ONNX model: the runtime that runs it

    @classmethod
    def read(cls, model) -> 'ModelFiles':
        """From an export prefix, an ``.onnx`` file, a block (exported to a temporary
        folder), or an ONNX model loaded on a runtime (it runs on that runtime)."""
        from .block import QuantizedBlock  # pylint: disable=import-outside-toplevel
        from .runtimes import RuntimeBlock  # pylint: disable=import-outside-toplevel
        if isinstance(model, QuantizedBlock):
            with tempfile.TemporaryDirectory() as tmp:
                model.export(os.path.join(tmp, 'model'))
                return cls.read(os.path.join(tmp, 'model'))
        if isinstance(model, RuntimeBlock):
            return cls({layout.ONNX: model.model_bytes}, list(model.data_names), model.runtime)
        if not isinstance(model, str):
            raise TypeError('model: got %s; expected an export prefix or an .onnx path (str), '
                            'a QuantizedBlock or a gluon_int8.runtimes.RuntimeBlock'
                            % type(model).__name__)
        if layout.is_onnx(model):
            from .runtimes import load_onnx  # pylint: disable=import-outside-toplevel
            return cls.read(load_onnx(model))
        files = _read_files(model)
        return cls(files, _data_names(files))

    def load(self):
        """The block: an ONNX model on its runtime (threads: the actor's
        OMP_NUM_THREADS), gluon_int8.load for our MXNet exports, SymbolBlock.imports
        otherwise."""
        import mxnet as mx  # pylint: disable=import-outside-toplevel
        from .block import load  # pylint: disable=import-outside-toplevel
        if layout.ONNX in self.files:
            from .runtimes import RuntimeBlock  # pylint: disable=import-outside-toplevel
            return RuntimeBlock(self.files[layout.ONNX], 'model.onnx', self.runtime)
        with tempfile.TemporaryDirectory() as tmp:
            prefix = os.path.join(tmp, 'model')
            paths = _shipped_files(prefix)
            for role, content in self.files.items():
                with open(paths[role], 'wb') as fobj:
                    fobj.write(content)
            if layout.SIDECAR in self.files:
                return load(prefix)
            block = mx.gluon.SymbolBlock.imports(paths[layout.SYMBOL], self.data_names,
                                                 paths[layout.PARAMS])
            block.hybridize(static_alloc=True, static_shape=True)
            return block


def _read_files(prefix: str) -> Dict[str, bytes]:
    """Role -> content of the files to ship: a gluon-int8 export is read as one unit,
    checked against its manifest (a set mixed by a concurrent export is refused here,
    not in every actor); an FP32 export of MXNet as its two files."""
    paths = _shipped_files(prefix)
    if os.path.isfile(paths[layout.SIDECAR]):
        from .store import read_export  # pylint: disable=import-outside-toplevel
        _, blobs = read_export(prefix, 0)
        return {role: blobs[role] for role in paths}
    files = {}
    for role in (layout.SYMBOL, layout.PARAMS):
        if not os.path.isfile(paths[role]):
            raise ValueError('model: export prefix %r has no file %r' % (prefix, paths[role]))
        with open(paths[role], 'rb') as fobj:
            files[role] = fobj.read()
    return files


def _shipped_files(prefix: str) -> Dict[str, str]:
    """Role -> path of the files actors need: epoch 0's graph, parameters and sidecar
    (not the FP32 reference, which only ``report`` reads)."""
    files = layout.export_files(prefix, 0)
    return {role: files[role] for role in (layout.SYMBOL, layout.PARAMS, layout.SIDECAR)}


def _data_names(files: Dict[str, bytes]) -> List[str]:
    """The model's input names: from our sidecar, else the symbol's non-parameter inputs."""
    import json  # pylint: disable=import-outside-toplevel
    if layout.SIDECAR in files:
        return list(json.loads(files[layout.SIDECAR])['data_names'])
    import mxnet as mx  # pylint: disable=import-outside-toplevel
    symbol = mx.sym.load_json(files[layout.SYMBOL].decode('utf-8'))
    params = mx.nd.load_frombuffer(files[layout.PARAMS])
    known = {k.split(':', 1)[-1] for k in params}
    return [n for n in symbol.list_inputs() if n not in known]


# ---------------------------------------------------------------------------
# The actor
# ---------------------------------------------------------------------------

def _head(outputs: List[np.ndarray], head: Optional[str]) -> List[np.ndarray]:
    """Reduce the first output in the actor when only predictions are needed."""
    if head is None:
        return outputs
    logits = outputs[0]
    if head == 'accuracy':
        return [np.argmax(logits, axis=1)]
    return [np.argsort(-logits, axis=1, kind='stable')[:, :5]]


class _Predictor:
    """Ray Data actor: loads the model once, runs batches of rows."""

    def __init__(self, model_ref, inputs_ref=None, batch_size=None, columns=None, head=None):
        import ray  # pylint: disable=import-outside-toplevel
        self.block = ray.get(model_ref).load()
        self.inputs = ray.get(inputs_ref) if inputs_ref is not None else None
        self.batch_size, self.columns, self.head = batch_size, columns, head

    def _run(self, arrays: Sequence[np.ndarray]) -> List[np.ndarray]:
        import mxnet as mx  # pylint: disable=import-outside-toplevel
        outputs = self.block(*[mx.nd.array(a, dtype=a.dtype) for a in arrays])
        flat = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        return _head([o.asnumpy() for o in flat], self.head)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if self.inputs is None:  # a Ray Dataset: the rows are the examples
            outputs = self._run([batch[c] for c in self.columns])
            rows = batch[ID]
        else:  # numpy input: each row is one batch number
            ids, outs = [], []
            for number in batch['data']:
                start = int(number) * self.batch_size
                part = [a[start:start + self.batch_size] for a in self.inputs]
                outs.append(self._run(part))
                ids.append(np.arange(start, start + len(part[0])))
            rows = np.concatenate(ids)
            outputs = [np.concatenate(o) for o in zip(*outs)]
        result = {ID: rows}
        result.update(('out%d' % i, o) for i, o in enumerate(outputs))
        return result


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Plan:
    """Validated options of one distributed run (``num_actors`` None: from the cluster)."""
    batch_size: int
    num_actors: Optional[int]
    threads_per_actor: int
    env: Dict[str, str]

    @classmethod
    def check(cls, batch_size, num_actors, threads_per_actor, env) -> '_Plan':
        """Validate before Ray starts: a bad argument costs no cluster start-up."""
        threads = 1 if threads_per_actor is None else _positive('threads_per_actor',
                                                               threads_per_actor)
        return cls(_positive('batch_size', batch_size),
                   None if num_actors is None else _positive('num_actors', num_actors),
                   threads, _actor_env(threads, env))

    def actors(self, ray) -> int:
        """The pool size: as asked, or the cluster's CPUs // threads_per_actor."""
        cpus = int(ray.cluster_resources().get('CPU', 1))
        if self.num_actors is None:
            return max(1, cpus // self.threads_per_actor)
        if self.num_actors * self.threads_per_actor > cpus:
            raise ValueError('num_actors: got %d actors x %d threads_per_actor, more than the '
                             '%d CPUs of the Ray cluster; the pool could never start'
                             % (self.num_actors, self.threads_per_actor, cpus))
        return self.num_actors


def _positive(param: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError('%s: got %r; expected a positive int' % (param, value))
    return value


def _actor_env(threads: int, env: Optional[Dict[str, str]]) -> Dict[str, str]:
    from .bench import RECOMMENDED_ENV  # pylint: disable=import-outside-toplevel
    values = dict(RECOMMENDED_ENV, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if env is not None:
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in env.items()):
            raise TypeError('env: got %r; expected a dict of str -> str' % (env,))
        values.update(env)
    return values


def _as_arrays(data, param: str = 'data') -> List[np.ndarray]:
    """numpy input: one array, or a tuple/list of arrays (one per model input)."""
    arrays = list(data) if isinstance(data, (tuple, list)) else [data]
    if not arrays or not all(isinstance(a, np.ndarray) for a in arrays):
        raise TypeError('%s: got %s; expected a numpy array, a tuple of them (one per '
                        'model input) or a ray.data.Dataset' % (param, type(data).__name__))
    sizes = {len(a) for a in arrays}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError('%s: got arrays of %s rows; expected non-empty arrays of one '
                         'length' % (param, sorted(sizes)))
    return arrays


def _mapped(ray, model: ModelFiles, data, plan: _Plan, head, input_columns):
    """The lazy Ray Dataset of outputs and the number of input rows (None if unknown)."""
    options = dict(compute=ray.data.ActorPoolStrategy(size=plan.actors(ray)),
                   num_cpus=plan.threads_per_actor, runtime_env={'env_vars': plan.env})
    model_ref = ray.put(model)
    if isinstance(data, ray.data.Dataset):
        columns = list(input_columns or model.data_names)
        names = data.schema().names
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError('data: the Ray Dataset has columns %s but not %s; name its '
                             'columns after the model inputs %s or pass input_columns'
                             % (names, missing, model.data_names))
        return data.map_batches(
            _Predictor, batch_size=plan.batch_size, batch_format='numpy',
            fn_constructor_kwargs=dict(model_ref=model_ref, columns=columns, head=head),
            **options), None
    arrays = _as_arrays(data)
    if len(arrays) != len(model.data_names):
        raise ValueError('data: got %d arrays; the model has %d inputs %s'
                         % (len(arrays), len(model.data_names), model.data_names))
    rows = len(arrays[0])
    batches = -(-rows // plan.batch_size)
    # in-memory blocks of a few batches each: no read task competes with the actors
    # for CPUs, the actors share the work evenly, and a failure retries little
    ds = ray.data.from_numpy(np.array_split(np.arange(batches),
                                            -(-batches // BATCHES_PER_TASK)))
    return ds.map_batches(
        _Predictor, batch_size=1, batch_format='numpy',
        fn_constructor_kwargs=dict(model_ref=model_ref, inputs_ref=ray.put(arrays),
                                   batch_size=plan.batch_size, head=head),
        **options), rows


def _collect(ds, rows: Optional[int]) -> List[np.ndarray]:
    """Gather the output columns in input row order, checking every row came once."""
    parts: Dict[str, list] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format='numpy'):
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
    if not parts:
        raise ValueError('data: the dataset produced no rows')
    ids = np.concatenate(parts.pop(ID))
    order = np.argsort(ids, kind='stable')
    expected = np.arange(rows if rows is not None else len(ids))
    if len(ids) != len(expected) or not np.array_equal(ids[order], expected):
        seen = np.bincount(ids, minlength=len(expected))
        raise RuntimeError('batch_predict: %d rows missing and %d duplicated of %d'
                           % (int(np.sum(seen == 0)), int(np.sum(seen > 1)), len(expected)))
    return [np.concatenate(parts['out%d' % i])[order] for i in range(len(parts))]


def batch_predict(model, data, batch_size: int = 64, *, num_actors: Optional[int] = None,
                  threads_per_actor: Optional[int] = None, address: Optional[str] = None,
                  env: Optional[Dict[str, str]] = None, input_columns=None,
                  output: str = 'numpy'):
    """Run an exported model over ``data`` with a pool of Ray actors.

    Parameters
    ----------
    model : str, QuantizedBlock or RuntimeBlock
        An export prefix (``prefix-symbol.json``, ``prefix-0000.params`` and, for
        gluon-int8 exports, ``prefix-quantization.json``), a block to export, an ONNX
        export (``prefix.onnx``, run on ONNX Runtime) or an ONNX model loaded with
        :func:`gluon_int8.runtimes.load_onnx` (run on its runtime).
    data : numpy array, tuple of arrays, or ray.data.Dataset
        One array per model input, examples along the first axis; or a Ray Dataset with
        one column per model input (named like the inputs, or see ``input_columns``).
    batch_size : int
        Examples per forward pass.
    num_actors : int
        Actors in the pool (default: the cluster's CPUs // ``threads_per_actor``).
    threads_per_actor : int
        CPUs each actor reserves and OpenMP threads it runs (default 1).
    address : str
        Ray cluster to join (``'auto'``, ``'ray://host:10001'``); default: the running
        Ray, else a new local one.
    env : dict
        Extra environment variables for the actors.
    input_columns : list of str
        Ray Dataset columns fed to the model inputs, in order.
    output : {'numpy', 'dataset'}
        ``'numpy'``: the outputs in input order: one array for a single-output model, else
        a list. ``'dataset'``: the lazy Ray Dataset with column ``__row`` (input row
        number) and ``out0``, ``out1``, ... (nothing runs until it is consumed).
    """
    if output not in ('numpy', 'dataset'):
        raise ValueError("output: got %r; expected 'numpy' or 'dataset'" % (output,))
    outputs = _run(model, data, batch_size, None, output, num_actors=num_actors,
                   threads_per_actor=threads_per_actor, address=address, env=env,
                   input_columns=input_columns)
    return outputs[0] if output == 'numpy' and len(outputs) == 1 else outputs


def _run(model, data, batch_size, head, output='numpy', num_actors=None,
         threads_per_actor=None, address=None, env=None, input_columns=None):
    plan = _Plan.check(batch_size, num_actors, threads_per_actor, env)
    files = ModelFiles.read(model)
    ray = init(address)
    if isinstance(data, ray.data.Dataset):
        data = _with_row_numbers(ray, data)
    ds, rows = _mapped(ray, files, data, plan, head, input_columns)
    if output == 'dataset':
        return ds
    return _collect(ds, rows)


def _materialized(data):
    """A Ray Dataset run once, in order, into the object store (reads finish before the
    actors take the CPUs); the caller's dataset keeps its own execution options."""
    options = data.context.execution_options
    kept = options.preserve_order
    options.preserve_order = True
    try:
        return data.materialize()
    finally:
        options.preserve_order = kept


def _with_row_numbers(ray, data):
    """The Ray Dataset with column ``__row``, its row numbers, materialized."""
    data = _materialized(data)
    numbers = ray.data.range(data.count()).rename_columns({'id': ID})
    return _materialized(data.zip(numbers))


def _read_images(source, labels):
    """A labelled image folder or .rec (an ImageSource) as numpy arrays."""
    if labels is not None:
        raise ValueError('labels: got a %s; an image folder or a .rec carries its own '
                         'labels (pass labels=None)' % type(labels).__name__)
    if not source.has_labels:
        raise ValueError('data: %r is a flat folder of images, which has no labels; '
                         'evaluation needs one subfolder per class (or a .rec)' % source.path)
    batches = list(source)
    if not batches:
        raise ValueError('data: no readable image in %r' % source.path)
    log.info('read %d images of %s into memory', sum(len(b[1]) for b in batches), source)
    return (np.concatenate([b[0].asnumpy() for b in batches]),
            np.concatenate([b[1].asnumpy() for b in batches]))


def evaluate(model, data, labels=None, metric: Union[str, Callable] = 'accuracy',
             batch_size: int = 64, **options) -> float:
    """The metric of an exported model on ``data``, computed on Ray.

    ``data``: numpy arrays, a Ray Dataset, or an image folder / ``.rec`` (a path, read
    with the ImageNet preprocessing, or an ``ImageSource``; the whole set is read into
    memory here first, so for large sets pass a Ray Dataset). ``labels``: a numpy array
    (numpy ``data``), the name of a label column (Ray Dataset ``data``), or None (a
    folder or ``.rec`` carries its labels). ``metric``: ``'accuracy'`` (top-1) or
    ``'top5'``, reduced to class predictions inside the actors; an
    ``mx.metric.EvalMetric``; or a callable
    ``metric(labels, outputs) -> float`` given the labels and the model outputs (one
    array, or a list for several outputs) in input order. ``options``: those of
    :func:`batch_predict`.
    """
    unknown = sorted(set(options) - set(_RUN_OPTIONS))
    if unknown:
        raise TypeError('options: got %s; evaluate takes %s' % (unknown, list(_RUN_OPTIONS)))
    head = metric if isinstance(metric, str) else None
    if head is not None and head not in _METRICS:
        raise ValueError('metric: got %r; expected one of %s, an mx.metric.EvalMetric or a '
                         'callable metric(labels, outputs)' % (metric, list(_METRICS)))
    from .datasets import ImageSource  # pylint: disable=import-outside-toplevel
    if isinstance(data, (str, os.PathLike, ImageSource)):
        data, labels = _read_images(ImageSource(data, batch_size=batch_size)
                                    if not isinstance(data, ImageSource) else data, labels)
    ray = _ray()
    if isinstance(data, ray.data.Dataset):
        if not isinstance(labels, str) or labels not in data.schema().names:
            raise ValueError('labels: got %r; with a Ray Dataset expected one of its column '
                             'names %s' % (labels, data.schema().names))
        init(options.get('address'))
        data = _materialized(data)  # read once: for the labels here and the actors
        truth = np.concatenate([b[labels] for b in data.iter_batches(
            batch_size=None, batch_format='numpy')])
    else:
        truth = np.asarray(labels)
        rows = len(_as_arrays(data)[0])
        if truth.shape[:1] != (rows,):
            raise ValueError('labels: got shape %s; expected %d labels, one per row of data'
                             % (truth.shape, rows))
    return _score(metric, truth, _run(model, data, batch_size, head, **options))


def _score(metric, labels: np.ndarray, outputs: List[np.ndarray]) -> float:
    if metric == 'accuracy':
        return float(np.mean(outputs[0] == labels.astype(np.int64).reshape(-1)))
    if metric == 'top5':
        hits = outputs[0] == labels.astype(np.int64).reshape(-1, 1)
        return float(np.mean(np.any(hits, axis=1)))
    if hasattr(metric, 'update') and hasattr(metric, 'get'):
        import mxnet as mx  # pylint: disable=import-outside-toplevel
        metric.reset()
        metric.update([mx.nd.array(labels)], [mx.nd.array(o) for o in outputs])
        return float(metric.get()[1])
    if callable(metric):
        return float(metric(labels, outputs[0] if len(outputs) == 1 else outputs))
    raise TypeError('metric: got %r; expected a name, an mx.metric.EvalMetric or a callable'
                    % (metric,))


# ---------------------------------------------------------------------------
# Tuning trials
# ---------------------------------------------------------------------------

def _remote_call(fn, builder, eval_fn, seed, spec):
    return fn(builder, eval_fn, seed, spec, False)


class RayExecutor:
    """Runs tuning work items (``gluon_int8.tune.run_trial`` / ``rank_unit``) as Ray
    tasks: the builder (graph + statistics) and ``eval_fn`` go to the object store once;
    each task rebuilds its block from them. ``width`` items run at a time."""

    def __init__(self, builder, eval_fn, seed, address=None, num_workers=None):
        ray = init(address)
        self.width = num_workers or max(1, int(ray.cluster_resources().get('CPU', 1)))
        self.refs = (ray.put(builder), ray.put(eval_fn), seed)
        self.remote = ray.remote(num_cpus=1)(_remote_call)
        self.ray = ray

    def map(self, fn, specs) -> list:
        return self.ray.get([self.remote.remote(fn, *self.refs, spec) for spec in specs])
