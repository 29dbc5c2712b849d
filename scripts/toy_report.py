"""The main job's summary: accuracy per question type on the toy world's held-out questions next to chance and the
question-only baseline, written to <out>/summary.json, printed as a table, and a few held-out pictures with the
model's answers in <out>/answers.png.

    python scripts/toy_report.py runs/toy --seconds 600

Chance is the accuracy of the type's best constant answer; the question-only baseline answers each question text
with its most frequent answer among the training questions (`visualrwkv.toy.chance_and_baseline`, notebook 18): what
a model that never looks at the picture could learn from the training data.
"""
import argparse
import json
from pathlib import Path


def summarise(out: Path, seconds: float, world: Path = None) -> dict:
    "summary.json's content from <out>/answers.jsonl and the world (default <out>/world)."
    from visualrwkv.toy import chance_and_baseline
    world = out / "world" if world is None else world
    evaluation = [json.loads(line) for line in (world / "eval.jsonl").read_text().splitlines() if line.strip()]
    training = json.loads((world / "stage2.json").read_text())
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines() if line.strip()]
    if len(rows) != len(evaluation):
        raise SystemExit(f"{out / 'answers.jsonl'}: {len(rows)} answers for {len(evaluation)} held-out questions")
    bars = chance_and_baseline(evaluation, training)
    types = {}
    for qtype, bar in sorted(bars.items()):
        right = [r["correct"] for r in rows if r["question_type"] == qtype]
        types[qtype] = dict(n=len(right), accuracy=sum(right) / len(right), chance=bar["chance"],
                            question_only=bar["question_only_train"])
    overall = sum(r["correct"] for r in rows) / len(rows)
    return dict(seconds=seconds, question_types=types, overall=overall)


def print_table(summary: dict):
    print(f"\n{'question type':<18}{'n':>5}{'accuracy':>10}{'chance':>9}{'question-only':>15}{'margin':>9}")
    for qtype, t in summary["question_types"].items():
        margin = t["accuracy"] - max(t["chance"], t["question_only"])
        print(f"{qtype:<18}{t['n']:>5}{t['accuracy']:>10.1%}{t['chance']:>9.1%}{t['question_only']:>15.1%}"
              f"{100 * margin:>+8.1f}p")
    print(f"{'overall':<18}{sum(t['n'] for t in summary['question_types'].values()):>5}{summary['overall']:>10.1%}")
    print("margin: accuracy minus the larger of chance and the question-only baseline, in points")


def plot_answers(out: Path, n: int = 8):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    evaluation = [json.loads(line) for line in (out / "world" / "eval.jsonl").read_text().splitlines() if line.strip()]
    answers = {r["id"]: r for r in (json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines())}
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.6))
    for ax, record in zip(axes, evaluation[:n]):
        row = answers[record["id"]]
        question = record["conversations"][0]["value"].replace("<image>\n", "").split("\n")[0]
        ax.imshow(Image.open(out / "world" / record["image"])); ax.set_xticks([]); ax.set_yticks([])
        ax.set_title(f"{question}\nmodel: {row.get('answer')}\ntruth: {record['conversations'][-1]['value']}",
                     fontsize=7, color="green" if row["correct"] else "red")
    fig.tight_layout()
    fig.savefig(out / "answers.png", dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the run folder (world/, answers.jsonl)")
    p.add_argument("--seconds", type=float, required=True, help="the whole run's time, recorded in summary.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    summary = summarise(out, args.seconds)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / "summary.json")
    print_table(summary)
    plot_answers(out)
    return summary


if __name__ == "__main__":
    main()
