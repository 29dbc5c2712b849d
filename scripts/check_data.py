"""Report every bad record of a LLaVA-format data file without training.

    python scripts/check_data.py --data llava_v1_5_mix665k.json --image-folder data --ctx-len 2048 --n-image-tokens 577

reads the `.json` list or `.jsonl` file, checks each record as training would (conversation, tokenisation with the
prompt layout of `--image-position`, truncation to `--ctx-len` with the image's `--n-image-tokens` counted, the image
file opened and decoded) and prints the number of bad records per cause (missing image, corrupt image, malformed
conversation, no label, image cut by truncation, nothing to learn after truncation) with the first few of each, by id
and reason. Without `--ctx-len` nothing is truncated. Exit status: 0 when no record is bad, 1 when some are, 2 when
the file itself cannot be read (one `error: ...` line naming it). The logic is `visualrwkv.data.check_data`.
"""
import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data", required=True, help="LLaVA .json list or .jsonl file")
    p.add_argument("--image-folder", default=None, help="folder the records' image paths are relative to (default: the data file's)")
    p.add_argument("--ctx-len", type=int, default=None, help="context length to truncate to, image tokens counted")
    p.add_argument("--n-image-tokens", type=int, default=577, help="tokens per image in the model (577: ViT-L/14-336, no pooling)")
    p.add_argument("--image-position", default="middle", choices=["first", "middle", "last"], help="prompt layout (Fig. 2)")
    p.add_argument("--text-only-tokens", type=int, default=0,
                   help="zero-image tokens before a text-only sample (a model with text_only_zero_image: the image tokens)")
    p.add_argument("--examples", type=int, default=5, help="bad records shown per cause")
    args = p.parse_args(argv)
    from visualrwkv.data import DataFileError, check_data                  # after parsing: --help stays fast
    try:
        report = check_data(args.data, args.image_folder, args.ctx_len, args.n_image_tokens, args.image_position,
                            args.text_only_tokens, n_examples=args.examples)
    except DataFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 1 if report.n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
