"""jaxroute: policy-guided stepwise routing between small and large LLMs, in JAX.

Layers (docs/design.md): `jaxroute.core` holds the math kernels and depends only on jax, chex and
numpy; the other modules of this package (networks, the learner interface and its two learners,
the guarantee, trace trees, offline environment, baselines, evaluation, export) add flax, optax and orbax. LLM
clients live in the `generation` package, entry points in `launch`.

Nothing is imported here, so `import jaxroute.core` stays light; import the submodules you use
(`from jaxroute import trainer`).
"""

__all__ = [
    "accounting",
    "baselines",
    "core",
    "durable",
    "env",
    "errors",
    "evaluate",
    "exact",
    "export",
    "guarantee",
    "learner",
    "networks",
    "records",
    "references",
    "stats",
    "suite",
    "synthetic",
    "tcpo",
    "trace",
    "traceset",
    "trainer",
    "types",
    "validity",
]
