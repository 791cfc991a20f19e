"""SYNTHETIC trace trees — a generative model of stepwise reasoning, for tests, benchmarks, demos.

Nothing here comes from a language model. Each problem has a difficulty level and a latent
hardness u ~ U(0, 1); model k can solve it iff u < `accuracy[k][level]` (so a problem the small
model can solve, the large one can too — nested abilities, as for real model families). A small
model trajectory on a problem it cannot solve makes a first error at a random step; that step
shows a lower confidence score (by `informativeness` noise standard deviations). Escalating at a
step whose prefix is still clean gives the larger model its own ability on the problem;
escalating after the error it recovers only with probability `recovery`. Each larger-model
outcome is flipped with probability `sampling_noise` (temperature sampling), and the verifier
mislabels a step with probability `verifier_flip`. The manifest is marked `"synthetic": true`.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np

from jaxroute import accounting, trace
from jaxroute.errors import InputError
from jaxroute.types import Rollout

FEATURES = ("confidence", "step_index", "step_length", "is_final", "difficulty")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    num_problems: int = 600
    roots_per_problem: int = 1
    num_models: int = 2
    # accuracy[k][level - 1]: model k's end-to-end accuracy at each difficulty level.
    accuracy: tuple[tuple[float, ...], ...] = ((0.92, 0.8, 0.62, 0.45, 0.3),
                                               (0.97, 0.93, 0.88, 0.8, 0.7))
    level_probs: tuple[float, ...] = (0.25, 0.25, 0.2, 0.15, 0.15)
    mean_steps: tuple[float, ...] = (3.0, 4.0, 5.5, 7.0, 8.5)  # per level, small model
    max_steps: int = 16
    informativeness: float = 2.0  # confidence drop at the error step, in noise std units
    recovery: float = 0.15  # P(larger model right | prefix already wrong, problem solvable)
    sampling_noise: float = 0.0  # P(a larger model's sampled outcome flips)
    verifier_flip: float = 0.05
    tokens_per_step: float = 60.0
    params: tuple[float, ...] = (1.5e9, 7e9)  # N per model (FLOPs per token = 2N)
    prices: tuple[tuple[float, float, float], ...] = ((0.0, 0.0, 0.0), (0.40, 0.10, 1.60))
    prompt_tokens: int = 150
    split_fractions: tuple[float, float, float] = (0.5, 0.2, 0.3)
    seed: int = 0

    def __post_init__(self):
        k = self.num_models
        if k < 2:
            raise InputError("num_models must be ≥ 2")
        if len(self.accuracy) != k or len(self.params) != k or len(self.prices) != k:
            raise InputError("accuracy, params and prices need one entry per model")
        levels = len(self.level_probs)
        if any(len(a) != levels for a in self.accuracy) or len(self.mean_steps) != levels:
            raise InputError("accuracy rows and mean_steps need one entry per difficulty level")
        if not np.isclose(sum(self.level_probs), 1.0) or not np.isclose(sum(self.split_fractions), 1):
            raise InputError("level_probs and split_fractions must each sum to 1")


def three_model_config(**overrides) -> SyntheticConfig:
    base = dict(num_models=3,
                accuracy=((0.92, 0.8, 0.62, 0.45, 0.3), (0.95, 0.88, 0.78, 0.65, 0.5),
                          (0.97, 0.93, 0.88, 0.8, 0.7)),
                params=(1.5e9, 7e9, 32e9),
                prices=((0.0, 0.0, 0.0), (0.15, 0.075, 0.60), (0.40, 0.10, 1.60)))
    base.update(overrides)
    return SyntheticConfig(**base)


def family_config(small_coverage: float, auroc: float, num_models: int = 2, seed: int = 0,
                  num_problems: int = 800, **overrides) -> SyntheticConfig:
    """A member of the routing benchmark's synthetic families (decision 69): the small model's
    coverage P(small right ∨ large wrong) and the confidence feature's wrong-step AUROC are the
    knobs.

    With nested abilities the small model misses what the large one solves with probability
    Σ_l p_l (acc_large[l] − acc_small[l]); scaling acc_small = r·acc_large sets that to
    1 − `small_coverage`. The error step's confidence is shifted by d = √2·Φ⁻¹(AUROC) noise
    standard deviations, so a wrong step scores below a sound one with probability AUROC. For
    K = 3 the middle model sits halfway between the two.
    """

    if not 0.0 < small_coverage < 1.0 or not 0.5 <= auroc < 1.0:
        raise InputError("small_coverage in (0, 1) and auroc in [0.5, 1) are required")
    base = SyntheticConfig() if num_models == 2 else three_model_config()
    large = np.asarray(base.accuracy[-1])
    solvable = float(np.dot(base.level_probs, large))
    r = 1.0 - (1.0 - small_coverage) / solvable
    if r < 0:
        raise InputError(f"small_coverage {small_coverage} is below what this family reaches")
    small = r * large
    acc = [tuple(small)] + ([tuple((small + large) / 2)] if num_models == 3 else []) + \
        [tuple(large)]
    d = float(np.sqrt(2.0) * statistics.NormalDist().inv_cdf(auroc))
    return dataclasses.replace(base, accuracy=tuple(acc), informativeness=d, seed=seed,
                               num_problems=num_problems, **overrides)


def _cost(cfg: SyntheticConfig, model: int, out_tokens: int, in_tokens: int) -> dict:
    return {"flops": 2.0 * cfg.params[model] * out_tokens, "input_tokens": int(in_tokens),
            "cached_input_tokens": 0, "output_tokens": int(out_tokens)}


class _Gen:
    def __init__(self, cfg: SyntheticConfig, rng: np.random.Generator):
        self.cfg, self.rng = cfg, rng

    def step_tokens(self) -> int:
        return int(max(5, self.rng.gamma(4.0, self.cfg.tokens_per_step / 4.0)))

    def solves(self, model: int, level: int, u: float) -> bool:
        return u < self.cfg.accuracy[model][level]

    def solution(self, model: int, level: int, u: float, start: int, clean: bool, context: int):
        """Outcome and cost of model `model` completing from step `start` (a leaf)."""
        cfg, rng = self.cfg, self.rng
        able = self.solves(model, level, u)
        correct = able if clean else (able and rng.random() < cfg.recovery)
        if rng.random() < cfg.sampling_noise:
            correct = not correct
        n = max(1, int(rng.poisson(cfg.mean_steps[level] * 0.9)) - start + 1)
        tokens = sum(self.step_tokens() for _ in range(n))
        return {"model": model, "correct": bool(correct),
                "cost": _cost(cfg, model, tokens, context)}

    def segment(self, model: int, level: int, u: float, start: int, clean: bool,
                context: int) -> dict:
        """Steps of a non-largest model from step `start` (prefix clean or not), with branches."""
        cfg, rng = self.cfg, self.rng
        length = int(np.clip(rng.poisson(cfg.mean_steps[level]) + 1, 1, cfg.max_steps))
        able = self.solves(model, level, u)
        # A clean run of a model that cannot solve the problem errs first at a random step; after
        # a wrong prefix the steps look locally fine and the answer is wrong regardless.
        first_err = int(rng.integers(length)) if (clean and not able) else -1
        if model > 0 and rng.random() < cfg.sampling_noise:
            first_err = -1 if first_err >= 0 else (int(rng.integers(length)) if clean else -1)
        steps, ctx = [], context
        for t in range(length):
            tok = self.step_tokens()
            is_err = t == first_err
            conf = rng.normal(0.0, 1.0) - (cfg.informativeness if is_err else 0.0)
            prefix_clean = clean and (first_err < 0 or t <= first_err)
            branches = {}
            for kp in range(model + 1, cfg.num_models):
                if kp == cfg.num_models - 1:
                    branches[str(kp)] = self.solution(kp, level, u, start + t, prefix_clean, ctx)
                else:
                    branches[str(kp)] = self.segment(kp, level, u, start + t, prefix_clean, ctx)
            ver = (not is_err) if rng.random() >= cfg.verifier_flip else is_err
            steps.append({
                "features": [float(conf), float(start + t), float(tok),
                             float(t == length - 1), float(level + 1)],
                "cost": _cost(cfg, model, tok, ctx),
                "verifier_ok": bool(ver),
                "branches": branches,
            })
            ctx += tok
        correct = clean and first_err < 0
        return {"model": model, "correct": bool(correct), "status": "ok", "steps": steps}


def generate(cfg: SyntheticConfig = SyntheticConfig()) -> tuple[trace.Manifest, list[dict]]:
    """A synthetic trace set (manifest, problems), deterministic given `cfg.seed`."""
    return manifest_of(cfg), list(iter_problems(cfg))


def generate_packed(cfg: SyntheticConfig = SyntheticConfig(), cost_model: str = "flops",
                    chunk: int = 4096) -> tuple[trace.Manifest, trace.PackedTrees]:
    """`generate` then `trace.pack`, packing problems as they are drawn so that no more than
    `chunk` of them are ever held as Python dicts (dict trees take gigabytes at 100 000
    problems; their packed arrays a fraction of that). Equal to `trace.pack(*generate(cfg))`."""
    manifest = manifest_of(cfg)
    return manifest, trace.pack_stream(manifest, iter_problems(cfg), cost_model, chunk)


def manifest_of(cfg: SyntheticConfig) -> trace.Manifest:
    """The manifest of `cfg`'s trace set (models, prices, features, provenance)."""
    return trace.Manifest(
        models=tuple(trace.ModelInfo(name=f"synthetic-model-{k}", params=cfg.params[k],
                                     price_input=cfg.prices[k][0],
                                     price_cached_input=cfg.prices[k][1],
                                     price_output=cfg.prices[k][2])
                     for k in range(cfg.num_models)),
        feature_names=FEATURES,
        provenance={"generator": "jaxroute.synthetic", "config": dataclasses.asdict(cfg)},
        synthetic=True,
    )


