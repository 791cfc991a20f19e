"""Math-token rule, S_os / S_API, and cost formulas."""

import json

import numpy as np
import pytest

from generation.backends import costs
from generation.traces import features


def test_math_mask_rule():
    toks = ["We", " have", " ", "3", " +", " x", " =", " $", "\\frac", "{a", "}{", "b", "}$",
            " so", " \\boxed", "{", "y", "}", ".", "\n\n", "Next"]
    mask, state = features.math_mask(toks)
    got = {t: bool(m) for t, m in zip(toks, mask, strict=True)}
    assert not got["We"] and not got[" have"] and not got[" "] and not got["\n\n"]
    assert got["3"] and got[" +"] and got[" ="] and got["\\frac"] and got["b"]
    assert not got[" $"]  # delimiters themselves are not math
    assert got["y"] and got["}"]  # inside \boxed{…}
    assert not got["Next"] and not got[" so"]
    assert not state.inside


def test_punctuation_counts_as_maths_only_inside_a_span():
    """The step delimiter fuses with punctuation (".\n\n"): outside a maths span such tokens
    are prose (generation.md §4); inside `$…$` or `\\boxed{…}` they are maths."""
    toks = ["So", " 3", " apples", ".", ".\n\n", ",", ":", " $", "1", ",", "2", "$", ";"]
    mask, _ = features.math_mask(toks)
    got = list(mask)
    assert got[3:7] == [False, False, False, False]  # ".", ".\n\n", ",", ":" in prose
    assert got[9] is np.True_ and not got[12]  # "," inside $…$; ";" after it
    assert got[1] and got[8] and got[10]


def test_s_all_is_logged_beside_the_maths_only_score():
    c = features.s_os(np.array([10.0, 20.0, 30.0, 40.0]), np.array([False, True, True, False]))
    assert c.value == 25.0 and c.all_tokens == 25.0
    c = features.s_api(np.array([0.9, 0.4, 0.7, 0.1]), np.array([True, True, False, False]))
    assert c.value == 0.4 and c.all_tokens == 0.1


def test_math_span_carries_across_steps():
    _, state = features.math_mask(["$$", "x"])
    mask, state = features.math_mask(["y", "$$", " done"], state)
    assert list(mask) == [True, False, False] and not state.inside


def test_confidence_scores_and_no_math_fallback():
    logits = np.array([10.0, 20.0, 30.0, 40.0])
    mask = np.array([False, True, True, False])
    c = features.s_os(logits, mask)
    assert c.value == 25.0 and c.math_tokens == 2 and not c.no_math
    c = features.s_os(logits, np.zeros(4, bool))
    assert c.value == 25.0 and c.no_math
    p = np.array([0.9, 0.4, 0.7, 0.1])
    assert features.s_api(p, mask).value == 0.4
    assert features.s_api(p, np.zeros(4, bool)).value == 0.1
    with pytest.raises(ValueError, match="empty step"):
        features.s_os(np.array([]), np.array([], bool))



def _result(tokens, conf, kind, logprobs=None, tops=None, ents=None, final=True, n=None):
    from generation.backends.base import StepResult

    return StepResult("", [], tokens, conf, kind, 0, 0, n or len(tokens), "stop", final,
                      logprobs=logprobs, top_logprobs=tops, entropies=ents)


def test_step_vector_names_the_features_in_any_order():
    """The legacy five are what `step_features` gave (S_os, index, length, final, difficulty);
    any order of names is served; an unknown name is refused."""
    r = _result(["1", "2"], [10.0, 40.0], "max_logit", n=40)
    vec, _ = features.step_vector(features.LEGACY_FEATURE_NAMES, r, 3, None,
                                  features.MathSpanState())
    assert vec == [25.0, 3.0, 40.0, 1.0, 0.0]
    rev, _ = features.step_vector(features.LEGACY_FEATURE_NAMES[::-1], r, 3, 2.0,
                                  features.MathSpanState())
    assert rev == [2.0, 1.0, 40.0, 3.0, 25.0]
    zeros, _ = features.step_vector(features.DISTRIBUTION_FEATURES, r, 3, None,
                                    features.MathSpanState())
    assert zeros == [0.0] * 4  # no per-token log-probs (an older backend): zeros, not a crash
    with pytest.raises(ValueError, match="unknown step features"):
        features.step_vector(("confidence", "nope"), r, 0, None, features.MathSpanState())


