"""kernels/bench_wkv.py runs end to end on the CPU (--cpu-smoke, TRITON_INTERPRET=1) and its check catches a wrong kernel."""
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process


import visualrwkv_kernels

BENCH = Path(__file__).resolve().parents[1] / "kernels" / "bench_wkv.py"


def load_bench():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_wkv", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_cpu_smoke_writes_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(BENCH), "--cpu-smoke", "--seg-chunks", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "fwd+bwd ms" in run.stdout and "floor ms" in run.stdout
    report = json.loads(out.read_text())
    assert [c["ok"] for c in report["correctness"]] == [True, True]
    bench = load_bench()
    impls = {row["impl"] for row in report["rows"]}
    assert impls == {"triton", "triton seg=1", "chunked"}      # fla only on CUDA
    assert len(report["rows"]) == len(bench.SMOKE_SHAPES) * len(impls)
    for row in report["rows"]:
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["floor_fwd_ms"] > 0


def test_bench_correctness_check_catches_a_wrong_kernel(monkeypatch):
    bench = load_bench()
    right = visualrwkv_kernels.wkv6_triton

    def off_by_a_little(r, k, v, logw, u, state=None):
        o, s = right(r, k, v, logw, u, state)
        return o * 1.01, s
    monkeypatch.setattr(visualrwkv_kernels, "wkv6_triton", off_by_a_little)
    result = bench.check_correctness("cpu", "float32", (1, 37, 2, 16))
    assert not result["ok"] and result["rel_errs"]["o"] > 1e-3
    monkeypatch.setattr(visualrwkv_kernels, "wkv6_triton", right)
    assert bench.check_correctness("cpu", "float32", (1, 37, 2, 16))["ok"]
