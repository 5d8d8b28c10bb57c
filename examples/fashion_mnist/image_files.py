"""Write the bundled Fashion-MNIST slice as image files, and a sample model as a plain
FP32 MXNet export, for the command-line flow of the README ("Images from disk").

    python examples/fashion_mnist/image_files.py --out work/fashion [--count 1000] \\
        [--model resnet]

writes ``work/fashion/folder/class<k>/<i>.png`` (one subfolder per class),
``flat/<i>.png``, ``slice.rec`` + ``slice.idx`` (MXNet RecordIO, PNG records) and
``fp32_<model>-symbol.json`` / ``-0000.params``. Read with ``--resize 0 --crop 0
--channels 1 --mean 0.286 --std 0.353`` the images equal the arrays of the bundled
slice exactly (PNG is lossless).
"""
import argparse
import os

import mxnet as mx

from gluon_int8_samples import fashion_mnist as fm


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', required=True, help='folder to write into')
    parser.add_argument('--count', type=int, default=fm.SLICE_SIZE,
                        help='images from the start of the slice (default: all %d)'
                             % fm.SLICE_SIZE)
    parser.add_argument('--model', default='resnet', choices=sorted(fm.MODELS))
    args = parser.parse_args(argv)
    for name, path in fm.write_image_files(args.out, args.count).items():
        print('%-6s %s' % (name, path))
    net = fm.get_model(args.model)
    net.hybridize()
    net(mx.nd.zeros((1,) + fm.INPUT_SHAPE))
    prefix = os.path.join(args.out, 'fp32_%s' % args.model)
    net.export(prefix)
    print('FP32   %s-symbol.json, %s-0000.params' % (prefix, prefix))


if __name__ == '__main__':
    main()
