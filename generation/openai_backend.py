"""Stepwise generation through any OpenAI-compatible server (OpenAI, `vllm serve`, the tiny-model
server), with log-probabilities, retries, a circuit breaker and a persistent response cache.

Two request modes:
- "chat" (OpenAI models, which have no assistant prefill): the partial solution goes into the
  user message and the model is asked for only the next step (continuation scheme below).
- "completions" (vLLM and other servers with raw prompts): the Appendix-A chat template rendered
  as text, followed by the steps so far; exact continuation.

Confidence per token: "top1_prob" = exp(max logprob among the returned top-k) (S_API), or, for a
server started with `--logprobs-mode raw_logits`, "max_logit" = the max returned value.

Retries with exponential backoff and jitter on 429, 408/409, ≥ 500, timeouts, dropped connections
and malformed bodies; no retry on other 4xx. After `breaker_threshold` consecutive failed requests
the circuit opens and further requests fail fast (recorded as per-request errors, never raised).
Responses are cached in SQLite keyed by the canonical request, so a re-run pays nothing twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from generation import costs
from generation.backend import STEP_DELIMITER, SYSTEM_PROMPT, StepRequest, StepResult, prefix_text

CHAT_SYSTEM = SYSTEM_PROMPT + " Separate steps with a blank line."
QWEN_TEMPLATE = ("<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n"
                 "{question}<|im_end|>\n<|im_start|>assistant\n")


def chat_messages(req: StepRequest, whole: bool) -> list[dict]:
    """The continuation prompt for chat models (no assistant prefill)."""
    if not req.steps:
        ask = ("Solve the problem." if whole else
               "Write ONLY the first step of the solution. If it reaches the final answer, give "
               "it in \\boxed{}.")
        user = f"Problem:\n{req.question}\n\n{ask}"
    else:
        ask = ("Continue the solution from there to the final answer." if whole else
               "Write ONLY the next step. If it reaches the final answer, give it in \\boxed{}.")
        user = (f"Problem:\n{req.question}\n\nPartial solution so far (do not repeat it):\n"
                f"{prefix_text(req.steps).rstrip()}\n\n{ask}")
    return [{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": user}]


class ResponseCache:
    """SQLite map from a request key to the raw JSON response."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, body TEXT)")
        self._db.commit()

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT body FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, body: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)",
                             (key, json.dumps(body)))
            self._db.commit()


class CircuitOpen(RuntimeError):
    pass


