"""Router checkpoints for serving: policy parameters, κ, feature spec and normaliser (orbax + JSON).

Layout of an exported router folder:

    router.json      metadata: schema, feature names, models, α, κ (deployed and online),
                     network shape, cost model, provenance
    params/          orbax PyTree checkpoint of {"policy": ..., "norm_mean": [D], "norm_std": [D]}

`load_router(path, feature_names=...)` refuses a router whose feature spec differs from the
caller's, and returns a `Router` whose `decide(features, model)` is eq. 6, jitted.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxroute import networks as nets_lib
from jaxroute.core import threshold
from jaxroute.durable import atomic_write_text

ROUTER_SCHEMA = 1


class RouterSpecError(ValueError):
    """The router's feature spec or models do not match what the caller generates."""


@dataclasses.dataclass
class Router:
    networks: nets_lib.RouterNetworks
    policy_params: Any
    normalizer: nets_lib.Normalizer
    kappa: float
    meta: dict

    def __post_init__(self):
        def decide(params, mean, std, kappa, features, model):
            norm = nets_lib.Normalizer(mean, std)
            probs = jnp.exp(self.networks.log_probs(params, norm, features, model))
            return threshold.route(probs, kappa, model)

        self._decide = jax.jit(decide)

        def escalation_prob(params, mean, std, features, model):
            norm = nets_lib.Normalizer(mean, std)
            return jnp.exp(self.networks.log_probs(params, norm, features, model))

        self._probs = jax.jit(escalation_prob)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(self.meta["feature_names"])

    def decide(self, features, model) -> jax.Array:
        """Eq. 6: the model for the next segment, `[...]` int, from features `[..., D]` and the
        current model `[...]`."""
        return self._decide(self.policy_params, self.normalizer.mean, self.normalizer.std,
                            jnp.float32(self.kappa), jnp.asarray(features, jnp.float32),
                            jnp.asarray(model, jnp.int32))

    def log_probs(self, features, model) -> jax.Array:
        """log π(·|o) `[..., K]` (traceable; used by the offline evaluation)."""
        return self.networks.log_probs(self.policy_params, self.normalizer, features, model)

    def probs(self, features, model) -> jax.Array:
        """π(·|o) `[..., K]`."""
        return self._probs(self.policy_params, self.normalizer.mean, self.normalizer.std,
                           jnp.asarray(features, jnp.float32), jnp.asarray(model, jnp.int32))


def export_router(path: str | Path, networks: nets_lib.RouterNetworks, policy_params,
                  normalizer: nets_lib.Normalizer, kappa: float, *, feature_names: Sequence[str],
                  model_names: Sequence[str], alpha: float, hidden: Sequence[int],
                  extra: dict | None = None) -> Path:
    """Write a router folder (overwrites an existing one at `path`)."""
    path = Path(path).absolute()
    if len(feature_names) != networks.num_features:
        raise RouterSpecError(f"{len(feature_names)} feature names for a policy over "
                              f"{networks.num_features} features")
    path.mkdir(parents=True, exist_ok=True)
    tree = {"policy": policy_params, "norm_mean": np.asarray(normalizer.mean),
            "norm_std": np.asarray(normalizer.std)}
    with ocp.PyTreeCheckpointer() as ckpt:
        ckpt.save(path / "params", tree, force=True)
    meta = {
        "schema_version": ROUTER_SCHEMA,
        "feature_names": list(feature_names),
        "model_names": list(model_names),
        "num_models": networks.num_models,
        "hidden": list(hidden),
        "alpha": float(alpha),
        "kappa": float(kappa),
        **(extra or {}),
    }
    atomic_write_text(path / "router.json", json.dumps(meta, indent=2, default=str) + "\n")
    return path


def load_router(path: str | Path, feature_names: Sequence[str] | None = None,
                model_names: Sequence[str] | None = None) -> Router:
    """Load an exported router; check it against the caller's feature spec and model pair."""
    path = Path(path).absolute()
    meta_file = path / "router.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{meta_file}: not found (is {path} an exported router?)")
    meta = json.loads(meta_file.read_text())
    if meta.get("schema_version") != ROUTER_SCHEMA:
        raise RouterSpecError(f"{meta_file}: schema_version {meta.get('schema_version')} is not "
                              f"supported (expected {ROUTER_SCHEMA})")
    if feature_names is not None and list(feature_names) != meta["feature_names"]:
        raise RouterSpecError(
            f"{meta_file}: router was trained on features {meta['feature_names']}, but the "
            f"generator emits {list(feature_names)}")
    if model_names is not None and list(model_names) != meta["model_names"]:
        raise RouterSpecError(f"{meta_file}: router was trained for models {meta['model_names']}"
                              f", not {list(model_names)}")
    networks = nets_lib.make_networks(meta["num_models"], len(meta["feature_names"]),
                                      tuple(meta["hidden"]))
    template_policy, _, _ = nets_lib.init_params(networks, jax.random.PRNGKey(0))
    d = len(meta["feature_names"])
    template = {"policy": template_policy, "norm_mean": np.zeros(d, np.float32),
                "norm_std": np.ones(d, np.float32)}
    with ocp.PyTreeCheckpointer() as ckpt:
        tree = ckpt.restore(path / "params", item=template)
    norm = nets_lib.Normalizer(jnp.asarray(tree["norm_mean"]), jnp.asarray(tree["norm_std"]))
    return Router(networks=networks, policy_params=tree["policy"], normalizer=norm,
                  kappa=float(meta["kappa"]), meta=meta)


def export_trained(path: str | Path, *, networks: nets_lib.RouterNetworks, policy_params,
                   normalizer: nets_lib.Normalizer, kappa: float, manifest, alpha: float,
                   hidden: Sequence[int], train_config: dict, extra: dict | None = None) -> Path:
    """The one export path of a trained router (either trainer): everything serving needs to
    check it — feature spec, models (names, parameter counts, prices), α, κ, network shape, the
    training config and the trace set's provenance."""
    return export_router(
        path, networks, policy_params, normalizer, kappa,
        feature_names=manifest.feature_names, model_names=[m.name for m in manifest.models],
        alpha=alpha, hidden=hidden,
        extra={"models": [dataclasses.asdict(m) for m in manifest.models],
               "trace_provenance": manifest.provenance, "synthetic": manifest.synthetic,
               "train_config": train_config, **(extra or {})})
