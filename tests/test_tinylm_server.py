"""The tiny-model HTTP server: every field honoured or refused in OpenAI's error shape, limits
that protect other clients (decision 80), on the shared Starlette/uvicorn stack."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.parse

import jax
import jax.numpy as jnp
import pytest

from generation.backends.base import StepRequest
from generation.serving.tiny_server import TinyLMServer, TinyServerConfig
from generation.tinylm.backend import TinyLMBackend
from generation.tinylm.model import LMConfig, TinyLM, Tokenizer

QUESTION = "Ada has 3 coins. How many?"


@pytest.fixture(scope="module")
def backend():
    tok = Tokenizer()
    cfg = LMConfig(vocab=tok.vocab_size, layers=1, d_model=32, heads=4, max_len=128)
    params = TinyLM(cfg).init(jax.random.PRNGKey(2), jnp.zeros((1, 4), jnp.int32))
    return TinyLMBackend("tiny", cfg, params, temperature=0.7)


@pytest.fixture(scope="module")
def server(backend):
    with TinyLMServer({"tiny": backend}, config=TinyServerConfig(max_body_bytes=4096,
                                                                 read_timeout_s=0.5)) as srv:
        yield srv


class Reply:
    def __init__(self, status: int, headers, data: bytes):
        self.status_code, self.headers, self.text = status, headers, data.decode()

    def json(self):
        return json.loads(self.text)


def call(method: str, url: str, body: bytes | None = None) -> Reply:
    """One raw HTTP request (stdlib: the bytes sent are exactly these)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.request(method, u.path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def chat(server, **fields):
    body = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], **fields}
    return call("POST", server.base_url + "/chat/completions", json.dumps(body).encode())


def assert_error(r: Reply, status: int, *words: str, param: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]  # OpenAI's shape: message, type, param, code
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    for w in words:
        assert w in err["message"], err["message"]
    if param is not None:
        assert err["param"] == param


def test_answers_as_the_backend_does(server, backend):
    r = chat(server, seed=4, max_tokens=12, temperature=0.7, n=1, stream=False, top_p=1,
             stop=["\n\n"])
    assert r.status_code == 200, r.text
    direct = backend.generate([StepRequest("d", QUESTION, (), None, 4)], max_tokens=12)[0]
    assert r.json()["choices"][0]["message"]["content"] == direct.text
    assert r.json()["usage"]["completion_tokens"] == direct.completion_tokens