def iter_problems(cfg: SyntheticConfig) -> Iterator[dict]:
    """`cfg`'s problems one at a time, in order (deterministic given `cfg.seed`)."""
    rng = np.random.default_rng(cfg.seed)
    gen = _Gen(cfg, rng)
    levels = rng.choice(len(cfg.level_probs), size=cfg.num_problems, p=cfg.level_probs)
    splits = rng.permutation(np.repeat(
        np.arange(3), np.round(np.array(cfg.split_fractions) * cfg.num_problems).astype(int)
    ))[: cfg.num_problems]
    splits = np.concatenate([splits, np.full(cfg.num_problems - len(splits), 2)])
    hardness = rng.random(cfg.num_problems)
    for i, level in enumerate(levels):
        u = float(hardness[i])
        roots = [gen.segment(0, int(level), u, 0, True, cfg.prompt_tokens)
                 for _ in range(cfg.roots_per_problem)]
        solo = [{"correct": roots[0]["correct"],
                 "cost": accounting.sum_costs(s["cost"] for s in roots[0]["steps"])}]
        for k in range(1, cfg.num_models):
            leaf = gen.solution(k, int(level), u, 0, True, cfg.prompt_tokens)
            solo.append({"correct": leaf["correct"], "cost": leaf["cost"]})
        yield {
            "problem_id": f"synthetic-{cfg.seed}-{i:06d}", "dataset": "synthetic",
            "difficulty": float(level + 1), "split": trace.SPLITS[int(splits[i])],
            "solo": solo, "roots": roots,
        }


def synthetic_rollout(seed: int, b: int, t: int, d: int, k: int = 2) -> Rollout:
    """A random padded `Rollout` of b episodes × t slots × d features (uniform behaviour over k
    actions) for kernel tests and benchmarks; not a routing world."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, b)
    mask = np.arange(t)[None] < lengths[:, None]
    return Rollout(
        obs=jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32),
        model=jnp.zeros((b, t), jnp.int32),
        action=jnp.asarray(rng.integers(0, k, (b, t)), jnp.int32),
        log_behaviour=jnp.full((b, t), np.log(1.0 / k), jnp.float32),
        cost=jnp.asarray(rng.uniform(0, 2, (b, t)), jnp.float32),
        verifier_ok=jnp.asarray(rng.random((b, t)) < 0.8),
        mask=jnp.asarray(mask),
        correct=jnp.asarray(rng.random(b) < 0.6),
        large_wrong=jnp.asarray(rng.random(b) < 0.2),
    )
