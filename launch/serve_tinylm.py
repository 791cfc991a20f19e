"""Serve the tiny models over the OpenAI wire protocol (for the OpenAI backend, or any client).

    python -m launch.serve_tinylm --port=8011 [--logprobs_mode=raw_logits]
    # models: tinylm-small, tinylm-large
"""

from __future__ import annotations

import uvicorn
from absl import flags

from generation.serving import asgi, tiny_server
from generation.tinylm import backend
from launch import common

_HOST = flags.DEFINE_string("host", "127.0.0.1", "Bind address.")
_PORT = flags.DEFINE_integer("port", 8011, "Port.")
_MODE = flags.DEFINE_enum("logprobs_mode", "logprobs", ["logprobs", "raw_logits"],
                          "Return log-probabilities or raw logits.")
_MAX_BODY = flags.DEFINE_integer("max_body_bytes", tiny_server.TinyServerConfig.max_body_bytes,
                                 "Largest request body.")
_MAX_CONCURRENT = flags.DEFINE_integer("max_concurrent", tiny_server.TinyServerConfig.max_concurrent,
                                       "Requests in flight (beyond: 429).")
_HEADER_TIMEOUT = flags.DEFINE_float("header_timeout", 10.0, "Seconds a connection may take to "
                                     "send a request head (beyond: closed).")
_MAX_CONNECTIONS = flags.DEFINE_integer("max_connections", 1024, "Open connections (beyond: a "
                                        "new one is closed at once).")
common.check_flags(port=(lambda v: 0 <= v < 65536, "a port"),
                   max_body_bytes=(common.positive, "≥ 1"),
                   max_concurrent=(common.positive, "≥ 1"),
                   header_timeout=(lambda v: v > 0, "> 0"),
                   max_connections=(common.positive, "≥ 1"))


def main(argv):
    del argv

    models = {b.name: b for b in (backend.load("small"), backend.load("large"))}
    app = tiny_server.make_app(models, _MODE.value, tiny_server.TinyServerConfig(
        max_body_bytes=_MAX_BODY.value, max_concurrent=_MAX_CONCURRENT.value))
    print(f"serving {sorted(models)} at http://{_HOST.value}:{_PORT.value}/v1", flush=True)
    uvicorn.Server(asgi.uvicorn_config(
        app, header_timeout_s=_HEADER_TIMEOUT.value, max_connections=_MAX_CONNECTIONS.value,
        host=_HOST.value, port=_PORT.value, timeout_keep_alive=30,
        timeout_graceful_shutdown=30)).run()


if __name__ == "__main__":
    common.run(main)
