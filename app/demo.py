"""VisualRWKV chat demo, as the official app/app_gpu.py: an image and questions in, answers streamed out, multi-turn.

    pip install -e ".[demo]"
    python app/demo.py PATH/visualrwkv.pth                  # then open http://127.0.0.1:7860

The checkpoint's shape options come from the model_config.json beside it (`visualrwkv.generate.load_for_inference`).
Each session keeps its conversation (LLaVA turns) in a `gr.State`; a `visualrwkv.generate.Chat` is rebuilt from it for
every question, so the image is re-read with the whole conversation (a new image, or Clear, starts a new one).
"""
import argparse

import gradio as gr

from visualrwkv.generate import Chat, load_for_inference
from visualrwkv.prompts import IMAGE_TOKEN
from visualrwkv.vision import clip_preprocess


def to_messages(turns) -> list:
    "LLaVA turns as chat messages: [{'from': 'human', 'value': '<image>\\nHi'}] -> [{'role': 'user', 'content': 'Hi'}]."
    role = {"human": "user", "gpt": "assistant"}
    return [{"role": role[t["from"]], "content": t["value"].replace(f"{IMAGE_TOKEN}\n", "")} for t in turns]


def build_demo(model, tokenizer, **sampling) -> gr.Blocks:
    "The page: image, chat, question box; `ask` (also the API endpoint /ask) streams each reply."
    Chat(model, tokenizer, **sampling)                                        # bad sampling settings fail now, not per question
    transform = clip_preprocess(model.vit.cfg.image_size)

    def ask(image, question, turns):
        "Stream the reply to `question` about `image` after the session's turns: (chat messages, turns, '')."
        if not question or not question.strip(): raise gr.Error("Type a question first.")
        chat = Chat(model, tokenizer, image=None if image is None else transform(image), **sampling)
        chat.turns = list(turns)
        asked, reply = to_messages(turns) + [{"role": "user", "content": question}], ""
        for piece in chat.ask(question):
            reply += piece
            yield asked + [{"role": "assistant", "content": reply.strip()}], chat.turns, ""
        yield to_messages(chat.turns), chat.turns, ""                         # the reply has joined chat.turns

    def restart():
        "A new conversation: no messages, no turns."
        return [], []

    with gr.Blocks(title="VisualRWKV") as demo:
        gr.Markdown("# VisualRWKV\nUpload an image and ask about it; follow-up questions keep the conversation.")
        turns = gr.State([])
        with gr.Row():
            image = gr.Image(type="pil", label="Image")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="VisualRWKV", height=420)
                question = gr.Textbox(label="Question", placeholder="What is in the picture?")
                with gr.Row():
                    submit = gr.Button("Ask", variant="primary")
                    clear = gr.Button("Clear")
        submit.click(ask, [image, question, turns], [chatbot, turns, question], api_name="ask")
        question.submit(ask, [image, question, turns], [chatbot, turns, question], api_name=False)
        clear.click(restart, None, [chatbot, turns], api_name="clear")
        image.change(restart, None, [chatbot, turns], api_name=False)
    return demo


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="VisualRWKV chat demo (gradio), on localhost")
    p.add_argument("model", help="VisualRWKV checkpoint (.pth or .safetensors), model_config.json beside it")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    return p.parse_args(argv)


def main(argv=None):
    "Load the checkpoint and serve the demo until interrupted."
    args = parse_args(argv)
    model, tokenizer = load_for_inference(args.model, device=args.device)
    demo = build_demo(model, tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    demo.queue(max_size=16).launch(server_name=args.host, server_port=args.port, share=False)


if __name__ == "__main__":
    main()
