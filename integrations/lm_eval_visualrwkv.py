"""lm-evaluation-harness adapter: the RWKV-6 language model, alone or a VisualRWKV checkpoint's, as `--model visualrwkv`.

The paper's text-only tables (LAMBADA, the English and multilingual averages) come from EleutherAI's harness. lm_eval
has no plugin discovery for models, so `visualrwkv-lm-eval` imports this module (which registers `visualrwkv`) and then
runs lm_eval's own command line:

    visualrwkv-lm-eval --model visualrwkv --model_args pretrained=PATH --tasks lambada_openai --batch_size 8

PATH: an official RWKV-6 World (x060) checkpoint, or a VisualRWKV checkpoint (its `rwkv.*` language model is scored;
the vision tower is never loaded). Scoring follows the official eval/run_lm_eval.py: every scored sequence starts with
the '\\n' token (11), so the first word has something to condition on, and greedy generation runs in RNN mode.
"""
import json
import warnings
from collections import defaultdict

import torch
import torch.nn.functional as F
try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    import lm_eval.models  # noqa: F401  (the built-ins first: get_model skips them once the registry is not empty)
except ImportError as e: raise ImportError(f'{e}: this adapter needs pip install -e ".[lmeval]"') from e

from visualrwkv.rwkv import RWKV6, load_rwkv6, read_state_dict, sample_logits
from visualrwkv.tokenizer import WorldTokenizer
from visualrwkv_integrations.common import cut_at, positive_int, resolve_device_dtype, until_strings

NEWLINE_TOKEN = 11                          # '\n': the official harness script's "RWKV_PAD" before every context
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")


def load_language_model(path, device=None, dtype=None) -> RWKV6:
    "The RWKV-6 of an official World checkpoint, or the `rwkv.*` language model of a VisualRWKV checkpoint, in eval mode."
    sd = read_state_dict(path)
    if any(k.startswith("rwkv.") for k in sd): sd = {k[len("rwkv."):]: v for k, v in sd.items() if k.startswith("rwkv.")}
    device, dtype = resolve_device_dtype(device, dtype)
    return load_rwkv6(sd).to(device=device, dtype=dtype).eval()


