"""The one training loop (`learner.fit` through `trainer.train`) with either learner: resumable
checkpoints, K = 3, learnability on an informative synthetic tree, one workdir per run."""

import dataclasses

import chex
import jax
import numpy as np
import pytest

from jaxroute import (
    core,
    durable,
    evaluate,
    exact,
    export,
    guarantee,
    learner,
    synthetic,
    tcpo,
    trace,
    trainer,
)
from jaxroute.core import threshold


@pytest.fixture(scope="module")
def trees():
    manifest, problems = synthetic.generate(synthetic.SyntheticConfig(num_problems=300))
    return manifest, trace.pack(manifest, problems)


def _tcpo(iterations, **kw):
    return tcpo.TCPOConfig(iterations=iterations, **kw)


@pytest.mark.parametrize("name", [pytest.param("tcpo", marks=pytest.mark.slow), "exact"])
def test_resume_continues_exactly(tmp_path, trees, name):
    """Either learner, two seeds at once: a run interrupted after its first chunk and resumed
    (with a longer length) gives the uninterrupted run's numbers."""
    _, packed = trees
    cfg = (_tcpo(16) if name == "tcpo" else exact.ExactConfig(alpha=0.1, iterations=6,
                                                                batch_size=64))
    run = trainer.TrainConfig(cfg, seeds=(0, 1), chunk=cfg.iterations // 2,
                              final_calibration=False)
    straight = trainer.train(packed, run)
    half = dataclasses.replace(run, learner=dataclasses.replace(cfg,
                                                                iterations=cfg.iterations // 2))
    trainer.train(packed, half, tmp_path)
    resumed = trainer.train(packed, run, tmp_path)
    assert resumed.learner == name and resumed.seeds == (0, 1)
    chex.assert_trees_all_close(resumed.params, straight.params, atol=1e-6)
    key = "kappa" if name == "tcpo" else "cost"
    assert resumed.history[key].shape == (2, cfg.iterations)
    np.testing.assert_allclose(resumed.history[key], straight.history[key], rtol=1e-6)
    # The seeds are different runs; TCPO's own κ moved.
    assert not np.allclose(jax.tree.leaves(straight.policy(0))[0],
                           jax.tree.leaves(straight.policy(1))[0])
    if name == "tcpo":
        assert np.all(straight.kappa_online != cfg.kappa_init)


@pytest.mark.slow
def test_three_models_train_and_evaluate(tmp_path):
    manifest, problems = synthetic.generate(synthetic.three_model_config(num_problems=120))
    packed = trace.pack(manifest, problems)
    cfg = trainer.TrainConfig(_tcpo(60, alpha=0.1), chunk=30)
    res = trainer.train(packed, cfg)
    assert np.all(np.isfinite(res.history["cpo_objective"]))
    out = evaluate.evaluate_all(packed, {"TCPO router (ours)": res.log_prob_fn(0)}, 0.1,
                                manifest.feature_names, references=False)
    names = [r["method"] for r in out["rows"]]
    assert names[:3] == ["model 0 only", "model 1 only", "model 2 only"]
    router = out["rows"][3]
    assert router["method"] == "TCPO router (ours)" and 0 <= router["coverage"] <= 1
    # The evaluation calibrates κ by the same rule as the trainer's final calibration.
    assert router["threshold"] == pytest.approx(res.kappa)
    # Export round trip keeps the decisions.
    path = export.export_router(tmp_path / "r", res.networks, res.policy(0), res.normalizer,
                                res.kappa, feature_names=manifest.feature_names,
                                model_names=[m.name for m in manifest.models], alpha=0.1,
                                hidden=cfg.learner.hidden)
    loaded = export.load_router(path, feature_names=manifest.feature_names)
    x = packed.features[:, 0, 0]
    model = np.zeros(len(x), np.int32)
    probs = np.exp(res.log_prob_fn(0)(x, model))
    np.testing.assert_array_equal(loaded.decide(x, model).model,
                                  threshold.route(probs, np.float32(res.kappa), model))
    with pytest.raises(export.RouterSpecError, match="trained on features"):
        export.load_router(path, feature_names=list(manifest.feature_names)[::-1])


@pytest.mark.slow
def test_learnability_on_an_informative_synthetic_tree():
    """Confidence and difficulty are informative: the paper's TCPO router meets coverage (within
    its CI) at a cost well below large-only."""
    alpha = 0.1
    scfg = synthetic.SyntheticConfig(
        num_problems=800, accuracy=((0.99, 0.97, 0.9, 0.2, 0.1), (1.0, 1.0, 0.97, 0.9, 0.85)),
        informativeness=1.5, seed=1)
    manifest, problems = synthetic.generate(scfg)
    packed = trace.pack(manifest, problems)
    cfg = trainer.TrainConfig(_tcpo(500, alpha=alpha, softmask_eps=0.05, batch_size=16))
    res = trainer.train(packed, cfg)
    assert res.feasible[0]
    out = evaluate.evaluate_all(packed, {"TCPO router (ours)": res.log_prob_fn(0)}, alpha,
                                manifest.feature_names, references=False)
    router = next(r for r in out["rows"] if r["method"] == "TCPO router (ours)")
    assert router["coverage_ci"][1] >= 1 - alpha
    large = next(r for r in out["rows"] if r["method"] == "model 1 only")
    # It learned to route (escalating everything costs ≥ large-only); beating the baselines at
    # the guarantee is the default trainer's test (tests/test_exact.py), not the paper's.
    assert router["cost"] < 0.75 * large["cost"]


@pytest.mark.slow
def test_a_workdir_belongs_to_one_run(tmp_path, trees):
    manifest, packed = trees
    cfg = trainer.TrainConfig(_tcpo(20, alpha=0.1), chunk=10)
    trainer.train_and_export(packed, manifest, cfg, tmp_path, source="s", cost_model="flops",
                             show_progress=False)
    other = dataclasses.replace(cfg, learner=_tcpo(20, alpha=0.3))
    with pytest.raises(FileExistsError, match=r"config.alpha: 0.1 → 0.3.*--overwrite"):
        trainer.train_and_export(packed, manifest, other, tmp_path, source="s",
                                 cost_model="flops", show_progress=False)
    # A longer run of the same config resumes; --overwrite starts the other one over.
    longer = dataclasses.replace(cfg, learner=_tcpo(30, alpha=0.1))
    res = trainer.train_and_export(packed, manifest, longer, tmp_path, source="s",
                                   cost_model="flops", show_progress=False)
    assert res.history["kappa"].shape == (1, 30)
    res = trainer.train_and_export(packed, manifest, other, tmp_path, source="s",
                                   cost_model="flops", show_progress=False, overwrite=True)
    assert export.load_router(tmp_path / "router").meta["alpha"] == 0.3


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, trees):
    _, packed = trees
    cfg = trainer.TrainConfig(_tcpo(20), chunk=10, final_calibration=False)
    straight = trainer.train(packed, cfg)
    trainer.train(packed, cfg, tmp_path)
    latest = tmp_path / "checkpoints" / "20"
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # a kill mid-save
    resumed = trainer.train(packed, cfg, tmp_path)  # from step 10, retrains 10 → 20
    chex.assert_trees_all_close(resumed.params, straight.params, atol=1e-6)
    np.testing.assert_allclose(resumed.history["kappa"], straight.history["kappa"], rtol=1e-6)


def test_a_run_records_its_config_and_reexports_the_same_router(tmp_path, trees):
    manifest, packed = trees
    cfg = trainer.TrainConfig(exact.ExactConfig(alpha=0.1, iterations=5), seeds=(0, 1))
    res = trainer.train_and_export(packed, manifest, cfg, tmp_path, source="synthetic",
                                   cost_model="flops", show_progress=False)
    router = export.load_router(tmp_path / "router", feature_names=manifest.feature_names)
    assert router.kappa == pytest.approx(res.kappas[0]) and router.meta["alpha"] == 0.1
    assert router.meta["train_config"]["trainer"] == "exact"
    import json

    record = json.loads((tmp_path / "train_config.json").read_text())
    assert trainer.config_from_dict(record) == cfg
    done = trainer.reexport(tmp_path, record, packed, manifest, "synthetic", tmp_path / "again")
    assert done["kappa"] == pytest.approx(res.kappas[0]) and done["gap"] <= 1e-5
    # Regression: a re-export took no lock; beside a running `launch.train` on the same run
    # folder both trained from one checkpoint and deleted each other's steps (decision 90).
    with durable.exclusive(tmp_path), pytest.raises(durable.FolderInUse, match="in use"):
        trainer.reexport(tmp_path, record, packed, manifest, "synthetic", tmp_path / "third")
    assert not (tmp_path / "third").exists()


def test_an_unknown_learner_config_is_refused():
    with pytest.raises(ValueError, match="no learner takes"):
        trainer.TrainConfig(learner=object())


def _ltt_plain(errors, alpha, delta):
    """Learn then Test as a plain loop with scipy (exact for {0, 1} rows, Bentkus otherwise)."""
    from scipy import stats

    env_ = np.maximum.accumulate(errors, axis=1)
    binary = np.all((errors == 0) | (errors == 1))
    idx = -1
    for j in range(errors.shape[1]):
        s = env_[:, j].sum()
        p = stats.binom.cdf(s, len(errors), alpha) if binary else min(
            1.0, np.e * stats.binom.cdf(np.ceil(s - 1e-4), len(errors), alpha))
        if p > delta:
            break
        idx = j
    return max(idx, 0), idx >= 0


def test_a_pac_run_calibrates_by_learn_then_test_and_records_its_guarantee(tmp_path, trees):
    from jaxroute import env as env_lib

    manifest, packed = trees
    cfg = trainer.TrainConfig(exact.ExactConfig(alpha=0.2, iterations=5), seeds=(0,), delta=0.2)
    res = trainer.train_and_export(packed, manifest, cfg, tmp_path, source="synthetic",
                                   cost_model="flops", show_progress=False)
    n = len(packed.split_indices("cal"))
    router = export.load_router(tmp_path / "router", feature_names=manifest.feature_names)
    assert router.guarantee == {"kind": "pac", "alpha": 0.2, "delta": 0.2,
                                "calibration_problems": n}
    fam = learner.router_family(packed, res.log_prob_fn(0))
    fw = guarantee.walk_family(packed, env_lib.to_device(packed), fam,
                              env_lib.instances(packed, packed.split_indices("cal")))
    idx, ok = _ltt_plain(fw.cal_errors, 0.2, 0.2)
    assert ok and res.feasible[0] and res.kappas[0] == pytest.approx(fam.grid[idx])
    assert trainer.config_from_dict(trainer.TrainConfig.to_dict(cfg)) == cfg


def test_a_guarantee_the_calibration_split_cannot_meet_stops_before_training(trees):
    from jaxroute.errors import InputError

    _, packed = trees
    n = len(packed.split_indices("cal"))
    need = core.min_calibration_size(0.02, 0.001)
    assert need > n
    # A million iterations: reaching the error at all shows nothing was trained first.
    cfg = trainer.TrainConfig(exact.ExactConfig(alpha=0.02, iterations=10**6), delta=0.001)
    with pytest.raises(InputError, match=f"has {n} problems.*needs at least {need}"):
        trainer.train(packed, cfg)
