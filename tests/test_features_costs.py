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
    assert features.step_features(25.0, 3, 40, True, None) == [25.0, 3.0, 40.0, 1.0, 0.0]


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