class OpenAIBackend:
    """A `generation.backend.Backend` over an OpenAI-compatible HTTP API.

    Args:
      model: model name on the server.
      base_url, api_key: server (None: the SDK's defaults / environment).
      mode: "chat" or "completions".
      params: N for FLOPs accounting (0 for closed models).
      price: USD per 1M tokens, for spend reporting.
      confidence: "top1_prob" (API log-probabilities) or "max_logit" (server in raw_logits mode).
      concurrency: requests in flight.
      max_attempts: attempts per request (1 = no retry).
      backoff_base, backoff_max: seconds; delay = min(max, base·2^attempt)·U(0.5, 1.5).
      timeout: seconds per HTTP request.
      breaker_threshold: consecutive failed requests that open the circuit.
      cache_path: SQLite file for the response cache (None: no cache).
      temperature, top_logprobs: sampling and log-probability settings (paper: 0.7, 5).
    """

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 mode: str = "chat", params: float = 0.0, price: costs.Price | None = None,
                 confidence: str = "top1_prob", concurrency: int = 8, max_attempts: int = 5,
                 backoff_base: float = 0.5, backoff_max: float = 8.0, timeout: float = 120.0,
                 breaker_threshold: int = 10, cache_path: str | Path | None = None,
                 temperature: float = 0.7, top_logprobs: int = 5,
                 template: str = QWEN_TEMPLATE, seed: int = 0):
        if mode not in ("chat", "completions"):
            raise ValueError(f"mode must be 'chat' or 'completions', got {mode!r}")
        if confidence not in ("top1_prob", "max_logit"):
            raise ValueError(f"confidence must be 'top1_prob' or 'max_logit', got {confidence!r}")
        self.name, self.params, self.mode = model, params, mode
        self.price = price or costs.DEFAULT_PRICES.get(model, costs.Price(0, 0, 0))
        self.confidence = confidence
        self.base_url, self.api_key = base_url, api_key
        self.concurrency, self.max_attempts = concurrency, max_attempts
        self.backoff_base, self.backoff_max, self.timeout = backoff_base, backoff_max, timeout
        self.breaker_threshold = breaker_threshold
        self.cache = ResponseCache(cache_path) if cache_path else None
        self.temperature, self.top_logprobs, self.template = temperature, top_logprobs, template
        self._rng = random.Random(seed)
        self._consecutive_failures = 0
        self.stats = {"requests": 0, "cache_hits": 0, "retries": 0, "failures": 0}

    # -- request building ----------------------------------------------------------------------

    def request_body(self, req: StepRequest, whole: bool, max_tokens: int) -> dict:
        body: dict = {"model": self.name, "temperature": self.temperature, "seed": req.seed}
        if not whole:
            body["stop"] = [STEP_DELIMITER]
        if self.mode == "chat":
            body.update(messages=chat_messages(req, whole), logprobs=True,
                        top_logprobs=self.top_logprobs, max_completion_tokens=max_tokens)
        else:
            body.update(prompt=self.template.replace("{question}", req.question) + prefix_text(
                req.steps), logprobs=self.top_logprobs, max_tokens=max_tokens)
        return body

    def cache_key(self, body: dict) -> str:
        canon = json.dumps({"base_url": self.base_url, "mode": self.mode, **body},
                           sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    # -- response parsing ----------------------------------------------------------------------

    def parse(self, resp: dict, whole: bool) -> StepResult:
        """StepResult from a raw response dict; raises ValueError on a malformed body."""
        try:
            choice = resp["choices"][0]
            usage = resp.get("usage") or {}
            finish = choice.get("finish_reason") or "stop"
            if self.mode == "chat":
                text = choice["message"]["content"] or ""
                content = (choice.get("logprobs") or {}).get("content") or []
                tokens = [c["token"] for c in content]
                conf = []
                for c in content:
                    tops = [t["logprob"] for t in (c.get("top_logprobs") or [])]
                    best = max(tops) if tops else c["logprob"]
                    conf.append(best if self.confidence == "max_logit" else math.exp(best))
            else:
                text = choice["text"] or ""
                lp = choice.get("logprobs") or {}
                tokens = list(lp.get("tokens") or [])
                tops = lp.get("top_logprobs") or [{} for _ in tokens]
                chosen = lp.get("token_logprobs") or [None] * len(tokens)
                conf = []
                for top, ch in zip(tops, chosen, strict=True):
                    vals = list((top or {}).values())
                    best = max(vals) if vals else (ch if ch is not None else -math.inf)
                    conf.append(best if self.confidence == "max_logit" else math.exp(best))
            details = usage.get("prompt_tokens_details") or {}
            prompt = int(usage.get("prompt_tokens") or 0)
            completion = int(usage.get("completion_tokens") or len(tokens))
            cached = int(details.get("cached_tokens") or 0)
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"malformed response body: {type(e).__name__}: {e}") from None
        text = text.split(STEP_DELIMITER)[0] if not whole else text
        return StepResult(
            text=text.strip("\n"), token_ids=[], tokens=tokens, confidence=conf,
            confidence_kind=self.confidence, prompt_tokens=prompt, cached_tokens=cached,
            completion_tokens=completion, finish_reason=finish,
            is_final=whole or "\\boxed" in text or finish == "length")

    # -- transport -----------------------------------------------------------------------------

    def _client(self):
        import openai  # lazy: the SDK is only needed when this backend is used

        return openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key or "EMPTY",
                                  max_retries=0, timeout=self.timeout)

    async def _call(self, client, body: dict) -> dict:
        import openai

        retryable = (openai.RateLimitError, openai.APIConnectionError, openai.InternalServerError,
                     openai.ConflictError, ValueError, json.JSONDecodeError)
        last: Exception | None = None
        for attempt in range(self.max_attempts):
            if self._consecutive_failures >= self.breaker_threshold:
                raise CircuitOpen(f"circuit open after {self._consecutive_failures} consecutive "
                                  f"failures (last: {last})")
            try:
                if self.mode == "chat":
                    raw = await client.chat.completions.with_raw_response.create(**body)
                else:
                    raw = await client.completions.with_raw_response.create(**body)
                resp = json.loads(raw.text)
                self.parse(resp, whole="stop" not in body)  # validate before caching
                self._consecutive_failures = 0
                return resp
            except openai.APIStatusError as e:
                if not isinstance(e, retryable) and e.status_code != 408:
                    self._consecutive_failures += 1
                    raise
                last = e
            except retryable as e:
                last = e
            if attempt + 1 < self.max_attempts:
                self.stats["retries"] += 1
                delay = min(self.backoff_max, self.backoff_base * 2**attempt)
                await asyncio.sleep(delay * self._rng.uniform(0.5, 1.5))
        self._consecutive_failures += 1
        raise RuntimeError(f"gave up after {self.max_attempts} attempts: "
                           f"{type(last).__name__}: {last}")

    async def _one(self, client, sem, req: StepRequest, whole: bool, max_tokens: int):
        body = self.request_body(req, whole, max_tokens)
        key = self.cache_key(body)
        self.stats["requests"] += 1
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self.stats["cache_hits"] += 1
            return self.parse(hit, whole)
        async with sem:
            try:
                resp = await self._call(client, body)
            except Exception as e:  # recorded per request; the run goes on
                self.stats["failures"] += 1
                return StepResult("", [], [], [], self.confidence, 0, 0, 0, "error", False,
                                  error=f"{type(e).__name__}: {e}")
        if self.cache is not None:
            self.cache.put(key, resp)
        return self.parse(resp, whole)

    async def agenerate(self, requests: Sequence[StepRequest], *, whole: bool = False,
                        max_tokens: int = 1024) -> list[StepResult]:
        sem = asyncio.Semaphore(self.concurrency)
        client = self._client()
        try:
            return list(await asyncio.gather(*(self._one(client, sem, r, whole, max_tokens)
                                               for r in requests)))
        finally:
            await client.close()

    def generate(self, requests: Sequence[StepRequest], *, whole: bool = False,
                 max_tokens: int = 1024) -> list[StepResult]:
        return asyncio.run(self.agenerate(requests, whole=whole, max_tokens=max_tokens))

    async def _one_raw(self, client, sem, body: dict) -> dict | None:
        key = self.cache_key(body)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self.stats["cache_hits"] += 1
            return hit
        async with sem:
            try:
                import openai

                resp = None
                for attempt in range(self.max_attempts):
                    try:
                        raw = await client.chat.completions.with_raw_response.create(**body)
                        resp = json.loads(raw.text)
                        resp["choices"][0]["message"]  # noqa: B018 — validate the shape
                        break
                    except (openai.RateLimitError, openai.APIConnectionError,
                            openai.InternalServerError, ValueError, KeyError, IndexError,
                            TypeError):
                        resp = None
                        await asyncio.sleep(min(self.backoff_max, self.backoff_base * 2**attempt))
                if resp is None:
                    return None
            except Exception:
                return None
        if self.cache is not None:
            self.cache.put(key, resp)
        return resp

    def chat_raw(self, messages: Sequence[list[dict]], *, max_tokens: int = 8,
                 temperature: float = 0.0, extra: dict | None = None) -> list[dict | None]:
        """Chat completions as response bodies (choices, usage, …), cached and retried; None
        where a request failed. `extra`: more request fields (e.g. logprobs, top_logprobs)."""

        async def run():
            sem = asyncio.Semaphore(self.concurrency)
            client = self._client()
            try:
                bodies = [{"model": self.name, "messages": m, "temperature": temperature,
                           "max_completion_tokens": max_tokens, **(extra or {})}
                          for m in messages]
                return list(await asyncio.gather(*(self._one_raw(client, sem, b)
                                                   for b in bodies)))
            finally:
                await client.close()

        return asyncio.run(run())

    def chat_texts(self, messages: Sequence[list[dict]], *, max_tokens: int = 8,
                   temperature: float = 0.0) -> list[str | None]:
        """Plain chat completions (no log-probabilities), cached; None where a request failed."""
        return [r["choices"][0]["message"]["content"] if r is not None else None
                for r in self.chat_raw(messages, max_tokens=max_tokens, temperature=temperature)]

    def usd(self, result: StepResult) -> float:
        return costs.usd(result.prompt_tokens, result.cached_tokens, result.completion_tokens,
                         self.price)
