"""Package layout: the library imports without OpenCV and never imports the samples,
which live beside it (gluon_int8_samples) with their data."""
import ast
import os
import subprocess
import sys

import gluon_int8
import gluon_int8_samples

LIBRARY = os.path.dirname(os.path.abspath(gluon_int8.__file__))
REPO = os.path.dirname(LIBRARY)

# cv2 set to None in sys.modules makes every `import cv2` raise ImportError, as on a
# machine without OpenCV; MXNet itself imports it only optionally.
NO_OPENCV = '''
import sys
sys.modules['cv2'] = None
import gluon_int8, gluon_int8.cli, gluon_int8.zoo, gluon_int8.data, gluon_int8.bench
import gluon_int8.datasets, gluon_int8.evaluation, gluon_int8.distributed
assert 'gluon_int8_samples' not in sys.modules, 'gluon_int8 imported the samples'
print('ok')
'''


def test_library_imports_without_opencv_and_without_the_samples():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))
    done = subprocess.run([sys.executable, '-c', NO_OPENCV], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith('ok')


def _imported_modules(path):
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_no_library_module_imports_opencv_or_the_samples_even_lazily():
    for name in sorted(os.listdir(LIBRARY)):
        if name.endswith('.py'):
            found = {m.split('.')[0] for m in _imported_modules(os.path.join(LIBRARY, name))}
            assert not found & {'cv2', 'gluon_int8_samples'}, (name, found)


def test_the_library_package_holds_code_only_and_the_samples_hold_the_data():
    assert not [n for n in os.listdir(LIBRARY) if not n.endswith('.py') and n != '__pycache__']
    data = os.path.join(os.path.dirname(gluon_int8_samples.__file__), 'data')
    assert {'fashion_mnist_resnet.params', 'fashion_mnist_test_slice.npz',
            'ssd_fashion.params'} <= set(os.listdir(data))


# MXNet's private API: reached through gluon_int8.mxnet_private only
PRIVATE_ATTRIBUTES = {'_cached_graph', '_get_graph', '_load_init', '_kwargs', '_reduce',
                      '_deferred_init', '_data', '_reg_params', '_in_format', '_out_format',
                      '_LIB', 'handle'}


def _private_mxnet_uses(path):
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('mxnet'):
            if node.module == 'mxnet.base' or any(a.name.startswith('_') for a in node.names) \
                    or '._' in node.module or 'mx2onnx' in node.module:
                yield 'from %s import ...' % node.module
        elif isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES and not (
                isinstance(node.value, ast.Name) and node.value.id in ('self', 'cls')):
            yield '.%s (line %d)' % (node.attr, node.lineno)


def test_private_mxnet_access_lives_in_one_module():
    for name in sorted(os.listdir(LIBRARY)):
        if name.endswith('.py') and name != 'mxnet_private.py':
            found = list(_private_mxnet_uses(os.path.join(LIBRARY, name)))
            assert not found, (name, found)


def test_the_onnx_runtimes_are_imported_only_when_used():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))
    # (MXNet imports the onnx package itself when it is installed)
    script = ('import sys, gluon_int8, gluon_int8.exporters, gluon_int8.runtimes\n'
              'print(sorted(m for m in ("onnxruntime", "openvino") if m in sys.modules))')
    done = subprocess.run([sys.executable, '-c', script], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith('[]')
