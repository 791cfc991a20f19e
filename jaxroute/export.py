"""Router checkpoints for serving: policy parameters, κ, feature spec and normaliser (orbax + JSON).

Layout of an exported router folder:

    router.json      metadata: schema, feature names, models, α, κ (deployed and online),
                     network shape, cost model, provenance
    params/          orbax PyTree checkpoint of {"policy": ..., "norm_mean": [D], "norm_std": [D]}

`load_router(path, feature_names=...)` refuses a router whose feature spec differs from the
caller's, and returns a `Router` whose `decide(features, model)` is eq. 6.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxroute import networks as nets_lib
from jaxroute.core import threshold
from jaxroute.durable import atomic_write_text, read_json, replace_folder, strict_json
from jaxroute.errors import InputError, quote

ROUTER_SCHEMA = 1
# κ is compared with probabilities; calibration puts it in [0, just above the largest score].
KAPPA_RANGE = (0.0, 1.0 + 1e-6)


TRAINERS = {"exact": "exact CPO", "tcpo": "TCPO"}  # trainer name → how a table names it


def router_label(trainer: str | None) -> str:
    """A router's row name with its trainer, e.g. "router (exact CPO, ours)" — so a table never
    shows a router under another trainer's name (the paper's TCPO has its own row)."""
    return f"router ({TRAINERS[trainer]}, ours)" if trainer in TRAINERS else "router (ours)"


class RouterSpecError(InputError):
    """The router's feature spec or models do not match what the caller generates."""


class Decisions(NamedTuple):
    """A router's decisions for a batch of steps, `[...]` each."""

    model: np.ndarray  # int32: the model of the next segment (eq. 6)
    escalation_prob: np.ndarray  # float32: max_{a>k} π(a|o), the value eq. 6 compared with κ


@dataclasses.dataclass
class Router:
    networks: nets_lib.RouterNetworks
    policy_params: Any
    normalizer: nets_lib.Normalizer
    kappa: float
    meta: dict

    def __post_init__(self):
        def probs(params, mean, std, features, model):
            norm = nets_lib.Normalizer(mean, std)
            return jnp.exp(self.networks.log_probs(params, norm, features, model))

        self._device_probs = jax.jit(probs)
        self._host = _host_policy(self.policy_params, self.normalizer, self.networks.num_models)

    @property
    def guarantee(self) -> dict:
        """What κ was calibrated to (decision 88): kind ("marginal" | "pac"), α, δ and the
        calibration size; a router exported before PAC existed is marginal at its α."""
        return self.meta.get("guarantee") or {"kind": "marginal", "alpha": self.meta.get("alpha"),
                                              "delta": None}

    @property
    def label(self) -> str:
        """The router's row name, with the trainer that produced it (`router_label`)."""
        return router_label((self.meta.get("train_config") or {}).get("trainer"))

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(self.meta["feature_names"])

    def decide(self, features, model, path: str = "auto") -> Decisions:
        """Eq. 6 for a batch: features `[..., D]` and current models `[...]` in, `Decisions` out.

        π is computed in numpy on the host for up to `HOST_BATCH` decisions (no host↔device
        transfer: the serving path) and by one jitted call above (decision 79; `python -m
        launch.benchmark_router` measures the crossover); `path="host"` / `"device"` forces one.
        Either way the rule itself is `core.route_rule`, the one eq. 6."""
        f = np.asarray(features, np.float32)
        m = np.asarray(model, np.int32)
        if path == "auto":
            path = "host" if f.size // max(f.shape[-1], 1) <= HOST_BATCH else "device"
        if path == "host":
            probs = self._host.probs(f, m)
        elif path == "device":
            probs = np.asarray(self._device_probs(
                self.policy_params, self.normalizer.mean, self.normalizer.std, jnp.asarray(f),
                jnp.asarray(m)))
        else:
            raise InputError(f"path must be 'auto', 'host' or 'device', got {path!r}")
        return Decisions(threshold.route_rule(np, probs, np.float32(self.kappa), m),
                         threshold.escalation_score(np, probs, m).astype(np.float32))

    def log_probs(self, features, model) -> jax.Array:
        """log π(·|o) `[..., K]` (traceable: the offline evaluation walks it over the trees)."""
        return self.networks.log_probs(self.policy_params, self.normalizer, features, model)


HOST_BATCH = 4096  # decisions up to this batch size run in numpy (decision 79: measured
# crossover > 1024 on 2 CPU cores; one code path also makes live and replayed decisions equal)


