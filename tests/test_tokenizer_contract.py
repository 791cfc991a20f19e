"""The prompt-id path through the real `transformers` tokenizer API (a tiny BPE tokenizer built
offline here, with a ChatML chat template like Qwen's), not a fake: a change in
`apply_chat_template`'s return type fails here first (decision 71)."""

import fake_vllm
import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from generation.backends.base import SYSTEM_PROMPT, StepRequest  # noqa: E402
from generation.backends.vllm_backend import VLLMBackend, chat_ids  # noqa: E402
from generation.live import scorers  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[
        "<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = ["Please reason step by step, and put your final answer within \\boxed{}.",
             "What is 2+3?", "Step 1: add 2 and 3.\n\nSo 2+3 = 5, \\boxed{5}",
             "system user assistant"] * 20
    tok.train_from_iterator(lines, trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
        chat_template=CHATML)


MSGS = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "What is 2+3?"}]


def test_chat_ids_are_the_token_ids_of_the_rendered_template(tokenizer):
    ids = chat_ids(tokenizer, MSGS)
    text = tokenizer.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert all(isinstance(i, int) for i in ids) and len(ids) > 10


def test_the_old_call_returns_a_mapping_on_transformers_5(tokenizer):
    """What the backend did before: `list(apply_chat_template(..., tokenize=True))`."""
    out = tokenizer.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=True)
    major = int(transformers.__version__.split(".")[0])
    if major >= 5:
        assert list(out) == ["input_ids", "attention_mask"]  # keys, not ids: the bug
    assert chat_ids(tokenizer, MSGS) == list(out["input_ids"] if major >= 5 else out)


def test_the_vllm_backend_and_judge_use_real_template_ids(tokenizer, monkeypatch):
    monkeypatch.setattr(fake_vllm.LLM, "get_tokenizer", lambda self: tokenizer)
    be = VLLMBackend("m", params=1e9, vllm_module=fake_vllm.module())
    ids = be.prompt_ids("What is 2+3?")
    assert ids == chat_ids(tokenizer, MSGS)
    captured = {}

    def generate(prompts, params, **kw):
        captured["ids"] = prompts[0]["prompt_token_ids"]
        raise RuntimeError("stop here")

    monkeypatch.setattr(be.llm, "generate", generate)
    with pytest.raises(RuntimeError, match="stop here"):
        be.generate([StepRequest("k", "What is 2+3?", (), None, 1)])
    assert captured["ids"] == ids
    with pytest.raises(RuntimeError, match="stop here"):
        scorers.VLLMJudge(be).score([("What is 2+3?", ("Step 1: add.",))])
    assert captured["ids"] == chat_ids(tokenizer, scorers.judge_messages("What is 2+3?",
                                                                        ("Step 1: add.",)))
