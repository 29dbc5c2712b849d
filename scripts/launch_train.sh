#!/usr/bin/env bash
# Stage 1 or 2 of VisualRWKV 1.6B, 3B or 7B with the settings of the official v6.0 scripts
# (VisualRWKV-v6/v6.0/scripts/train/rwkv{1b5,3b,7b}_{pretrain,mix665k}.sh), on one machine or several.
#
#   scripts/launch_train.sh SIZE STAGE [more scripts/train.py flags]      SIZE: 1b6 | 3b | 7b | toy   STAGE: 1 | 2
#
# Paths, from the environment (local files only):
#   LM       stage 1: the RWKV-6 World checkpoint (e.g. RWKV-x060-World-1B6-v2.1-20240328-ctx4096.pth)
#   VISION   stage 1: the open_clip ViT-L-14-336 checkpoint
#   DATA     the LLaVA json (stage 1: blip_laion_cc_sbu_558k.json, stage 2: llava_v1_5_mix665k.json)
#   IMAGES   the folder the records' images are relative to
#   OUT      output folder (default runs/SIZE-stageSTAGE; launching again continues from its newest checkpoint)
#   INIT     stage 2's start (default runs/SIZE-stage1/visualrwkv.pth)
# Machines:
#   NPROC        processes (GPUs) per machine, default: the GPUs torch sees, else 1
#   NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500
#                several machines with torchrun: run this on each, with the same NNODES, MASTER_ADDR and MASTER_PORT and
#                its own NODE_RANK (0 on the machine at MASTER_ADDR)
#   HOSTFILE     or DeepSpeed's launcher: run this once, on the first machine, with a hostfile ("host slots=8" lines)
#                and passwordless ssh to the others
#
# The global batch is what the official scripts' GPUs x micro-batch x accumulation give (128 everywhere); train.py
# derives the accumulation from it, so another GPU count keeps the batch. Where the paper's Table 6 differs from the
# scripts (the scripts are what ran): stage-1 batch 256 in Table 6; stage-2 lr 6e-5 -> 1.5e-5 (1.6B), 5e-5 -> 1.25e-5
# (3B), 4e-5 -> 1e-5 with ZeRO 2 (7B) in Table 6. Epochs follow Table 6 (1, then 2): the scripts count "mini-epochs"
# of 1000 steps, 0.19 of an epoch for 1.6B stage 2 (probably resumed several times) and about 1 and 2 elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE="${1:?usage: scripts/launch_train.sh SIZE STAGE [flags]}"; STAGE="${2:?usage: scripts/launch_train.sh SIZE STAGE [flags]}"
shift 2

#                    micro ctx   lr    lr_end  zero grad_cp freeze_proj
case "$SIZE-$STAGE" in
  1b6-1) set_args=(16 1024 1e-3 1e-5   1 0 0) ;;
  1b6-2) set_args=(16 2048 3e-5 1.5e-5 1 1 0) ;;
  3b-1)  set_args=(8  1024 1e-3 1e-5   1 0 0) ;;
  3b-2)  set_args=(8  2048 2e-5 2e-5   1 1 0) ;;
  7b-1)  set_args=(8  1024 1e-3 1e-5   1 0 0) ;;
  7b-2)  set_args=(2  2048 2e-5 2e-5   1 1 1) ;;
  toy-1|toy-2) set_args=(2 128 1e-2 1e-3 1 0 0) ;;                 # a smoke run of the launcher on the CPU
  *) echo "error: SIZE must be 1b6, 3b, 7b or toy and STAGE 1 or 2, got '$SIZE' '$STAGE'" >&2; exit 2 ;;
esac
read -r MICRO CTX LR LR_END ZERO GRAD_CP FREEZE_PROJ <<< "${set_args[*]}"
OUT="${OUT:-runs/$SIZE-stage$STAGE}"
POSITION=$([ "$STAGE" = 1 ] && echo first || echo middle)

flags=(--stage "$STAGE" --out "$OUT" --resume auto --ctx-len "$CTX" --micro-batch "$MICRO" --lr "$LR" --lr-end "$LR_END"
       --zero "$ZERO" --image-position "$POSITION")                  # --resume auto: a relaunch continues
[ "$GRAD_CP" = 1 ] && flags+=(--grad-cp)
[ "$FREEZE_PROJ" = 1 ] && flags+=(--freeze-proj)
if [ "$SIZE" = toy ]; then
  flags+=(--toy --toy-samples 32 --batch-size 4 --steps 2)
  [ "$STAGE" = 2 ] && flags+=(--init "${INIT:-runs/toy-stage1/visualrwkv.pth}")
else
  flags+=(--batch-size 128 --data "${DATA:?set DATA}" --image-folder "${IMAGES:?set IMAGES}")
  if [ "$STAGE" = 1 ]; then flags+=(--lm "${LM:?set LM}" --vision "${VISION:?set VISION}")
  else flags+=(--init "${INIT:-runs/$SIZE-stage1/visualrwkv.pth}"); fi
fi

if [ -n "${HOSTFILE:-}" ]; then
  exec deepspeed --hostfile "$HOSTFILE" --no_local_rank --master_addr "${MASTER_ADDR:-127.0.0.1}" \
       --master_port "${MASTER_PORT:-29500}" scripts/train.py "${flags[@]}" "$@"
fi
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
exec python -m torch.distributed.run --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
     --nproc_per_node "${NPROC:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 1)}" \
     --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
     scripts/train.py "${flags[@]}" "$@"
