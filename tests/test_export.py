"""Router export: one atomic unit, and a router.json that is checked before it is trusted."""

import json

import jax
import numpy as np
import pytest

from jaxroute import export
from jaxroute import networks as nets_lib

FEATS = ("confidence", "step_index", "step_length", "is_final", "difficulty")


def _export(path, kappa=0.3):
    nets = nets_lib.make_networks(2, 5, (8,))
    params, _, _ = nets_lib.init_params(nets, jax.random.PRNGKey(0))
    norm = nets_lib.Normalizer(np.zeros(5, np.float32), np.ones(5, np.float32))
    return export.export_router(path, nets, params, norm, kappa, feature_names=FEATS,
                                model_names=["s", "l"], alpha=0.05, hidden=(8,))


def test_export_replaces_a_router_as_one_unit(tmp_path):
    path = _export(tmp_path / "router", kappa=0.3)
    _export(tmp_path / "router", kappa=0.7)
    assert export.load_router(path).kappa == 0.7
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "router"]
    assert leftovers == []  # no temporary or old folder remains


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(kappa=float("nan")), "'kappa'"),
    (lambda m: m.update(kappa=5.0), "'kappa' = 5.0 is outside"),
    (lambda m: m.update(alpha=2), "'alpha'"),
    (lambda m: m.pop("feature_names"), "'feature_names' missing"),
])
def test_a_damaged_router_json_is_refused_by_name(tmp_path, edit, match):
    path = _export(tmp_path / "router")
    meta = json.loads((path / "router.json").read_text())
    edit(meta)
    (path / "router.json").write_text(json.dumps(meta))
    with pytest.raises(export.RouterSpecError, match=match):
        export.load_router(path)


def test_an_unreadable_router_json_names_the_file(tmp_path):
    path = _export(tmp_path / "router")
    (path / "router.json").write_bytes(b"\xff\xfe{not json")
    with pytest.raises(export.RouterSpecError, match="router.json: not valid JSON"):
        export.load_router(path)
    (path / "router.json").write_text("[1, 2]")
    with pytest.raises(export.RouterSpecError, match="router.json: expected a JSON object"):
        export.load_router(path)


def test_an_out_of_range_kappa_is_never_exported(tmp_path):
    with pytest.raises(export.RouterSpecError, match="outside"):
        _export(tmp_path / "r", kappa=float("nan"))


@pytest.mark.parametrize("k", [2, 3])
def test_the_host_path_decides_exactly_as_the_jitted_one(tmp_path, k):
    nets = nets_lib.make_networks(k, 5, (16, 16))
    params, _, _ = nets_lib.init_params(nets, jax.random.PRNGKey(k))
    # Larger output weights than a fresh policy, so decisions vary.
    params = jax.tree.map(lambda a: a * 30.0, params)
    rng = np.random.default_rng(k)
    norm = nets_lib.Normalizer(rng.normal(size=5).astype(np.float32),
                               rng.uniform(0.5, 2, 5).astype(np.float32))
    path = export.export_router(tmp_path / "r", nets, params, norm, 0.4, feature_names=FEATS,
                                model_names=[f"m{i}" for i in range(k)], alpha=0.05,
                                hidden=(16, 16))
    router = export.load_router(path)
    f = rng.normal(size=(500, 5)).astype(np.float32) * 3
    m = rng.integers(0, k - 1, 500).astype(np.int32)
    host, dev = router.decide(f, m, path="host"), router.decide(f, m, path="device")
    np.testing.assert_allclose(host.escalation_prob, dev.escalation_prob, atol=1e-5)
    # π itself against an independent jax evaluation of the exported networks
    probs = np.exp(np.asarray(nets.log_probs(params, norm, f, m)))
    np.testing.assert_allclose(router._host.probs(f, m), probs, atol=1e-5)
    assert (host.model == dev.model).mean() > 0.998  # ties at κ within float rounding aside
    assert len(set(host.model.tolist())) > 1
    np.testing.assert_array_equal(router.decide(f[:1], m[:1]).model, host.model[:1])
    np.testing.assert_array_equal(router.decide(f, m).model, dev.model)  # large: device path
    with pytest.raises(ValueError, match="path"):
        router.decide(f, m, path="gpu")


def test_an_edited_or_truncated_router_is_refused_naming_the_file(tmp_path):
    """Regression: edited num_models/hidden gave flax's ScopeParamShapeError, truncated params a
    bare JSONDecodeError or a tensorstore dump."""
    import json
    import shutil

    path = _export(tmp_path / "r")
    meta_file = path / "router.json"
    meta = json.loads(meta_file.read_text())
    for field, value, words in (("hidden", [32, 32], "parameter shapes"),
                                ("num_models", 3, "num_models"),
                                ("hidden", [0], "layer widths")):
        edited = tmp_path / f"edit-{field}-{value}"
        shutil.copytree(path, edited)
        (edited / "router.json").write_text(json.dumps({**meta, field: value}))
        with pytest.raises(export.RouterSpecError, match=words) as e:
            export.load_router(edited)
        assert str(edited) in str(e.value)
    broken = tmp_path / "truncated"
    shutil.copytree(path, broken)
    for f in (broken / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(export.RouterSpecError, match="unreadable") as e:
        export.load_router(broken)
    assert str(broken / "params") in str(e.value)


def test_router_json_is_strict_json_and_loads_back(tmp_path):
    """Regression: router.json held `"kappa_online": NaN`, which strict parsers (other
    languages') refuse. Non-finite numbers are strings now, and the router loads back."""
    nets = nets_lib.make_networks(2, 5, (8,))
    params, _, _ = nets_lib.init_params(nets, jax.random.PRNGKey(0))
    norm = nets_lib.Normalizer(np.zeros(5, np.float32), np.ones(5, np.float32))
    path = export.export_router(tmp_path / "r", nets, params, norm, 0.3, feature_names=FEATS,
                                model_names=["s", "l"], alpha=0.05, hidden=(8,),
                                extra={"kappa_online": float("nan")})
    meta = json.loads((path / "router.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert meta["kappa_online"] == "NaN"
    assert np.isnan(export.load_router(path).meta["kappa_online"])
