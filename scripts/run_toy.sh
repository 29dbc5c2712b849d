#!/usr/bin/env bash
# The tiny end-to-end run on the embedded toy dataset, on the CPU with 2 processes (DeepSpeed, gloo):
#   1. stage 1 makes the toy data (coloured shapes, written as LLaVA json + images) and trains the projector of a tiny
#      random VisualRWKV (LM and vision tower frozen);
#   2. stage 2 starts from stage 1's checkpoint and trains projector + LM (tower frozen);
#   3. greedy answers on held-out toy questions, VQA exact match against the question-only baseline;
#   4. a summary table.
# Usage: bash scripts/run_toy.sh [OUT_DIR]   (default runs/toy; about 5 minutes on 2 CPU cores)
# Knobs: NPROC (processes, default 2), STAGE1_STEPS (30), STAGE2_STEPS (250), GRID_SIZE (-1: all 16 patches + CLS),
#        DS_ACCELERATOR=cuda to run on GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/toy}"
NPROC="${NPROC:-2}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"
train() { python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" scripts/train.py --toy \
            --toy-samples 768 --ctx-len 128 --batch-size 16 --micro-batch $((16 / NPROC)) --log-every 10 --overwrite "$@"; }

SECONDS=0
train --stage 1 --out "$OUT/stage1" --steps "${STAGE1_STEPS:-30}" --lr 1e-2 --lr-end 1e-3 --grid-size "${GRID_SIZE:--1}"
T1=$SECONDS
train --stage 2 --out "$OUT/stage2" --init "$OUT/stage1/visualrwkv.pth" --steps "${STAGE2_STEPS:-250}" --lr 2e-3 --lr-end 1e-4
T2=$SECONDS
python scripts/evaluate.py --model "$OUT/stage2/visualrwkv.pth" --data "$OUT/toy_data/eval.jsonl"
T3=$SECONDS

python - "$OUT" "$T1" "$T2" "$T3" <<'EOF'
import json, sys
from pathlib import Path
out, t1, t2, t3 = Path(sys.argv[1]), *map(int, sys.argv[2:])
print(f"\n{'':<10}{'steps':>7}{'first loss':>12}{'last loss':>11}{'skipped':>9}{'time':>8}")
for stage, seconds in (("stage1", t1), ("stage2", t2 - t1)):
    rows = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
    print(f"{stage:<10}{rows[-1]['step']:>7}{rows[0]['loss']:>12.3f}{rows[-1]['loss']:>11.3f}{rows[-1]['skipped']:>9}"
          f"{seconds:>7}s")
ev = json.loads((out / "stage2" / "eval_summary.json").read_text())
print(f"{'evaluate':<10}{ev['n']:>7} questions: exact match {ev['accuracy']:.1%}, "
      f"question-only baseline {ev['question_only_baseline']:.1%}{t3 - t2:>7}s")
print(f"total {t3}s; model {out / 'stage2' / 'visualrwkv.pth'}")
EOF
