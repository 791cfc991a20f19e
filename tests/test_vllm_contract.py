"""Contract of the project's vLLM usage against the real `vllm` package — on a CPU, without
starting an engine (decision 71). Runs wherever vLLM is importable (`.ci/run` installs the
`[vllm]` extra into a second environment for it); skipped, with the reason, elsewhere.

It builds the project's exact engine arguments, sampling parameters and prompts with vLLM's
own classes, builds model configs from small local config.json folders (a `Qwen2ForCausalLM`
and a `Qwen2ForProcessRewardModel`), checks every method and field the backends and scorers
use, and checks the test fakes (tests/fake_vllm.py) against the real classes.
"""

import dataclasses
import inspect
import json
import typing

import fake_vllm
import pytest

vllm = pytest.importorskip("vllm", reason="vllm is not installed (pip install '.[vllm]')")

from generation.backends.vllm_backend import engine_kwargs, sampling_kwargs  # noqa: E402
from generation.live import scorers  # noqa: E402

QWEN2 = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 512, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
         "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
         "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}


def _folder(tmp_path, arch):
    d = tmp_path / arch
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": [arch], **QWEN2}))
    return str(d)


def _fields(cls) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    if hasattr(cls, "__struct_fields__"):
        return set(cls.__struct_fields__)
    if hasattr(cls, "__annotations__") and typing.is_typeddict(cls):
        return set(cls.__annotations__)
    return set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}


def test_generation_engine_arguments_build_a_model_config(tmp_path):
    kw = engine_kwargs(_folder(tmp_path, "Qwen2ForCausalLM"), gpu_memory_utilization=0.25,
                       max_model_len=2048)
    mc = vllm.EngineArgs(**kw, skip_tokenizer_init=True).create_model_config()
    assert mc.max_model_len == 2048 and mc.logprobs_mode == "raw_logits"
    assert mc.runner_type == "generate" and mc.is_prefix_caching_supported
    # LLM(**kw) forwards unknown names to EngineArgs: each is a field of EngineArgs.
    assert set(kw) <= _fields(vllm.EngineArgs)


def test_reward_model_engine_arguments_follow_vllms_prefix_cache_support(tmp_path):
    prm = scorers.VLLMRewardModel(_folder(tmp_path, "Qwen2ForProcessRewardModel"),
                                  llm=object(), max_model_len=2048)
    kw = prm.engine_kwargs()
    mc = vllm.EngineArgs(**kw, skip_tokenizer_init=True).create_model_config()
    assert mc.runner_type == "pooling" and mc.pooler_config.tok_pooling_type == "STEP"
    # vLLM does not prefix-cache STEP pooling; the project asks for none.
    assert kw["enable_prefix_caching"] is False and not mc.is_prefix_caching_supported
    assert kw["gpu_memory_utilization"] == 0.25 and kw["max_model_len"] == 2048


def test_sampling_params_and_prompts_are_vllms_own_objects():
    sp = vllm.SamplingParams(**sampling_kwargs(0.7, 64, False, 11))
    assert sp.stop == ["\n\n"] and sp.logprobs == 5 and sp.seed == 11 and sp.max_tokens == 64
    whole = vllm.SamplingParams(**sampling_kwargs(0.7, 64, True, 11))
    assert not whole.stop
    judge = vllm.SamplingParams(**scorers.VLLMJudge(backend=None).sampling_kwargs())
    assert judge.max_tokens == 1 and judge.temperature == 0.0
    prompt = vllm.TokensPrompt(prompt_token_ids=[1, 2, 3])
    assert prompt["prompt_token_ids"] == [1, 2, 3]
    assert vllm.TokensPrompt is vllm.inputs.TokensPrompt


def test_the_methods_the_backends_call_exist_with_these_parameters():
    gen = inspect.signature(vllm.LLM.generate).parameters
    assert {"prompts", "sampling_params", "use_tqdm"} <= set(gen)
    enc = inspect.signature(vllm.LLM.encode).parameters
    assert {"prompts", "use_tqdm", "pooling_task", "pooling_params"} <= set(enc)
    assert "step_tag_id" in _fields(vllm.PoolingParams)  # STEP pooling at the model's own tag
    task = str(enc["pooling_task"].annotation)
    assert "token_classify" in task
    assert hasattr(vllm.LLM, "get_tokenizer")
    assert "self.llm_engine" in inspect.getsource(vllm.LLM.__init__)  # .model_config read


def test_output_classes_have_the_fields_the_parsers_read():
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput, PoolingOutput, PoolingRequestOutput, RequestOutput

    assert {"prompt_token_ids", "outputs", "num_cached_tokens"} <= _fields(RequestOutput)
    assert {"text", "token_ids", "logprobs", "finish_reason", "stop_reason"} <= _fields(
        CompletionOutput)
    assert {"logprob", "rank", "decoded_token"} <= _fields(Logprob)
    assert {"outputs", "prompt_token_ids"} <= _fields(PoolingRequestOutput)
    assert "data" in _fields(PoolingOutput)


def test_the_fakes_match_the_real_classes():
    """Every field and parameter the fakes have exists in vLLM (a fake cannot drift)."""
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput, PoolingOutput, PoolingRequestOutput, RequestOutput

    for fake, real in [(fake_vllm.Logprob, Logprob), (fake_vllm.CompletionOutput,
                                                      CompletionOutput),
                       (fake_vllm.RequestOutput, RequestOutput),
                       (fake_vllm.PoolingOutput, PoolingOutput),
                       (fake_vllm.PoolingRequestOutput, PoolingRequestOutput)]:
        assert _fields(fake) <= _fields(real), (fake, _fields(fake) - _fields(real))
    assert fake_vllm.SamplingParams.FIELDS <= _fields(vllm.SamplingParams)
    assert fake_vllm.PoolingParams.FIELDS <= _fields(vllm.PoolingParams)
    assert fake_vllm.LLM.ENGINE_ARGS <= _fields(vllm.EngineArgs)
    for name in ("generate", "encode"):
        fake = inspect.signature(getattr(fake_vllm.LLM, name)).parameters
        real = inspect.signature(getattr(vllm.LLM, name)).parameters
        assert list(fake) == list(real), (name, list(fake), list(real))
    assert set(typing.get_type_hints(fake_vllm.TokensPrompt)) <= set(
        typing.get_type_hints(vllm.TokensPrompt))
