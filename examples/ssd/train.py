"""Train the small SSD of gluon_int8_samples.detection on the synthetic Fashion-MNIST
detection set.

Every epoch draws fresh images of the 'train' split (epoch e uses images
e*N .. (e+1)*N - 1, objects from the Fashion-MNIST training set), so no augmentation is
needed. Targets and loss are GluonCV's, as in its scripts/detection/ssd/train_ssd.py:
``SSDTargetGenerator`` (bipartite + IoU >= 0.5 matching, box encoding with stds
0.1/0.1/0.2/0.2) and ``SSDMultiBoxLoss`` (softmax cross-entropy with 3:1 hard negative
mining + smooth L1 on positive boxes). SGD with Nesterov momentum, linear warm-up then
cosine decay. mxnet, numpy and the image generator are seeded: the same command gives
the same parameters for the same thread count. VOC mAP on the 'val' split is logged
after every epoch.

Example::

    OMP_NUM_THREADS=2 PYTHONPATH=. python examples/ssd/train.py --seed 0

``--out`` defaults to this repository's ``gluon_int8_samples/data/ssd_fashion.params``
(found from this script's location: the file the samples load in a checkout or an
editable install), never to an installed package.
"""
import argparse
import logging
import os
import random
import time

import mxnet as mx
import numpy as np
from gluoncv.loss import SSDMultiBoxLoss
from gluoncv.model_zoo.ssd.target import SSDTargetGenerator
from mxnet import autograd, gluon

from gluon_int8_samples import detection as det

#: The repository's sample data folder (this script lives in <repo>/examples/ssd).
REPO_DATA_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                              '..', '..', 'gluon_int8_samples', 'data'))


def padded_labels(labels):
    """List of (k, 5) arrays -> (B, max k, 5) NDArray padded with -1 (never matched)."""
    out = -np.ones((len(labels), max(len(lab) for lab in labels), 5), dtype=np.float32)
    for i, lab in enumerate(labels):
        out[i, :len(lab)] = lab
    return mx.nd.array(out)


def train_step(net, trainer, target_generator, loss_fn, images, labels):
    """One SGD step on a batch; returns (class loss, box loss)."""
    data, gt = det.to_input(images), padded_labels(labels)
    with autograd.record():
        cls_preds, box_preds, anchors = net(data)
        with autograd.pause():
            cls_targets, box_targets, _ = target_generator(anchors, None, gt[:, :, :4],
                                                           gt[:, :, 4:5])
        total, cls_loss, box_loss = loss_fn(cls_preds, box_preds, cls_targets, box_targets)
    autograd.backward(total)
    trainer.step(1)  # the loss is already normalized by the number of positives
    return float(cls_loss[0].mean().asscalar()), float(box_loss[0].mean().asscalar())


def validate(net, images, labels, batch_size):
    """VOC mAP on the validation images; the net is re-traced in inference mode (SSD's
    graph differs between training and inference) and again for training afterwards."""
    net.hybridize(static_alloc=True, static_shape=True)
    value = det.evaluate_map(net, images, labels, batch_size)
    net.hybridize(static_alloc=True, static_shape=True)
    return value


def make_trainer(net, args, total_steps):
    warmup = min(300, total_steps // 10)
    schedule = mx.lr_scheduler.CosineScheduler(
        max_update=total_steps, base_lr=args.lr, final_lr=args.lr * 0.01,
        warmup_steps=warmup, warmup_begin_lr=args.lr * 0.1)
    return gluon.Trainer(net.collect_params(), 'nag', {
        'learning_rate': args.lr, 'momentum': 0.9, 'wd': args.wd, 'lr_scheduler': schedule})


def run(args):
    mx.random.seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    net = det.get_ssd_model(params=None)
    net.hybridize(static_alloc=True, static_shape=True)
    val_images, val_labels = det.make_detection_set('val', args.val_images, seed=args.seed)
    batches = args.images_per_epoch // args.batch_size
    trainer = make_trainer(net, args, args.epochs * batches)
    target_generator = SSDTargetGenerator(iou_thresh=0.5, stds=(0.1, 0.1, 0.2, 0.2),
                                          negative_mining_ratio=-1)
    loss_fn = SSDMultiBoxLoss(negative_mining_ratio=3)
    print('%d epochs x %d batches of %d fresh images; val: %d images'
          % (args.epochs, batches, args.batch_size, args.val_images), flush=True)
    start_all = time.time()
    for epoch in range(args.epochs):
        start, losses = time.time(), []
        for b in range(batches):
            first = (epoch * batches + b) * args.batch_size
            images, labels = det.make_detection_set('train', args.batch_size, seed=args.seed,
                                                    start=first)
            losses.append(train_step(net, trainer, target_generator, loss_fn, images, labels))
        train_time = time.time() - start
        val_map = validate(net, val_images, val_labels, args.batch_size)
        cls_loss, box_loss = np.mean(losses, axis=0)
        print('epoch %2d/%d  cls-loss %.4f  box-loss %.4f  val-mAP %.4f  lr %.5f  train %.0fs  '
              'eval %.0fs' % (epoch + 1, args.epochs, cls_loss, box_loss, val_map,
                              trainer.learning_rate, train_time,
                              time.time() - start - train_time), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    net.save_parameters(args.out)
    print('saved %s (%d bytes); final val-mAP %.4f; %.1f min'
          % (args.out, os.path.getsize(args.out), val_map, (time.time() - start_all) / 60),
          flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--epochs', type=int, default=28)
    parser.add_argument('--images-per-epoch', type=int, default=3200)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--lr', type=float, default=0.05)
    parser.add_argument('--wd', type=float, default=5e-4)
    parser.add_argument('--val-images', type=int, default=300)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default=os.path.join(REPO_DATA_DIR, 'ssd_fashion.params'),
                        help='where to save the parameters (default: %(default)s)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    run(args)


if __name__ == '__main__':
    main()
