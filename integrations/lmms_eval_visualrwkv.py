"""lmms-eval adapter: VisualRWKV as `--model visualrwkv`, found through the `lmms_eval.models` entry point (setup.py).

    pip install -e ".[lmms]"
    lmms-eval --model visualrwkv --model_args pretrained=PATH/visualrwkv.pth --tasks pope --batch_size 8

The checkpoint's shape options (image position, grid size, scan, tower head width) come from the model_config.json
beside it, as `visualrwkv.generate.load_for_inference` reads them; model_args may override them. Each request is one
human turn, "<image>\\n" + lmms-eval's context, as the official v6.0 evaluate.py builds it, tokenized by
`tokenize_conversation` so the image lands where this checkpoint was trained to see it, then "Assistant:".
"""
import json
import warnings
from collections import defaultdict

import torch
import torch.nn.functional as F
try: from lmms_eval.api.model import lmms
except ImportError as e: raise ImportError(f'{e}: this adapter needs pip install -e ".[lmms]"') from e

from visualrwkv.generate import generate, load_for_inference
from visualrwkv.prompts import IMAGE_TOKEN, STOP_TOKEN, tokenize_conversation
from visualrwkv.vision import clip_preprocess
from visualrwkv_integrations.common import cut_at, positive_int, resolve_device_dtype, until_strings

GEN_KWARGS = ("until", "max_new_tokens", "temperature", "top_p", "do_sample", "num_beams")


class VisualRWKVLMMS(lmms):
    "VisualRWKV for lmms-eval: generate_until (batched, greedy by default) and loglikelihood, one image per request."
    def __init__(self, pretrained: str, device=None, dtype=None, batch_size=1, max_new_tokens=128, image_position=None,
                 grid_size=None, scan=None, seed=1234, max_batch_size=None):   # max_batch_size: lmms-eval passes it, unused
        super().__init__()
        device, dtype = resolve_device_dtype(device, dtype)
        self.model, self.tokenizer = load_for_inference(pretrained, device, dtype, image_position=image_position,
                                                        grid_size=None if grid_size is None else int(grid_size), scan=scan)
        self.device = self.model.rwkv.emb.weight.device
        self.batch_size = positive_int("batch_size", batch_size)
        self.max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
        self.transform = clip_preprocess(self.model.vit.cfg.image_size)
        self.generator = torch.Generator(self.device).manual_seed(int(seed))

    def prompt(self, context: str, image) -> list:
        "Prompt ids of one question: a human turn (with '<image>' first if there is an image), then 'Assistant:'."
        question = f"{IMAGE_TOKEN}\n{context}" if image is not None and IMAGE_TOKEN not in context else context
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": ""}]
        return tokenize_conversation(turns, self.model.image_position, self.tokenizer)[0]

    def request_inputs(self, context, doc_to_visual, doc_id, task, split):
        "(prompt ids, image tensor [3, S, S] or None) of one request; its doc's visuals must be at most one PIL image."
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = [v for v in (visuals if isinstance(visuals, (list, tuple)) else [visuals]) if v is not None]
        if len(visuals) > 1:
            raise ValueError(f"{task}/{split} doc {doc_id}: {len(visuals)} visuals, VisualRWKV reads one image per question")
        if visuals and not hasattr(visuals[0], "convert"):
            raise ValueError(f"{task}/{split} doc {doc_id}: expected a PIL image, got {type(visuals[0]).__name__}")
        image = self.transform(visuals[0]) if visuals else None                      # [3, S, S]
        return self.prompt(context, image), image

    def generate_until(self, requests) -> list:
        "Each request's reply, cut at its `until` strings and the turn end '\\n\\n'; batched by gen_kwargs."
        groups = defaultdict(list)
        for i, r in enumerate(requests): groups[json.dumps(r.args[1], sort_keys=True, default=str)].append(i)
        results = [None] * len(requests)
        for members in groups.values():
            until, sampling = self._sampling(requests[members[0]].args[1])
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                inputs = [self.request_inputs(r.args[0], *r.args[2:]) for r in (requests[i] for i in chunk)]
                new = generate(self.model, [ids for ids, _ in inputs], [img for _, img in inputs], **sampling)
                for i, ids in zip(chunk, new):
                    results[i] = cut_at(self.tokenizer.decode(ids), until).strip()
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], results[i])
        return results

    def _sampling(self, gen_kwargs: dict):
        "(until strings, generate's keyword arguments) from lmms-eval's gen_kwargs; greedy unless do_sample."
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown: warnings.warn(f"generate_until: ignoring unsupported gen_kwargs {unknown}", stacklevel=3)
        if int(gen_kwargs.get("num_beams", 1)) != 1: raise ValueError("generate_until: beam search is not supported (num_beams=1)")
        until = until_strings(gen_kwargs) + [STOP_TOKEN]
        temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample", False) else 0.0
        return until, dict(max_new_tokens=positive_int("max_new_tokens", gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                           temperature=temperature, top_p=float(gen_kwargs.get("top_p", 1.0)), generator=self.generator)

    def continuation_ids(self, continuation: str) -> list:
        "The answer's ids as they follow 'Assistant:' in training ('Assistant: yes'): one leading space."
        if not continuation.strip(): raise ValueError(f"loglikelihood: empty continuation {continuation!r}, nothing to score")
        return self.tokenizer.encode(continuation if continuation.startswith(" ") else " " + continuation)

    @torch.no_grad()
    def loglikelihood(self, requests) -> list:
        "(log P(continuation | image, question, 'Assistant:'), is_greedy) per request, batched."
        results = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            prompts, images, conts = [], [], []
            for context, doc_to_target, doc_to_visual, doc_id, task, split in (r.args for r in chunk):
                ids, image = self.request_inputs(context, doc_to_visual, doc_id, task, split)
                answer = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(self.task_dict[task][split][doc_id])
                cont = self.continuation_ids(answer)
                prompts.append(ids + cont); images.append(image); conts.append(cont)
            out = self.model(prompts, images)                                        # logits [B, T, V], right padded
            for b, cont in enumerate(conts):
                end = int(out.mask[b].sum())                                         # real positions, image tokens included
                logp = F.log_softmax(out.logits[b, end - 1 - len(cont):end - 1].float(), dim=-1)   # [n, V]
                target = torch.tensor(cont, device=logp.device)
                results.append((logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())))
        return results

    def generate_until_multi_round(self, requests) -> list:
        "Not supported: lmms-eval's multi-round protocol differs per task."
        raise NotImplementedError("VisualRWKV's lmms-eval adapter runs generate_until and loglikelihood tasks only")
