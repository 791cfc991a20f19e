"""Step scorers for the per-step baselines (`generation.live.online.ScoreRule`).

- `VLLMRewardModel` — RSD's process reward model through vLLM's pooling runner
  (`LLM(model=…, runner="pooling")`; `LLM.encode(…, pooling_task="token_classify")` in vLLM
  0.33, `LLM.reward` in 0.10). Native support: Qwen2.5-Math-PRM
  (`Qwen2ForProcessRewardModel`, steps separated by the `<extra_0>` tag; vLLM returns the
  softmaxed 2-class output at each tag, and P(good) of the last tag is the reward). The paper's
  Skywork-o1 PRM needs a vLLM plugin (`--prompt_format=skywork`, reward = sigmoid of the value at
  the last step's delimiter).
- `OpenAIJudge` — SpecReason's judge through any OpenAI-compatible chat model: one generated
  token, the top-10 log-probabilities, score = expected value of the digit tokens 0–9 after
  renormalisation (SpecReason's "average" mode; 0 when no digit is among them), reported /9.

Both return scores in [0, 1] and the compute they spent (FLOPs = 2N per token processed; tokens;
USD where priced) — a separate column, never part of the generation cost.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import re
from collections.abc import Sequence

from generation.backends import costs
from generation.backends.base import SYSTEM_PROMPT
from generation.backends.vllm_backend import chat_ids
from jaxroute.errors import InputError

STEP_TAG = "<extra_0>"  # Qwen2.5-Math-PRM's step tag (the embedded stand-in's too)
JUDGE_INSTRUCTION = (
    "Look only at the last step of the solution above. Is it factually correct and does it "
    "follow logically from the problem and the earlier steps? Ignore style and whether it is "
    "useful. Answer with a single digit from 0 (certainly wrong) to 9 (certainly correct).")


def judge_messages(question: str, steps: Sequence[str]) -> list[dict]:
    """The judge's chat: the solver's own prompt, the steps so far as its answer, then the
    question about the last step (SpecReason's layout; our wording)."""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": question},
            {"role": "assistant", "content": "\n\n".join(steps)},
            {"role": "user", "content": JUDGE_INSTRUCTION}]


def expected_digit(top_logprobs: Sequence[dict]) -> float:
    """E[digit] over the digit tokens among `[{"token", "logprob"}, …]`, renormalised; 0 if none
    (SpecReason counts a non-digit answer as 0)."""
    num = den = 0.0
    for t in top_logprobs:
        tok = str(t.get("token", "")).strip()
        if len(tok) == 1 and tok.isdigit():
            p = math.exp(float(t["logprob"]))
            num, den = num + int(tok) * p, den + p
    return num / den if den > 0 else 0.0


