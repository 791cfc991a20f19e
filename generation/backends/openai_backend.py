"""Stepwise generation through any OpenAI-compatible server (OpenAI, `vllm serve`, the tiny-model
server), with log-probabilities, one retry policy and circuit breaker (`generation.backends.retry`)
and a persistent response cache (`generation.backends.response_cache`).

Two request modes:
- "chat" (OpenAI models, which have no assistant prefill): the partial solution goes into the
  user message and the model is asked for only the next step (continuation scheme below).
- "completions" (vLLM and other servers with raw prompts): the Appendix-A chat template rendered
  as text, followed by the steps so far; exact continuation.

Confidence per token: "top1_prob" = exp(max logprob among the returned top-k) (S_API), or, for a
server started with `--logprobs-mode raw_logits`, "max_logit" = the max returned value.

Failures (decisions 36, 71): every request — steps, judge, verifier — goes through one policy.
Retried with exponential backoff and jitter, honouring `Retry-After` (capped): 429, 408, 409,
≥ 500, timeouts, dropped connections and invalid bodies (validated before anything is cached).
A 400 is the request's own failure (recorded, not retried). A refused key (401/403), an unknown
model (404) or a server that cannot be reached stop the run at once (`FatalBackendError`, naming
the flag or environment variable to fix); so does an error rate above `max_error_rate`. After
`breaker_threshold` consecutive failed requests the circuit opens; after `breaker_cooldown`
seconds one probe request is let through (half-open) and a success closes it again.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from generation.backends import costs
from generation.backends.base import (
    STEP_DELIMITER,
    SYSTEM_PROMPT,
    StepRequest,
    StepResult,
    prefix_text,
    redact_url,
)
from generation.backends.openai_stream import OpenAIStream
from generation.backends.response_cache import ResponseCache
from generation.backends.retry import (
    Backoff,
    CircuitBreaker,
    CircuitOpen,
    FatalBackendError,
    retry_after_seconds,
)

CHAT_SYSTEM = SYSTEM_PROMPT + " Separate steps with a blank line."
QWEN_TEMPLATE = ("<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n"
                 "{question}<|im_end|>\n<|im_start|>assistant\n")


def completion_template(tokenizer: str) -> str:
    """The completions-mode prompt of a model whose template is not Qwen's: its tokenizer's own
    chat template (a local folder, or a hub name online) rendered as text around a
    `{question}` placeholder, the assistant turn open (e.g. the exported tiny models behind
    `vllm serve`, decision 85)."""
    import transformers  # lazy: only when a template is asked for

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer)
    text = tok.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                    {"role": "user", "content": "{question}"}],
                                   add_generation_prompt=True, tokenize=False)
    if "{question}" not in text:
        raise ValueError(f"{tokenizer}: its chat template dropped the question placeholder")
    return text


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


_LIMITS = ("max_tokens", "max_completion_tokens")


def context_room(e) -> int | None:
    """The step limit a server's context refusal leaves room for, or None when the 400 is not
    one (or the prompt alone fills the context). vLLM 0.32's server refuses a `max_tokens` over
    its whole context ("max_tokens=1024 cannot be greater than max_model_len=192") and clamps any
    smaller one to what the prompt leaves (so the context is the limit to ask again with); the
    OpenAI API names the prompt's share ("maximum context length is N tokens … (P in the
    messages, …)"). Asking again without a limit is no clamp: a completions server then
    writes its default 16 tokens (seen against the real server, decision 85)."""
    if getattr(e, "status_code", None) != 400:
        return None
    msg = str(e)
    m = re.search(r"max_(?:completion_)?tokens=\d+ cannot be greater than max_model_len=(\d+)",
                  msg)
    if m:
        return int(m.group(1))
    m = re.search(r"maximum context length is (\d+) tokens", msg)
    p = re.search(r"\((\d+) in the messages", msg)
    if m and p and int(m.group(1)) > int(p.group(1)):
        return int(m.group(1)) - int(p.group(1))
    return None


class OpenAIBackend:
    """A `generation.backends.base.Backend` over an OpenAI-compatible HTTP API.

    Args:
      model: model name on the server.
      base_url: server (None: the official API).
      api_key: the key (None: `OPENAI_API_KEY` from the environment; a server given by
        `base_url` that needs none gets "EMPTY").
      mode: "chat" or "completions".
      params: N for FLOPs accounting (0 for closed models).
      price: USD per 1M tokens, for spend reporting.
      confidence: "top1_prob" (API log-probabilities) or "max_logit" (server in raw_logits mode).
      concurrency: requests in flight.
      max_attempts: attempts per request (1 = no retry).
      backoff_base, backoff_max: seconds; delay = min(max, base·2^attempt)·U(0.5, 1.5).
      retry_after_max: cap on a server's `Retry-After`.
      timeout: seconds per HTTP request.
      breaker_threshold, breaker_cooldown: consecutive failed requests that open the circuit;
        seconds until a half-open probe.
      max_error_rate, min_requests: stop (`FatalBackendError`) once more than this share of at
        least `min_requests` requests has failed.
      preflight: check the server, key and model once before the first request (`check`).
      cache_path: SQLite file for the response cache (None: no cache).
      temperature, top_logprobs: sampling and log-probability settings (paper: 0.7, 5).
      stream: write each answer as one streaming request cut into steps (`astream`; None: in
        completions mode) instead of one request per step.
    """

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 mode: str = "chat", params: float = 0.0, price: costs.Price | None = None,
                 confidence: str = "top1_prob", concurrency: int = 8, max_attempts: int = 5,
                 backoff_base: float = 0.5, backoff_max: float = 8.0,
                 retry_after_max: float = 60.0, timeout: float = 120.0,
                 breaker_threshold: int = 10, breaker_cooldown: float = 30.0,
                 max_error_rate: float = 0.5, min_requests: int = 20, preflight: bool = True,
                 cache_path: str | Path | None = None, temperature: float = 0.7,
                 top_logprobs: int = 5, template: str = QWEN_TEMPLATE, seed: int = 0,
                 stream: bool | None = None):
        if mode not in ("chat", "completions"):
            raise ValueError(f"mode must be 'chat' or 'completions', got {mode!r}")
        if confidence not in ("top1_prob", "max_logit"):
            raise ValueError(f"confidence must be 'top1_prob' or 'max_logit', got {confidence!r}")
        self.name, self.params, self.mode = model, params, mode
        self.price = price or costs.DEFAULT_PRICES.get(model, costs.Price(0, 0, 0))
        self.confidence = confidence
        self.base_url = base_url
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY")
        if self.api_key is None:
            if base_url is None:
                raise FatalBackendError(f"model {model!r} on the OpenAI API needs a key: set "
                                        "OPENAI_API_KEY (or pass api_key)")
            self.api_key = "EMPTY"  # a local server (vllm serve, the tiny-model server)
        self.concurrency, self.max_attempts = concurrency, max_attempts
        self.timeout = timeout
        self.retry_after_max = retry_after_max
        self.breaker = CircuitBreaker(breaker_threshold, breaker_cooldown)
        self.max_error_rate, self.min_requests = max_error_rate, min_requests
        self._checked = not preflight
        self.cache = ResponseCache(cache_path) if cache_path else None
        self.temperature, self.top_logprobs, self.template = temperature, top_logprobs, template
        self.backoff = Backoff(backoff_base, backoff_max, seed)
        self.stats = {"requests": 0, "cache_hits": 0, "retries": 0, "failures": 0,
                      "context_clamps": 0, "streams": 0, "cancelled_streams": 0}
        # One streaming request per answer (decision 94): the default where the prompt
        # continues a prefix exactly (completions); a chat model is asked step by step.
        self.streaming = mode == "completions" if stream is None else bool(stream)
        self._loop_client: tuple | None = None  # (event loop, client, semaphore)
        self.failure_reasons: collections.Counter = collections.Counter()

    @property
    def where(self) -> str:
        return redact_url(self.base_url) or "the OpenAI API"  # messages never show secrets

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
        """StepResult from a raw response dict; raises ValueError on an invalid body: missing
        fields, null content, or no log-probabilities for generated text (asked for on every
        step request, and needed for the confidence feature)."""
        try:
            choice = resp["choices"][0]
            usage = resp.get("usage") or {}
            finish = choice.get("finish_reason") or "stop"
            eos = False
            if self.mode == "chat":
                text = choice["message"]["content"]
                if text is None:
                    raise ValueError("null message content")
                content = (choice.get("logprobs") or {}).get("content") or []
                tokens = [c["token"] for c in content]
                conf, sampled, top = [], [], []
                for c in content:
                    tops = sorted((t["logprob"] for t in (c.get("top_logprobs") or [])),
                                  reverse=True)
                    best = tops[0] if tops else c["logprob"]
                    conf.append(best if self.confidence == "max_logit" else math.exp(best))
                    sampled.append(float(c["logprob"]))
                    top.append(tops or [float(c["logprob"])])
            else:
                text = choice["text"]
                if text is None:
                    raise ValueError("null completion text")
                lp = choice.get("logprobs") or {}
                tokens = list(lp.get("tokens") or [])
                tops = lp.get("top_logprobs") or [{} for _ in tokens]
                chosen = lp.get("token_logprobs") or [None] * len(tokens)
                conf, sampled, top = [], [], []
                for cand, ch in zip(tops, chosen, strict=True):
                    vals = sorted((cand or {}).values(), reverse=True)
                    best = vals[0] if vals else (ch if ch is not None else -math.inf)
                    conf.append(best if self.confidence == "max_logit" else math.exp(best))
                    sampled.append(float(ch if ch is not None else best))
                    top.append(vals or [float(best)])
                # vLLM reports which stop ended a completion; None after "stop" means EOS.
                eos = finish == "stop" and "stop_reason" in choice and choice["stop_reason"] is None
            if text.strip() and not tokens:
                raise ValueError("no log-probabilities for the generated text")
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
            is_final=whole or eos or "\\boxed" in text or finish == "length",
            logprobs=sampled, top_logprobs=top)

    @staticmethod
    def _valid_chat(resp: dict) -> None:
        try:
            if resp["choices"][0]["message"]["content"] is None:
                raise ValueError("null message content")
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"malformed response body: {type(e).__name__}: {e}") from None

    # -- transport -----------------------------------------------------------------------------

    def _client(self, asynchronous: bool = True):
        import openai  # lazy: the SDK is only needed when this backend is used

        cls = openai.AsyncOpenAI if asynchronous else openai.OpenAI
        return cls(base_url=self.base_url, api_key=self.api_key, max_retries=0,
                   timeout=self.timeout)

    def _loop_state(self):
        """(client, semaphore) of the running event loop: one long-lived client per loop
        (connection pooling, keep-alive), made on first use."""
        loop = asyncio.get_running_loop()
        if self._loop_client is None or self._loop_client[0] is not loop:
            self._loop_client = (loop, self._client(), asyncio.Semaphore(self.concurrency))
        return self._loop_client[1], self._loop_client[2]

    async def aclose(self) -> None:
        """Close the running loop's long-lived client (a loop that ends with its run)."""
        if self._loop_client is not None and self._loop_client[0] is asyncio.get_running_loop():
            client, self._loop_client = self._loop_client[1], None
            await client.close()

    def _fatal(self, e: Exception) -> FatalBackendError | None:
        """The run-stopping failures, with the message that says what to fix."""
        import openai

        status = getattr(e, "status_code", None)
        if isinstance(e, openai.AuthenticationError | openai.PermissionDeniedError):
            return FatalBackendError(
                f"{self.where} refused the API key for model {self.name!r} ({status}: "
                f"{_msg(e)}): set OPENAI_API_KEY (or --api_key) to a key with access")
        if isinstance(e, openai.NotFoundError):
            return FatalBackendError(
                f"{self.where} answered 404 for model {self.name!r} ({_msg(e)}): check the model "
                "name and base URL in --models (or the preset)")
        return None

    def check(self) -> None:
        """Preflight, once: the server answers, accepts the key and knows the model
        (`GET /models`; a server without that route is let through). Raises
        `FatalBackendError` naming what to fix."""
        if self._checked:
            return
        import openai

        try:
            with self._client(asynchronous=False) as client:
                ids = [m.id for m in client.models.list()]
        except openai.APIConnectionError as e:
            raise FatalBackendError(f"cannot reach {self.where} for model {self.name!r} "
                                    f"({_msg(e)}): check the base URL in --models") from None
        except openai.APIStatusError as e:
            fatal = self._fatal(e)
            if fatal is not None and not isinstance(e, openai.NotFoundError):
                raise fatal from None
            ids = []  # no /models route: the first request will tell
        if ids and self.name not in ids:
            raise FatalBackendError(f"{self.where} does not serve model {self.name!r} (it serves "
                                    f"{sorted(ids)[:10]}): check --models")
        self._checked = True

    async def _send(self, client, body: dict, validate: Callable[[dict], object], key: str
                    ) -> dict:
        """One request under the one retry policy; returns the validated response body."""

        async def call(body):
            create = (client.chat.completions if "messages" in body
                      else client.completions).with_raw_response.create
            raw = await create(**body)
            resp = json.loads(raw.text)
            validate(resp)  # never cache an invalid body
            return resp

        return await self._attempts(body, call, key)

    async def _attempts(self, body: dict, call, key: str):
        """`await call(body)` under the one retry policy (backoff, Retry-After, the breaker,
        fatal errors, the context clamp)."""
        import openai

        retryable = (openai.RateLimitError, openai.APIConnectionError, openai.InternalServerError,
                     openai.ConflictError)
        last: Exception | None = None
        for attempt in range(self.max_attempts):
            if not self.breaker.allow():
                raise CircuitOpen(f"circuit open after {self.breaker.failures} consecutive "
                                  f"failed requests (last: {last})")
            hint = None
            try:
                resp = await call(body)
                self.breaker.record(True)
                return resp
            except openai.APIStatusError as e:
                fatal = self._fatal(e)
                if fatal is not None:
                    raise fatal from None
                room = context_room(e)
                limit = next((k for k in _LIMITS if k in body), None)
                if room is not None and limit is not None and room < body[limit]:
                    # the step limit does not fit the server's context: ask again, at once,
                    # with what the context leaves (decision 85)
                    body = {**body, limit: room}
                    self.stats["context_clamps"] += 1
                    continue
                if not isinstance(e, retryable) and e.status_code != 408:
                    self.breaker.record(True)  # the server answered: the request's own failure
                    raise  # (e.g. 400) is not retried
                last, hint = e, retry_after_seconds(e.response.headers, self.retry_after_max)
            except (*retryable, ValueError, json.JSONDecodeError) as e:
                last = e
            if attempt + 1 < self.max_attempts:
                self.stats["retries"] += 1
                await asyncio.sleep(self.backoff.delay(attempt, hint))
        self.breaker.record(False)
        raise RuntimeError(f"request {key}: gave up after {self.max_attempts} attempts: "
                           f"{type(last).__name__}: {last}")

    async def _request(self, client, sem, body: dict, validate, key: str) -> dict | Exception:
        """Cache, semaphore and accounting around `_send`; a per-request failure is returned
        (and counted), a fatal one raised."""
        ckey = self.cache_key(body)
        self.stats["requests"] += 1
        if self.cache is not None and (hit := self.cache.get(ckey)) is not None:
            try:
                validate(hit)
                self.stats["cache_hits"] += 1
                return hit
            except ValueError:
                pass  # an invalid body cached by an older version: ask again
        async with sem:
            try:
                resp = await self._send(client, body, validate, key)
            except FatalBackendError:
                raise
            except Exception as e:  # recorded per request; the run goes on
                self.stats["failures"] += 1
                self.failure_reasons[type(e).__name__] += 1
                self._check_error_rate()
                return e
        if self.cache is not None:
            self.cache.put(ckey, resp)
        return resp

    def _check_error_rate(self) -> None:
        n, f = self.stats["requests"], self.stats["failures"]
        if n >= self.min_requests and f > self.max_error_rate * n:
            raise FatalBackendError(
                f"{f} of {n} requests to {self.where} ({self.name!r}) failed "
                f"({dict(self.failure_reasons)}), above max_error_rate {self.max_error_rate}: "
                "stopping instead of recording failures")

    def summary(self) -> dict:
        """Request counts and failure reasons, for the run's summary and manifest."""
        return {**self.stats, "failure_reasons": dict(self.failure_reasons),
                "model": self.name, "base_url": redact_url(self.base_url)}

    async def _one(self, client, sem, req: StepRequest, whole: bool, max_tokens: int):
        body = self.request_body(req, whole, max_tokens)
        out = await self._request(client, sem, body, lambda r: self.parse(r, whole), req.key)
        if isinstance(out, Exception):
            return StepResult("", [], [], [], self.confidence, 0, 0, 0, "error", False,
                              error=f"request {req.key}: {type(out).__name__}: {out}")
        return self.parse(out, whole)

    async def agenerate(self, requests: Sequence[StepRequest], *, whole: bool = False,
                        max_tokens: int = 1024, long_lived: bool = True) -> list[StepResult]:
        """Step requests on the running loop, through its long-lived client (`long_lived`
        False: a client of this call only, closed after it — `generate`'s own loop)."""
        if not self._checked:
            await asyncio.to_thread(self.check)
        if long_lived:
            client, sem = self._loop_state()
            return list(await asyncio.gather(*(self._one(client, sem, r, whole, max_tokens)
                                               for r in requests)))
        sem, client = asyncio.Semaphore(self.concurrency), self._client()
        try:
            return list(await asyncio.gather(*(self._one(client, sem, r, whole, max_tokens)
                                               for r in requests)))
        finally:
            await client.close()

    def generate(self, requests: Sequence[StepRequest], *, whole: bool = False,
                 max_tokens: int = 1024) -> list[StepResult]:
        self.check()
        return asyncio.run(self.agenerate(requests, whole=whole, max_tokens=max_tokens,
                                          long_lived=False))

    def astream(self, answer) -> OpenAIStream:
        """The answer as one streaming request, cut into steps as tokens arrive (decision 94)."""
        return OpenAIStream(self, answer)

    async def open_stream(self, body: dict, key: str):
        """A streaming request under the retry policy (retried until its first byte: a
        failure after that fails the answer); returns the SDK's raw streamed response."""
        if not self._checked:
            await asyncio.to_thread(self.check)
        client, _ = self._loop_state()
        self.stats["requests"] += 1
        self.stats["streams"] += 1

        async def call(body):
            # The raw event stream: one json.loads per chunk, not an SDK model per token.
            api = client.chat.completions if "messages" in body else client.completions
            return await api.with_streaming_response.create(**body).__aenter__()

        try:
            return await self._attempts(body, call, key)
        except FatalBackendError:
            raise
        except Exception as e:
            self.stats["failures"] += 1
            self.failure_reasons[type(e).__name__] += 1
            self._check_error_rate()
            raise

    def chat_raw(self, messages: Sequence[list[dict]], *, max_tokens: int = 8,
                 temperature: float = 0.0, extra: dict | None = None) -> list[dict | None]:
        """Chat completions as response bodies (choices, usage, …), cached, under the same retry
        policy; None where a request failed (counted in `stats`). `extra`: more request fields
        (e.g. logprobs, top_logprobs)."""
        self.check()

        async def run():
            sem = asyncio.Semaphore(self.concurrency)
            client = self._client()
            try:
                bodies = [{"model": self.name, "messages": m, "temperature": temperature,
                           "max_completion_tokens": max_tokens, **(extra or {})}
                          for m in messages]
                outs = await asyncio.gather(*(self._request(client, sem, b, self._valid_chat,
                                                            f"chat[{i}]")
                                              for i, b in enumerate(bodies)))
                return [None if isinstance(o, Exception) else o for o in outs]
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


def _msg(e: Exception) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(e).splitlines()[0][:200]
