"""The answer-check worker: `python -m generation.traces.answer_worker`. Reads one JSON check per line
on stdin, writes one JSON verdict per line on stdout; exits when stdin closes (its parent is
gone). Imports only math-verify — never the caller's main module, JAX or the models.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from generation.traces.answers import verify

    print("ready", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        try:
            out = {"verdict": verify(job["gold"], job["pred"], job["dataset"], job["timeout"])}
        except Exception as e:  # an unparseable gold answer, a math-verify failure
            out = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
