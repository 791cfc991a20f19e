"""Serve the tiny models over the OpenAI wire protocol (for the OpenAI backend, or any client).

    python -m launch.serve_tinylm --port=8011 [--logprobs_mode=raw_logits]
    # models: tinylm-small, tinylm-large
"""

from __future__ import annotations

import time

from absl import app, flags

from generation.tinylm import backend
from generation.tinylm.server import TinyLMServer

_HOST = flags.DEFINE_string("host", "127.0.0.1", "Bind address.")
_PORT = flags.DEFINE_integer("port", 8011, "Port.")
_MODE = flags.DEFINE_enum("logprobs_mode", "logprobs", ["logprobs", "raw_logits"],
                          "Return log-probabilities or raw logits.")


def main(argv):
    del argv
    models = {b.name: b for b in (backend.load("small"), backend.load("large"))}
    with TinyLMServer(models, _HOST.value, _PORT.value, _MODE.value) as srv:
        print(f"serving {sorted(models)} at {srv.base_url}")
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    app.run(main)
