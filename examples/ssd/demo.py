"""Draw FP32 and INT8 detections of the exported SSDs side by side in one PNG.

Run examples/ssd/quantization.py first: it writes the two models this script loads
(``<model-prefix>/ssd_<network>_<data-shape>`` and ``cqssd_...``). Each row is one
synthetic test image; left FP32, right INT8; green dashed boxes are the ground truth.

Example::

    PYTHONPATH=. python examples/ssd/demo.py --out ./model/ssd_demo.png
"""
import argparse
import os
import sys

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from gluon_int8_samples import detection as det  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evaluate import load_deploy  # noqa: E402


def draw(ax, image, labels, boxes, scores, ids, threshold, title):
    """One panel: the image, dashed ground truth, detections above ``threshold``."""
    ax.imshow(image)
    for x0, y0, x1, y1, _ in labels:
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec='lime',
                                   ls='--', lw=1))
    shown = 0
    for (x0, y0, x1, y1), score, cls in zip(boxes, scores, ids):
        if cls < 0 or score < threshold:
            continue
        shown += 1
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec='red', lw=1.5))
        ax.text(x0, y0 - 2, '%s %.2f' % (det.CLASS_NAMES[int(cls)], score), color='white',
                fontsize=7, bbox=dict(facecolor='red', alpha=0.7, pad=1, lw=0))
    ax.set_title('%s: %d detections >= %.2f' % (title, shown, threshold), fontsize=9)
    ax.axis('off')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model-prefix', default='./model')
    parser.add_argument('--network', default='fashion')
    parser.add_argument('--data-shape', type=int, default=300)
    parser.add_argument('--num-images', type=int, default=3)
    parser.add_argument('--start', type=int, default=0, help='first test split image')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threshold', type=float, default=0.3, help='minimum score drawn')
    parser.add_argument('--out', default='./model/ssd_demo.png')
    args = parser.parse_args(argv)

    name = '%s_%d' % (args.network, args.data_shape)
    models = {}
    for title, kind in (('FP32', 'ssd_'), ('INT8', 'cqssd_')):
        prefix = os.path.join(args.model_prefix, kind + name)
        if not os.path.isfile(prefix + '-symbol.json'):
            sys.exit('%s-symbol.json not found: run examples/ssd/quantization.py first' % prefix)
        models[title] = load_deploy(prefix)
    images, labels = det.make_detection_set('test', args.num_images, seed=args.seed,
                                            start=args.start)
    fig, axes = plt.subplots(args.num_images, 2, figsize=(8, 4 * args.num_images),
                             squeeze=False)
    for col, (title, net) in enumerate(models.items()):
        boxes, scores, ids = det.detect(net, images)
        for row in range(args.num_images):
            draw(axes[row, col], images[row], labels[row], boxes[row], scores[row], ids[row],
                 args.threshold, title)
    fig.suptitle('SSD on synthetic Fashion-MNIST test images: FP32 (left) vs INT8 (right)\n'
                 'red: detections with their score, green dashed: ground truth', fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print('wrote %s' % args.out)


if __name__ == '__main__':
    main()
