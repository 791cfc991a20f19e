"""jaxroute: policy-guided stepwise routing between small and large LLMs, in JAX.

Layers (BUILD_NOTES.md, "Layout"): `jaxroute.core` holds the math kernels and depends only on
jax, chex and numpy; the other modules of this package (networks, learners, trace trees, offline
environment, baselines, evaluation, export) add flax, optax and orbax. LLM clients live in the
`generation` package, entry points in `launch`.

Nothing is imported here, so `import jaxroute.core` stays light; import the submodules you use
(`from jaxroute import trainer`).
"""

__all__ = [
    "baselines",
    "core",
    "durable",
    "env",
    "evaluate",
    "export",
    "networks",
    "records",
    "synthetic",
    "tcpo",
    "trace",
    "trainer",
    "types",
]
