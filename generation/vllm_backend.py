"""Stepwise generation with an in-process vLLM engine (open models, raw logits).

- `LLM(..., logprobs_mode="raw_logits")`: the logprob values vLLM returns are the raw
  (pre-temperature, pre-softmax) logits, so with `logprobs=1` each position's dict holds the sampled
  token and the rank-1 token, and its maximum value is max_v z_v — S_os is read directly.
- Prompts are token ids (`TokensPrompt`): the Appendix-A chat template through the tokenizer's own
  chat template, then the ids generated so far (no re-tokenisation drift; exact prefix-cache hits).
- Temperature 0.7 by default, stop on "\\n\\n", a per-request seed, all waiting problems in one
  `generate` call. `tensor_parallel_size` and memory share are constructor arguments.

vLLM is imported lazily (and can be injected, which is how the tests run it through faithful
fakes of `LLM`, `SamplingParams`, `TokensPrompt`, `RequestOutput`, `CompletionOutput`, `Logprob`).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from generation import costs
from generation.backend import (
    STEP_DELIMITER,
    SYSTEM_PROMPT,
    StepRequest,
    StepResult,
    is_final_step,
    prefix_text,
)


class VLLMBackend:
    """A `generation.backend.Backend` over `vllm.LLM`.

    Args:
      model: local path (or hub name, online only).
      params: N for FLOPs; default: from the model folder's config.json.
      temperature: sampling temperature (paper: 0.7).
      tensor_parallel_size, gpu_memory_utilization, max_model_len, dtype: engine settings (two
        engines share a GPU by splitting `gpu_memory_utilization`, e.g. 0.25 + 0.6).
      vllm_module: the `vllm` module (tests pass a fake).
    """

    def __init__(self, model: str, *, params: float | None = None, temperature: float = 0.7,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.45,
                 max_model_len: int | None = None, dtype: str = "auto", seed: int = 0,
                 name: str | None = None, vllm_module: ModuleType | None = None):
        self._vllm = vllm_module or importlib.import_module("vllm")
        self.name = name or Path(model).name
        if params is None:
            if not Path(model).exists():
                raise ValueError(f"params not given and {model!r} is not a local folder with a "
                                 "config.json to read N from")
            params = costs.params_from_config(model)
        self.params = float(params)
        self.temperature = temperature
        kwargs = dict(model=model, logprobs_mode="raw_logits", max_logprobs=5,
                      enable_prefix_caching=True, gpu_memory_utilization=gpu_memory_utilization,
                      tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
                      generation_config="vllm")
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self.llm = self._vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self._prompt_cache: dict[str, list[int]] = {}

    def prompt_ids(self, question: str) -> list[int]:
        if question not in self._prompt_cache:
            msgs = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": question}]
            self._prompt_cache[question] = list(self.tokenizer.apply_chat_template(
                msgs, add_generation_prompt=True, tokenize=True))
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
        prompts, params = [], []
        for req in requests:
            prompts.append(self._vllm.inputs.TokensPrompt(prompt_token_ids=self._ids(req)))
            params.append(self._vllm.SamplingParams(
                temperature=self.temperature, max_tokens=max_tokens,
                stop=None if whole else [STEP_DELIMITER], logprobs=1, seed=req.seed))
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [self._parse(out, whole) for out in outs]

    def _parse(self, out, whole: bool) -> StepResult:
        o = out.outputs[0]
        token_ids = list(o.token_ids)
        logprobs = o.logprobs or []
        if len(logprobs) != len(token_ids):
            return StepResult(o.text, token_ids, [], [], "max_logit",
                              len(out.prompt_token_ids), int(out.num_cached_tokens or 0),
                              len(token_ids), o.finish_reason or "stop", True,
                              error=f"{len(logprobs)} logprob entries for {len(token_ids)} tokens")
        tokens, conf = [], []
        for tid, entry in zip(token_ids, logprobs, strict=True):
            conf.append(max(lp.logprob for lp in entry.values()))  # raw logits: max_v z_v
            chosen = entry.get(tid)
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
            is_final=whole or is_final_step(text, o.finish_reason or "stop", eos))
