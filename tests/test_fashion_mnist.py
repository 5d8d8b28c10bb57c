"""Tests for gluon_int8.fashion_mnist: bundled data, shipped models, loading."""

import os

import mxnet as mx
import numpy as np
import pytest

from gluon_int8_samples import fashion_mnist as fm
from conftest import requires_fashion_mnist

# Accuracy of the shipped parameters on the bundled 1000-image slice, as
# measured after training (see examples/fashion_mnist/README.md):
# resnet 0.933, mobilenet 0.937, inception 0.941, preact_resnet 0.942,
# shufflenet 0.939.  The floor is two points
# below, so that a broken model, a wrong normalization or mismatched
# parameters fail while numeric noise (a handful of images) does not.
SLICE_ACCURACY_FLOOR = {
    "resnet": 0.913,
    "mobilenet": 0.917,
    "inception": 0.921,
    "preact_resnet": 0.922,
    "shufflenet": 0.919,
    "mobilenetv3": 0.907,
}


def test_bundled_slice_shape(slice_data):
    images, labels = slice_data
    assert images.shape == (1000, 1, 28, 28)
    assert images.dtype == np.float32
    assert labels.shape == (1000,)
    assert labels.min() >= 0 and labels.max() <= 9
    # all ten classes are present in the first 1000 test images
    assert set(np.unique(labels).tolist()) == set(range(10))
    # normalized data is roughly zero-mean / unit-variance
    assert abs(float(images.mean())) < 0.2
    assert 0.8 < float(images.std()) < 1.2


@requires_fashion_mnist
def test_bundled_slice_matches_debian_test_split(slice_data):
    images, labels = fm.load_split("test")
    assert images.shape == (10000, 1, 28, 28)
    np.testing.assert_array_equal(images[:1000], slice_data[0])
    np.testing.assert_array_equal(labels[:1000], slice_data[1])


def test_dataset_root_follows_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(fm.ROOT_ENV, str(tmp_path))
    assert fm.dataset_root() == str(tmp_path)
    assert fm.dataset_root("/elsewhere") == "/elsewhere"
    assert not fm.debian_available()
    images, _, source = fm.default_data("test")
    assert source == "bundled" and images.shape == (1000, 1, 28, 28)
    with pytest.raises(FileNotFoundError) as info:
        fm.load_raw_split("test")
    msg = str(info.value)
    assert str(tmp_path / "t10k-images-idx3-ubyte.gz") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and fm.ROOT_ENV in msg
    monkeypatch.delenv(fm.ROOT_ENV)
    assert fm.dataset_root() == fm.DEBIAN_ROOT


@requires_fashion_mnist
def test_write_bundled_slice_rewrites_the_shipped_one(tmp_path):
    path = fm.write_bundled_slice(str(tmp_path / "slice.npz"))
    with np.load(path) as written, np.load(fm.SLICE_PATH) as shipped:
        np.testing.assert_array_equal(written["images"], shipped["images"])
        np.testing.assert_array_equal(written["labels"], shipped["labels"])


def test_default_data_falls_back_to_bundled_slice(tmp_path):
    images, labels, source = fm.default_data("test", root=str(tmp_path))
    assert source == "bundled"
    assert images.shape == (1000, 1, 28, 28)
    assert labels.shape == (1000,)
    with pytest.raises(FileNotFoundError):
        fm.default_data("train", root=str(tmp_path))


@pytest.mark.parametrize("name", sorted(fm.MODELS))
def test_pretrained_accuracy_on_slice(name, slice_data):
    net = fm.get_model(name)
    acc = fm.evaluate(net, *slice_data)
    assert acc >= SLICE_ACCURACY_FLOOR[name], (name, acc)
    assert acc > 0.85


@pytest.mark.parametrize("name", sorted(fm.MODELS))
def test_params_are_small(name):
    assert os.path.getsize(fm.params_path(name)) < 3 * 1024 * 1024


def test_hybridized_and_symbolblock_agree(tmp_path, slice_data):
    images, labels = slice_data
    net = fm.get_model("resnet")
    eager = fm.predict(net, images[:200])
    net.hybridize()
    assert np.array_equal(fm.predict(net, images[:200]), eager)
    prefix = str(tmp_path / "resnet")
    net.export(prefix)
    sym = mx.gluon.SymbolBlock.imports(prefix + "-symbol.json", ["data"],
                                       prefix + "-0000.params")
    assert fm.evaluate(sym, images[:200], labels[:200]) == pytest.approx(
        float(np.mean(eager == labels[:200])))


def test_wrong_family_params_raise_value_error():
    path = fm.params_path("resnet")
    with pytest.raises(ValueError) as info:
        fm.get_model("mobilenet", params_file=path)
    msg = str(info.value)
    assert path in msg
    assert "FashionMobileNet" in msg
    assert "missing" in msg


def test_shape_mismatch_raises_value_error():
    path = fm.params_path("resnet")
    wider = fm.FashionResNet(channels=(32, 64, 128))
    with pytest.raises(ValueError) as info:
        fm.load_params(wider, path)
    assert path in str(info.value)
    assert "shape" in str(info.value)
    assert isinstance(info.value.__cause__, Exception)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        fm.get_model("vgg16")
    msg = str(info.value)
    assert "vgg16" in msg
    for name in fm.MODELS:
        assert name in msg


def test_untrained_model_builds_and_runs():
    net = fm.get_model("inception", pretrained=False)
    out = net(mx.nd.zeros((2, 1, 28, 28)))
    assert out.shape == (2, 10)


def test_normalize_accepts_nhw_and_nchw():
    raw = np.full((3, 28, 28), 255, dtype=np.uint8)
    a = fm.normalize(raw)
    b = fm.normalize(raw[:, None])
    assert a.shape == b.shape == (3, 1, 28, 28)
    np.testing.assert_allclose(a, (1.0 - fm.MEAN) / fm.STD, rtol=1e-6)
    with pytest.raises(ValueError):
        fm.normalize(np.zeros((3, 32, 32), dtype=np.uint8))


def test_evaluate_rejects_length_mismatch(slice_data):
    net = fm.get_model("mobilenet")
    with pytest.raises(ValueError):
        fm.evaluate(net, slice_data[0][:10], slice_data[1][:12])


@pytest.mark.parametrize("only_a, only_b, p_value", [
    (0, 5, 2 / 32),            # 2 * P(Bin(5, 1/2) <= 0)
    (9, 1, 2 * 11 / 1024),     # 2 * (C(10,0) + C(10,1)) / 2^10
    (3, 3, 1.0),               # an even split: capped at 1
    (0, 0, 1.0),               # no disagreement at all
])
def test_paired_difference_is_the_exact_mcnemar_test(only_a, only_b, p_value):
    both = 7  # images both get right, and 4 both get wrong: they do not count
    hits_a = [True] * both + [True] * only_a + [False] * only_b + [False] * 4
    hits_b = [True] * both + [False] * only_a + [True] * only_b + [False] * 4
    found = fm.paired_difference(hits_a, hits_b)
    assert (found["only_a"], found["only_b"]) == (only_a, only_b)
    assert found["p_value"] == pytest.approx(p_value, rel=1e-12)


def test_paired_difference_needs_the_same_images():
    with pytest.raises(ValueError, match="hits_a has 3 images, hits_b 2"):
        fm.paired_difference([True, False, True], [True, False])