@dataclasses.dataclass
class OpenAIJudge:
    """SpecReason's judge through an `OpenAIBackend` (any OpenAI-compatible chat endpoint)."""

    backend: object  # generation.backends.openai_backend.OpenAIBackend (its client, retries and cache)
    params: float = 0.0  # N of the judge model for FLOPs (0: unknown, e.g. a closed API model)
    top_logprobs: int = 10
    name: str = "SpecReason judge"

    def score(self, items):
        msgs = [judge_messages(q, steps) for q, steps in items]
        resps = self.backend.chat_raw(msgs, max_tokens=1, temperature=0.0,
                                      extra={"logprobs": True,
                                             "top_logprobs": self.top_logprobs})
        scores, spent = [], []
        for r in resps:
            if r is None:  # a failed request: treat as "no confidence" (the step is redone)
                scores.append(0.0)
                spent.append({"flops": 0.0, "input_tokens": 0, "output_tokens": 0, "usd": 0.0,
                              "failures": 1})
                continue
            content = (r["choices"][0].get("logprobs") or {}).get("content") or []
            top = content[0].get("top_logprobs", []) if content else []
            scores.append(expected_digit(top) / 9.0)
            u = r.get("usage") or {}
            p_in, p_out = int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))
            cached = int((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
            spent.append({"flops": 2.0 * self.params * (p_in + p_out), "input_tokens": p_in,
                          "output_tokens": p_out,
                          "usd": costs.usd(p_in, cached, p_out, self.backend.price)})
        return scores, spent


@dataclasses.dataclass
class VLLMRewardModel:
    """A process reward model served in-process by vLLM's pooling runner.

    `prompt_format="qwen"`: Qwen2.5-Math-PRM's chat layout with `<extra_0>` after every step;
    `"skywork"`: RSD's Skywork layout (BOS + question + "\\n", steps joined by "\\n\\n"),
    which needs the Skywork vLLM plugin.

    The engine starts when the scorer is made (not at its first score, hours into a run), with
    its own `gpu_memory_utilization` and `max_model_len` (it shares the GPU with the generation
    engines) and without prefix caching, which vLLM does not support for STEP pooling
    (decision 71).
    """

    model: str
    params: float | None = None  # N for FLOPs; None: from the local folder's weights (else 7.6e9)
    prompt_format: str = "qwen"
    llm: object = None  # an injected `vllm.LLM` (tests pass a fake); built at construction
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.25
    max_model_len: int | None = 4096
    trust_remote_code: bool = False  # only the Skywork plugin needs it: ask for it explicitly
    dtype: str = "auto"
    name: str = "PRM"
    vllm_module: object = None  # the `vllm` module (tests pass a fake); imported when needed
    _tokenizer: object = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        if self.prompt_format not in ("qwen", "skywork"):
            raise InputError(f"prompt_format must be 'qwen' or 'skywork', got "
                             f"{self.prompt_format!r}")
        if self.llm is None:
            from vllm import LLM  # lazy: only where vLLM is installed

            self.llm = LLM(**self.engine_kwargs())
        if self.params is None:
            # Qwen2.5-Math-PRM-7B's N when the weights are not a local folder (a hub name).
            self.params = costs.params_from_weights(self.model) or 7.6e9

    def engine_kwargs(self) -> dict:
        """The reward model engine's `vllm.LLM` / `vllm.EngineArgs` keyword arguments."""
        kw = dict(model=self.model, runner="pooling", enable_prefix_caching=False,
                  tensor_parallel_size=self.tensor_parallel_size,
                  gpu_memory_utilization=self.gpu_memory_utilization,
                  trust_remote_code=self.trust_remote_code, dtype=self.dtype)
        if self.max_model_len is not None:
            kw["max_model_len"] = self.max_model_len
        return kw

    def prompt(self, question: str, steps: Sequence[str]) -> str:
        """The reward model's input. "qwen": the model's own chat template over the solver's
        chat with every step closed by the `<extra_0>` step tag (Qwen2.5-Math-PRM's model card;
        any model with that layout, e.g. the embedded stand-in, decision 85). "skywork": BOS +
        question + "\n", steps joined by "\n\n"."""
        if self.prompt_format == "qwen":
            answer = "".join(s + STEP_TAG for s in steps)
            return self.tokenizer.apply_chat_template(
                [{"role": "system", "content": SYSTEM_PROMPT},
                 {"role": "user", "content": question},
                 {"role": "assistant", "content": answer}], tokenize=False,
                add_generation_prompt=False)
        return question + "\n" + "".join(s + "\n\n" for s in steps)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self.llm.get_tokenizer()
        return self._tokenizer

    def pooling_params(self):
        """Per request: STEP pooling at the model's own `<extra_0>` id (vLLM's default,
        151651, is Qwen's vocabulary's; a model with another vocabulary says its own)."""
        if self.prompt_format != "qwen":
            return None
        vllm = self.vllm_module or importlib.import_module("vllm")  # lazy: only where installed
        return vllm.PoolingParams(step_tag_id=int(self.tokenizer.convert_tokens_to_ids(STEP_TAG)))

    def _pool(self, prompts: list[str]):
        """Per-token pooling outputs: `encode(pooling_task="token_classify")` where vLLM has it
        (0.33), `reward` otherwise (0.10)."""
        encode = getattr(self.llm, "encode", None)
        if encode is not None and "pooling_task" in inspect.signature(encode).parameters:
            return encode(prompts, pooling_params=self.pooling_params(), use_tqdm=False,
                          pooling_task="token_classify")
        return self.llm.reward(prompts, use_tqdm=False)

    def score(self, items):
        """P(good) of each item's last step. An item whose prompt does not fit the engine's
        context scores 0 alone (its step goes to the large model; decision 85) — vLLM would
        fail the whole call."""
        prompts = [self.prompt(q, steps) for q, steps in items]
        limit = self.max_model_len or 1 << 30
        lengths = [len(self.tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
        fits = [i for i, n in enumerate(lengths) if n < limit]
        scores = [0.0] * len(items)
        spent = [{"flops": 0.0, "input_tokens": 0, "output_tokens": 0, "usd": 0.0,
                  "failures": 1} for _ in items]
        outs = self._pool([prompts[i] for i in fits]) if fits else []
        for i, out in zip(fits, outs, strict=True):
            data = out.outputs.data
            rows = data.tolist() if hasattr(data, "tolist") else list(data)
            last = rows[-1] if rows else [0.0]
            last = last if isinstance(last, list) else [last]
            # Qwen PRM: [P(bad), P(good)] per step tag; a 1-wide head: a sigmoid value.
            scores[i] = float(last[1]) if len(last) == 2 else 1 / (1 + math.exp(-float(last[0])))
            n = len(out.prompt_token_ids)
            spent[i] = {"flops": 2.0 * self.params * n, "input_tokens": n, "output_tokens": 0,
                        "usd": 0.0}
        return scores, spent


@dataclasses.dataclass
class VLLMJudge:
    """SpecReason's judge on an in-process `VLLMBackend` (the large model judges with the weights
    it already holds): the judge chat through the tokenizer's template, one greedy token, top-10
    "logprobs". With `logprobs_mode="raw_logits"` those are raw logits; renormalising over the
    digits gives the same probabilities either way (softmax is shift-invariant)."""

    backend: object  # generation.backends.vllm_backend.VLLMBackend
    top_logprobs: int = 5  # the backend's engine caps this at its max_logprobs (5)
    name: str = "SpecReason judge"

    def sampling_kwargs(self) -> dict:
        """One greedy token with its top log-probabilities."""
        return dict(temperature=0.0, max_tokens=1, logprobs=self.top_logprobs)

    def score(self, items):
        """One greedy token per item. An item whose judge prompt does not fit the engine's
        context scores 0 alone (the step goes to the large model) — vLLM would fail the whole
        call (decision 85)."""
        be = self.backend
        ids = [chat_ids(be.tokenizer, judge_messages(q, steps)) for q, steps in items]
        fits = [i for i, x in enumerate(ids) if len(x) < be.max_model_len]
        scores = [0.0] * len(items)
        spent = [{"flops": 0.0, "input_tokens": 0, "output_tokens": 0, "usd": 0.0,
                  "failures": 1} for _ in items]
        prompts = [be._vllm.TokensPrompt(prompt_token_ids=ids[i]) for i in fits]
        params = [be._vllm.SamplingParams(**self.sampling_kwargs()) for _ in fits]
        outs = be.llm.generate(prompts, params, use_tqdm=False) if fits else []
        for i, out in zip(fits, outs, strict=True):
            lp = out.outputs[0].logprobs or [{}]
            top = [{"token": v.decoded_token, "logprob": v.logprob} for v in lp[0].values()]
            scores[i] = expected_digit(top) / 9.0
            n = len(out.prompt_token_ids)
            spent[i] = {"flops": 2.0 * be.params * (n + 1), "input_tokens": n,
                        "output_tokens": 1, "usd": 0.0}
        return scores, spent


def from_spec(spec: str, backends, *, role: str, cache=None, seed: int = 0,
              prm_engine: dict | None = None):
    """A step scorer from a spec, or None for an empty spec.

    `tiny` (the embedded stand-ins: the tiny PRM for `role="prm"`, the tiny judge on the large
    tiny LM for `role="judge"`), `vllm-large` (SpecReason's judge on the large in-process vLLM
    engine), `vllm:MODEL[:qwen|skywork]` (a process reward model), `openai:MODEL[@BASE_URL]`
    (a judge on any OpenAI-compatible chat endpoint). `prm_engine`: the reward model engine's
    `gpu_memory_utilization` / `max_model_len` (from the preset)."""
    if not spec:
        return None
    if spec == "tiny":
        from generation.tinylm import scorers as tiny

        return tiny.load_prm() if role == "prm" else tiny.TinyJudge(backends[-1])
    if spec == "vllm-large":
        return VLLMJudge(backends[-1])
    kind, _, rest = spec.partition(":")
    if kind == "vllm":
        m = re.fullmatch(r"(.+?)(?::(qwen|skywork))?", rest)
        fmt = m.group(2) or "qwen"
        return VLLMRewardModel(m.group(1), prompt_format=fmt, trust_remote_code=fmt == "skywork",
                               **(prm_engine or {}))
    if kind == "openai":
        from generation.registry import make_backend

        return OpenAIJudge(make_backend(spec, cache=cache, seed=seed))
    raise InputError(f"unknown scorer spec {spec!r} (tiny, vllm-large, vllm:MODEL[:qwen|skywork], "
                     "openai:MODEL[@BASE_URL])")
