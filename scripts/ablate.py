"""The paper's ablations in miniature, on the toy world: Tables 1, 3, 4, 7 and 9, each setting with several seeds.

    python scripts/ablate.py                                      # every setting, seeds 0 1 2 -> runs/ablations/
    python scripts/ablate.py --settings default,image-last --seeds 0 1

Every setting changes one thing of the default (data-dependent recurrence, sandwich prompt, bidirectional scan,
sample-level loss, 3x3 + CLS image tokens), as its table in the paper does. All runs share one base, built once: the
toy world, stage 0 (tower and language model; a second, RWKV-5 style language model for Table 1) and stage 1 (the
projector, image first, as the official scripts), each part built when a chosen setting first needs it. Each
(setting, seed) is then a short stage 2 from that base and a greedy evaluation on the held-out questions; the seed sets
stage 2's sample order. A finished run leaves
`runs/<setting>/seed-<n>/result.json` (written atomically) and is never repeated, so the set can be stopped and
resumed; an unfinished one starts over. After each run, `ablations.md` (mean and spread per setting and question
type) and `ablations.png` are rewritten from every finished run.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

DEFAULT = dict(recurrence="data-dependent", image_position="middle", scan="bidirectional", loss_reduction="sample",
               grid_size=3)
SETTINGS = {                                   # name -> (the paper's table, what changes from DEFAULT)
    "default": ("all", {}),
    "static-recurrence": ("Table 1", dict(recurrence="static")),
    "image-first": ("Table 3", dict(image_position="first")),
    "image-last": ("Table 3", dict(image_position="last")),
    "scan-uni": ("Table 4", dict(scan="unidirectional")),
    "scan-multi": ("Table 4", dict(scan="multidirectional")),
    "batch-loss": ("Table 7", dict(loss_reduction="batch")),
    "tokens-1": ("Table 9", dict(grid_size=0)),
    "tokens-2": ("Table 9", dict(grid_size=1)),
    "tokens-5": ("Table 9", dict(grid_size=2)),
    "tokens-37": ("Table 9", dict(grid_size=-1)),
    "image-last-tokens-2": ("Table 9", dict(image_position="last", grid_size=1)),
    "image-last-tokens-37": ("Table 9", dict(image_position="last", grid_size=-1)),
}
TRAIN_SHAPE = ["--ctx-len", "192", "--batch-size", "16", "--no-progress-bar", "--log-every", "50"]


def setting(name: str) -> dict:
    "The full configuration of a setting, or ValueError naming the known ones."
    if name not in SETTINGS: raise ValueError(f"unknown setting {name!r}; known: {', '.join(SETTINGS)}")
    return {**DEFAULT, **SETTINGS[name][1]}


def run_quiet(args, log: Path, env: dict):
    "Run a command with its output in `log`; on failure raise with the log's tail."
    with open(log, "w") as f: done = subprocess.run(args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode: raise RuntimeError(f"{' '.join(map(str, args[:4]))} ... failed; {log}:\n{log.read_text()[-3000:]}")


def train(args, stage_args: list, log: Path):
    "One training stage in `args.nproc` processes (gloo on the CPU)."
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc)]
    run_quiet([*launcher, "scripts/train.py", *TRAIN_SHAPE, "--micro-batch", str(16 // args.nproc), *stage_args],
              log, env)


def build_base(args, recurrences) -> Path:
    """The shared base under <out>/base, each part built once: the world and stage 0 (done.json), then for each of
    `recurrences` its stage 1 (and, for "static", its own stage-0 language model first)."""
    base = Path(args.out) / "base"
    if not (base / "done.json").is_file():
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        t0 = time.time()
        run_quiet([sys.executable, "scripts/toy_stage0.py", "--out", str(base), "--seed", "0",
                   "--train-images", str(args.train_images), "--eval-questions", str(args.eval_questions),
                   "--vision-steps", str(args.vision_steps), "--lm-steps", str(args.lm_steps)], base / "stage0.log",
                  os.environ)
        atomic_json(base / "done.json", dict(seconds=time.time() - t0))
    for recurrence in recurrences:
        stage1 = base / f"stage1-{recurrence}"
        if (stage1 / "visualrwkv.pth").is_file(): continue
        lm = base / "stage0" / ("toy_lm.pth" if recurrence == "data-dependent" else "toy_lm_static.pth")
        if not lm.is_file(): static_lm(base, args.lm_steps)
        shutil.rmtree(stage1, ignore_errors=True)
        train(args, ["--stage", "1", "--out", str(stage1), "--lm", str(lm),
                     "--vision", str(base / "stage0" / "toy_clip.pth"), "--tokenizer",
                     str(base / "world" / "toy_tokenizer.json"), "--data", str(base / "world" / "stage1.json"),
                     "--steps", str(args.stage1_steps), "--lr", "1e-2", "--lr-end", "1e-3"], base / f"{stage1.name}.log")
    return base


def static_lm(base: Path, steps: int):
    "Stage 0's language model again, with the RWKV-5 style recurrence (no LoRA in token shift and decay, Table 1)."
    from visualrwkv.tokenizer import ToyTokenizer
    from visualrwkv.toy import conversation_text, pretrain_lm
    records = [r for name in ("stage1.json", "stage2.json")
               for r in json.loads((base / "world" / name).read_text())]
    lm = pretrain_lm([conversation_text(r["conversations"]) for r in records],
                     ToyTokenizer.load(base / "world" / "toy_tokenizer.json"), base / "stage0" / "toy_lm_static.pth",
                     steps=steps, data_dependent=False)
    atomic_json(base / "stage0" / "static_lm.json", {k: v for k, v in lm.items() if isinstance(v, (int, float))})


def atomic_json(path: Path, obj):
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def one_run(args, base: Path, name: str, seed: int) -> dict:
    "Stage 2 of `name` with `seed` from the base, then evaluation; the result is cached in result.json."
    run = Path(args.out) / "runs" / name / f"seed-{seed}"
    if (run / "result.json").is_file():
        cached = json.loads((run / "result.json").read_text())
        if (cached["stage2_steps"], cached["lr"]) != (args.stage2_steps, args.lr):
            raise ValueError(f"{run / 'result.json'}: finished with --stage2-steps {cached['stage2_steps']} --lr "
                             f"{cached['lr']}, not {args.stage2_steps} and {args.lr}; use another --out")
        return cached
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    cfg, t0 = setting(name), time.time()
    train(args, ["--stage", "2", "--out", str(run / "stage2"), "--init",
                 str(base / f"stage1-{cfg['recurrence']}" / "visualrwkv.pth"), "--data",
                 str(base / "world" / "stage2.json"), "--steps", str(args.stage2_steps), "--lr", str(args.lr),
                 "--lr-end", str(args.lr / 10), "--seed", str(seed), "--grid-size", str(cfg["grid_size"]),
                 "--scan", cfg["scan"], "--image-position", cfg["image_position"],
                 "--loss-reduction", cfg["loss_reduction"]], run / "stage2.log")
    trained = time.time() - t0
    run_quiet([sys.executable, "scripts/evaluate.py", "--model", str(run / "stage2" / "visualrwkv.pth"),
               "--data", str(base / "world" / "eval.jsonl"), "--out", str(run / "answers.jsonl"), "--device", "cpu",
               "--batch-size", "64", "--max-new-tokens", "6"], run / "evaluate.log", os.environ)
    from toy_report import summarise
    summary = summarise(run, time.time() - t0, world=base / "world")
    result = dict(setting=name, seed=seed, config=cfg, stage2_steps=args.stage2_steps, lr=args.lr,
                  train_seconds=trained, **summary)
    atomic_json(run / "result.json", result)
    shutil.rmtree(run / "stage2" / "checkpoints", ignore_errors=True)      # keep the final weights only
    return result


def finished_results(out: Path) -> dict:
    "{setting: [result, ...]} of every finished run under out/runs, in SETTINGS order."
    found = {}
    for path in sorted((out / "runs").glob("*/seed-*/result.json")):
        r = json.loads(path.read_text())
        found.setdefault(r["setting"], []).append(r)
    return {name: found[name] for name in SETTINGS if name in found}


def mean_spread(values) -> str:
    "'mean ± sample standard deviation' in percent ('mean' alone for one value)."
    values = [100 * v for v in values]
    if len(values) == 1: return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def markdown(results: dict) -> str:
    "The table: one row per setting, overall and per question type, mean ± spread over seeds (accuracy, %)."
    types = sorted({t for rs in results.values() for r in rs for t in r["question_types"]})
    head = ["setting", "paper", "changes", "seeds", "s/run", "overall", *types]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rs in results.items():
        table, changes = SETTINGS[name]
        cells = [name, table, ", ".join(f"{k}={v}" for k, v in changes.items()) or "-", str(len(rs)),
                 f"{statistics.mean(r['seconds'] for r in rs):.0f}", mean_spread([r["overall"] for r in rs]),
                 *(mean_spread([r["question_types"][t]["accuracy"] for r in rs]) for t in types)]
        lines.append("| " + " | ".join(cells) + " |")
    bars = next(iter(results.values()))[0]["question_types"]
    lines.append("| bar: max(chance, question-only) | | | | | | "
                 + " | ".join(f"{100 * max(bars[t]['chance'], bars[t]['question_only']):.1f}" for t in types) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path):
    "Overall accuracy per setting: each seed a dot, the mean a bar, grouped by the paper's table."
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1))
    for i, name in enumerate(names):
        acc = [100 * r["overall"] for r in results[name]]
        ax.barh(i, statistics.mean(acc), color="C0" if name == "default" else "C7", alpha=0.6)
        ax.plot(acc, [i] * len(acc), "k.", ms=6)
    ax.set_yticks(range(len(names)), [f"{n} ({SETTINGS[n][0]})" for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("held-out accuracy, % (bar: mean over seeds; dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(out: Path):
    "Rewrite ablations.md and ablations.png from the finished runs."
    results = finished_results(out)
    if not results: return
    (out / "ablations.md").write_text(markdown(results))
    plot(results, out / "ablations.png")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablations")
    p.add_argument("--settings", default="all", help=f"comma-separated, or 'all': {', '.join(SETTINGS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--stage2-steps", type=int, default=1000,
                   help="stage 2's steps of 16; at 300 the default setting scores at the baselines")
    p.add_argument("--lr", type=float, default=3e-3, help="stage 2's initial learning rate (cosine to a tenth)")
    p.add_argument("--nproc", type=int, default=2)
    base = p.add_argument_group("the shared base (changing these needs a fresh --out)")
    base.add_argument("--train-images", type=int, default=2000)
    base.add_argument("--eval-questions", type=int, default=700)
    base.add_argument("--vision-steps", type=int, default=200)
    base.add_argument("--lm-steps", type=int, default=600)
    base.add_argument("--stage1-steps", type=int, default=40)
    args = p.parse_args(argv)
    args.settings = list(SETTINGS) if args.settings == "all" else args.settings.split(",")
    for name in args.settings:
        try: setting(name)
        except ValueError as e: p.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    t0 = time.time()
    base = build_base(args, sorted({setting(name)["recurrence"] for name in args.settings}))
    print(f"base ready in {out / 'base'} ({time.time() - t0:.0f} s)", flush=True)
    for seed in args.seeds:
        for name in args.settings:
            t1 = time.time()
            r = one_run(args, base, name, seed)
            print(f"{name:<22} seed {seed}: overall {r['overall']:.1%} ({time.time() - t1:.0f} s)", flush=True)
            report(out)
    print(f"table: {out / 'ablations.md'}, plot: {out / 'ablations.png'} ({time.time() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
