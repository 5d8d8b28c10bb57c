"""Samples beside the gluon-int8 library: data and trained models to try it on.

* :mod:`gluon_int8_samples.fashion_mnist`: Fashion-MNIST readers, the bundled 1000-image
  test slice and six small model families (parameters trained by
  ``examples/fashion_mnist/train.py``);
* :mod:`gluon_int8_samples.detection`: a synthetic detection set made of Fashion-MNIST
  items, VOC mAP and a small GluonCV SSD trained on it (needs OpenCV and GluonCV: the
  ``[samples]`` extra).

Shipped in the gluon-int8 distribution, never imported by ``gluon_int8`` itself. The
trained parameters and the slice live in ``gluon_int8_samples/data/``; nothing here
writes into it (the training scripts in ``examples/`` write there only when run from the
repository).
"""
