"""lmms-eval adapter (`pip install -e ".[lmms]"`): on requests built here for a fake task of PIL images, its replies equal
visualrwkv.generate on prompts written out by hand, and its loglikelihoods equal a by-hand log-softmax sum; skipped
without lmms_eval."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("lmms_eval")
from lmms_eval.api.instance import Instance

from visualrwkv.generate import generate
from visualrwkv.checkpoint import save_visualrwkv
from visualrwkv.model import VisualRWKV
from visualrwkv.prompts import IMAGE_TOKEN_INDEX
from visualrwkv.rwkv import RWKV6Config, randomize_
from visualrwkv.tokenizer import WorldTokenizer
from visualrwkv.vision import VisionConfig, clip_preprocess
from visualrwkv_integrations.lmms_eval_visualrwkv import VisualRWKVLMMS

TOK = WorldTokenizer()
VIS = VisionConfig(image_size=28, patch_size=7, width=24, layers=1, head_width=8)
QUESTION = "What colour is the square?"


def make_model(image_position):
    "A tiny random VisualRWKV with the World vocabulary (weights reproducible from the seed)."
    torch.manual_seed(0)
    cfg = RWKV6Config(vocab_size=65536, n_layer=2, n_embd=32, head_size=8, lora_mix=4, lora_decay=4)
    model = VisualRWKV(cfg, VIS, image_position=image_position)
    randomize_(model.rwkv, seed=5)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in list(model.vit.parameters()) + [model.proj.weight]: p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=["first", "middle"])
def checkpoint(request, tmp_path_factory):
    "(model, path): the checkpoint and its model_config.json say where the image goes."
    model, folder = make_model(request.param), tmp_path_factory.mktemp(request.param)
    save_visualrwkv(model, folder / "visualrwkv.pth")
    (folder / "model_config.json").write_text(json.dumps(dict(image_position=request.param, vision_head_width=8)))
    return model, folder / "visualrwkv.pth"


def by_hand_prompt(position, question=QUESTION, image=True):
    "The prompt ids written out (prompts notebook, Fig. 2): 'User: ...\\n\\nAssistant:' with the image where trained."
    if not image: return TOK.encode(f"User: {question}\n\nAssistant:")
    if position == "first": return TOK.encode("User: ") + [IMAGE_TOKEN_INDEX] + TOK.encode(f"\n{question}\n\nAssistant:")
    return TOK.encode(f"User: {question}\n") + [IMAGE_TOKEN_INDEX] + TOK.encode(f"\n{question}\n\nAssistant:")


def fake_task():
    "Two docs with a PIL image (odd sizes: the transform resizes and crops), a red one and a noisy one, and one without."
    noise = np.random.default_rng(0).integers(0, 256, (50, 29, 3), dtype=np.uint8)
    red = Image.new("RGB", (40, 30), (220, 20, 20))
    return {"toy": {"test": [{"image": red}, {"image": Image.fromarray(noise)}, {"image": None}]}}


def doc_to_visual(doc):
    return [doc["image"]] if doc["image"] is not None else []


def adapter(path, **kw):
    lm = VisualRWKVLMMS(pretrained=str(path), device="cpu", dtype="float32", **kw)
    lm.task_dict = fake_task()
    return lm


def gen_request(doc_id, gen_kwargs, question=QUESTION):
    return Instance("generate_until", (question, gen_kwargs, doc_to_visual, doc_id, "toy", "test"), 0,
                    {"task": "toy", "doc_id": doc_id, "repeats": 1})


def test_generate_until_equals_generate_on_the_hand_built_prompt(checkpoint):
    model, path = checkpoint
    docs = fake_task()["toy"]["test"]
    prompts = [by_hand_prompt(model.image_position, image=d["image"] is not None) for d in docs]
    pixels = [clip_preprocess(28)(d["image"]) if d["image"] is not None else None for d in docs]
    expected = [TOK.decode(ids).split("\n\n")[0].strip() for ids in
                [generate(model, [p], [x], max_new_tokens=10)[0] for p, x in zip(prompts, pixels)]]
    assert len(set(expected)) == 3                                  # the image and its position change the reply
    for batch_size in (1, 2):
        got = adapter(path, batch_size=batch_size).generate_until([gen_request(i, {"max_new_tokens": 10}) for i in range(3)])
        assert got == expected


def test_generate_until_cuts_at_until(checkpoint):
    model, path = checkpoint
    ids = generate(model, [by_hand_prompt(model.image_position)], [clip_preprocess(28)(fake_task()["toy"]["test"][0]["image"])],
                   max_new_tokens=12)[0]
    text = TOK.decode(ids).split("\n\n")[0]
    until = text.strip()[len(text.strip()) // 2:][:2]
    assert until
    (got,) = adapter(path).generate_until([gen_request(0, {"max_new_tokens": 12, "until": [until]})])
    assert got == text.split(until)[0].strip() and len(got) < len(text.strip())


def ll_request(doc_id, continuation):
    return Instance("loglikelihood", (QUESTION, continuation, doc_to_visual, doc_id, "toy", "test"), 0,
                    {"task": "toy", "doc_id": doc_id, "repeats": 1})


@torch.no_grad()
def by_hand_loglikelihood(model, doc, answer_ids):
    "log P(answer) after the hand-written prompt: one forward of the single sample, log-softmax summed over the answer."
    image = doc["image"]
    ids = by_hand_prompt(model.image_position, image=image is not None) + answer_ids
    out = model([ids], [clip_preprocess(28)(image) if image is not None else None])
    logits = out.logits[0, :int(out.mask[0].sum())]                                     # [T', V]: N image tokens for one id
    logp = F.log_softmax(logits[-1 - len(answer_ids):-1].double(), dim=-1)
    target = torch.tensor(answer_ids)
    return logp[torch.arange(len(target)), target].sum().item(), bool((logp.argmax(-1) == target).all())


def test_loglikelihood_is_the_log_softmax_sum(checkpoint):
    model, path = checkpoint
    docs = fake_task()["toy"]["test"]
    cases = [(0, "Red"), (1, "a blue square"), (2, "Yes"), (0, " No")]       # " No": the leading space is not doubled
    expected = [by_hand_loglikelihood(model, docs[i], TOK.encode(" " + c.lstrip())) for i, c in cases]
    got = adapter(path, batch_size=3).loglikelihood([ll_request(i, c) for i, c in cases])
    for (ll, greedy), (ll_ref, greedy_ref) in zip(got, expected):
        assert ll == pytest.approx(ll_ref, rel=1e-5) and greedy == greedy_ref


def test_is_greedy(checkpoint):
    "A continuation that is the greedy reply scores is_greedy (searched over a few questions: it must start with a space)."
    model, path = checkpoint
    docs = fake_task()["toy"]["test"]
    questions = ("What colour is the square?", "Is it red?", "Name it.", "How many?")
    for doc_id, question in ((d, q) for d in (0, 1) for q in questions):
        pixels = clip_preprocess(28)(docs[doc_id]["image"])
        tokens = generate(model, [by_hand_prompt(model.image_position, question)], [pixels], max_new_tokens=2)[0]
        answer = TOK.decode(tokens)
        if answer.startswith(" ") and TOK.encode(answer) == tokens: break
    else: pytest.fail("no question whose greedy reply starts with a space: try other questions")
    requests = [Instance("loglikelihood", (question, a, doc_to_visual, doc_id, "toy", "test"), 0,
                         {"task": "toy", "doc_id": doc_id, "repeats": 1}) for a in (answer, answer + "x")]
    assert [greedy for _, greedy in adapter(path).loglikelihood(requests)] == [True, False]


def test_registered_for_lmms_eval(tmp_path):
    "lmms-eval finds `visualrwkv` through the installed entry point (run elsewhere: a stale *.egg-info here would shadow it)."
    code = "from lmms_eval.models import get_model; c = get_model('visualrwkv'); print(c.__module__ + '.' + c.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split()[-1] == "visualrwkv_integrations.lmms_eval_visualrwkv.VisualRWKVLMMS"


def test_bad_input(checkpoint):
    _, path = checkpoint
    lm = adapter(path)
    lm.task_dict["toy"]["test"].append({"image": "not a picture"})
    with pytest.raises(ValueError, match="expected a PIL image"): lm.generate_until([gen_request(3, {})])
    two = lambda doc: [fake_task()["toy"]["test"][0]["image"]] * 2
    r = Instance("generate_until", (QUESTION, {}, two, 0, "toy", "test"), 0, {"task": "toy", "doc_id": 0, "repeats": 1})
    with pytest.raises(ValueError, match="2 visuals"): lm.generate_until([r])
    with pytest.raises(ValueError, match="beam search"): lm.generate_until([gen_request(0, {"num_beams": 3})])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"): adapter(path, batch_size=0)
    with pytest.raises(NotImplementedError): lm.generate_until_multi_round([gen_request(0, {})])
    with pytest.raises(ValueError, match="empty continuation"): lm.loglikelihood([ll_request(0, " ")])


TOY_TASK = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
task: toy_vqa
test_split: test
output_type: generate_until
doc_to_visual: !function toy_utils.doc_to_visual
doc_to_text: !function toy_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 8
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
process_results: !function toy_utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
TOY_UTILS = '''from PIL import Image
def doc_to_visual(doc): return [Image.open(doc["image"]).convert("RGB")]
def doc_to_text(doc, lmms_eval_specific_kwargs=None): return doc["question"]
def process_results(doc, results): return {"exact_match": float(results[0].strip().lower() == doc["answer"])}
'''


def test_lmms_eval_command_runs_a_local_task(tmp_path):
    "`lmms-eval --model visualrwkv` on a task read from local files (one picture): its reply is generate's, by hand."
    model = make_model("middle")
    save_visualrwkv(model, tmp_path / "visualrwkv.pth")
    (tmp_path / "model_config.json").write_text(json.dumps(dict(image_position="middle", vision_head_width=8)))
    Image.new("RGB", (40, 30), (220, 20, 20)).save(tmp_path / "red.png")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    doc = {"image": str(tmp_path / "red.png"), "question": "Is it red?", "answer": "yes"}
    (tasks / "docs.jsonl").write_text(json.dumps(doc) + "\n")
    (tasks / "toy_utils.py").write_text(TOY_UTILS)
    (tasks / "toy_vqa.yaml").write_text(TOY_TASK.format(docs=tasks / "docs.jsonl"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "visualrwkv", "--model_args",
                    f"pretrained={tmp_path / 'visualrwkv.pth'},dtype=float32", "--device", "cpu", "--tasks", "toy_vqa",
                    "--include_path", str(tasks), "--output_path", str(tmp_path / "out"), "--log_samples"],
                   check=True, env=env, cwd=tmp_path, timeout=600, capture_output=True)
    (sample,) = [json.loads(line) for line in next((tmp_path / "out").rglob("*samples_toy_vqa.jsonl")).read_text().splitlines()]
    ids = generate(model, [by_hand_prompt("middle", "Is it red?")], [clip_preprocess(28)(Image.open(tmp_path / "red.png"))],
                   max_new_tokens=8)[0]
    assert sample["filtered_resps"] == TOK.decode(ids).split("\n\n")[0].strip()
