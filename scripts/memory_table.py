"""Memory per GPU for stage-2 training of VisualRWKV 1.6B, 3B and 7B: model states under ZeRO 1 and 2, plus activations
at ctx 2048 with and without gradient checkpointing. Prints a markdown table (the README's) and writes JSON:

    python scripts/memory_table.py --out runs/memory_table.json

Model states follow DeepSpeed's accounting for bf16 mixed precision with Adam (its ZeRO-2 estimator,
`estimate_zero2_model_states_mem_needs`, without CPU offload): 2 bytes per parameter for the bf16 weights, and per
trainable parameter 2 (bf16 gradient) + 4 (fp32 gradient) + 4 (fp32 master) + 8 (Adam's two moments). ZeRO-2 splits
the last 18 bytes over the GPUs; ZeRO-1 splits the 16 fp32 bytes and keeps the bf16 gradient whole. Frozen parameters
(the vision tower, and the embedding, frozen in stage 2 as in the official code) cost their bf16 weights only. Not
counted: DeepSpeed's communication buckets, the allocator's fragmentation, the CUDA context (about 0.5-1 GiB).

Activations are measured, not modelled: one RWKV-6 block of each width runs forward in bf16 on the CPU (the WKV through
the Triton kernel under TRITON_INTERPRET=1, as a GPU would run it), and every tensor autograd saves for the backward is
counted once (weights excluded), per token. The language-model head is counted the same way with every position
supervised (the worst case). Without checkpointing a micro-batch keeps every block's activations; with `--grad-cp`
each block keeps only its input (2 bytes x C per token) and one block's activations are live during its recompute.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

GiB = 2**30
SIZES = {"1.6B": dict(n_layer=24, n_embd=2048), "3B": dict(n_layer=32, n_embd=2560), "7B": dict(n_layer=32, n_embd=4096)}
MEASURE_T = 32                      # tokens per measuring forward (activations are linear in T)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ctx-len", type=int, default=2048)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--out", help="JSON path")
    return p.parse_args(argv)


def param_counts(size):
    """(total, trainable in stage 2, vision tower) parameters of VisualRWKV at `size`, counted on the meta device."""
    import torch
    from visualrwkv.model import VisualRWKV
    from visualrwkv.rwkv import RWKV6Config
    with torch.device("meta"):
        model = VisualRWKV(RWKV6Config(**SIZES[size]))
    total = sum(p.numel() for p in model.parameters())
    tower = sum(p.numel() for p in model.vit.parameters())
    frozen = tower + model.rwkv.emb.weight.numel()
    return total, total - frozen, tower


def model_state_bytes(total, trainable, gpus, zero):
    """Bytes per GPU of weights, gradients, fp32 masters and Adam moments (module docstring)."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    frozen = total - trainable
    if zero == 2:
        _, gpu = estimate_zero2_model_states_mem_needs(trainable, num_gpus_per_node=gpus, cpu_offload=False)
        return 2 * frozen + gpu
    return 2 * total + 2 * trainable + 16 * trainable / gpus


def saved_bytes(fn, exclude):
    """Bytes of the distinct storages autograd saves while fn() runs, leaving out the storages in `exclude`."""
    import torch
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def activation_bytes_per_token(n_embd):
    """(one block, the head with every position supervised) bytes saved per token, bf16, WKV through Triton."""
    import torch
    from visualrwkv.model import next_token_loss
    from visualrwkv.rwkv import Block, RWKV6Config, randomize_
    cfg = RWKV6Config(n_layer=2, n_embd=n_embd, wkv_impl="triton")
    block = randomize_(Block(cfg, 1)).to(torch.bfloat16)
    head = torch.nn.Linear(n_embd, cfg.vocab_size, bias=False).to(torch.bfloat16)
    exclude = {p.untyped_storage().data_ptr() for p in list(block.parameters()) + list(head.parameters())}
    x = torch.randn(1, MEASURE_T, n_embd, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, cfg.vocab_size, (1, MEASURE_T))
    per_block = saved_bytes(lambda: block(x), exclude | {x.untyped_storage().data_ptr()})
    per_head = saved_bytes(lambda: next_token_loss(head(x), labels), exclude | {x.untyped_storage().data_ptr()})
    return per_block / MEASURE_T, per_head / MEASURE_T


def table(args):
    rows = []
    for size, shape in SIZES.items():
        total, trainable, tower = param_counts(size)
        block, head = activation_bytes_per_token(shape["n_embd"])
        L, C, T = shape["n_layer"], shape["n_embd"], args.ctx_len
        act = {"no grad-cp": (block * L + head) * T, "grad-cp": (2 * C * L + block + head) * T}
        for zero in (1, 2):
            states = model_state_bytes(total, trainable, args.gpus, zero)
            rows.append(dict(size=size, zero=zero, gpus=args.gpus, params=total, trainable=trainable, tower=tower,
                             model_states_GiB=states / GiB, block_bytes_per_token=block, head_bytes_per_token=head,
                             **{f"activations_{k}_GiB_per_sample": v / GiB for k, v in act.items()},
                             **{f"total_{k}_GiB_micro1": (states + v) / GiB for k, v in act.items()}))
        print(f"{size}: measured {block / C:.1f} x C bytes per token per block, head {head / 1e6:.2f} MB per token",
              file=sys.stderr, flush=True)
    return rows


def print_markdown(rows, args):
    print(f"| model | ZeRO | parameters (trainable) | model states / GPU | activations / sample, ctx {args.ctx_len} "
          f"| with `--grad-cp` | total, micro-batch 1 | with `--grad-cp` |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['zero']} | {r['params'] / 1e9:.2f}B ({r['trainable'] / 1e9:.2f}B) "
              f"| {r['model_states_GiB']:.1f} GiB | {r['activations_no grad-cp_GiB_per_sample']:.1f} GiB "
              f"| {r['activations_grad-cp_GiB_per_sample']:.1f} GiB | {r['total_no grad-cp_GiB_micro1']:.1f} GiB "
              f"| {r['total_grad-cp_GiB_micro1']:.1f} GiB |")


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rows = table(args)
    print_markdown(rows, args)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(ctx_len=args.ctx_len, gpus=args.gpus, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
