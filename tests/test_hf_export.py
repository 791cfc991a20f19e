"""The tiny models as Hugging Face folders (decision 85): deterministic files, tensors that are
the flax parameters, and a tokenizer that real `transformers` loads and that gives the JAX
tokenizer's ids, prompts and text. (Logits through torch and the real vLLM engine: the
real-engine tests, tests/test_real_engine.py.)"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from generation.tinylm import hf_export, task, train
from generation.tinylm.backend import load
from generation.tinylm.model import Tokenizer
from jaxroute.errors import InputError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return hf_export.export_all(tmp_path_factory.mktemp("models"))


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_export_is_deterministic_and_complete(folders, tmp_path):
    again = hf_export.export_all(tmp_path)
    for name, folder in folders.items():
        assert _digests(folder) == _digests(again[name])
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja", "generation_config.json", "jaxroute.json"} <= set(_digests(folder))


@pytest.mark.parametrize("name", ["small", "large"])
def test_the_tensors_are_the_flax_parameters(folders, name):
    cfg, params, _ = train.load(train.WEIGHTS, name)
    tensors = load_file(folders[name] / "model.safetensors")
    assert sum(t.size for t in tensors.values()) == load(name).params  # N for FLOPs
    lm = params["params"]
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"],
                                  lm["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(tensors["lm_head.weight"], np.asarray(lm["lm_head"]["kernel"]).T)
    np.testing.assert_array_equal(tensors["model.layers.0.self_attn.q_proj.bias"],
                                  lm["blocks_0"]["q_proj"]["bias"])
    config = json.loads((folders[name] / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["head_dim"] >= 32
    assert not config["tie_word_embeddings"] and "lm_head.bias" not in tensors
    hf_cfg = transformers.AutoConfig.from_pretrained(folders[name])
    assert (hf_cfg.hidden_size, hf_cfg.num_hidden_layers, hf_cfg.vocab_size) == (
        cfg.d_model, cfg.layers, cfg.vocab)


def test_the_prm_is_a_qwen2_process_reward_model(folders):
    tensors = load_file(folders["prm"] / "model.safetensors")
    config = json.loads((folders["prm"] / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForProcessRewardModel"] and config["num_labels"] == 2
    assert tensors["score.2.weight"].shape == (2, config["hidden_size"])
    assert not any(k.startswith("lm_head") for k in tensors)


@pytest.mark.parametrize("loader", ["auto", "fast"])
def test_real_transformers_tokenizes_as_the_jax_tokenizer(folders, loader):
    """transformers ≥ 5 loads a qwen2 folder with its own Qwen2Tokenizer (byte-level BPE around
    the vocabulary); the plain fast tokenizer reads tokenizer.json as it is. Both must give the
    JAX tokenizer's ids, chat prompt and text."""
    folder = folders["small"]
    hf = (transformers.AutoTokenizer.from_pretrained(folder) if loader == "auto" else
          transformers.PreTrainedTokenizerFast.from_pretrained(folder))
    tok = Tokenizer()
    for p in task.generate(20, seed=3, split="test"):
        q = p.problem.question
        text = "\n\n".join(p.solution_steps)
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.decode(tok.encode(text)) == text
        ids = hf.apply_chat_template([{"role": "system", "content": "Please reason."},
                                      {"role": "user", "content": q}],
                                     add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(ids) == tok.prompt(q)
    assert hf.convert_tokens_to_ids("<extra_0>") == tok.step_tag
    assert hf.eos_token_id == tok.eos and hf.bos_token_id == tok.bos
    judge = hf.apply_chat_template([{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "s1\n\ns2"},
                                    {"role": "user", "content": "judge"}],
                                   add_generation_prompt=True, tokenize=False)
    assert judge == "<bos>q<asst>s1\n\ns2<eos>judge<asst>"


def test_out_must_be_an_empty_folder_unless_overwritten_and_is_then_written_clean(tmp_path):
    """Regression: `--out` onto a file ended in a NotADirectoryError traceback, and onto a
    non-empty folder the export merged, leaving a stale `model.safetensors.index.json` beside
    the new weights (decision 90)."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        hf_export.export_all(a_file)
    out = tmp_path / "models"
    (out / "small").mkdir(parents=True)
    (out / "small" / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(InputError, match="not empty.*--overwrite"):
        hf_export.export_all(out)
    assert (out / "small" / "model.safetensors.index.json").exists()  # nothing was touched
    done = hf_export.export_all(out, overwrite=True)
    assert not (out / "small" / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["large", "prm", "small"]
    assert (done["small"] / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
