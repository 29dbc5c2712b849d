"""Smoke run of the RWKV-6 language model on the CPU: learn a copy task, decode in RNN mode, save and reload.

A copy task needs memory: the model sees `a b c ... | ` and must reproduce the prefix, which it can only do through its
recurrent state. Run: `python scripts/smoke_lm.py` (about a minute on 2 cores). Exits non-zero if anything fails.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from visualrwkv.rwkv import RWKV6, RWKV6Config, generate, load_rwkv6, write_state_dict

SEP = 1  # token ids: 0 pad (unused), 1 separator, 2.. symbols


def copy_batch(batch_size, length, n_symbols, generator):
    """Sequences `x_1..x_n SEP x_1..x_n`; the loss covers the copy only."""
    prefix = torch.randint(2, 2 + n_symbols, (batch_size, length), generator=generator)
    seq = torch.cat([prefix, torch.full((batch_size, 1), SEP), prefix], dim=1)          # [B, 2n+1]
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()
    targets[:, :length] = -100                                                          # nothing to predict before SEP
    return inputs, targets


def train(model, args, generator):
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    history, t0 = [], time.time()
    for step in range(1, args.steps + 1):
        inputs, targets = copy_batch(args.batch_size, args.length, args.symbols, generator)
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step()
        history.append(loss.item())
        if step % args.log_every == 0 or step == 1:
            print(f"{step:>6} {sum(history[-args.log_every:]) / len(history[-args.log_every:]):>10.4f} {time.time() - t0:>8.1f}s")
    return history


@torch.no_grad()
def copy_accuracy(model, args, generator):
    inputs, _ = copy_batch(64, args.length, args.symbols, generator)
    prompt = inputs[:, :args.length + 1]                                                # prefix and SEP
    copied = generate(model, prompt, max_new_tokens=args.length, temperature=0)
    return (copied == prompt[:, :args.length]).float().mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--length", type=int, default=8, help="symbols to copy")
    p.add_argument("--symbols", type=int, default=12)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--head-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--out", default="out/smoke/rwkv6.pth")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    cfg = RWKV6Config(vocab_size=2 + args.symbols, n_layer=args.n_layer, n_embd=args.n_embd, head_size=args.head_size,
                      lora_mix=16, lora_decay=32)
    model = RWKV6(cfg)
    print(f"RWKV-6 {cfg.n_layer} layers x {cfg.n_embd}, {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"copy {args.length} of {args.symbols} symbols; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'step':>6} {'loss':>10} {'time':>9}")
    history = train(model, args, generator)
    model.eval()
    accuracy = copy_accuracy(model, args, generator)

    inputs, _ = copy_batch(4, args.length, args.symbols, generator)
    with torch.no_grad():
        parallel = model(inputs)
        state, steps = None, []
        for t in range(inputs.shape[1]):
            logits, state = model.step(inputs[:, t], state)
            steps.append(logits)
    rnn_gap = (torch.stack(steps, 1) - parallel).abs().max().item()

    write_state_dict(model.state_dict(), args.out)
    reloaded = load_rwkv6(args.out)
    with torch.no_grad():
        reload_gap = (reloaded(inputs) - parallel).abs().max().item()

    first, last = sum(history[:20]) / 20, sum(history[-20:]) / 20
    print(f"\nloss {first:.3f} -> {last:.3f}; greedy copy accuracy (RNN-mode decoding) {accuracy:.1%}")
    print(f"max |RNN mode - parallel mode| = {rnn_gap:.2e}; max |reloaded - trained| = {reload_gap:.2e}; saved {args.out}")
    checks = {"loss fell by half": last < 0.5 * first, "RNN mode == parallel mode": rnn_gap < 1e-4,
              "checkpoint round trip": reload_gap == 0.0}
    for name, ok in checks.items(): print(f"{'PASS' if ok else 'FAIL'}: {name}")
    raise SystemExit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
