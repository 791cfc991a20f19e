"""The router's policy and its two critics: small flax MLPs over normalised step features.

Seed Sec. 5.1: "three-layer neural networks with 64 hidden units per layer" — read as three weight
layers, i.e. two hidden layers of 64 and the output layer (CCPO's reading; configurable via
`hidden`, e.g. `(64, 64, 64)` for three hidden layers). Inputs are the step features, standardised with fixed
statistics (`Normalizer`), concatenated with a one-hot of the current model (the policy "tracks the
current model M_k", Sec. 3.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxroute.core import threshold
from jaxroute.errors import InputError


class Normalizer(NamedTuple):
    """Fixed feature standardisation, saved with the router. Shapes `[D]`."""

    mean: jax.Array
    std: jax.Array

    @classmethod
    def identity(cls, dim: int) -> Normalizer:
        return cls(jnp.zeros(dim, jnp.float32), jnp.ones(dim, jnp.float32))

    @classmethod
    def fit(cls, features: jax.Array, mask: jax.Array | None = None) -> Normalizer:
        """Statistics of `[..., D]` features over entries where `mask` `[...]` is true."""
        x = features.reshape(-1, features.shape[-1])
        w = jnp.ones(x.shape[0]) if mask is None else mask.reshape(-1).astype(jnp.float32)
        n = jnp.maximum(w.sum(), 1.0)
        mean = (w[:, None] * x).sum(0) / n
        var = (w[:, None] * (x - mean[None]) ** 2).sum(0) / n
        # A constant feature (std 0) would divide by zero; leave it centred but unscaled.
        std = jnp.where(var > 1e-12, jnp.sqrt(var), 1.0)
        return cls(mean.astype(jnp.float32), std.astype(jnp.float32))

    def __call__(self, features: jax.Array) -> jax.Array:
        shape = (1,) * (features.ndim - 1) + (-1,)
        return (features - self.mean.reshape(shape)) / self.std.reshape(shape)


class MLP(nn.Module):
    """tanh MLP; the last layer is initialised small so a fresh policy is near-uniform."""

    hidden: Sequence[int]
    out: int
    out_scale: float = 0.01

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for h in self.hidden:
            x = nn.tanh(nn.Dense(h, kernel_init=nn.initializers.orthogonal(jnp.sqrt(2.0)))(x))
        return nn.Dense(self.out, kernel_init=nn.initializers.orthogonal(self.out_scale))(x)


class RouterNetworks(NamedTuple):
    """Pure apply functions for a K-model router with D features."""

    num_models: int
    num_features: int
    policy: MLP
    critic: MLP

    def inputs(self, normalizer: Normalizer, obs: jax.Array, model: jax.Array) -> jax.Array:
        """`[..., D + K]` network input from raw features `[..., D]` and model index `[...]`."""
        return jnp.concatenate(
            [normalizer(obs), jax.nn.one_hot(model, self.num_models, dtype=obs.dtype)], axis=-1
        )

    def logits(self, params, normalizer: Normalizer, obs, model) -> jax.Array:
        """Unmasked policy logits `[..., K]`."""
        return self.policy.apply(params, self.inputs(normalizer, obs, model))

    def log_probs(self, params, normalizer: Normalizer, obs, model) -> jax.Array:
        """log π(·|o) `[..., K]`, NEG_INF on actions below the current model."""
        valid = threshold.valid_actions(model, self.num_models)
        return threshold.masked_log_softmax(self.logits(params, normalizer, obs, model), valid)

    def value(self, params, normalizer: Normalizer, obs, model) -> jax.Array:
        """Critic value `[...]`."""
        return self.critic.apply(params, self.inputs(normalizer, obs, model))[..., 0]


def make_networks(
    num_models: int, num_features: int, hidden: Sequence[int] = (64, 64)
) -> RouterNetworks:
    if num_models < 2:
        raise InputError(f"routing needs at least 2 models, got num_models={num_models}")
    if num_features < 1:
        raise InputError(f"num_features must be ≥ 1, got {num_features}")
    return RouterNetworks(
        num_models=num_models,
        num_features=num_features,
        policy=MLP(tuple(hidden), num_models, out_scale=0.01),
        critic=MLP(tuple(hidden), 1, out_scale=1.0),
    )


def init_params(networks: RouterNetworks, key: jax.Array):
    """(policy, cost critic, correctness critic) parameters from one key."""
    x = jnp.zeros((1, networks.num_features + networks.num_models), jnp.float32)
    kp, kc, kz = jax.random.split(key, 3)
    return (
        networks.policy.init(kp, x),
        networks.critic.init(kc, x),
        networks.critic.init(kz, x),
    )
