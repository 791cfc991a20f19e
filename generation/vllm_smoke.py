"""GPU smoke checks of everything the project asks of vLLM (generation.md §7, decision 71).

`python -m launch.smoke_vllm` runs them on a machine with a GPU, vLLM and local weights (not
part of the test suite). Every check runs even when an earlier one fails; `run` returns the
(name, passed, detail) rows and `render` the pass/fail table. Checks:
1. two generation engines (the preset's memory shares) and the reward model start in one process;
2. prompt ids from the real chat template are ids (not a `BatchEncoding`'s keys) and end with
   the open assistant turn;
3. raw_logits mode: some returned values > 0 (logits, not log-probs) and the rank-1 value ≥ the
   sampled token's at every position; optionally against HF `logits.max(-1)` (--hf);
4. the small and large tokenizers are identical; how "\\n\\n" tokenizes;
5. prefix caching: on step t+1, num_cached_tokens ≥ len(prefix) − 16;
6. the backend writes three steps of a GSM8K problem end to end; N is read from the engine;
7. an over-long prompt fails alone, not its batch;
8. SpecReason's judge on the large engine returns a score in [0, 1] (`VLLMJudge`);
9. the reward model scores through `LLM.encode(pooling_task="token_classify")`: a correct step
   above a wrong one (`VLLMRewardModel`, Qwen2.5-Math-PRM layout).
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence

QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
            "clips in May. How many clips did Natalia sell altogether in April and May?")


def run(small_path: str, large_path: str, prm_path: str | None = None, *,
        mem: Sequence[float] = (0.15, 0.4), prm_memory: float = 0.25, max_model_len: int = 4096,
        hf: bool = False) -> list[tuple[str, bool, str]]:
    """Every check, in order; a check that raises is a failed row (its traceback printed)."""
    from generation import scorers
    from generation.backend import StepRequest
    from generation.vllm_backend import VLLMBackend, chat_ids

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
        engines["small"] = VLLMBackend(small_path, gpu_memory_utilization=mem[0],
                                       max_model_len=max_model_len)
        engines["large"] = VLLMBackend(large_path, gpu_memory_utilization=mem[-1],
                                       max_model_len=max_model_len)
        if prm_path:
            engines["prm"] = scorers.VLLMRewardModel(prm_path, gpu_memory_utilization=
                                                     prm_memory, max_model_len=max_model_len)
        return True, f"({sorted(engines)})"

    check("engines start in one process", start)
    small, large = engines.get("small"), engines.get("large")
    if small is None or large is None:
        return table

    def ids_check():
        ids = small.prompt_ids(QUESTION)
        msgs = [{"role": "user", "content": QUESTION}]
        tail = small.tokenizer.decode(ids[-5:])
        return (all(isinstance(i, int) for i in ids) and "assistant" in tail
                and chat_ids(small.tokenizer, msgs)[0] == ids[0], f"({len(ids)} ids, ends {tail!r})")

    check("prompt ids from the real chat template", ids_check)
    check("same vocabulary", lambda: (small.tokenizer.get_vocab() == large.tokenizer.get_vocab(),
                                      ""))
    for s in ("\n\n", ".\n\n", ":\n\n"):
        print(f"  ids of {s!r}: {small.tokenizer.encode(s, add_special_tokens=False)}")
    steps, ids, results = [], [], []

    def three_steps():
        for t in range(3):
            r = small.generate([StepRequest(f"smoke/{t}", QUESTION, tuple(steps), tuple(ids),
                                            t)])[0]
            if r.error:
                return False, r.error
            results.append(r)
            if t > 0:
                prefix = len(small.prompt_ids(QUESTION)) + len(ids)
                check(f"prefix cache at step {t}", lambda r=r, p=prefix: (
                    r.cached_tokens >= p - 16, f"(cached {r.cached_tokens}, prefix {p})"))
            steps.append(r.text)
            ids.extend(r.token_ids)
            if r.is_final:
                break
        return True, f"({len(results)} steps, N = {small.params:.3g})"

    check("the backend writes steps end to end", three_steps)

    def raw_logits():
        vals = [c for r in results for c in r.confidence]
        return any(v > 0 for v in vals), f"(max {max(vals):.2f})"

    check("raw logits (some values > 0)", raw_logits)

    def rank1():
        import vllm

        out = small.llm.generate([vllm.TokensPrompt(prompt_token_ids=small.prompt_ids(QUESTION))],
                                 [vllm.SamplingParams(temperature=0.7, max_tokens=64,
                                                      stop=["\n\n"], logprobs=1, seed=0)],
                                 use_tqdm=False)[0].outputs[0]
        ok = all(max(lp.logprob for lp in d.values()) >= d[t].logprob
                 for t, d in zip(out.token_ids, out.logprobs, strict=True))
        if hf:
            import torch
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(small_path, torch_dtype=torch.bfloat16,
                                                         device_map="cuda")
            full = small.prompt_ids(QUESTION) + list(out.token_ids)
            with torch.no_grad():
                logits = model(torch.tensor([full], device="cuda")).logits[0].float()
            n = len(out.token_ids)
            hf_max = logits[-n - 1:-1].max(-1).values.cpu().tolist()
            ours = [max(lp.logprob for lp in d.values()) for d in out.logprobs]
            err = max(abs(a - b) for a, b in zip(hf_max, ours, strict=True))
            return ok and err < 0.5, f"(max |Δ| vs HF {err:.3f})"
        return ok, ""

    check("rank-1 value ≥ sampled value", rank1)

    def long_prompt():
        out = small.generate([StepRequest("ok", QUESTION, (), None, 1),
                              StepRequest("long", QUESTION + " x" * max_model_len, (), None, 2)])
        return out[0].error is None and out[1].error is not None, f"({out[1].error})"

    check("an over-long prompt fails alone", long_prompt)

    def judge():
        js, jc = scorers.VLLMJudge(large).score([(QUESTION, tuple(steps))])
        return 0.0 <= js[0] <= 1.0, f"(score {js[0]:.3f}, {jc[0]})"

    check("judge score in [0, 1]", judge)
    if "prm" in engines:
        def prm():
            good = "In May she sold 48 / 2 = 24 clips."
            bad = "In May she sold 48 / 2 = 42 clips."
            ps, _ = engines["prm"].score([(QUESTION, (good,)), (QUESTION, (bad,))])
            return ps[0] > ps[1], f"({ps[0]:.3f} vs {ps[1]:.3f})"

        check("PRM through LLM.encode: correct step above wrong step", prm)
    return table



def render(table: list[tuple[str, bool, str]]) -> tuple[str, int]:
    """(the pass/fail table as text, number of failed checks)."""
    width = max(len(n) for n, _, _ in table)
    lines = [f"{'PASS' if ok else 'FAIL'}  {n:<{width}}  {d}" for n, ok, d in table]
    fails = sum(not ok for _, ok, _ in table)
    lines.append(f"{fails} failed of {len(table)}" if fails else f"all {len(table)} passed")
    return "\n".join(lines), fails
