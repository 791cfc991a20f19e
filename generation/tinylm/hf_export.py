"""The embedded tiny models as Hugging Face model folders that `transformers` and a real vLLM
engine load exactly (decision 85): `config.json`, `model.safetensors`, `generation_config.json`
and a character-level tokenizer built offline with `tokenizers` (loaded by transformers as
`PreTrainedTokenizerFast`), with its chat template.

- the LMs as `Qwen2ForCausalLM` (`export_lm`);
- the PRM stand-in as `Qwen2ForProcessRewardModel` (`export_prm`): the same backbone under
  `model.`, and the 2-class head `score.0` (Linear h→h), ReLU, `score.2` (Linear h→2) that vLLM's
  `Qwen2ForProcessRewardModel` reads at every `<extra_0>` step tag.

Export is deterministic (same weights → same bytes) and takes well under a second per model.

    python -m launch.export_tinylm --out=models/   # models/{small,large,prm}/
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from generation.tinylm.model import ALPHABET, SPECIALS, LMConfig, Tokenizer
from jaxroute.durable import replace_folder
from jaxroute.errors import InputError

# The chat layout of the tiny models: <bos> question <asst> solution. The system prompt is not
# rendered (the tiny models were never trained on one); an assistant turn that is followed by
# another turn ends with <eos> (the judge's chat: solution, then the question about it).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<asst>{{ m['content'] }}{% if not loop.last %}"
    "{{ eos_token }}{% endif %}{% endif %}{% endfor %}{% if add_generation_prompt %}<asst>"
    "{% endif %}")


# The exported context. RoPE has no learned positions, so a real engine may read past the 192
# tokens the models were trained on; SpecReason's judge chat (its English instruction spelled in
# the tiny alphabet) needs ≈ 300. Generation stays inside 192 by its own guards.
CONTEXT = 512


def hf_config(cfg: LMConfig, architecture: str = "Qwen2ForCausalLM") -> dict:
    """`config.json` of a Qwen2 model with these sizes (float32; untied head; no sliding window)."""
    tok = Tokenizer()
    out = {
        "architectures": [architecture], "model_type": "qwen2", "vocab_size": cfg.vocab,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp,
        "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": CONTEXT, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": False, "use_sliding_window": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": tok.bos, "eos_token_id": tok.eos, "pad_token_id": tok.pad,
        "torch_dtype": "float32",
    }
    if architecture == "Qwen2ForProcessRewardModel":
        out["num_labels"] = 2
    return out


def _linear(p: dict) -> dict[str, np.ndarray]:
    """A flax Dense (kernel [in, out]) as torch Linear tensors (weight [out, in])."""
    out = {"weight": np.ascontiguousarray(np.asarray(p["kernel"], np.float32).T)}
    if "bias" in p:
        out["bias"] = np.asarray(p["bias"], np.float32)
    return out


def backbone_tensors(lm: dict, cfg: LMConfig, prefix: str = "model.") -> dict[str, np.ndarray]:
    """HF `Qwen2Model` tensors (names under `prefix`) from the flax `TinyLM` params `lm`."""
    out = {f"{prefix}embed_tokens.weight": np.asarray(lm["embed_tokens"]["embedding"], np.float32),
           f"{prefix}norm.weight": np.asarray(lm["norm"]["weight"], np.float32)}
    for i in range(cfg.layers):
        blk = lm[f"blocks_{i}"]
        base = f"{prefix}layers.{i}."
        for name in ("input_layernorm", "post_attention_layernorm"):
            out[f"{base}{name}.weight"] = np.asarray(blk[name]["weight"], np.float32)
        for name, where in (("q_proj", "self_attn"), ("k_proj", "self_attn"),
                            ("v_proj", "self_attn"), ("o_proj", "self_attn"),
                            ("gate_proj", "mlp"), ("up_proj", "mlp"), ("down_proj", "mlp")):
            for kind, arr in _linear(blk[name]).items():
                out[f"{base}{where}.{name}.{kind}"] = arr
    return out


def lm_tensors(params: dict, cfg: LMConfig) -> dict[str, np.ndarray]:
    """`Qwen2ForCausalLM` tensors of a flax `TinyLM`'s params (`{"params": …}`)."""
    lm = params["params"]
    return {**backbone_tensors(lm, cfg), "lm_head.weight": _linear(lm["lm_head"])["weight"]}


