"""scripts/memory_table.py: parameter counts against the paper, model-state bytes against DeepSpeed's accounting by hand."""
import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("memory_table", Path(__file__).resolve().parents[1] / "scripts" / "memory_table.py")
memory_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory_table)


@pytest.mark.parametrize("size,paper_total", [("1.6B", 1.9e9), ("3B", 3.4e9), ("7B", 7.9e9)])
def test_parameter_counts_match_the_paper(size, paper_total):
    """Appendix B: VisualRWKV 1.6B, 3B and 7B have 1.9B, 3.4B and 7.9B parameters, the CLIP-L tower 0.3B."""
    total, trainable, tower = memory_table.param_counts(size)
    assert abs(total - paper_total) < 0.05e9
    assert abs(tower - 0.3e9) < 0.01e9 and trainable < total - tower


def test_model_state_bytes_by_hand():
    """10 parameters, 6 trainable, 2 GPUs. ZeRO-2: 2 x 10 + 18 x 6 / 2 = 74. ZeRO-1: 2 x 10 + 2 x 6 + 16 x 6 / 2 = 80."""
    assert memory_table.model_state_bytes(10, 6, gpus=2, zero=2) == 74
    assert memory_table.model_state_bytes(10, 6, gpus=2, zero=1) == 80
