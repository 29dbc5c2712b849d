"""How fast does a tiny model learn the toy world's questions when the scene is given as words? (notebook 18, "Where
the learning is slow")

    python scripts/toy_diagnose.py --world runs/toy_world/world --arch rwkv --out results/toy_diagnosis/text-rwkv.json

A language model is trained from scratch on 'caption, question, answer' texts: every question-answer turn of the
world's stage-2 picture conversations, each after the caption of its own picture, the loss on the answer only. Every
--eval-every steps it answers the held-out questions (eval.jsonl, each after its picture's caption) and is scored by
exact match of the whole answer, per question type. `--arch rwkv` is stage 0's RWKV-6 shape (4 layers, width 64, head
size 16); `--arch transformer` a causal pre-norm transformer of the same width and depth (4 heads, learned
positions), with the same loop and learning-rate schedule. Prints the curve and writes it as json to --out.
"""
import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from visualrwkv.prompts import STOP_TOKEN, turn_text
from visualrwkv.rwkv import RWKV6, RWKV6Config
from visualrwkv.tokenizer import ToyTokenizer
from visualrwkv.toy import caption, read_scenes
from visualrwkv.train import lr_at


class TinyTransformer(torch.nn.Module):
    "A causal pre-norm transformer language model (learned positions) for the comparison."
    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, max_len: int):
        super().__init__()
        self.emb, self.pos = torch.nn.Embedding(vocab_size, width), torch.nn.Embedding(max_len, width)
        block = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.ln_out, self.head = torch.nn.LayerNorm(width), torch.nn.Linear(width, vocab_size)

    def forward(self, ids):                                                  # ids [B, T] -> logits [B, T, V]
        T = ids.shape[1]
        causal = torch.nn.Transformer.generate_square_subsequent_mask(T)
        x = self.emb(ids) + self.pos(torch.arange(T))
        return self.head(self.ln_out(self.blocks(x, mask=causal, is_causal=True)))

def qa_sample(tokenizer, scene, question: str, answer: str, qtype: str) -> tuple:
    "(ids, answer start, type): the scene's caption, the question as a User turn, then the Assistant turn answering it."
    prompt = tokenizer.encode(f"{caption(scene)}\n\n" + turn_text("human", question) + turn_text("gpt", ""))
    return prompt + tokenizer.encode(f" {answer}{STOP_TOKEN}"), len(prompt), qtype

def qa_samples(world: Path, tokenizer) -> dict:
    """{'train': every question-answer turn of stage2.json's picture conversations, 'eval': eval.jsonl's questions},
    each with the caption of its own picture."""
    scenes = read_scenes(world)
    train = [qa_sample(tokenizer, scenes["train"][r["image"]], q["value"].replace("<image>", "").strip(), a["value"], "")
             for r in json.loads((world / "stage2.json").read_text()) if "image" in r
             for q, a in zip(r["conversations"][::2], r["conversations"][1::2])]
    held_out = []
    for line in (world / "eval.jsonl").read_text().splitlines():
        r = json.loads(line)
        q, a = r["conversations"][-2:]
        held_out.append(qa_sample(tokenizer, scenes["eval"][r["image"]], q["value"].replace("<image>", "").strip(),
                                  a["value"], r["question_type"]))
    return dict(train=train, eval=held_out)

def answer_batch(samples) -> tuple:
    "ids [B, T] right-padded with 0, targets [B, T]: the next token at answer positions, -100 elsewhere."
    T = max(len(ids) for ids, _, _ in samples)
    ids = torch.zeros(len(samples), T, dtype=torch.long)
    targets = torch.full_like(ids, -100)
    for b, (x, start, _) in enumerate(samples):
        ids[b, :len(x)] = torch.tensor(x)
        targets[b, start - 1:len(x) - 1] = torch.tensor(x[start:])
    return ids, targets

@torch.no_grad()
def exact_match(model, samples, batch_size: int = 100) -> dict:
    "{type: share of samples whose every answer token (and the end) is the model's top prediction}."
    model.eval()
    hits = defaultdict(list)
    for k in range(0, len(samples), batch_size):
        chunk = samples[k:k + batch_size]
        ids, targets = answer_batch(chunk)
        right = ((model(ids).argmax(-1) == targets) | (targets == -100)).all(1)             # [B]
        for (_, _, qtype), ok in zip(chunk, right.tolist()): hits[qtype].append(ok)
    model.train()
    return {t: sum(v) / len(v) for t, v in sorted(hits.items())}

def build_lm(arch: str, vocab_size: int, max_len: int, seed: int):
    "Stage 0's RWKV-6 shape, or the transformer of the same width and depth."
    torch.manual_seed(seed)
    if arch == "rwkv":
        return RWKV6(RWKV6Config(vocab_size=vocab_size, n_layer=4, n_embd=64, head_size=16, lora_mix=8, lora_decay=8))
    return TinyTransformer(vocab_size, width=64, layers=4, heads=4, max_len=max_len)

def text(world: Path, arch: str, steps: int, lr: float, batch_size: int, eval_every: int, seed: int) -> dict:
    "Answer exact match per type on the held-out questions over training (the question-only and chance bars aside)."
    tokenizer = ToyTokenizer.load(world / "toy_tokenizer.json")
    data = qa_samples(world, tokenizer)
    max_len = max(len(ids) for split in data.values() for ids, _, _ in split)
    model = build_lm(arch, len(tokenizer), max_len, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    batches, curve, t0 = torch.Generator().manual_seed(seed), [], time.time()
    for step in range(steps):
        for group in optimizer.param_groups: group["lr"] = lr_at(step, steps, lr, lr / 20, 20)
        pick = torch.randint(0, len(data["train"]), (batch_size,), generator=batches).tolist()
        ids, targets = answer_batch([data["train"][i] for i in pick])
        loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
        optimizer.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); optimizer.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            per_type = exact_match(model, data["eval"])
            curve.append(dict(step=step + 1, loss=loss.item(), seconds=time.time() - t0, per_type=per_type,
                              overall=sum(per_type.values()) / len(per_type)))
            print(f"step {step + 1:>5} loss {loss.item():.3f} {curve[-1]['seconds']:>5.0f}s held-out "
                  f"{curve[-1]['overall']:.1%}  " + " ".join(f"{t}={a:.0%}" for t, a in per_type.items()), flush=True)
    return dict(arch=arch, steps=steps, lr=lr, batch_size=batch_size, seed=seed, n_train=len(data["train"]),
                n_eval=len(data["eval"]), curve=curve)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", required=True, help="a toy world folder (make_world)")
    p.add_argument("--arch", choices=("rwkv", "transformer"), default="rwkv")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--lr", type=float, default=None, help="default 6e-3 (rwkv, as stage 0) or 2e-3 (transformer)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="json file to write")
    args = p.parse_args(argv)
    lr = args.lr if args.lr is not None else {"rwkv": 6e-3, "transformer": 2e-3}[args.arch]
    result = text(Path(args.world), args.arch, args.steps, lr, args.batch_size, args.eval_every, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
