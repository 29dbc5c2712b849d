#!/usr/bin/env bash
# The toy world run: a tiny VisualRWKV made as the real ones are, on the toy world of notebook 18, on the CPU.
# Not yet the main job (scripts/run_toy.sh): at these settings the model has only begun to use the picture (colour,
# shape and relation questions above their baselines, count, position, yes/no and multiple choice not); the README's
# toy world section has the measured numbers.
#   0. the toy world (shapes on a 3x3 grid, captions, seven question types, a held-out split) and stage 0: its reduced
#      vocabulary, a tiny open_clip tower trained contrastively on the captions, a tiny RWKV-6 LM on the world's text;
#   1. stage 1 trains the projector (tower and LM frozen), image first;
#   2. stage 2 trains projector and LM (embedding and tower frozen) on the multi-turn questions, sandwich prompt;
#   3. greedy answers to the held-out questions, accuracy per question type next to chance and the question-only
#      baseline: <OUT>/summary.json, a table, <OUT>/answers.png; loss curves in stage1/ and stage2/curves.png.
# Usage: bash scripts/run_toy_world.sh [OUT_DIR]   (default runs/toy_world, emptied first; 2 processes, gloo)
# Knobs: NPROC (2), STAGE1_STEPS (200), STAGE2_STEPS (1000), LM_STEPS (600), VISION_STEPS (200), TRAIN_IMAGES (2000),
#        EVAL_QUESTIONS (700), SEED (0), DS_ACCELERATOR=cuda to run on GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/toy_world}"
NPROC="${NPROC:-2}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"
rm -rf "$OUT"
mkdir -p "$OUT"
train() { python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" scripts/train.py \
            --ctx-len 192 --batch-size 16 --micro-batch $((16 / NPROC)) --log-every 20 --no-progress-bar "$@"; }

SECONDS=0
OMP_NUM_THREADS=$(nproc) python scripts/toy_stage0.py --out "$OUT" --seed "${SEED:-0}" \
    --train-images "${TRAIN_IMAGES:-2000}" --eval-questions "${EVAL_QUESTIONS:-700}" \
    --vision-steps "${VISION_STEPS:-200}" --lm-steps "${LM_STEPS:-600}"
T0=$SECONDS
train --stage 1 --out "$OUT/stage1" --lm "$OUT/stage0/toy_lm.pth" --vision "$OUT/stage0/toy_clip.pth" \
      --tokenizer "$OUT/world/toy_tokenizer.json" --data "$OUT/world/stage1.json" --steps "${STAGE1_STEPS:-200}" \
      --lr 1e-2 --lr-end 1e-3 --seed "${SEED:-0}"
T1=$SECONDS
train --stage 2 --out "$OUT/stage2" --init "$OUT/stage1/visualrwkv.pth" --data "$OUT/world/stage2.json" \
      --steps "${STAGE2_STEPS:-1000}" --lr 3e-3 --lr-end 2e-4 --seed "${SEED:-0}"
T2=$SECONDS
OMP_NUM_THREADS=$(nproc) python scripts/evaluate.py --model "$OUT/stage2/visualrwkv.pth" --data "$OUT/world/eval.jsonl" \
    --out "$OUT/answers.jsonl" --batch-size 32 --max-new-tokens 8
T3=$SECONDS
python scripts/toy_report.py "$OUT" --seconds "$T3"
echo "times: stage 0 ${T0}s, stage 1 $((T1 - T0))s, stage 2 $((T2 - T1))s, evaluation $((T3 - T2))s, total ${T3}s"
