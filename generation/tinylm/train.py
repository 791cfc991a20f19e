"""Training the tiny LMs on the procedural task (next-token loss on the solution only), and
saving / loading their weights with a checksum."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from generation.tinylm import task
from generation.tinylm.model import LMConfig, TinyLM, Tokenizer
from jaxroute.errors import InputError

WEIGHTS = Path(__file__).resolve().parent / "weights"


def encode_batch(tok: Tokenizer, problems: list[task.TaskProblem], max_len: int):
    """`(tokens [B, L], loss_mask [B, L])`: prompt + solution + <eos>, loss on the solution."""
    b = len(problems)
    toks = np.zeros((b, max_len), np.int32)
    mask = np.zeros((b, max_len), np.float32)
    for i, p in enumerate(problems):
        prompt = tok.prompt(p.problem.question)
        sol = tok.encode("\n\n".join(p.solution_steps)) + [tok.eos]
        ids = (prompt + sol)[:max_len]
        toks[i, :len(ids)] = ids
        mask[i, len(prompt) - 1:len(ids) - 1] = 1.0  # predict sol[j] from position len(prompt)-1+j
    return toks, mask


def train_lm(cfg: LMConfig, steps: int, batch: int = 64, lr: float = 3e-3, seed: int = 0,
             z_loss: float = 0.0, init=None, log_every: int = 100, log=print):
    """Next-token training; returns (params, seconds).

    `z_loss` adds `z_loss · mean(log Z)²` (log Z = logsumexp of the raw logits, PaLM's z-loss).
    Softmax is shift-invariant, so without it the level of the raw logits is arbitrary per
    position; pinning log Z ≈ 0 makes the raw max logit ≈ log of the top probability, which is
    what S_os (mean max raw logit) needs to be a confidence signal. `init`: start from these
    parameters instead of a fresh initialisation.
    """
    tok = Tokenizer()
    model = TinyLM(cfg)
    params = init if init is not None else model.init(jax.random.PRNGKey(seed),
                                                      jnp.zeros((1, 8), jnp.int32))
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10), steps, lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, toks, mask):
        def loss_fn(p):
            logits = model.apply(p, toks[:, :-1])
            ll = optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:])
            ll = ll + z_loss * jnp.square(jax.nn.logsumexp(logits, axis=-1))
            return jnp.sum(ll * mask[:, :-1]) / jnp.sum(mask[:, :-1])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    data = task.generate(steps * batch, seed, "lm")
    start = time.perf_counter()
    for i in range(steps):
        toks, mask = encode_batch(tok, data[i * batch:(i + 1) * batch], cfg.max_len)
        # Trim padding to the batch's longest sequence, bucketed to 32 (few shapes to compile).
        width = min(cfg.max_len, int(-(-(mask.sum(0) > 0).nonzero()[0].max() // 32) * 32) + 32)
        params, opt_state, loss = step(params, opt_state, toks[:, :width], mask[:, :width])
        if log and (i % log_every == 0 or i == steps - 1):
            log(f"step {i:5d} loss {float(loss):.4f} ({time.perf_counter() - start:.0f} s)")
    return params, time.perf_counter() - start


def save(path: Path, name: str, cfg: LMConfig, params, meta: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    flat = {"/".join(k): np.asarray(v) for k, v in
            traverse_util.flatten_dict(jax.device_get(params)).items()}
    weights = path / f"{name}.npz"
    np.savez(weights, **flat)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    (path / f"{name}.json").write_text(json.dumps(
        {"config": cfg.__dict__, "sha256": digest, "alphabet": Tokenizer().itos, **meta},
        indent=2) + "\n")


class ChecksumError(InputError):
    pass


def load(path: Path, name: str):
    """(LMConfig, params) after checking the weights' sha256 and the tokenizer alphabet."""
    if not (path / f"{name}.json").exists():
        raise FileNotFoundError(f"{path / (name + '.json')}: no tiny model {name!r} here (train it "
                                f"with `python -m launch.train_tinylm --models={name}`)")
    meta = json.loads((path / f"{name}.json").read_text())
    weights = path / f"{name}.npz"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if digest != meta["sha256"]:
        raise ChecksumError(f"{weights}: sha256 {digest} does not match {meta['sha256']} in "
                            f"{name}.json (corrupted or replaced weights)")
    if meta["alphabet"] != Tokenizer().itos:
        raise ChecksumError(f"{path / (name + '.json')}: tokenizer alphabet differs from this code")
    cfg = LMConfig(**meta["config"])
    with np.load(weights) as z:
        flat = {tuple(k.split("/")): jnp.asarray(z[k]) for k in z.files}
    return cfg, traverse_util.unflatten_dict(flat), meta
