#!/usr/bin/env python
"""Train the CIFAR-10 reference ViT from scratch: the same as ``visionfx train cifar10 ...``.

    python scripts/train_cifar10.py --data /path/to/cifar10.tar.xz --cache-dir .data --time-budget 180
    python scripts/train_cifar10.py --data cifar10.tar.xz --limit 4 --batch-size 8 --max-steps 2 --cpu   # smoke run

The function behind it is visionfx.recovery.train.train_reference.
"""

import sys

from visionfx.recovery.cli import main_train

if __name__ == "__main__":
    sys.exit(main_train(["cifar10", *sys.argv[1:]]))
