"""Stand-ins for RSD's process reward model and SpecReason's judge on the embedded default.

Both are documented stand-ins (decision 57), not the real thing:

- `TinyPRM` — a process reward model in Qwen2.5-Math-PRM's exact layout
  (`Qwen2ForProcessRewardModel`: the LM backbone, a 2-class head read at the `<extra_0>` tag
  that closes every step), initialised from the small tiny LM and fine-tuned in JAX on the
  small model's own sampled steps with the rule verifier's labels (`train_prm`, `python -m
  launch.train_tinylm --models=prm`). Reward = P(good) at the last step's tag. Exported, it
  runs in vLLM's pooling runner exactly as the real PRM does (decision 85).
- `TinyJudge` — the large tiny LM cannot follow a judge prompt, so it judges by likelihood: the
  score of a step is the lowest probability the large model gives to any of the step's maths
  tokens (teacher-forced, one forward pass — the same single pass a judge spends reading the
  prompt). On SpecReason's 0–9 scale that is 9 × this value.

Both report their compute (2N FLOPs per token read) as the scorer column.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from generation.backends.base import StepRequest, prefix_text
from generation.tinylm import task, train
from generation.tinylm.model import LMConfig, TinyLM, Tokenizer
from generation.traces import features
from jaxroute.errors import InputError

WEIGHTS = Path(__file__).resolve().parent / "weights"


class RewardModel(nn.Module):
    """TinyLM backbone + the 2-class head of `Qwen2ForProcessRewardModel` (Linear h→h, ReLU,
    Linear h→2): `[B, L]` tokens, `[B]` lengths → `[B, 2]` logits at each row's last token (a
    step tag), class 1 = the step is right (decision 85)."""

    cfg: LMConfig

    def setup(self):
        self.lm = TinyLM(self.cfg)
        self.score_hidden = nn.Dense(self.cfg.d_model)
        self.score_out = nn.Dense(2)

    def __call__(self, tokens, lengths):
        h = self.lm.hidden(tokens)[jnp.arange(tokens.shape[0]), lengths - 1]
        return self.score_out(nn.relu(self.score_hidden(h)))


def _ids(tok: Tokenizer, text: str) -> list[int]:
    try:
        return tok.encode(text)
    except ValueError as e:
        raise InputError(f"{e}: the tiny stand-ins read only the procedural task's text (use "
                         "them with the tinylm backends)") from None


def _encode(tok: Tokenizer, question: str, steps: Sequence[str]) -> list[int]:
    """The PRM's input in Qwen2.5-Math-PRM's layout: prompt, then every step closed by the
    `<extra_0>` step tag (the score is read at the last tag)."""
    ids = [tok.bos] + _ids(tok, question) + [tok.asst]
    for s in steps:
        ids += _ids(tok, s) + [tok.step_tag]
    return ids


def _judge_input(tok: Tokenizer, question: str, steps: Sequence[str]) -> list[int]:
    """The generator's own input up to the last step: prompt + earlier steps with delimiters."""
    return [tok.bos] + _ids(tok, question) + [tok.asst] + _ids(tok, prefix_text(steps))


SCORE_ROWS = 64  # rows per forward pass: bounds activation memory (attention is [rows, H, L, L])


def _in_chunks(score, items):
    """`score(items)` a `SCORE_ROWS` slice at a time (each row is scored independently)."""
    if len(items) <= SCORE_ROWS:
        return score(items)
    scores, spent = [], []
    for i in range(0, len(items), SCORE_ROWS):
        a, b = score(items[i:i + SCORE_ROWS])
        scores += a
        spent += b
    return scores, spent


