"""`python -m mumu_model.training CONFIG.yaml [--set field=value ...] [--resume latest]`.

The same code as `mumu train`; under torchrun:
    torchrun --nproc_per_node=2 -m mumu_model.training configs/train_tiny.yaml
Check a config and print its sizing report without training:
    python -m mumu_model.training configs/train_stage1_paper.yaml --dry-run --world-size 8
"""

import sys

from mumu_model.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
