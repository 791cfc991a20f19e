"""One answer as one streaming request to an OpenAI-compatible server (decision 94): the raw
event stream read chunk by chunk, cut into steps by `streams.StepCutter` as it arrives, and
closed on escalation (`OpenAIBackend.astream` makes them)."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from typing import Any

from generation.backends import streams
from generation.backends.base import StepResult
from generation.backends.retry import FatalBackendError
from generation.backends.streams import Token


def _chunk_tokens(chunk: dict, chat: bool, confidence: str) -> tuple[list[Token], str]:
    """The tokens of one streamed chunk (with their log-probabilities) and its text."""
    choices = chunk.get("choices") or []
    if not choices:
        return [], ""
    c = choices[0]
    out = []
    if chat:
        text = (c.get("delta") or {}).get("content") or ""
        for e in ((c.get("logprobs") or {}).get("content") or []):
            tops = sorted((t["logprob"] for t in (e.get("top_logprobs") or [])), reverse=True)
            tops = tops or [float(e["logprob"])]
            out.append(Token(e["token"], tops[0] if confidence == "max_logit"
                             else math.exp(tops[0]), float(e["logprob"]), tops))
    else:
        text = c.get("text") or ""
        lp = c.get("logprobs") or {}
        tops_all = lp.get("top_logprobs") or [{} for _ in lp.get("tokens") or []]
        chosen = lp.get("token_logprobs") or [None] * len(lp.get("tokens") or [])
        for tok, cand, ch in zip(lp.get("tokens") or [], tops_all, chosen, strict=True):
            vals = sorted((cand or {}).values(), reverse=True)
            best = vals[0] if vals else (ch if ch is not None else -math.inf)
            out.append(Token(tok, best if confidence == "max_logit" else math.exp(best),
                             float(ch if ch is not None else best), vals or [float(best)]))
    if text and not out:
        raise ValueError("no log-probabilities for the streamed text")
    if out and "".join(t.text for t in out) != text:
        # The chunk's text is what the answer says (special tokens such as EOS left out, as
        # in a whole response); the token strings may differ: the text goes to the last token.
        for t in out[:-1]:
            t.text = ""
        out[-1].text = text
    return out, text


class OpenAIStream:
    """One answer as one streaming request (`streams.AnswerStream`): chunks are cut into steps
    by `streams.StepCutter` as they arrive; `close()` closes the HTTP response — a vLLM server
    aborts the request when its client disconnects (checked against the real server in
    `tests/test_real_engine.py`) — and returns what was written past the last step handed over.
    The request's prompt tokens are known from the usage chunk at the stream's end: the final
    step carries them (a cancelled stream's are not reported)."""

    def __init__(self, backend: Any, answer):  # an `openai_backend.OpenAIBackend`
        self.be, self.a = backend, answer
        self.cutter, self.ready = streams.StepCutter(), collections.deque()
        self.resp, self.it, self.ended = None, None, False
        self.finish, self.eos, self.usage = "stop", False, {}

    async def next(self) -> StepResult | None:
        be = self.be
        while not self.ready:
            if self.ended:
                return None
            try:
                if self.resp is None:
                    body = be.request_body(self.a.request, True, self.a.limit(stream=True))
                    body.update(stream=True, stream_options={"include_usage": True})
                    self.resp = await be.open_stream(body, self.a.request.key)
                    self.it = self.resp.iter_lines().__aiter__()
                line = await self.it.__anext__()
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event names
                data = line[5:].strip()
                if data == "[DONE]":
                    raise StopAsyncIteration
                chunk = json.loads(data)
                if isinstance(chunk, dict) and chunk.get("error"):
                    raise ValueError(f"error event mid-stream: {chunk['error']}")
                self._feed(chunk)
            except StopAsyncIteration:
                self._end()
            except FatalBackendError:
                raise
            except Exception as e:  # a failure mid-stream fails this answer
                self.ended = True
                return streams.error_result(f"request {self.a.request.key}: "
                                            f"{type(e).__name__}: {e}", be.confidence)
        return self.ready.popleft()

    def _feed(self, chunk: dict) -> None:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        tokens, _ = _chunk_tokens(chunk, self.be.mode == "chat", self.be.confidence)
        for t in tokens:
            cut = self.cutter.feed(t)
            if cut is not None:
                self.ready.append(streams.step_result(*cut, self.be.confidence, finish="stop",
                                                      eos=False))
        for c in chunk.get("choices") or []:
            if c.get("finish_reason"):
                self.finish = c["finish_reason"]
                # vLLM names the stop that ended a completion; None after "stop" means EOS
                self.eos = self.finish == "stop" and c.get("stop_reason") is None

    def _end(self) -> None:
        self.ended = True
        tokens, text = self.cutter.rest()
        details = self.usage.get("prompt_tokens_details") or {}
        r = streams.step_result(tokens, text, self.be.confidence, finish=self.finish,
                                eos=self.eos, last=True,
                                prompt_tokens=int(self.usage.get("prompt_tokens") or 0),
                                cached_tokens=int(details.get("cached_tokens") or 0))
        if tokens or not self.ready:
            self.ready.append(r)
        elif self.ready:  # the stream ended right after a cut: that step is the last
            last = self.ready.pop()
            self.ready.append(dataclasses.replace(
                last, is_final=True, finish_reason=r.finish_reason,
                prompt_tokens=r.prompt_tokens, cached_tokens=r.cached_tokens))

    async def close(self) -> StepResult | None:
        """Cancel the request if it is still writing; the tokens written past the last step
        handed over, as a piece to pay for."""
        left = [t for r in self.ready for t in r.tokens]
        spare = list(self.cutter.tokens)
        if not self.ended and self.resp is not None:
            self.be.stats["cancelled_streams"] += 1
            await self.resp.close()
        self.ended = True
        self.ready.clear()
        n = len(left) + len(spare)
        if not n:
            return None
        return StepResult("", [], left + [t.text for t in spare], [], self.be.confidence, 0,
                          0, n, "stop", False)
