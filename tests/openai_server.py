"""A real HTTP server on loopback that speaks the OpenAI wire protocol (chat and completions),
with scripted faults. For tests only: it answers "What is A+B?" step by step."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _answer(prompt_text: str, question: str, stop: bool) -> str:
    a, b = map(int, re.findall(r"\d+", question)[:2])
    done = prompt_text.count("Step ")
    if done < 2:
        step = f"Step {done + 1}: look at {a} and {b}."
        return step + ("\n\nmore text after the stop" if stop else "")
    return f"So {a}+{b} = {a + b}, \\boxed{{{a + b}}}"


class FakeOpenAI(ThreadingHTTPServer):
    """`api_key`: when set, every request must carry `Authorization: Bearer <api_key>` (else
    401, as the real API answers). `models`: the ids GET /v1/models lists (None: the route is
    missing, 404 — some servers have none)."""

    daemon_threads = True

    def __init__(self, api_key: str | None = None, models: list[str] | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        # Consumed one per request: "429", "500", "400", "401", "404", "timeout", "malformed",
        # "nologprobs" (200 without the log-probabilities asked for), "nullcontent",
        # "retry-after:<s>" (429 with a Retry-After header).
        self.faults: list[str] = []
        self.api_key, self.models = api_key, models
        self.auth_headers: list[str | None] = []
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.delay = 2.0  # seconds for a "timeout" fault
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _send(self, code: int, body: bytes, ctype="application/json"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        srv: FakeOpenAI = self.server  # type: ignore[assignment]
        got = self.headers.get("Authorization")
        with srv.lock:
            srv.auth_headers.append(got)
        if srv.api_key is not None and got != f"Bearer {srv.api_key}":
            err = {"error": {"message": "Incorrect API key provided", "type":
                             "invalid_request_error", "code": "invalid_api_key"}}
            self._send(401, json.dumps(err).encode())
            return False
        return True

    def do_GET(self):  # noqa: N802
        srv: FakeOpenAI = self.server  # type: ignore[assignment]
        if not self._authorized():
            return None
        if self.path.rstrip("/").endswith("/models") and srv.models is not None:
            data = [{"id": m, "object": "model", "owned_by": "test"} for m in srv.models]
            return self._send(200, json.dumps({"object": "list", "data": data}).encode())
        return self._send(404, json.dumps({"error": {"message": "no route"}}).encode())

    def do_POST(self):  # noqa: N802
        srv: FakeOpenAI = self.server  # type: ignore[assignment]
        if not self._authorized():
            return None
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.requests.append(body)
            fault = srv.faults.pop(0) if srv.faults else None
        if fault == "timeout":
            time.sleep(srv.delay)
        if fault and fault.startswith("context:"):  # a context refusal in the server's words
            err = {"error": {"message": fault.split(":", 1)[1], "type": "BadRequestError",
                             "code": 400}}
            return self._send(400, json.dumps(err).encode())
        if fault in ("429", "500", "400", "401", "404"):
            err = {"error": {"message": f"injected {fault}", "type": "test", "code": fault}}
            return self._send(int(fault), json.dumps(err).encode())
        if fault and fault.startswith("retry-after:"):
            err = json.dumps({"error": {"message": "slow down", "type": "test"}}).encode()
            self.send_response(429)
            self.send_header("Content-Type", "application/json")
            self.send_header("Retry-After", fault.split(":", 1)[1])
            self.send_header("Content-Length", str(len(err)))
            self.end_headers()
            self.wfile.write(err)
            return None
        if fault == "malformed":
            return self._send(200, b'{"id": "x", "choices": [{"index": 0')
        if fault == "eos":  # vLLM: ended by EOS (stop_reason null), no \boxed{}
            resp = {"id": "cmpl-e", "object": "text_completion", "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop", "stop_reason": None,
                                 "text": "The end", "logprobs": {
                                     "tokens": ["The", " end"], "token_logprobs": [-0.1, -0.1],
                                     "top_logprobs": [{"The": -0.1}, {" end": -0.1}],
                                     "text_offset": [0, 3]}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}
            return self._send(200, json.dumps(resp).encode())
        chat = self.path.endswith("/chat/completions")
        if chat and body["messages"][-1]["content"].startswith("Look only at the last step"):
            return self._judge(body)
        if chat and body["messages"][-1]["content"].startswith("Task: Determine"):
            last = body["messages"][-1]["content"].split("Last step:\n")[1]
            text = "incorrect" if "wrong" in last else "Correct."
        elif chat:
            user = body["messages"][-1]["content"]
            question = user.split("\n")[1]
            text = _answer(user, question, "stop" in body)
        else:
            prompt = body["prompt"]
            question = prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
            text = _answer(prompt.split("assistant\n")[-1], question, "stop" in body)
        if "stop" in body:
            text = text.split("\n\n")[0]
        toks = text.split(" ")
        lps = [-0.05 if not any(c.isdigit() for c in t) else -0.7 for t in toks]
        usage = {"prompt_tokens": 50 + len(str(body)) // 20, "completion_tokens": len(toks),
                 "total_tokens": 0, "prompt_tokens_details": {"cached_tokens": 16}}
        finish = "stop"
        if chat:
            content = [{"token": t, "bytes": None, "logprob": lp,
                        "top_logprobs": [{"token": t, "bytes": None, "logprob": lp},
                                         {"token": "x", "bytes": None, "logprob": -3.0}]}
                       for t, lp in zip(toks, lps, strict=True)]
            if fault == "nologprobs":
                content = None
            resp = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": finish,
                                 "message": {"role": "assistant",
                                             "content": None if fault == "nullcontent" else text},
                                 "logprobs": {"content": content}}], "usage": usage}
        else:
            resp = {"id": "cmpl-1", "object": "text_completion", "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": finish, "text": text,
                                 # vLLM names the stop string that ended a completion
                                 "stop_reason": "\n\n" if "stop" in body else None,
                                 "logprobs": {"tokens": toks, "token_logprobs": lps,
                                              "top_logprobs": [{t: lp, "x": -3.0} for t, lp in
                                                               zip(toks, lps, strict=True)],
                                              "text_offset": [0] * len(toks)}}],
                    "usage": usage}
        self._send(200, json.dumps(resp).encode())

    def _judge(self, body):
        """A judge: one digit, top_logprobs over digits peaked at 2 (a step with "wrong") or 8."""
        import math

        last = body["messages"][-2]["content"].split("\n\n")[-1]
        peak = 2 if "wrong" in last else 8
        logits = {str(d): -abs(d - peak) for d in range(10)}
        z = math.log(sum(math.exp(v) for v in logits.values()))
        top = sorted(({"token": t, "bytes": None, "logprob": v - z} for t, v in logits.items()),
                     key=lambda x: -x["logprob"])[:body.get("top_logprobs", 0)]
        content = [{"token": str(peak), "bytes": None, "logprob": top[0]["logprob"],
                    "top_logprobs": top}] if body.get("logprobs") else None
        resp = {"id": "chatcmpl-j", "object": "chat.completion", "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "length",
                             "message": {"role": "assistant", "content": str(peak)},
                             "logprobs": {"content": content}}],
                "usage": {"prompt_tokens": 40, "completion_tokens": 1, "total_tokens": 41,
                          "prompt_tokens_details": {"cached_tokens": 0}}}
        self._send(200, json.dumps(resp).encode())