def test_distribution_stats_against_a_plain_computation():
    """Exact entropies as given; log-probs as given; the margin and lowest-k from the values;
    raw logits normalised over the candidates (and the sampled token when it is not one); the
    top-k entropy estimate Σ −p log p − r log r."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 9))
        logits = rng.normal(size=(n, 12)) * 3
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        pick = rng.integers(0, 12, n)
        sampled = logp[np.arange(n), pick]
        tops = -np.sort(-logp, -1)[:, :5]
        ent = -(np.exp(logp) * logp).sum(-1)
        r = _result(["3"] * n, list(tops[:, 0]), "max_logit", list(sampled),
                    [list(x) for x in tops], list(ent))
        got = features.distribution_stats(r)
        assert got["min_logprob"] == pytest.approx(sampled.min())
        assert got["low3_logprob"] == pytest.approx(np.sort(sampled)[:3].mean())
        assert got["neg_entropy"] == pytest.approx(-ent.mean())
        assert got["min_margin"] == pytest.approx((tops[:, 0] - tops[:, 1]).min())
        # The same step from an API (top-5 log-probabilities, no entropies): the estimate.
        api = features.distribution_stats(_result(["3"] * n, list(np.exp(tops[:, 0])),
                                                  "top1_prob", list(sampled),
                                                  [list(x) for x in tops]))
        p5 = np.exp(tops)
        rest = 1 - p5.sum(-1)
        est = -(p5 * tops).sum(-1) - rest * np.log(rest)
        assert api["neg_entropy"] == pytest.approx(-est.mean())
        assert api["min_logprob"] == pytest.approx(sampled.min())
        # Raw logits (vLLM's raw_logits mode): normalised over what was returned.
        raw_top = -np.sort(-logits, -1)[:, :5]
        raw_s = logits[np.arange(n), pick]
        raw = features.distribution_stats(_result(["3"] * n, list(raw_top[:, 0]), "max_logit",
                                                  list(raw_s), [list(x) for x in raw_top]))
        inside = np.isin(np.round(raw_s, 9), np.round(raw_top, 9).ravel()) & (
            raw_s >= raw_top[:, -1] - 1e-9)
        z = np.log(np.exp(raw_top).sum(-1) + np.where(inside, 0.0, np.exp(raw_s)))
        assert raw["min_logprob"] == pytest.approx((raw_s - z).min())
        assert raw["min_margin"] == pytest.approx((raw_top[:, 0] - raw_top[:, 1]).min())


def test_costs():
    assert costs.step_flops(324, 1.5e9) == pytest.approx(0.972e12)  # the paper's 1.5B-only row
    p = costs.DEFAULT_PRICES["gpt-4.1-mini"]
    assert costs.usd(2000, 1024, 100, p) == pytest.approx((976 * 0.4 + 1024 * 0.1 + 100 * 1.6) / 1e6)
    assert costs.prefill_flops(100, 30, 1e9) == 2 * 70 * 1e9


def test_params_from_config_matches_qwen2_5_1_5b(tmp_path):
    # Qwen2.5-1.5B's published config; its reported size is 1.54B parameters.
    cfg = {"hidden_size": 1536, "num_hidden_layers": 28, "vocab_size": 151936,
           "intermediate_size": 8960, "num_attention_heads": 12, "num_key_value_heads": 2,
           "hidden_act": "silu", "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert costs.params_from_config(tmp_path) == pytest.approx(1.54e9, rel=0.01)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="lacks 'num_hidden_layers'"):
        costs.params_from_config(tmp_path)


def test_parameters_of_a_gpt2_config_and_from_the_weights(tmp_path):
    """Regression (decision 85): a GPT-2-family config.json (n_embd, n_layer, n_inner) raised,
    and its tanh-GELU MLP was counted as gated. The count equals the tensors of a real GPT-2
    layout (biases and norms aside), and `params_from_weights` counts a folder's safetensors
    exactly."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    from generation.backends import costs

    h, layers, vocab, pos, inner = 64, 2, 100, 32, 256
    cfg = {"model_type": "gpt2", "n_embd": h, "n_layer": layers, "n_head": 2, "n_inner": inner,
           "vocab_size": vocab, "n_positions": pos, "activation_function": "gelu_pytorch_tanh"}
    weights = {"wte": (vocab, h), "wpe": (pos, h)}
    for i in range(layers):
        weights |= {f"h.{i}.attn.c_attn.weight": (h, 3 * h), f"h.{i}.attn.c_proj.weight": (h, h),
                    f"h.{i}.mlp.c_fc.weight": (h, inner), f"h.{i}.mlp.c_proj.weight": (inner, h)}
    matrices = sum(int(np.prod(s)) for s in weights.values())
    n = costs.params_from_config(cfg)
    norms = 2 * h * layers + h
    assert n == matrices + norms  # tied head, ungated MLP
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({k: np.zeros(s, np.float32) for k, s in weights.items()},
              str(tmp_path / "model.safetensors"))
    assert costs.params_from_weights(tmp_path) == matrices
    assert costs.params_from_weights(tmp_path / "missing") is None
