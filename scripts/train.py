"""Two-stage VisualRWKV training with DeepSpeed (Section 4.1, Appendix A, Table 6): the command line over
`visualrwkv.train.train` (derived in nbs/15_train.ipynb).

Stage 1 (`--stage 1`) trains the projector only; stage 2 (`--stage 2`) the projector and the LM. The vision tower and
the LM's embedding are always frozen (official v6.0 train.py), `--freeze-proj` freezes the projector too (the official
7B stage-2 script). Defaults follow Table 6 for VisualRWKV 1.6B (AdamW without weight decay, cosine decay from 1e-3
to 1e-5 at batch 256 in stage 1, from 6e-5 to 1.5e-5 at batch 128 in stage 2, no warmup, ZeRO 1) and the official
scripts (scripts/train/rwkv1b5_pretrain.sh, rwkv1b5_mix665k.sh): stage 1 puts the image first with ctx_len 1024,
stage 2 in the middle (the sandwich) with ctx_len 2048. The loss is reduced per sample (Appendix D) unless
`--loss-reduction batch`, with the official L2Wrap on the logits unless `--no-l2wrap`.

Weights come from local paths only: `--lm` an RWKV-6 World .pth, `--vision` an open_clip checkpoint, or `--init` a
VisualRWKV checkpoint (stage 1's result, to start stage 2 from; its model_config.json gives the grid size, scan and
tower head width, not the image position). `--toy` builds a tiny random LM and tower and the embedded toy dataset:

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 scripts/train.py --toy --stage 1 --out runs/toy/stage1

Checkpoints: every `--save-every-minutes` (30) and every `--save-every` steps, and at the end, the newest
`--keep-checkpoints` (2) are kept in <out>/checkpoints/step-N/: the model in the official VisualRWKV-v060 layout,
model_config.json, the optimizer state as full tensors by parameter name (any number of processes can resume it),
a manifest of sizes and checksums written last. `--resume auto` continues from the newest intact one (or starts
when there is none); `--resume <folder>` from that one. A resumed run must keep its batch size, data and step
count unless `--allow-changes`; a new run refuses an --out with checkpoints unless `--overwrite`. Everything loads
with `torch.load(weights_only=True)`. A bad flag or input file ends in one line `error: ...` (exit code 2).
"""
import argparse
import os
import sys
import time

from visualrwkv.data import DataFileError
from visualrwkv.train import RunError, TrainConfig, resolve_config, train
from visualrwkv.wkv import IMPLS


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    p.add_argument("--out", required=True, help="output folder: checkpoints, metrics.jsonl, model_config.json, ...")
    w = p.add_argument_group("weights (local paths only)")
    w.add_argument("--toy", action="store_true", help="tiny random LM + tower and the embedded toy data")
    w.add_argument("--lm", help="RWKV-6 World checkpoint (.pth / .safetensors)")
    w.add_argument("--vision", help="open_clip CLIP checkpoint (visual.*), or a VisualRWKV checkpoint's tower (vit.*)")
    w.add_argument("--init", help="VisualRWKV checkpoint to start from (e.g. stage 1's visualrwkv.pth)")
    w.add_argument("--resume", help="a checkpoint folder (out/checkpoints/step-N), or 'auto': the newest intact one in "
                                    "--out (a fresh start from --toy/--init/--lm when there is none)")
    m = p.add_argument_group("model shape (default: --init's model_config.json, else the paper's)")
    m.add_argument("--grid-size", type=int, help="image token pooling, Table 9: -1 all patches, 0 CLS, g g x g")
    m.add_argument("--scan", choices=("unidirectional", "bidirectional", "multidirectional"))
    m.add_argument("--image-position", choices=("first", "middle", "last"),
                   help="default: the stage's (1: first, 2: middle, as the official scripts)")
    m.add_argument("--vision-head-width", type=int)
    m.add_argument("--text-only-zero-image", action="store_true", default=None)
    d = p.add_argument_group("data")
    d.add_argument("--data", help="LLaVA-format .json / .jsonl (with --toy: the stage's toy file by default)")
    d.add_argument("--image-folder", help="folder the records' 'image' paths are relative to (default: the data's)")
    d.add_argument("--toy-samples", type=int, default=512, help="--toy: images in the generated dataset")
    d.add_argument("--ctx-len", type=int, help="model positions per sample, image tokens included (stage 1: 1024, "
                                               "stage 2: 2048, as the official scripts)")
    d.add_argument("--workers", type=int, help="DataLoader worker processes (default: 4 on CUDA, 0 on the CPU)")
    d.add_argument("--max-bad-fraction", type=float, default=0.5, help="stop when more samples than this are bad")
    o = p.add_argument_group("optimisation (defaults: Table 6, VisualRWKV 1.6B)")
    o.add_argument("--batch-size", type=int, help="global batch: micro-batch x processes x accumulation")
    o.add_argument("--micro-batch", type=int, default=1, help="samples per process per forward")
    o.add_argument("--lr", type=float, help="initial learning rate (after warmup)")
    o.add_argument("--lr-end", type=float, help="final learning rate of the cosine decay")
    o.add_argument("--warmup-steps", type=int, default=0)
    o.add_argument("--epochs", type=float, help="stage 1: 1, stage 2: 2 (Table 6)")
    o.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    o.add_argument("--grad-clip", type=float, default=1.0)
    o.add_argument("--zero", type=int, default=1, choices=(0, 1, 2), help="DeepSpeed ZeRO stage")
    o.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 on CUDA cards with bf16, fp32 elsewhere")
    o.add_argument("--wkv-impl", choices=IMPLS, help="force one WKV implementation (default: by device and length)")
    o.add_argument("--loss-reduction", choices=("sample", "batch"), default="sample", help="Appendix D")
    o.add_argument("--l2wrap", action=argparse.BooleanOptionalAction, default=True,
                   help="official L2Wrap: push each position's largest logit towards zero (default: on)")
    o.add_argument("--freeze-proj", action="store_true", help="stage 2: freeze the projector (official 7B script)")
    o.add_argument("--grad-cp", action="store_true", help="gradient checkpointing per block (less memory, slower)")
    o.add_argument("--seed", type=int, default=0)
    c = p.add_argument_group("checkpoints and logs")
    c.add_argument("--save-every", type=int, default=0, help="also save every N steps (0: by time and at the end)")
    c.add_argument("--save-every-minutes", type=float, default=30.0, help="save when this much time has passed")
    c.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept in <out>/checkpoints")
    c.add_argument("--allow-changes", action="store_true",
                   help="resume although batch size, data, steps, lr ... changed, continuing with the new values")
    c.add_argument("--overwrite", action="store_true", help="start over in an --out that has checkpoints (deletes them)")
    c.add_argument("--log-every", type=int, default=1, help="print every N steps (when there is no progress bar)")
    c.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")
    c.add_argument("--tensorboard", action="store_true", help="also log to <out>/tensorboard (needs tensorboard)")
    try:
        return resolve_config(TrainConfig(**vars(p.parse_args(argv))))
    except RunError as e:
        p.error(str(e))


def main(argv=None):
    cfg = parse_args(argv)
    try:
        return train(cfg)
    except (RunError, DataFileError) as e:              # the user's flags or files: one line, no traceback
        if int(os.environ.get("RANK", "0")) > 0: time.sleep(2)   # process 0 speaks first; torchrun then ends the rest
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
