"""Stage 0 of the main job: the toy world, then the parts a real VisualRWKV downloads, pretrained on it
(`visualrwkv.toy`, notebook 18): the world's reduced vocabulary, a tiny open_clip tower trained contrastively on the
captions, a tiny RWKV-6 language model trained on the world's text.

    python scripts/toy_stage0.py --out runs/toy     # writes runs/toy/world/ and runs/toy/stage0/

Prints one line per part with its time and what it reached; writes stage0/stage0.json.
"""
import argparse
import json
import time
from pathlib import Path

from visualrwkv.toy import conversation_text, make_world, pretrain_lm, pretrain_vision
from visualrwkv.tokenizer import ToyTokenizer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder: world/ and stage0/ go inside")
    p.add_argument("--train-images", type=int, default=2000)
    p.add_argument("--eval-questions", type=int, default=700, help="held-out images, one question each")
    p.add_argument("--vision-steps", type=int, default=200)
    p.add_argument("--lm-steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    t0 = time.time()
    paths = make_world(out / "world", n_train=args.train_images, n_eval=args.eval_questions, seed=args.seed)
    world_s = time.time() - t0
    print(f"world: {args.train_images} training images, {args.eval_questions} held-out questions in {world_s:.0f} s")
    vision = pretrain_vision(out / "world", out / "stage0" / "toy_clip.pth", steps=args.vision_steps, seed=args.seed)
    print(f"stage 0 tower: {args.vision_steps} steps in {vision['seconds']:.0f} s, held-out image->caption retrieval "
          f"{vision['retrieval_before']:.1%} -> {vision['retrieval_after']:.1%}")
    tokenizer = ToyTokenizer.load(paths["tokenizer"])
    records = json.loads(paths["stage1"].read_text()) + json.loads(paths["stage2"].read_text())
    lm = pretrain_lm([conversation_text(r["conversations"]) for r in records], tokenizer,
                     out / "stage0" / "toy_lm.pth", steps=args.lm_steps, seed=args.seed)
    print(f"stage 0 language model: {args.lm_steps} steps in {lm['seconds']:.0f} s, held-out loss "
          f"{lm['held_out_loss_before']:.2f} -> {lm['held_out_loss']:.3f} nats, vocabulary {len(tokenizer)} ids")
    summary = dict(world_seconds=world_s, vocab_size=len(tokenizer),
                   vision={k: v for k, v in vision.items() if isinstance(v, (int, float))},
                   lm={k: v for k, v in lm.items() if isinstance(v, (int, float))})
    (out / "stage0" / "stage0.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
