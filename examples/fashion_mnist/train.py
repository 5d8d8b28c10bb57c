"""Train the Fashion-MNIST model families shipped with gluon_int8.

Deterministic for a given ``--seed`` on a single thread: mxnet, numpy and
random are seeded, shuffling and augmentation (random 28x28 crop of the
2-pixel zero-padded image + random horizontal flip) use a seeded numpy RNG.
Optimizer: SGD with Nesterov momentum 0.9, weight decay 5e-4, cosine
learning-rate schedule with a short linear warm-up.

Example::

    OMP_NUM_THREADS=1 .venv/bin/python examples/fashion_mnist/train.py \
        --model resnet --epochs 6 --seed 0

``--out-dir`` defaults to this repository's ``gluon_int8_samples/data`` (found from this
script's location: the folder the samples load from in a checkout or an editable
install), never to an installed package; the bundled test slice is rewritten there too
unless ``--no-slice``.
"""

import argparse
import os
import random
import sys
import time

# single-threaded, deterministic training unless the caller says otherwise
os.environ.setdefault("OMP_NUM_THREADS", "1")

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__),
                                                "..", "..")))
from gluon_int8_samples import fashion_mnist as fm  # noqa: E402

#: The repository's sample data folder (this script lives in <repo>/examples/fashion_mnist).
REPO_DATA_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                              "..", "..", "gluon_int8_samples", "data"))

#: Epochs used when --epochs is not given (chosen for <= ~15 min on 1 core).
DEFAULT_EPOCHS = {"resnet": 6, "mobilenet": 12, "inception": 6, "preact_resnet": 6,
                  "shufflenet": 10, "mobilenetv3": 10}


def augment(images_u8, rng, pad=2):
    """Random crop (from a ``pad``-pixel zero padding) + horizontal flip."""
    num, height, width = images_u8.shape
    padded = np.pad(images_u8, ((0, 0), (pad, pad), (pad, pad)))
    offy = rng.randint(0, 2 * pad + 1, size=num)
    offx = rng.randint(0, 2 * pad + 1, size=num)
    flip = rng.rand(num) < 0.5
    out = np.empty_like(images_u8)
    for i in range(num):
        crop = padded[i, offy[i]:offy[i] + height, offx[i]:offx[i] + width]
        out[i] = crop[:, ::-1] if flip[i] else crop
    return out


def train_one(name, args, train_u8, train_labels, test_x, test_y):
    """Train model ``name``; save its parameters; return a summary dict."""
    mx.random.seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    rng = np.random.RandomState(args.seed)

    epochs = args.epochs or DEFAULT_EPOCHS[name]
    net = fm.get_model(name, pretrained=False)
    net.hybridize(static_alloc=True, static_shape=True)
    nparams = sum(p.data().size for p in net.collect_params().values())

    num = len(train_labels)
    batches = num // args.batch_size  # drop the last partial batch
    total_steps = epochs * batches
    if total_steps < 1:
        raise ValueError("need at least one batch of %d training images"
                         % args.batch_size)
    # 200 warm-up steps for the full data set; fewer for tiny debug runs
    warmup = min(200, total_steps // 10)
    schedule = mx.lr_scheduler.CosineScheduler(
        max_update=total_steps, base_lr=args.lr, final_lr=0.0,
        warmup_steps=warmup, warmup_begin_lr=args.lr * 0.1)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {
        "learning_rate": args.lr, "momentum": 0.9, "wd": args.wd,
        "lr_scheduler": schedule})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    print("[%s] %d parameters, %d epochs x %d batches of %d"
          % (name, nparams, epochs, batches, args.batch_size), flush=True)

    history = []
    for epoch in range(1, epochs + 1):
        start = time.time()
        order = rng.permutation(num)
        images = fm.normalize(augment(train_u8[order], rng))
        labels = train_labels[order].astype(np.float32)
        loss_sum = 0.0
        for b in range(batches):
            sl = slice(b * args.batch_size, (b + 1) * args.batch_size)
            data = mx.nd.array(images[sl])
            label = mx.nd.array(labels[sl])
            with autograd.record():
                loss = loss_fn(net(data), label)
            loss.backward()
            trainer.step(args.batch_size)
            loss_sum += float(loss.mean().asscalar())
        train_time = time.time() - start
        acc = fm.evaluate(net, test_x, test_y)
        history.append((epoch, loss_sum / batches, acc, train_time))
        print("[%s] epoch %d/%d  loss %.4f  test-acc %.4f  lr %.4f  "
              "train %.1fs  eval %.1fs"
              % (name, epoch, epochs, loss_sum / batches, acc,
                 trainer.learning_rate, train_time,
                 time.time() - start - train_time), flush=True)

    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "fashion_mnist_%s.params" % name)
    net.save_parameters(path)
    mean_epoch = sum(h[3] for h in history) / len(history)
    print("[%s] saved %s (%d bytes); final test-acc %.4f; %.1f s/epoch"
          % (name, path, os.path.getsize(path), history[-1][2], mean_epoch),
          flush=True)
    return {"name": name, "epochs": epochs, "acc": history[-1][2],
            "sec_per_epoch": mean_epoch, "path": path}


def main(argv=None):
    """Parse arguments and train the requested model(s)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all",
                        choices=sorted(fm.MODELS) + ["all"])
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs (default per model: %s)" % DEFAULT_EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--wd", type=float, default=5e-4)
    parser.add_argument("--out-dir", default=REPO_DATA_DIR,
                        help="where to save the parameters (default %(default)s)")
    parser.add_argument("--data-root", default=None,
                        help="directory of the idx .gz files (default $%s, else %s)"
                             % (fm.ROOT_ENV, fm.DEBIAN_ROOT))
    parser.add_argument("--no-slice", action="store_true",
                        help="do not (re)write the bundled test slice")
    args = parser.parse_args(argv)

    train_u8, train_labels = fm.load_raw_split("train", args.data_root)
    test_x, test_y = fm.load_split("test", args.data_root)
    if not args.no_slice:
        path = fm.write_bundled_slice(
            os.path.join(args.out_dir, os.path.basename(fm.SLICE_PATH)),
            args.data_root)
        print("wrote bundled test slice %s" % path, flush=True)

    names = sorted(fm.MODELS) if args.model == "all" else [args.model]
    results = [train_one(n, args, train_u8, train_labels, test_x, test_y)
               for n in names]
    for res in results:
        print("SUMMARY %-10s epochs %2d  %.1f s/epoch  test-acc %.4f"
              % (res["name"], res["epochs"], res["sec_per_epoch"], res["acc"]))


if __name__ == "__main__":
    main()
