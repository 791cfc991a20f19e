"""jaxroute: policy-guided stepwise routing between small and large LLMs, in JAX.

Layers (docs/design.md): `jaxroute.core` holds the math kernels and depends only on jax, chex and
numpy; the other modules of this package (networks, the learner interface and its two learners,
trace trees, offline environment, baselines, evaluation, export) add flax, optax and orbax. LLM
clients live in the `generation` package, entry points in `launch`.

Nothing is imported here, so `import jaxroute.core` stays light; import the submodules you use
(`from jaxroute import trainer`).
"""

__all__ = [
    "baselines",
    "core",
    "durable",
    "env",
    "evaluate",
    "exact",
    "export",
    "learner",
    "networks",
    "records",
    "references",
    "suite",
    "synthetic",
    "tcpo",
    "trace",
    "trainer",
    "types",
]
