"""scripts/launch_train.sh: the multi-machine path, run as 2 nodes x 1 process on this machine (torchrun, gloo)."""
import json
import os
import socket
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_process_train_together(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "NNODES": "2", "NPROC": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OUT": str(tmp_path / "toy-stage1")}
    nodes = [subprocess.Popen(["bash", str(REPO / "scripts" / "launch_train.sh"), "toy", "1"], cwd=REPO,
                              env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (0, 1)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "2 processes x micro-batch 2" in logs[0]                       # one world of two, across the two "nodes"
    rows = [json.loads(line) for line in (tmp_path / "toy-stage1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (tmp_path / "toy-stage1" / "visualrwkv.pth").is_file()


def test_unknown_size_is_refused():
    done = subprocess.run(["bash", str(REPO / "scripts" / "launch_train.sh"), "13b", "1"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "SIZE must be 1b6, 3b, 7b or toy" in done.stderr
