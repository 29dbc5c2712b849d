"""Report every bad record of a LLaVA-format data file without training: `visualrwkv check-data` (visualrwkv.cli).

    python scripts/check_data.py --data llava_v1_5_mix665k.json --image-folder data --ctx-len 2048 --n-image-tokens 577

reads the `.json` list or `.jsonl` file, checks each record as training would (conversation, tokenisation with the
prompt layout of `--image-position`, truncation to `--ctx-len` with the image's `--n-image-tokens` counted, the image
file opened and decoded) and prints the number of bad records per cause (missing image, corrupt image, malformed
conversation, no label, image cut by truncation, nothing to learn after truncation) with the first few of each, by id
and reason. Without `--ctx-len` nothing is truncated. Exit status: 0 when no record is bad, 1 when some are, 2 when
the file itself cannot be read (one `error: ...` line naming it). The logic is `visualrwkv.data.check_data`.
"""
import sys

from visualrwkv.cli import main as cli_main


def main(argv=None) -> int:
    return cli_main(["check-data", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
