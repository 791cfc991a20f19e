"""Stepwise generation, one room per concept (decision 89; `tests/test_layout.py` holds the arrows):

- `backends/` — the one backend interface, costs, and the vLLM and OpenAI-compatible backends;
- `traces/` — problems and datasets, answer checks, the step verifier, step features, trace trees;
- `tinylm/` — the embedded default's tiny models, their in-process engine, PRM and judge;
- `registry` — backends from specs (the one module that knows every implementation);
- `live/` — live routing: the engine, the rules, RSD/SpecReason scorers, the live comparison;
- `serving/` — the HTTP servers (routing server, tiny-model server) and the load generator;
- `main_job` — the main job's pipeline on the embedded default (`launch.experiment`).

Heavy clients (vLLM, the OpenAI SDK's network calls) are imported lazily inside the backends.
"""