@pytest.mark.parametrize("chat_mode", [False, True])
def test_a_streamed_answer_is_the_whole_answer_token_by_token(server, chat_mode):
    """`stream: true` (what the routing engine's answer streams read, decision 94) through the
    openai SDK: the chunks join to the plain answer, each token with its log-probabilities, the
    finish reason last and the usage when asked for."""
    import openai

    c = openai.OpenAI(base_url=server.base_url, api_key="x")
    if chat_mode:
        ask = dict(messages=[{"role": "user", "content": QUESTION}], logprobs=True,
                   top_logprobs=3)
        create = c.chat.completions.create
    else:
        ask = dict(prompt=f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n",
                   logprobs=3)
        create = c.completions.create
    whole = create(model="tiny", seed=5, max_tokens=40, **ask)
    chunks = list(create(model="tiny", seed=5, max_tokens=40, stream=True,
                         stream_options={"include_usage": True}, **ask))
    body = [ch for ch in chunks if ch.choices]
    if chat_mode:
        text = "".join(ch.choices[0].delta.content or "" for ch in body)
        assert text.strip("\n") == whole.choices[0].message.content
        lps = [e.logprob for ch in body if ch.choices[0].logprobs
               for e in ch.choices[0].logprobs.content]
        assert lps == [e.logprob for e in whole.choices[0].logprobs.content][:len(lps)]
    else:
        text = "".join(ch.choices[0].text for ch in body)
        assert text.strip("\n") == whole.choices[0].text
        assert all(len(ch.choices[0].logprobs.tokens) == 1 for ch in body[:-1])
    assert body[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_huge_max_tokens_is_clamped_to_the_context(server, backend):
    """Regression: buffers were sized for 1e9 tokens before the clamp, under the global lock."""
    r = chat(server, max_tokens=1e9, seed=1)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= backend.cfg.max_len
    with pytest.raises(ValueError, match="max_tokens"):
        backend.generate([StepRequest("x", QUESTION, (), None)], max_tokens=0)


@pytest.mark.parametrize("fields, status, words, param", [
    ({"temperature": 0.2}, 400, ["'temperature' must be 0.7"], "temperature"),
    ({"n": 2}, 400, ["'n' must be 1"], "n"),
    ({"stream": "yes"}, 400, ["'stream' must be true or false"], "stream"),
    ({"top_p": 0.5}, 400, ["'top_p'"], "top_p"),
    ({"stop": ["x"]}, 400, ["'stop' may only be"], "stop"),
    ({"frequency_penalty": 1}, 400, ["unsupported field 'frequency_penalty'"],
     "frequency_penalty"),
    ({"max_tokens": "many"}, 400, ["'max_tokens' must be an integer"], "max_tokens"),
    ({"max_tokens": -3}, 400, ["'max_tokens' must be in"], "max_tokens"),
    ({"top_logprobs": 99, "logprobs": True}, 400, ["'top_logprobs' must be in"], "top_logprobs"),
    ({"logprobs": "yes"}, 400, ["'logprobs' must be true or false"], "logprobs"),
    ({"model": "gpt-9"}, 404, ["'gpt-9' not found"], "model"),
    ({"model": 3}, 400, ["not found"], "model"),
    ({"messages": "hi"}, 400, ["'messages' must be a non-empty list"], "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, ["no user message"], "messages"),
])
def test_every_bad_field_is_refused_by_name(server, fields, status, words, param):
    assert_error(chat(server, **fields), status, *words, param=param)


def test_bad_bodies_get_errors_not_dropped_connections(server):
    url = server.base_url + "/chat/completions"
    assert_error(call("POST", url, b"\xff\xfe{}"), 400, "UTF-8")
    assert_error(call("POST", url, b"{not json"), 400, "not JSON")
    assert_error(call("POST", url, b"[1, 2]"), 400, "JSON object")
    assert_error(call("POST", url, b"{" + b" " * 5000 + b"}"), 413, "4096")
    c = call("POST", server.base_url + "/completions", b'{"model": "tiny", "prompt": 7}')
    assert_error(c, 400, "'prompt' must be a string", param="prompt")
    assert_error(call("GET", server.base_url + "/nowhere"), 404, "/v1/nowhere")
    assert_error(call("DELETE", server.base_url + "/models"), 405, "DELETE")
    assert call("GET", server.base_url + "/models").json()["data"][0]["id"] == "tiny"


def test_a_prompt_beyond_the_context_is_a_400(server):
    r = chat(server, messages=[{"role": "user", "content": "7 + " * 200}])
    assert_error(r, 400, "exceeds the tiny model's context")


def test_a_slow_body_times_out_and_never_holds_the_slot(backend):
    """A client that never finishes its body gets 408 after the read timeout; meanwhile it holds
    no admission slot (one is taken only with a whole body in hand, decision 90), so another
    client's request is served even with a single slot."""
    cfg = TinyServerConfig(max_concurrent=1, read_timeout_s=1.0)
    with TinyLMServer({"tiny": backend}, config=cfg) as srv:
        slow = socket.create_connection((srv.host, srv.port))
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mo")
        time.sleep(0.3)
        assert chat(srv, max_tokens=4).status_code == 200
        slow.settimeout(10)
        reply = slow.recv(4096).decode()
        slow.close()
        assert reply.startswith("HTTP/1.1 408") and '"code":408' in reply.replace(" ", "")
        assert chat(srv, max_tokens=4).status_code == 200  # the slot is free again


def test_an_integer_python_cannot_read_is_a_400(backend):
    """Regression: a 5000-digit integer (above Python's 4300-digit conversion limit) in a body
    was a 500 with a traceback in the log (decision 90)."""
    body = ('{"model": "tiny", "seed": ' + "9" * 5000 + ', "messages": [{"role": "user", '
            '"content": "1 + 1?"}]}').encode()
    with TinyLMServer({"tiny": backend}) as srv:
        r = call("POST", srv.base_url + "/chat/completions", body)
    assert r.status_code == 400 and "cannot read" in r.json()["error"]["message"]
    assert len(r.text) < 1000  # the message quotes a bounded part of the value
