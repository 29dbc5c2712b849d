"""Greedy answers of a VisualRWKV checkpoint on a LLaVA-format question set, and their VQA-style exact-match accuracy.

Each record's last `gpt` turn is the reference answer; the turns before it are the prompt, which ends with
`Assistant:` as in training. Answers are generated greedily in RNN mode (`visualrwkv.generate.generate`) until the
turn's stop token `\\n\\n`. Prediction and reference are compared exactly after the EvalAI answer processor that
TextVQA and VizWiz use (`visualrwkv.eval.vqa_normalize`: lower case, punctuation, articles, number words as digits).
A question that cannot be asked (missing image, bad record) counts as wrong and is named; more than `--max-missing`
of them (default 1%) stops the run with an error instead of a score. The paper's benchmarks are scored by
`visualrwkv evaluate` with their own official rules; this script is for LLaVA-format sets such as the toy one.

    python scripts/evaluate.py --model runs/toy/stage2/visualrwkv.pth --data runs/toy/toy_data/eval.jsonl

writes answers.jsonl next to the model (or --out) and prints the accuracy, per `question_type` when records have one,
next to the question-only baseline: the accuracy of always giving each question's most frequent answer, which is the
best a model that ignores the image can do on this set.
"""
import argparse
import json
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch

from visualrwkv.data import BadSample, BadSampleWarning, conversation_problem, load_image, read_llava_records
from visualrwkv.generate import generate, load_for_inference, stop_token_ids
from visualrwkv.eval import vqa_normalize as normalize_answer
from visualrwkv.prompts import tokenize_conversation


def split_prompt(conversations):
    """(prompt turns ending with an empty gpt turn, reference answer) of a record whose last turn is the answer."""
    if not conversations or conversations[-1]["from"].lower() != "gpt":
        raise BadSample("the last turn is not a 'gpt' answer")
    return conversations[:-1] + [{"from": "gpt", "value": ""}], conversations[-1]["value"]


def question_only_baseline(rows) -> float:
    """Accuracy of answering every question with its most frequent normalised reference answer in this set."""
    by_question = defaultdict(Counter)
    for r in rows: by_question[r["question"]][normalize_answer(r["reference"])] += 1
    return sum(c.most_common(1)[0][1] for c in by_question.values()) / max(len(rows), 1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="VisualRWKV checkpoint (official v060 layout)")
    p.add_argument("--data", required=True, help="LLaVA-format .json / .jsonl question set")
    p.add_argument("--image-folder", help="folder the 'image' paths are relative to (default: the data's folder)")
    p.add_argument("--out", help="answers.jsonl path (default: next to the model)")
    p.add_argument("--config", help="model_config.json (default: next to the model); flags below override it")
    p.add_argument("--grid-size", type=int)
    p.add_argument("--scan", choices=("unidirectional", "bidirectional", "multidirectional"))
    p.add_argument("--image-position", choices=("first", "middle", "last"))
    p.add_argument("--vision-head-width", type=int)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--max-missing", type=float, default=0.01,
                   help="refuse to report a score when more than this fraction of questions cannot be asked")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def load_model(args):
    """The checkpoint with the model_config.json that training wrote beside it (in <out>/ and in every
    checkpoints/step-N/), or --config; flags override it. Without one the paper's defaults are used, with a warning:
    a stage-1 model puts the image first, not in the middle."""
    return load_with_tokenizer(args)[0]


def load_with_tokenizer(args):
    """(model, tokenizer): the tokenizer the checkpoint was trained with (its tokenizer.json, else World)."""
    flags = {key: getattr(args, key) for key in ("grid_size", "scan", "image_position", "vision_head_width")}
    return load_for_inference(args.model, args.device, config=args.config, **flags)


def main(argv=None):
    args = parse_args(argv)
    model, tokenizer = load_with_tokenizer(args)
    records = read_llava_records(args.data)
    image_folder = Path(args.image_folder) if args.image_folder else Path(args.data).parent
    n = len(records) if args.limit is None else min(args.limit, len(records))
    if not n: raise ValueError(f"{args.data}: no questions")
    prompts, skipped = [], []
    for i in range(n):
        record, sid = records[i], str(records[i].get("id") or f"#{i}")
        try:
            if (problem := conversation_problem(record)) is not None: raise BadSample(problem)
            turns, reference = split_prompt(record["conversations"])
            ids, _ = tokenize_conversation(turns, model.image_position, tokenizer)
            image = load_image(image_folder / record["image"], model.vit.cfg.image_size) if record.get("image") else None
            question = "\n".join(t["value"] for t in turns if t["from"].lower() == "human")
            prompts.append(dict(id=sid, ids=ids, image=image, question=question, reference=reference,
                                question_type=record.get("question_type")))
        except BadSample as e:
            warnings.warn(f"question {sid!r} cannot be asked, counted wrong: {e}", BadSampleWarning)
            skipped.append(dict(id=sid, error=str(e), question_type=records[i].get("question_type"), correct=False))
    if len(skipped) > args.max_missing * n:
        raise ValueError(f"{args.data}: {len(skipped)} of {n} questions cannot be asked (more than --max-missing="
                         f"{args.max_missing:.1%}), e.g. {skipped[0]['id']!r}: {skipped[0]['error']}")

    rows, t0 = [], time.time()
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        images = [None if p["image"] is None else p["image"].to(args.device) for p in chunk]
        new = generate(model, [p["ids"] for p in chunk], images, max_new_tokens=args.max_new_tokens, temperature=0.0,
                       stop_ids=stop_token_ids(tokenizer))
        for p, ids in zip(chunk, new):
            answer = tokenizer.decode(ids).strip()
            rows.append(dict(id=p["id"], question=p["question"], question_type=p["question_type"], answer=answer,
                             reference=p["reference"],
                             correct=normalize_answer(answer) == normalize_answer(p["reference"])))
    elapsed = time.time() - t0
    rows += skipped

    out = Path(args.out) if args.out else Path(args.model).parent / "answers.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out)

    accuracy = sum(r["correct"] for r in rows) / len(rows)
    baseline = question_only_baseline([r for r in rows if "error" not in r])
    print(f"{len(rows)} questions ({len(skipped)} could not be asked, counted wrong) in {elapsed:.1f}s; answers in {out}")
    types = sorted({r["question_type"] for r in rows if r["question_type"]})
    if types:
        print(f"{'question type':<16}{'n':>5}{'accuracy':>10}{'question-only':>15}")
        for t in types:
            sub = [r for r in rows if r["question_type"] == t]
            print(f"{t:<16}{len(sub):>5}{sum(r['correct'] for r in sub) / len(sub):>10.1%}"
                  f"{question_only_baseline([r for r in sub if 'error' not in r]):>15.1%}")
    print(f"exact-match accuracy {accuracy:.1%} (question-only baseline {baseline:.1%})")
    summary = dict(n=len(rows), skipped=len(skipped), accuracy=accuracy, question_only_baseline=baseline)
    tmp = out.with_name("eval_summary.json.tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out.with_name("eval_summary.json"))
    return summary


if __name__ == "__main__":
    main()