def prm_tensors(params: dict, cfg: LMConfig) -> dict[str, np.ndarray]:
    """`Qwen2ForProcessRewardModel` tensors of a flax `RewardModel`'s params."""
    p = params["params"]
    out = backbone_tensors(p["lm"], cfg)
    for i, name in ((0, "score_hidden"), (2, "score_out")):
        for kind, arr in _linear(p[name]).items():
            out[f"score.{i}.{kind}"] = arr
    return out


def build_tokenizer():
    """The character-level tokenizer as a `tokenizers.Tokenizer` whose ids equal `Tokenizer()`'s.

    It is byte-level BPE with no merges (GPT-2/Qwen2's pipeline: every character of the
    alphabet is one byte, spelled as its byte-level symbol in the vocabulary), because
    `transformers` ≥ 5 loads any `model_type: qwen2` folder with its own `Qwen2Tokenizer`, which
    rebuilds the byte-level pre-tokenizer and decoder around the vocabulary whatever
    tokenizer.json says; a tokenizer of the same pipeline gives the same ids either way."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    symbol = _bytes_to_unicode()
    vocab = {(c if c in SPECIALS else symbol[ord(c)]): i for i, c in enumerate(Tokenizer().itos)}
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(list(SPECIALS))
    return tk


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable symbol table (the byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _write_tokenizer(out: Path, cfg: LMConfig) -> None:
    build_tokenizer().save(str(out / "tokenizer.json"), pretty=False)
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>",
               "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
               "additional_special_tokens": ["<asst>", "<extra_0>"],
               "model_max_length": CONTEXT, "clean_up_tokenization_spaces": False,
               "add_bos_token": False, "add_eos_token": False, "chat_template": CHAT_TEMPLATE}
    _write_json(out / "tokenizer_config.json", tok_cfg)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_folder(out: str | Path, config: dict, tensors: dict[str, np.ndarray], cfg: LMConfig,
                 meta: dict) -> Path:
    """One model folder; existing files of the same names are replaced."""
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", config)
    tok = Tokenizer()
    _write_json(out / "generation_config.json", {"bos_token_id": tok.bos, "eos_token_id": tok.eos,
                                                 "pad_token_id": tok.pad, "do_sample": True,
                                                 "temperature": 0.7})
    # One metadata key only: safetensors writes its metadata map in hash order, so provenance
    # goes to its own file to keep the export byte-for-byte deterministic.
    save_file({k: tensors[k] for k in sorted(tensors)}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    _write_json(out / "jaxroute.json", meta)
    _write_tokenizer(out, cfg)
    return out


def export_lm(name: str, out: str | Path, weights: str | Path | None = None) -> Path:
    """The committed tiny LM `name` (small | large) as a `Qwen2ForCausalLM` folder."""
    from generation.tinylm import train

    from_dir = Path(weights) if weights else train.WEIGHTS
    cfg, params, meta = train.load(from_dir, name)
    return write_folder(out, hf_config(cfg), lm_tensors(params, cfg), cfg,
                        {"jaxroute_model": name, "jaxroute_sha256": meta["sha256"]})


def export_prm(out: str | Path, weights: str | Path | None = None) -> Path:
    """The committed PRM stand-in as a `Qwen2ForProcessRewardModel` folder."""
    from generation.tinylm import train

    from_dir = Path(weights) if weights else train.WEIGHTS
    cfg, params, meta = train.load(from_dir, "prm")
    return write_folder(out, hf_config(cfg, "Qwen2ForProcessRewardModel"),
                        prm_tensors(params, cfg), cfg,
                        {"jaxroute_model": "prm", "jaxroute_sha256": meta["sha256"]})


def export_all(out: str | Path, weights: str | Path | None = None, *,
               overwrite: bool = False) -> dict[str, Path]:
    """small, large and prm under `out/`, written into a fresh folder beside it that then
    replaces `out` (decision 90): `out` is never a mix of old and new files (a stale
    `model.safetensors.index.json` next to new weights would send a loader to old shards). A
    file at `out`, or a non-empty folder unless `overwrite`, is refused (`InputError`)."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file, not a folder: give a folder to write the models into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out} is not empty ({', '.join(sorted(p.name for p in out.iterdir())[:5])}"
                         "…): give an empty or new folder, or overwrite it (--overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        for name in ("small", "large"):
            export_lm(name, tmp / name, weights)
        export_prm(tmp / "prm", weights)
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {name: out / name for name in ("small", "large", "prm")}


__all__ = ["CHAT_TEMPLATE", "ALPHABET", "build_tokenizer", "export_all", "export_lm",
           "export_prm", "hf_config", "lm_tensors", "prm_tensors", "write_folder"]
