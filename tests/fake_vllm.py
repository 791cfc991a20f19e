"""A faithful fake of the parts of vLLM the backend uses (names as in vllm/outputs.py,
vllm/logprobs.py, vllm/sampling_params.py, vllm/inputs; see generation.md §1).

The fake "model" answers "What is A+B?" in three steps with per-token raw logits.
"""

from __future__ import annotations

import dataclasses
import re
import types
from typing import TypedDict


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: object = None
    num_cached_tokens: int | None = None


@dataclasses.dataclass
class PoolingOutput:
    data: object  # torch.Tensor in vLLM; anything with .tolist() here


class PoolingRequestOutput:
    def __init__(self, request_id: str, outputs: PoolingOutput, prompt_token_ids: list[int],
                 num_cached_tokens: int, finished: bool):
        self.request_id, self.outputs = request_id, outputs
        self.prompt_token_ids, self.num_cached_tokens = prompt_token_ids, num_cached_tokens
        self.finished = finished


class SamplingParams:
    FIELDS = {"n", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
              "include_stop_str_in_output", "max_tokens", "logprobs", "prompt_logprobs"}

    def __init__(self, **kw):
        unknown = set(kw) - self.FIELDS
        if unknown:
            raise TypeError(f"SamplingParams got unexpected fields {unknown}")
        self.__dict__.update(dict.fromkeys(self.FIELDS), **kw)  # unset fields default to None


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]


class Tokenizer:
    """Character-level tokenizer over a tiny vocabulary: id = ord(c)."""

    def apply_chat_template(self, msgs, add_generation_prompt=True, tokenize=True):
        text = "".join(f"<{m['role']}>{m['content']}" for m in msgs) + "<assistant>"
        return self.encode(text) if tokenize else text

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class LLM:
    instances: list[LLM] = []
    ENGINE_ARGS = {"model", "logprobs_mode", "max_logprobs", "enable_prefix_caching",
                   "gpu_memory_utilization", "tensor_parallel_size", "dtype", "seed",
                   "generation_config", "max_model_len", "runner", "trust_remote_code"}

    def __init__(self, **kw):
        unknown = set(kw) - self.ENGINE_ARGS
        if unknown:
            raise TypeError(f"LLM got unexpected engine args {unknown}")
        self.kw, self.calls, self.seen = kw, [], set()
        LLM.instances.append(self)

    def get_tokenizer(self):
        return Tokenizer()

    def generate(self, prompts, sampling_params, use_tqdm=True):
        assert isinstance(sampling_params, list) and len(sampling_params) == len(prompts)
        self.calls.append((prompts, sampling_params))
        tok = Tokenizer()
        outs = []
        for i, (p, sp) in enumerate(zip(prompts, sampling_params, strict=True)):
            ids = p["prompt_token_ids"]
            text = tok.decode(ids)
            a, b = map(int, re.findall(r"\d+", text.split("<user>")[1])[:2])
            done = text.split("<assistant>")[1].count("Step ")
            steps = [f"Step {k + 1}: think." for k in range(2)] + [f"= {a + b} \\boxed{{{a + b}}}"]
            rest = steps[done:] if done < 3 else ["."]
            gen = "\n\n".join(rest)
            finish, stop_reason = "stop", None  # EOS
            if sp.stop and "\n\n" in gen:
                gen = gen.split("\n\n")[0]
                out_text, gen_ids = gen, tok.encode(gen + "\n\n")  # ids keep the newline token
                stop_reason = "\n\n"
            else:
                out_text, gen_ids = gen, tok.encode(gen)
            lps = []
            for t in gen_ids:
                z = 30.0 if chr(t).isdigit() else 20.0
                lps.append({t: Logprob(z - 0.5, 2, chr(t)), t + 1: Logprob(z, 1, chr(t + 1))})
            cached = max(len(ids) - 7, 0) // 16 * 16 if tuple(ids[:10]) in self.seen else 0
            self.seen.add(tuple(ids[:10]))
            outs.append(RequestOutput(str(i), None, ids, None, [CompletionOutput(
                0, out_text, gen_ids, None, lps, finish, stop_reason)], True,
                num_cached_tokens=cached))
        return outs


    def reward(self, prompts, use_tqdm=True):
        """A fake Qwen2.5-Math-PRM (STEP pooling): one [P(bad), P(good)] row per <extra_0> tag;
        a step containing "wrong" is bad."""
        import numpy as np

        assert self.kw.get("runner") == "pooling", "reward() needs LLM(runner='pooling')"
        outs = []
        for i, p in enumerate(prompts):
            steps = p.split("<|im_start|>assistant\n")[1].split("<extra_0>")[:-1]
            rows = [[0.9, 0.1] if "wrong" in s else [0.2, 0.8] for s in steps]
            outs.append(PoolingRequestOutput(str(i), PoolingOutput(np.array(rows)),
                                             Tokenizer().encode(p), 0, True))
        return outs


def module() -> types.ModuleType:
    m = types.ModuleType("vllm")
    m.LLM, m.SamplingParams = LLM, SamplingParams
    m.inputs = types.SimpleNamespace(TokensPrompt=TokensPrompt)
    return m