@register_model("visualrwkv")
class VisualRWKVLM(TemplateLM):
    "An RWKV-6 language model for lm_eval: loglikelihood (batched), loglikelihood_rolling, generate_until (batched RNN decode)."
    def __init__(self, pretrained=None, device=None, dtype=None, batch_size=1, max_length=4096, max_gen_toks=256,
                 prefix_token=NEWLINE_TOKEN, seed=1234, max_batch_size=None):      # max_batch_size: lm_eval passes it, unused
        super().__init__()
        if pretrained is None: raise ValueError("model_args: pretrained=PATH (an RWKV-6 or VisualRWKV checkpoint) is required")
        self.model = load_language_model(pretrained, device, dtype)
        self.tokenizer = WorldTokenizer()
        self._device = self.model.emb.weight.device
        self._batch_size = positive_int("batch_size", batch_size)
        self._max_length = positive_int("max_length", max_length)
        self.max_gen_toks = positive_int("max_gen_toks", max_gen_toks)
        self._prefix = int(prefix_token)
        self.generator = torch.Generator(self._device).manual_seed(int(seed))

    @property
    def eot_token_id(self): return self.tokenizer.end_of_text
    @property
    def prefix_token_id(self): return self._prefix
    @property
    def max_length(self): return self._max_length
    @property
    def batch_size(self): return self._batch_size
    @property
    def tokenizer_name(self): return "rwkv_vocab_v20230424"

    def tok_encode(self, string, add_special_tokens=None, **kwargs): return self.tokenizer.encode(string)
    def tok_decode(self, tokens, **kwargs): return self.tokenizer.decode(tokens)

    def loglikelihood(self, requests, disable_tqdm=False):
        "(log P(continuation | prefix token + context), is_greedy) per (context, continuation) request."
        pairs = []
        for context, continuation in (r.args for r in requests):
            ctx, cont = self._encode_pair(context, continuation) if context else ([], self.tok_encode(continuation))
            pairs.append(((context, continuation), [self.prefix_token_id] + ctx, cont))
        return self._loglikelihood_tokens(pairs, disable_tqdm)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        "(key, context ids, continuation ids) -> (sum of continuation log-probs, greedy?), batched longest first."
        for key, _, cont in requests:
            if not cont: raise ValueError(f"loglikelihood: empty continuation, nothing to score (request {key!r})")
            if len(cont) > self.max_length:
                raise ValueError(f"loglikelihood: continuation of {len(cont)} tokens exceeds max_length={self.max_length}")
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            scores = self._score_batch([requests[i][1] + requests[i][2] for i in chunk], [requests[i][2] for i in chunk])
            for i, score in zip(chunk, scores):
                results[i] = score
                if requests[i][0] is not None: self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
        return results

    def _score_batch(self, seqs, conts):
        "Each sequence (context + continuation ids), the last max_length+1 kept, scored on its last len(cont) tokens."
        inputs = [s[-(self.max_length + 1):][:-1] for s in seqs]
        idx = torch.zeros(len(inputs), max(map(len, inputs)), dtype=torch.long)        # [B, T], right padded
        for b, inp in enumerate(inputs): idx[b, :len(inp)] = torch.tensor(inp)
        logits = self.model(idx.to(self.device))                                      # [B, T, V]: causal, pads come last
        out = []
        for b, (inp, cont) in enumerate(zip(inputs, conts)):
            logp = F.log_softmax(logits[b, len(inp) - len(cont):len(inp)].float(), dim=-1)   # [n, V]
            target = torch.tensor(cont, device=logp.device)
            out.append((logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        "log P(text) per (text,) request, in lm_eval's disjoint windows of max_length tokens (the first after the prefix)."
        out = []
        for (text,) in (r.args for r in requests):
            windows = lm_utils.get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1)
            pieces = [(None, *lm_utils.make_disjoint_window(w)) for w in windows]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(pieces, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm=False):
        "Text generated after each context until an `until` string, end of text or max_gen_toks; batched by gen_kwargs."
        groups = defaultdict(list)
        for i, r in enumerate(requests): groups[json.dumps(r.args[1], sort_keys=True, default=str)].append(i)
        results = [None] * len(requests)
        for members in groups.values():
            sampling = self._sampling(requests[members[0]].args[1])
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                for i, text in zip(chunk, self._generate([requests[i].args[0] for i in chunk], **sampling)):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _sampling(self, gen_kwargs: dict) -> dict:
        "until, max_gen_toks, temperature, top_p from lm_eval's gen_kwargs (greedy unless do_sample with temperature > 0)."
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown: warnings.warn(f"generate_until: ignoring unsupported gen_kwargs {unknown}", stacklevel=3)
        temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample", False) else 0.0
        max_gen_toks = positive_int("max_gen_toks", gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        return dict(until=until_strings(gen_kwargs), max_gen_toks=max_gen_toks, temperature=temperature,
                    top_p=float(gen_kwargs.get("top_p", 1.0)))

    @torch.no_grad()
    def _generate(self, contexts, until, max_gen_toks, temperature, top_p):
        "Continue each context (its last max_length tokens) in RNN mode; each row stops at an `until` string or end of text."
        prompts = [self.tok_encode(c)[-self.max_length:] or [self.prefix_token_id] for c in contexts]
        logits, state = self._prefill(prompts)
        new, done = [[] for _ in prompts], [False] * len(prompts)
        for _ in range(max_gen_toks):
            next_ids = sample_logits(logits, temperature, top_p, self.generator)               # [B]
            for b, t in enumerate(next_ids.tolist()):
                if done[b]: continue
                if t == self.eot_token_id: done[b] = True; continue
                new[b].append(t)
                done[b] = any(u in self.tok_decode(new[b]) for u in until)
            if all(done): break
            logits, state = self.model.step(next_ids, state)
        return [cut_at(self.tok_decode(ids), until) for ids in new]

    def _prefill(self, prompts):
        "Right-padded prompts through the model: (logits at each last real token [B, V], per-layer states after it)."
        idx = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long, device=self.device)   # [B, T]
        mask = torch.zeros_like(idx, dtype=torch.bool)                                                  # [B, T]
        for b, p in enumerate(prompts): idx[b, :len(p)], mask[b, :len(p)] = torch.tensor(p), True
        logits, state = self.model.forward_embeds(self.model.emb(idx), mask=mask)                       # [B, T, V]
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        return logits[torch.arange(len(prompts), device=self.device), last], state


def main():
    "`visualrwkv-lm-eval`: lm_eval's command line, with `--model visualrwkv` registered (this module is imported)."
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()


if __name__ == "__main__":
    main()
