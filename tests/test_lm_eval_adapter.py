"""lm-evaluation-harness adapter (`pip install -e ".[lmeval]"`): its scores equal log-softmax sums of the plain RWKV6
forward, computed here by hand in float64 on explicitly written token sequences; skipped without lm_eval."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance

from visualrwkv.checkpoint import save_visualrwkv
from visualrwkv.model import VisualRWKV
from visualrwkv.rwkv import RWKV6, RWKV6Config, randomize_, write_state_dict
from visualrwkv.tokenizer import WorldTokenizer
from visualrwkv.vision import VisionConfig
from visualrwkv_integrations.common import cut_at
from visualrwkv_integrations.lm_eval_visualrwkv import VisualRWKVLM

NL = 11                                                     # '\n', the official harness script's prefix token
CFG = RWKV6Config(vocab_size=65536, n_layer=2, n_embd=32, head_size=8, lora_mix=4, lora_decay=4)
TOK = WorldTokenizer()


@pytest.fixture(scope="module")
def lm():
    "A tiny random RWKV-6 with the World vocabulary; float32 weights held in float64 for the by-hand references."
    torch.manual_seed(0)
    return randomize_(RWKV6(CFG), seed=3).double().eval()


@pytest.fixture(scope="module")
def lm_path(lm, tmp_path_factory):
    path = tmp_path_factory.mktemp("lm") / "rwkv6.pth"
    write_state_dict({k: v.float() for k, v in lm.state_dict().items()}, path)   # an x060 checkpoint, exactly lm's weights
    return path


def adapter(path, **kw):
    return VisualRWKVLM(pretrained=str(path), device="cpu", dtype="float32", **kw)


def req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@torch.no_grad()
def logprob(lm, ids, n):
    "Sum of log P(ids[t] | ids[:t]) over the last n tokens, and whether each was the argmax: one float64 forward."
    logits = lm(torch.tensor(ids)[None])[0]                                     # [T, V]
    logp = F.log_softmax(logits[len(ids) - n - 1:-1], dim=-1)                   # predicts ids[-n:]
    target = torch.tensor(ids[-n:])
    return logp[torch.arange(n), target].sum().item(), bool((logp.argmax(-1) == target).all())


def test_loglikelihood_is_the_log_softmax_sum(lm, lm_path):
    requests = [("The cat", " sat on the mat"), ("The cat ", "sat"), ("", "Hello world"), ("A much longer context, "
                "so that the batch is right padded", " here")]
    expected = [logprob(lm, [NL] + TOK.encode("The cat") + TOK.encode(" sat on the mat"), len(TOK.encode(" sat on the mat"))),
                logprob(lm, [NL] + TOK.encode("The cat") + TOK.encode(" sat"), 1),        # the space moves to the continuation
                logprob(lm, [NL] + TOK.encode("Hello world"), 2),
                logprob(lm, [NL] + TOK.encode(requests[3][0].rstrip()) + TOK.encode(" here"), 1)]
    for batch_size in (1, 3):
        got = adapter(lm_path, batch_size=batch_size).loglikelihood([req("loglikelihood", *r) for r in requests])
        for (ll, greedy), (ll_ref, greedy_ref) in zip(got, expected):
            assert ll == pytest.approx(ll_ref, rel=1e-5) and greedy == greedy_ref


def test_is_greedy(lm, lm_path):
    context = "Once upon a time"
    ctx = [NL] + TOK.encode(context)
    best = int(lm(torch.tensor(ctx)[None])[0, -1].argmax())                     # the greedy next token, by hand
    other = (best + 1) % CFG.vocab_size
    for token, greedy in ((best, True), (other, False)):
        continuation = TOK.decode([token])
        assert TOK.encode(context + continuation) == TOK.encode(context) + [token]    # precondition: one token
        (ll, is_greedy), = adapter(lm_path).loglikelihood([req("loglikelihood", context, continuation)])
        assert is_greedy is greedy and ll == pytest.approx(logprob(lm, ctx + [token], 1)[0], rel=1e-5)


def test_visualrwkv_checkpoint_scores_its_language_model(lm, lm_path, tmp_path):
    vis = VisualRWKV(CFG, VisionConfig(image_size=28, patch_size=7, width=24, layers=1, head_width=8))
    vis.rwkv.load_state_dict(lm.state_dict())
    save_visualrwkv(vis, tmp_path / "visualrwkv.pth")
    r = [req("loglikelihood", "The cat", " sat")]
    assert adapter(tmp_path / "visualrwkv.pth").loglikelihood(r) == adapter(lm_path).loglikelihood(r)


def test_rolling_windows(lm, lm_path):
    text = "one two three four five six seven eight nine ten"
    t = TOK.encode(text)
    assert len(t) == 10
    # lm_eval's rolling windows for max_length 4 (its LM.loglikelihood_rolling docstring), written out:
    # [NL t0 t1 t2] predicts t0..t3; [t3 t4 t5 t6] predicts t4..t7; [t5 t6 t7 t8] predicts t8 t9.
    expected = (logprob(lm, [NL] + t[:4], 4)[0] + logprob(lm, t[3:8], 4)[0] + logprob(lm, t[5:10], 2)[0])
    (got,) = adapter(lm_path, max_length=4).loglikelihood_rolling([req("loglikelihood_rolling", text)])
    assert got == pytest.approx(expected, rel=1e-5)
    assert abs(got - logprob(lm, [NL] + t, 10)[0]) > 1e-2                    # one long window differs: the test sees the cuts
    (whole,) = adapter(lm_path, max_length=16).loglikelihood_rolling([req("loglikelihood_rolling", text)])
    assert whole == pytest.approx(logprob(lm, [NL] + t, 10)[0], rel=1e-5)


@torch.no_grad()
def greedy_by_hand(lm, prompt, n):
    "n greedy tokens, re-running the whole sequence in parallel mode at every step (no recurrent state)."
    ids = list(prompt)
    for _ in range(n): ids.append(int(lm(torch.tensor(ids)[None])[0, -1].argmax()))
    return ids[len(prompt):]


def test_generate_until_stops_at_the_string(lm, lm_path):
    contexts = ["The capital of France is", "Q: 2+2?\nA:"]
    texts = [TOK.decode(greedy_by_hand(lm, TOK.encode(c), 12)) for c in contexts]
    until = texts[0][len(texts[0]) // 2:][:2]                                   # a string the first text reaches mid-way
    assert until and until in texts[0]
    requests = [req("generate_until", c, {"until": [until], "max_gen_toks": 12}) for c in contexts]
    got = adapter(lm_path, batch_size=2).generate_until(requests)
    assert got == [t.split(until)[0] for t in texts]
    assert got[0] != texts[0]                                                   # it stopped early


def test_generate_until_max_gen_toks(lm, lm_path):
    tokens = greedy_by_hand(lm, TOK.encode("Hello"), 5)
    (got,) = adapter(lm_path).generate_until([req("generate_until", "Hello", {"until": ["\x00never"], "max_gen_toks": 5})])
    assert got == TOK.decode(tokens)


def test_cut_at():
    assert cut_at("a.b\nc", ["\n", "."]) == "a" and cut_at("abc", []) == "abc" and cut_at("abc", ["x"]) == "abc"


def test_bad_input(lm_path):
    with pytest.raises(ValueError, match="pretrained=PATH"): VisualRWKVLM()
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 'auto'"): adapter(lm_path, batch_size="auto")
    with pytest.raises(ValueError, match="dtype must be one of"): VisualRWKVLM(pretrained=str(lm_path), dtype="fp8")
    with pytest.raises(FileNotFoundError): VisualRWKVLM(pretrained=str(lm_path) + ".missing")
    with pytest.raises(ValueError, match="empty continuation"): adapter(lm_path).loglikelihood([req("loglikelihood", "a", "")])


def test_harness_command_runs_a_local_task(lm, lm_path, tmp_path):
    "`python -m ...lm_eval_visualrwkv` (= visualrwkv-lm-eval) runs a multiple-choice task read from local files."
    docs = [{"q": "The cat", "choices": ["sat", "flew"], "gold": 0}, {"q": "Dogs", "choices": ["bark", "fly"], "gold": 1}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "toy_choice.yaml").write_text(
        "task: toy_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(tmp_path / "docs.jsonl") +
        "\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, "-m", "visualrwkv_integrations.lm_eval_visualrwkv", "--model", "visualrwkv",
                    "--model_args", f"pretrained={lm_path},dtype=float32", "--device", "cpu", "--tasks", "toy_choice",
                    "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out")],
                   check=True, env=env, cwd=tmp_path, timeout=600)
    results = json.loads(next((tmp_path / "out").rglob("results*.json")).read_text())["results"]["toy_choice"]
    score = lambda d, c: logprob(lm, [NL] + TOK.encode(d["q"]) + TOK.encode(" " + c), len(TOK.encode(" " + c)))[0]
    right = [max(range(2), key=lambda c: score(d, d["choices"][c])) == d["gold"] for d in docs]    # lm_eval's " " delimiter
    assert results["acc,none"] == pytest.approx(sum(right) / len(docs))