class _HostPolicy(NamedTuple):
    """The policy MLP as numpy arrays: the first layer absorbs the feature normaliser and, per
    current model, the one-hot input (decision 79)."""

    first: np.ndarray  # [D, H] kernel on the raw features
    first_bias: np.ndarray  # [K, H] bias per current model
    layers: tuple  # ((kernel, bias), ...) of the further layers, the last one linear

    def probs(self, features: np.ndarray, model: np.ndarray) -> np.ndarray:
        """π(·|o) `[..., K]`, zero on actions below the current model."""
        h = np.tanh(features @ self.first + self.first_bias[model])
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if i + 1 < len(self.layers):
                h = np.tanh(h)
        valid = np.arange(h.shape[-1]) >= model[..., None]
        h = np.where(valid, h, -np.inf)
        h = h - h.max(axis=-1, keepdims=True)
        e = np.exp(h)
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _host_policy(params, normalizer: nets_lib.Normalizer, num_models: int) -> _HostPolicy:
    dense = params["params"]
    names = sorted(dense, key=lambda n: int(n.split("_")[-1]))  # Dense_0, Dense_1, …
    w0 = np.asarray(dense[names[0]]["kernel"], np.float64)
    b0 = np.asarray(dense[names[0]]["bias"], np.float64)
    mean = np.asarray(normalizer.mean, np.float64)
    std = np.asarray(normalizer.std, np.float64)
    d = len(mean)
    first = w0[:d] / std[:, None]
    bias = b0 - (mean / std) @ w0[:d]
    per_model = bias[None] + w0[d:d + num_models]
    layers = tuple((np.asarray(dense[n]["kernel"], np.float32),
                    np.asarray(dense[n]["bias"], np.float32)) for n in names[1:])
    return _HostPolicy(first.astype(np.float32), per_model.astype(np.float32), layers)


def export_router(path: str | Path, networks: nets_lib.RouterNetworks, policy_params,
                  normalizer: nets_lib.Normalizer, kappa: float, *, feature_names: Sequence[str],
                  model_names: Sequence[str], alpha: float, hidden: Sequence[int],
                  extra: dict | None = None) -> Path:
    """Write a router folder as one unit (decision 78): parameters and router.json go to a
    temporary folder beside `path`, which then replaces `path` (an existing router is moved
    aside first and removed after), so a reader finds the old router or the new one, never a
    mix."""

    path = Path(path).absolute()
    if len(feature_names) != networks.num_features:
        raise RouterSpecError(f"{len(feature_names)} feature names for a policy over "
                              f"{networks.num_features} features")
    if not (math.isfinite(kappa) and KAPPA_RANGE[0] <= kappa <= KAPPA_RANGE[1]):
        raise RouterSpecError(f"κ = {kappa} is outside {list(KAPPA_RANGE)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    tree = {"policy": policy_params, "norm_mean": np.asarray(normalizer.mean),
            "norm_std": np.asarray(normalizer.std)}
    with ocp.PyTreeCheckpointer() as ckpt:
        ckpt.save(tmp / "params", tree, force=True)
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
    atomic_write_text(tmp / "router.json", strict_json(meta, indent=2, default=str) + "\n")
    replace_folder(tmp, path)
    return path


