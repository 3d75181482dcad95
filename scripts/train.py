"""Training entry point for torchrun:

    torchrun --nproc_per_node=8 scripts/train.py --config fitnets_r50_r18_in1k data.root=/data/imagenet

Same arguments as `fastfit train` (--config, --resume, key.path=value overrides).
"""

import sys

from fastfit.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
