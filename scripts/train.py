"""Two-stage VisualRWKV training with DeepSpeed: `visualrwkv train` (visualrwkv.cli, notebooks 15 and 20) under the
path the launchers and the README use. `--help` lists every option.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 scripts/train.py --toy --stage 1 --out runs/toy/stage1
"""
import sys

from visualrwkv.cli import main as cli_main, parse_train_args


def parse_args(argv=None):
    "The checked TrainConfig of training flags (argparse's usage error on a bad one)."
    return parse_train_args(argv, prog="scripts/train.py")


def main(argv=None):
    code = cli_main(["train", *(sys.argv[1:] if argv is None else argv)])
    if code: sys.exit(code)


if __name__ == "__main__":
    main()
