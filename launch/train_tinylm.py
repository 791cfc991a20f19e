"""Train the embedded default's two tiny LMs on the procedural arithmetic task, and the stand-in
process reward model for RSD, and save them (weights + config + sha256) under
generation/tinylm/weights/.

    python -m launch.train_tinylm                      # small, large, then the PRM
    python -m launch.train_tinylm --models=prm         # only the PRM (from the saved small LM)
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from generation.tinylm import train
from generation.tinylm.model import LMConfig, Tokenizer
from launch import common

_OUT = flags.DEFINE_string("out", str(Path(__file__).resolve().parents[1] / "generation" /
                                      "tinylm" / "weights"), "Output folder.")
_SMALL_STEPS = flags.DEFINE_integer("small_steps", 2200, "Training steps of the small model "
                                    "from scratch (decision 85).")
_SMALL_MORE = flags.DEFINE_integer("small_more_steps", 1200, "Then this many more steps on "
                                   "fresh problems (seed + 1, peak learning rate "
                                   "--small_more_lr): the paper's regime (decision 92).")
_SMALL_MORE_LR = flags.DEFINE_float("small_more_lr", 0.002, "Peak learning rate of the more "
                                    "steps.")
_LARGE_STEPS = flags.DEFINE_integer("large_steps", 2000, "Training steps of the large model.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")
_SMALL_Z = flags.DEFINE_float("small_z_loss", 0.001, "z-loss of the small model (decision 60).")
_WHICH = flags.DEFINE_list("models", ["small", "large", "prm"], "Which models to (re)train.")
_PRM_PROBLEMS = flags.DEFINE_integer("prm_problems", 12000, "Problems the small model solves to "
                                     "make the PRM's labelled steps (decision 92).")
_PRM_STEPS = flags.DEFINE_integer("prm_steps", 3000, "Training steps of the PRM (classes "
                                  "drawn equally often).")
_PRM_HARD = flags.DEFINE_bool("prm_hard_negatives", False, "Also train on right steps with their "
                              "result off by 1–9 (measured worse on held-out steps; "
                              "decision 92).")

# Sizes chosen so the large model is clearly better and the small one often slips on a digit;
# head_dim 32 so that vLLM's CPU attention runs them (decision 85).
SMALL = dict(layers=2, d_model=64, heads=2, mlp=128, max_len=192)
LARGE = dict(layers=3, d_model=128, heads=4, mlp=256, max_len=192)
# z-loss on the small model pins log Z ≈ 0, so its raw max logit (S_os) reads as a confidence;
# the large model's logits are never routed on (it is the last model), so it is trained without.
Z_LOSS = {"small": 0.001, "large": 0.0}


def main(argv):
    del argv
    vocab = Tokenizer().vocab_size
    for name, spec, steps in (("small", SMALL, _SMALL_STEPS.value),
                              ("large", LARGE, _LARGE_STEPS.value)):
        if name not in _WHICH.value:
            continue
        cfg = LMConfig(vocab=vocab, **spec)
        print(f"training {name}: {cfg.num_params():,} parameters, {steps} steps")
        z_loss = _SMALL_Z.value if name == "small" else Z_LOSS[name]
        params, secs = train.train_lm(cfg, steps, seed=_SEED.value, z_loss=z_loss)
        meta = {"steps": steps, "train_seconds": round(secs, 1), "seed": _SEED.value,
                "z_loss": z_loss}
        if name == "small" and _SMALL_MORE.value:
            params, more = train.train_lm(cfg, _SMALL_MORE.value, seed=_SEED.value + 1,
                                          z_loss=z_loss, init=params, lr=_SMALL_MORE_LR.value)
            meta.update(steps=steps + _SMALL_MORE.value, train_seconds=round(secs + more, 1),
                        continued={"steps": _SMALL_MORE.value, "seed": _SEED.value + 1,
                                   "lr": _SMALL_MORE_LR.value})
            secs += more
        train.save(Path(_OUT.value), name, cfg, params, meta)
        print(f"{name}: {secs:.0f} s")
    if "prm" in _WHICH.value:
        from generation.tinylm import backend as tiny
        from generation.tinylm import scorers

        small = tiny.TinyLMBackend("small", *train.load(Path(_OUT.value), "small")[:2])
        data = scorers.prm_data(small, _PRM_PROBLEMS.value, _SEED.value,
                                hard_negatives=_PRM_HARD.value)
        wrong = sum(1 for _, y in data if y == 0) / max(len(data), 1)
        print(f"training prm: {len(data)} labelled steps of the small model ({wrong:.0%} wrong)")
        params, secs = scorers.train_prm(small.cfg, small.weights, data, _PRM_STEPS.value,
                                         seed=_SEED.value)
        train.save(Path(_OUT.value), "prm", small.cfg, params,
                   {"steps": _PRM_STEPS.value, "train_seconds": round(secs, 1),
                    "seed": _SEED.value, "labelled_steps": len(data), "init": "small",
                    "hard_negatives": _PRM_HARD.value})
        auc, n = scorers.prm_auroc(scorers.load_prm(Path(_OUT.value)), small)
        print(f"prm: {secs:.0f} s; AUROC {auc:.3f} on {n} held-out steps (target ≥ 0.85)")


if __name__ == "__main__":
    common.run(main)
