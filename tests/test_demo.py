"""The gradio demo (`pip install -e ".[demo]"`), started on a free localhost port with a tiny random checkpoint and
driven with gradio_client: two questions about one image, each reply equal to visualrwkv.generate's greedy reply to
the conversation written out by hand; skipped without gradio."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from visualrwkv.generate import generate
from visualrwkv.checkpoint import save_visualrwkv
from visualrwkv.model import VisualRWKV
from visualrwkv.prompts import IMAGE_TOKEN_INDEX
from visualrwkv.rwkv import RWKV6Config, randomize_
from visualrwkv.tokenizer import WorldTokenizer
from visualrwkv.vision import VisionConfig, clip_preprocess

DEMO = Path(__file__).parents[1] / "app" / "demo.py"
TOK = WorldTokenizer()
N_NEW = 8


def make_model():
    "A tiny random VisualRWKV with the World vocabulary; the image goes first (stage 1), as its model_config.json says."
    torch.manual_seed(0)
    cfg = RWKV6Config(vocab_size=65536, n_layer=2, n_embd=32, head_size=8, lora_mix=4, lora_decay=4)
    model = VisualRWKV(cfg, VisionConfig(image_size=28, patch_size=7, width=24, layers=1, head_width=8), image_position="first")
    randomize_(model.rwkv, seed=5)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in list(model.vit.parameters()) + [model.proj.weight]: p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port, proc, timeout=180):
    "Until the server accepts connections (or its process died, or timeout)."
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None: pytest.fail(f"demo exited with {proc.returncode}:\n{proc.stdout.read()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0: return
        time.sleep(0.5)
    pytest.fail("demo did not start listening in time")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    "(model, picture path, gradio_client.Client) of a demo process serving the checkpoint on localhost."
    folder = tmp_path_factory.mktemp("demo")
    model = make_model()
    save_visualrwkv(model, folder / "visualrwkv.pth")
    (folder / "model_config.json").write_text(json.dumps(dict(image_position="first", vision_head_width=8)))
    Image.new("RGB", (40, 30), (220, 20, 20)).save(folder / "red.png")
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost"}
    proc = subprocess.Popen([sys.executable, str(DEMO), str(folder / "visualrwkv.pth"), "--port", str(port), "--device", "cpu",
                             "--max-new-tokens", str(N_NEW)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(port, proc)
        yield model, folder / "red.png", gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def reply_by_hand(model, prompt_ids, pixels):
    "The greedy reply to hand-written prompt ids: visualrwkv.generate, decoded and stripped as the chat shows it."
    return TOK.decode(generate(model, [prompt_ids], [pixels], max_new_tokens=N_NEW)[0]).strip()


def last_reply(messages) -> str:
    "The text of the last chat message (gradio sends a message's content as text, or as a list of text parts)."
    content = messages[-1]["content"]
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def test_two_questions_about_one_image(served):
    model, picture, client = served
    pixels = clip_preprocess(28)(Image.open(picture))
    first = reply_by_hand(model, TOK.encode("User: ") + [IMAGE_TOKEN_INDEX] + TOK.encode("\nWhat is it?\n\nAssistant:"), pixels)
    assert first and "\n\n" not in first
    messages, box = client.predict(gradio_client.handle_file(str(picture)), "What is it?", api_name="/ask")
    assert last_reply(messages) == first and box == ""
    second = reply_by_hand(model, TOK.encode("User: ") + [IMAGE_TOKEN_INDEX] +
                           TOK.encode(f"\nWhat is it?\n\nAssistant: {first}\n\nUser: Why?\n\nAssistant:"), pixels)
    messages, _ = client.predict(gradio_client.handle_file(str(picture)), "Why?", api_name="/ask")
    assert len(messages) == 4 and last_reply(messages) == second
    client.predict(api_name="/clear")
    messages, _ = client.predict(gradio_client.handle_file(str(picture)), "What is it?", api_name="/ask")
    assert len(messages) == 2 and last_reply(messages) == first                # a new conversation


def test_bad_sampling_fails_at_start():
    "A bad setting stops the demo before it serves (visualrwkv.generate's check), not at the first question."
    import importlib.util
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    with pytest.raises(ValueError, match="temperature"): demo.build_demo(make_model(), TOK, temperature=-1.0)
