"""Train the embedded default's two tiny LMs on the procedural arithmetic task and save them
(weights + config + sha256) under generation/tinylm/weights/.

    python -m launch.train_tinylm
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from generation.tinylm import train
from generation.tinylm.model import LMConfig, Tokenizer

_OUT = flags.DEFINE_string("out", str(Path(__file__).resolve().parents[1] / "generation" /
                                      "tinylm" / "weights"), "Output folder.")
_SMALL_STEPS = flags.DEFINE_integer("small_steps", 2500, "Training steps of the small model.")
_LARGE_STEPS = flags.DEFINE_integer("large_steps", 1500, "Training steps of the large model.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")
_WHICH = flags.DEFINE_list("models", ["small", "large"], "Which models to (re)train.")

# Sizes chosen so the large model is clearly better and the small one often slips on a digit.
SMALL = dict(layers=2, d_model=48, heads=4, max_len=192)
LARGE = dict(layers=3, d_model=96, heads=4, max_len=192)
# z-loss on the small model pins log Z ≈ 0, so its raw max logit (S_os) reads as a confidence;
# the large model's logits are never routed on (it is the last model), so it is trained without.
Z_LOSS = {"small": 0.1, "large": 0.0}


def main(argv):
    del argv
    vocab = Tokenizer().vocab_size
    for name, spec, steps in (("small", SMALL, _SMALL_STEPS.value),
                              ("large", LARGE, _LARGE_STEPS.value)):
        if name not in _WHICH.value:
            continue
        cfg = LMConfig(vocab=vocab, **spec)
        print(f"training {name}: {cfg.num_params():,} parameters, {steps} steps")
        params, secs = train.train_lm(cfg, steps, seed=_SEED.value, z_loss=Z_LOSS[name])
        train.save(Path(_OUT.value), name, cfg, params,
                   {"steps": steps, "train_seconds": round(secs, 1), "seed": _SEED.value,
                    "z_loss": Z_LOSS[name]})
        print(f"{name}: {secs:.0f} s")


if __name__ == "__main__":
    app.run(main)
