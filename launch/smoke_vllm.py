"""GPU smoke test of the vLLM assumptions the generation layer relies on (generation.md §7).

Run on a machine with a GPU, vLLM and local weights (not part of the test suite):

    python -m launch.smoke_vllm --small=/models/Qwen2.5-Math-1.5B-Instruct \\
        --large=/models/Qwen2.5-Math-7B-Instruct

Checks, printing PASS/FAIL per line (exit 1 on any FAIL):
1. raw_logits mode: some returned values > 0 (they are logits, not log-probs) and the rank-1 value
   ≥ the sampled token's value at every position; optionally vs HF `logits.max(-1)` (--hf).
2. the small and large tokenizers are identical; ids of "\\n\\n", ".\\n\\n", ":\\n\\n"; how often
   decode(token_ids) == text + "\\n\\n" for stopped steps.
3. prefix caching: on step t+1, num_cached_tokens ≥ len(prefix) − 16.
4. two engines (0.25 + 0.6 of memory) start on one GPU.
5. the backend generates three steps of a GSM8K-style problem end to end.
6. SpecReason's judge on the large engine returns a score in [0, 1] (`VLLMJudge`).
7. with --prm: the process reward model loads under the pooling runner and scores a correct
   step above a wrong one (`VLLMRewardModel`, Qwen2.5-Math-PRM layout).
"""

from __future__ import annotations

import sys

from absl import app, flags

_SMALL = flags.DEFINE_string("small", None, "Small model folder.")
_LARGE = flags.DEFINE_string("large", None, "Large model folder.")
_HF = flags.DEFINE_bool("hf", False, "Also compare with Hugging Face logits (needs torch).")
_PRM = flags.DEFINE_string("prm", None, "Process reward model folder (e.g. Qwen2.5-Math-PRM-7B).")
flags.mark_flags_as_required(["small", "large"])

QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
            "clips in May. How many clips did Natalia sell altogether in April and May?")


def main(argv):
    del argv
    from generation.backend import StepRequest
    from generation.vllm_backend import VLLMBackend

    fails = []

    def check(name, ok, detail=""):
        print(f"{'PASS' if ok else 'FAIL'} {name} {detail}")
        if not ok:
            fails.append(name)

    small = VLLMBackend(_SMALL.value, gpu_memory_utilization=0.25)
    large = VLLMBackend(_LARGE.value, gpu_memory_utilization=0.6)
    check("two engines on one GPU", True)
    ts, tl = small.tokenizer, large.tokenizer
    check("same vocabulary", ts.get_vocab() == tl.get_vocab())
    for s in ("\n\n", ".\n\n", ":\n\n"):
        print(f"  ids of {s!r}: {ts.encode(s, add_special_tokens=False)}")

    steps, ids, roundtrip, results = [], [], 0, []
    for t in range(3):
        r = small.generate([StepRequest(f"smoke/{t}", QUESTION, tuple(steps), tuple(ids), t)])[0]
        results.append(r)
        roundtrip += int(ts.decode(r.token_ids) == r.text + "\n\n")
        if t > 0:
            prefix = len(small.prompt_ids(QUESTION)) + len(ids)
            check(f"prefix cache at step {t}", r.cached_tokens >= prefix - 16,
                  f"(cached {r.cached_tokens}, prefix {prefix})")
        steps.append(r.text)
        ids += r.token_ids
        if r.is_final:
            break
    print(f"  decode(token_ids) == text + '\\n\\n' for {roundtrip}/{len(results)} steps")
    vals = [c for r in results for c in r.confidence]
    check("raw logits (some values > 0)", any(v > 0 for v in vals), f"(max {max(vals):.2f})")
    # rank-1 ≥ sampled: re-run one step and inspect the raw dicts.
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outs = small.llm.generate([TokensPrompt(prompt_token_ids=small.prompt_ids(QUESTION))],
                              [SamplingParams(temperature=0.7, max_tokens=64, stop=["\n\n"],
                                              logprobs=1, seed=0)], use_tqdm=False)
    o = outs[0].outputs[0]
    ok = all(max(d.values(), key=lambda lp: lp.logprob).rank in (1, None) or
             max(lp.logprob for lp in d.values()) >= d[tid].logprob
             for tid, d in zip(o.token_ids, o.logprobs, strict=True))
    check("rank-1 value ≥ sampled value", ok)
    if _HF.value:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(_SMALL.value, torch_dtype=torch.bfloat16,
                                                     device_map="cuda")
        full = small.prompt_ids(QUESTION) + list(o.token_ids)
        with torch.no_grad():
            logits = model(torch.tensor([full], device="cuda")).logits[0].float()
        n = len(o.token_ids)
        hf = logits[-n - 1:-1].max(-1).values.cpu().tolist()
        ours = [max(lp.logprob for lp in d.values()) for d in o.logprobs]
        err = max(abs(a - b) for a, b in zip(hf, ours, strict=True))
        check("vLLM raw max logit ≈ HF logits.max(-1)", err < 0.5, f"(max |Δ| {err:.3f})")
    check("three steps generated", len(results) >= 1 and all(r.error is None for r in results))
    from generation import scorers

    js, jc = scorers.VLLMJudge(large).score([(QUESTION, tuple(steps))])
    check("judge score in [0, 1]", 0.0 <= js[0] <= 1.0, f"(score {js[0]:.3f}, {jc[0]})")
    if _PRM.value:
        del small, large  # free the GPU for the reward model
        prm = scorers.VLLMRewardModel(_PRM.value)
        good = "In May she sold 48 / 2 = 24 clips."
        bad = "In May she sold 48 / 2 = 42 clips."
        ps, _ = prm.score([(QUESTION, (good,)), (QUESTION, (bad,))])
        check("PRM: correct step above wrong step", ps[0] > ps[1], f"({ps[0]:.3f} vs {ps[1]:.3f})")
    print(f"{len(fails)} failed" if fails else "all passed")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    app.run(main)