def _pad(seqs: list[list[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    rows = max(8, 1 << (len(seqs) - 1).bit_length())
    width = min(max_len, int(-(-max(len(s) for s in seqs) // 32) * 32))
    arr = np.zeros((rows, width), np.int32)
    lens = np.ones(rows, np.int32)
    for i, s in enumerate(seqs):
        s = s[-width:]  # keep the end (the step being scored) if a prefix is too long
        arr[i, :len(s)] = s
        lens[i] = len(s)
    return arr, lens


class TinyPRM:
    name = "tiny PRM (stand-in)"

    def __init__(self, cfg: LMConfig, params):
        self.cfg, self.weights = cfg, params
        self.tok = Tokenizer()
        self.model = RewardModel(cfg)
        self.params = float(sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params)))
        self._value = jax.jit(self.model.apply)

    def score(self, items):
        return _in_chunks(self._score, items)

    def _score(self, items):
        if not items:
            return [], []
        seqs = [_encode(self.tok, q, steps) for q, steps in items]
        arr, lens = _pad(seqs, self.cfg.max_len)
        logits = self._value(self.weights, jnp.asarray(arr), jnp.asarray(lens))
        good = np.asarray(jax.nn.softmax(logits, axis=-1)[:, 1])
        scores = [float(x) for x in good[:len(seqs)]]
        spent = [{"flops": 2.0 * self.params * min(len(s), self.cfg.max_len),
                  "input_tokens": len(s), "output_tokens": 0} for s in seqs]
        return scores, spent


def load_prm(path: str | Path | None = None) -> TinyPRM:
    cfg, params, _ = train.load(Path(path) if path else WEIGHTS, "prm")
    return TinyPRM(cfg, params)


@dataclasses.dataclass
class TinyJudge:
    """Likelihood judge from a tiny LM backend (`generation.tinylm.backend.TinyLMBackend`)."""

    backend: object
    name: str = "tiny judge (stand-in)"

    def __post_init__(self):
        self._forward = jax.jit(self.backend.model.apply)

    def score(self, items):
        return _in_chunks(self._score, items)

    def _score(self, items):
        if not items:
            return [], []
        be = self.backend
        seqs, spans = [], []
        for q, steps in items:
            head = _judge_input(be.tok, q, steps[:-1])
            body = _ids(be.tok, steps[-1])
            seqs.append(head + body)
            spans.append((len(head), len(body)))
        arr, _ = _pad(seqs, be.cfg.max_len)
        logp = np.asarray(jax.nn.log_softmax(self._forward(be.weights, jnp.asarray(arr)), -1))
        scores, spent = [], []
        for i, (start, n) in enumerate(spans):
            if n == 0 or start + n > arr.shape[1]:
                scores.append(0.0)
            else:
                toks = arr[i, start:start + n]
                p = np.exp(logp[i, np.arange(start - 1, start + n - 1), toks])
                mask, _ = features.math_mask([be.tok.itos[t] for t in toks])
                scores.append(float(p[mask].min() if mask.any() else p.min()))
            spent.append({"flops": 2.0 * be.params * (len(seqs[i]) + 1),
                          "input_tokens": len(seqs[i]), "output_tokens": 1})
        return scores, spent


# -- training the stand-in PRM ---------------------------------------------------------------------


def corrupt(step: str, rng: np.random.Generator) -> str | None:
    """The step with the result of its last equation off by 1–9 (a wrong step that looks like
    the model's own), or None when it has no equation."""
    eqs = list(re.finditer(r"=\s*(\d+)", step))
    if not eqs:
        return None
    m = eqs[-1]
    value = int(m.group(1))
    wrong = value + int(rng.choice([-1, 1])) * int(rng.integers(1, 10))
    wrong = wrong if wrong >= 0 else value + int(rng.integers(1, 10))
    return step[:m.start(1)] + str(wrong) + step[m.end(1):]


def prm_data(small, n_problems: int, seed: int, max_steps: int = 8, hard_negatives: bool = False
             ) -> list[tuple[list[int], float]]:
    """(input ids, label) for every checkable step of the small model's sampled solutions
    (labels: the rule verifier). `hard_negatives`: also each right step with its result off
    by 1–9 (label 0): the small model's own slips, which the sampled steps alone hold too few
    of to learn from (decision 92)."""
    rng = np.random.default_rng([seed, 7])
    probs = task.generate(n_problems, seed, "prm")
    tok = Tokenizer()
    steps: list[list[str]] = [[] for _ in probs]
    ids: list[tuple[int, ...]] = [() for _ in probs]
    live = list(range(len(probs)))
    out = []
    for t in range(max_steps):
        if not live:
            break
        reqs = [StepRequest(f"prm/{i}/{t}", probs[i].problem.question, (), ids[i],
                            seed * 100_003 + i * 31 + t) for i in live]
        nxt = []
        for i, r in zip(live, small.generate(reqs, max_tokens=64), strict=True):
            steps[i].append(r.text)
            ids[i] = ids[i] + tuple(r.token_ids)
            ok = task.check_step(r.text)
            if ok is not None:
                out.append((_encode(tok, probs[i].problem.question, steps[i]), float(ok)))
            bad = corrupt(r.text, rng) if ok and hard_negatives else None
            if bad is not None:
                out.append((_encode(tok, probs[i].problem.question, steps[i][:-1] + [bad]), 0.0))
            if not r.is_final:
                nxt.append(i)
        live = nxt
    return out


def train_prm(small_cfg: LMConfig, small_params, data, steps: int = 600, batch: int = 64,
              lr: float = 1e-3, seed: int = 0, log=print):
    """Fine-tune backbone + 2-class head with cross-entropy at the last step tag; returns
    (params, seconds)."""
    model = RewardModel(small_cfg)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32),
                        jnp.ones(1, jnp.int32))
    params = {"params": {**params["params"], "lm": small_params["params"]}}
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps, lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, toks, lens, y, w):
        def loss_fn(p):
            z = model.apply(p, toks, lens)
            ce = optax.softmax_cross_entropy_with_integer_labels(z, y.astype(jnp.int32))
            return jnp.sum(ce * w) / jnp.sum(w)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    labels = np.array([y for _, y in data])
    # Classes drawn equally often: right steps far outnumber wrong ones.
    p = np.where(labels > 0.5, 0.5 / max(1, (labels > 0.5).sum()),
                 0.5 / max(1, (labels <= 0.5).sum()))
    start = time.perf_counter()
    for i in range(steps):
        idx = rng.choice(len(data), batch, p=p / p.sum())
        seqs = [data[j][0] for j in idx]
        toks, lens = _pad(seqs, small_cfg.max_len)
        y = np.zeros(len(lens), np.float32)
        w = np.zeros(len(lens), np.float32)
        y[:batch] = [data[j][1] for j in idx]
        w[:batch] = 1.0
        params, opt_state, loss = step(params, opt_state, jnp.asarray(toks), jnp.asarray(lens),
                                       jnp.asarray(y), jnp.asarray(w))
        if log and (i % 100 == 0 or i == steps - 1):
            log(f"prm step {i:4d} loss {float(loss):.4f} ({time.perf_counter() - start:.0f} s)")
    return params, time.perf_counter() - start


def prm_auroc(prm: TinyPRM, small, n_problems: int = 300, seed: int = 12345
              ) -> tuple[float, int]:
    """(AUROC of the PRM's score for "this step is right", steps scored) on held-out steps of
    the small model's own sampled solutions (fresh problems, no hard negatives)."""
    from jaxroute import stats

    data = prm_data(small, n_problems, seed)
    scores = []
    for i in range(0, len(data), SCORE_ROWS):
        chunk = [ids for ids, _ in data[i:i + SCORE_ROWS]]
        arr, lens = _pad(chunk, prm.cfg.max_len)
        logits = prm._value(prm.weights, jnp.asarray(arr), jnp.asarray(lens))
        scores += [float(x) for x in np.asarray(jax.nn.softmax(logits, -1)[:, 1])[:len(chunk)]]
    return stats.auroc(np.asarray(scores), np.array([y for _, y in data]) > 0.5), len(data)
