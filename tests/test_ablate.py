"""scripts/ablate.py: the settings, the table's arithmetic (worked by hand), and the whole loop at a tiny size, with its
cache: a finished run is not repeated."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import ablate                                                                   # noqa: E402

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
TINY = ["--train-images", "40", "--eval-questions", "14", "--vision-steps", "2", "--lm-steps", "2",
        "--stage1-steps", "2", "--stage2-steps", "2", "--nproc", "1"]


def fake_result(setting, seed, overall, colour):
    bars = dict(chance=0.25, question_only=0.3)
    return dict(setting=setting, seed=seed, seconds=80 + seed, overall=overall,
                question_types=dict(colour=dict(n=4, accuracy=colour, **bars)))


def test_each_setting_changes_what_its_table_changes():
    assert ablate.setting("default") == dict(recurrence="data-dependent", image_position="middle",
                                             scan="bidirectional", loss_reduction="sample", grid_size=3)
    assert ablate.setting("image-last-tokens-2") == dict(recurrence="data-dependent", image_position="last",
                                                         scan="bidirectional", loss_reduction="sample", grid_size=1)
    with pytest.raises(ValueError, match="unknown setting 'sandwich'.*default, static-recurrence"):
        ablate.setting("sandwich")


def test_the_table_gives_mean_and_sample_spread():
    results = {"default": [fake_result("default", 0, 0.5, 0.75), fake_result("default", 1, 0.7, 0.25)],
               "scan-uni": [fake_result("scan-uni", 0, 0.4, 0.5)]}
    lines = ablate.markdown(results).splitlines()
    # mean of 50% and 70% is 60.0; sample standard deviation sqrt((10^2 + 10^2) / 1) = 14.1
    # colour: 75% and 25% -> 50.0 ± sqrt((25^2 + 25^2) / 1) = 35.4; seconds 80 and 81 -> 80 (80.5 rounds to even)
    assert lines[2] == "| default | all | - | 2 | 80 | 60.0 ± 14.1 | 50.0 ± 35.4 |"
    assert lines[3] == "| scan-uni | Table 4 | scan=unidirectional | 1 | 80 | 40.0 | 50.0 |"
    assert lines[4] == "| bar: max(chance, question-only) | | | | | | 30.0 |"


def test_a_cached_run_of_another_schedule_is_refused(tmp_path):
    run = tmp_path / "runs" / "default" / "seed-0"
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps(dict(fake_result("default", 0, 0.5, 0.5), stage2_steps=300, lr=3e-3)))
    args = ablate.parse_args(["--out", str(tmp_path), "--stage2-steps", "1000"])
    with pytest.raises(ValueError, match="finished with --stage2-steps 300 --lr 0.003, not 1000 and 0.003"):
        ablate.one_run(args, tmp_path / "base", "default", 0)
    args = ablate.parse_args(["--out", str(tmp_path), "--stage2-steps", "300"])
    assert ablate.one_run(args, tmp_path / "base", "default", 0)["overall"] == 0.5      # same schedule: the cache


def test_an_unknown_setting_is_refused_by_the_command():
    done = subprocess.run([sys.executable, "scripts/ablate.py", "--settings", "default,nope"], cwd=REPO, env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "unknown setting 'nope'" in done.stderr


def test_a_tiny_ablation_runs_caches_and_reports(tmp_path):
    def ablation(*args):
        done = subprocess.run([sys.executable, "scripts/ablate.py", "--out", tmp_path, *TINY, *args], cwd=REPO,
                              env=ENV, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        return done.stdout

    ablation("--settings", "static-recurrence", "--seeds", "0")              # builds only the parts it needs
    assert not (tmp_path / "base/stage1-data-dependent").exists()
    result = json.loads((tmp_path / "runs/static-recurrence/seed-0/result.json").read_text())
    assert result["config"]["recurrence"] == "static" and result["stage2_steps"] == 2
    static = torch.load(tmp_path / "runs/static-recurrence/seed-0/stage2/visualrwkv.pth", weights_only=True)
    dependent = torch.load(tmp_path / "base/stage0/toy_lm.pth", weights_only=True)
    assert "blocks.0.att.time_maa_w1" in dependent and "rwkv.blocks.0.att.time_maa_w1" not in static
    assert "rwkv.blocks.0.att.time_maa_k" in static                       # its fixed token-shift mix (Eq. 1)
    assert json.loads((tmp_path / "runs/static-recurrence/seed-0/stage2/model_config.json").read_text())["grid_size"] == 3
    finished = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/seed-0/*")}
    ablation("--settings", "static-recurrence", "--seeds", "0")              # cached: nothing runs again
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/seed-0/*")} == finished
    table = (tmp_path / "ablations.md").read_text().splitlines()
    assert table[2].startswith("| static-recurrence | Table 1 | recurrence=static | 1 |")
    assert (tmp_path / "ablations.png").stat().st_size > 5_000