def _number(x) -> float | None:
    """A JSON number (or strict JSON's "NaN"/"Infinity" string, `durable.strict_json`) as a
    float; None when it is neither."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x)


def check_meta(meta: dict, meta_file) -> None:
    """Everything else in router.json a server relies on, checked at load rather than failing
    later (decision 90): the model records agree with `model_names`, in order, small → large;
    the guarantee is one the project makes, at the router's α; the other recorded numbers are
    numbers."""
    names = meta["model_names"]
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise RouterSpecError(f"{meta_file}: field 'model_names' must be distinct names")
    models = meta.get("models")
    if models is not None:
        if not isinstance(models, list) or len(models) != len(names) or not all(
                isinstance(m, dict) for m in models):
            raise RouterSpecError(f"{meta_file}: field 'models' must hold one record per model")
        if [m.get("name") for m in models] != names:
            raise RouterSpecError(
                f"{meta_file}: field 'model_names' {quote(names)} disagrees with the model "
                f"records {quote([m.get('name') for m in models])}: was router.json edited?")
        params = [_number(m.get("params")) for m in models]
        if any(n is None or not math.isfinite(n) or n < 0 for n in params):
            raise RouterSpecError(f"{meta_file}: every model record needs 'params' ≥ 0")
        known = [n for n in params if n > 0]
        if len(known) == len(params) and any(b < a for a, b in itertools.pairwise(known)):
            raise RouterSpecError(
                f"{meta_file}: models must go small → large, but their parameter counts are "
                f"{params}: was router.json edited?")
    g = meta.get("guarantee")
    if g is not None:
        if not isinstance(g, dict) or g.get("kind") not in ("marginal", "pac"):
            raise RouterSpecError(f"{meta_file}: field 'guarantee' must be an object with "
                                  f"'kind' marginal or pac, got {quote(g)}")
        a, d = _number(g.get("alpha")), g.get("delta")
        if a is None or abs(a - float(meta["alpha"])) > 1e-12:
            raise RouterSpecError(f"{meta_file}: the guarantee's 'alpha' {quote(g.get('alpha'))}"
                                  f" is not the router's α = {meta['alpha']}")
        if (g["kind"] == "marginal") != (d is None) or (
                d is not None and not (_number(d) is not None and 0 < float(d) < 1)):
            raise RouterSpecError(f"{meta_file}: the guarantee's 'delta' must be null (marginal)"
                                  f" or in (0, 1) (PAC), got {quote(d)}")
        n = g.get("calibration_problems")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise RouterSpecError(f"{meta_file}: the guarantee's 'calibration_problems' must be "
                                  f"a count, got {quote(n)}")
    for key in ("kappa_online",):
        if key in meta and meta[key] is not None and _number(meta[key]) is None:
            raise RouterSpecError(f"{meta_file}: field {key!r} must be a number, got "
                                  f"{quote(meta[key])}")
    feasible = meta.get("calibration_feasible")
    if feasible is not None and not isinstance(feasible, bool):
        raise RouterSpecError(f"{meta_file}: field 'calibration_feasible' must be true or false")


def load_router(path: str | Path, feature_names: Sequence[str] | None = None,
                model_names: Sequence[str] | None = None) -> Router:
    """Load an exported router; check it against the caller's feature spec and model pair."""
    path = Path(path).absolute()
    meta_file = path / "router.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{meta_file}: not found (is {path} an exported router?)")
    try:
        meta = read_json(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RouterSpecError(f"{meta_file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise RouterSpecError(f"{meta_file}: expected a JSON object")
    for key, kind in (("feature_names", list), ("model_names", list), ("num_models", int),
                      ("hidden", list), ("alpha", float), ("kappa", float)):
        val = meta.get(key)
        if not isinstance(val, kind) and not (kind is float and isinstance(val, int)):
            raise RouterSpecError(f"{meta_file}: field {key!r} missing or not a "
                                  f"{kind.__name__}")
    kappa = float(meta["kappa"])
    if not (math.isfinite(kappa) and KAPPA_RANGE[0] <= kappa <= KAPPA_RANGE[1]):
        raise RouterSpecError(f"{meta_file}: field 'kappa' = {meta['kappa']!r} is outside "
                              f"{list(KAPPA_RANGE)} (eq. 6 compares it with a probability)")
    if not 0 < float(meta["alpha"]) < 1:
        raise RouterSpecError(f"{meta_file}: field 'alpha' = {meta['alpha']!r} not in (0, 1)")
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
    if meta["num_models"] != len(meta["model_names"]) or meta["num_models"] < 2:
        raise RouterSpecError(f"{meta_file}: field 'num_models' = {meta['num_models']} but "
                              f"'model_names' lists {len(meta['model_names'])}")
    if not meta["hidden"] or not all(isinstance(h, int) and h >= 1 for h in meta["hidden"]):
        raise RouterSpecError(f"{meta_file}: field 'hidden' = {quote(meta['hidden'])} is not a "
                              "list of layer widths ≥ 1")
    check_meta(meta, meta_file)
    networks = nets_lib.make_networks(meta["num_models"], len(meta["feature_names"]),
                                      tuple(meta["hidden"]))
    template_policy, _, _ = nets_lib.init_params(networks, jax.random.PRNGKey(0))
    d = len(meta["feature_names"])
    template = {"policy": template_policy, "norm_mean": np.zeros(d, np.float32),
                "norm_std": np.ones(d, np.float32)}
    try:  # as stored (no template: a template of other shapes is an error of its own kind)
        with ocp.PyTreeCheckpointer() as ckpt:
            tree = ckpt.restore(path / "params")
    except Exception as e:  # noqa: BLE001 — orbax/tensorstore raise many kinds; name the file
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise RouterSpecError(f"{path / 'params'}: the router's parameters are unreadable "
                              f"({type(e).__name__}: {first}); re-export the router") from None
    want = jax.tree.map(np.shape, template)
    got = jax.tree.map(np.shape, tree)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
        raise RouterSpecError(
            f"{path / 'params'}: parameter shapes do not match {meta_file} (num_models "
            f"{meta['num_models']}, {d} features, hidden {meta['hidden']}): was router.json "
            "edited? re-export the router")
    tree = jax.tree.map(jnp.asarray, tree)
    norm = nets_lib.Normalizer(tree["norm_mean"], tree["norm_std"])
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
