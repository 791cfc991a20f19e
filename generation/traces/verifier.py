"""The LLM step verifier (training only): the Appendix-A verification prompt, strict verdicts.

`StepVerifier(backend)(items)` takes (question, previous steps, last step) triples and returns
True ("correct"), False ("incorrect") or None (no answer, or anything but exactly one of the two
words — never guessed).
"""

from __future__ import annotations

from collections.abc import Sequence

PROMPT = """Task: Determine whether the final step is correct for the given problem.

Instructions:
- Reply with exactly one verdict: correct or incorrect.
- Do not explain, justify, or provide any reasoning.

Question:
{question}

Previous steps:
{prefix}

Last step:
{answer}

Verdict:
correct | incorrect"""


def parse_verdict(text: str | None) -> bool | None:
    """Strict: the reply, stripped of whitespace, quotes and a trailing period, must be exactly
    "correct" or "incorrect" (any case)."""
    if text is None:
        return None
    t = text.strip().strip("\"'`*").rstrip(".").strip().lower()
    return {"correct": True, "incorrect": False}.get(t)


def render(question: str, prefix: Sequence[str], step: str) -> str:
    body = PROMPT.replace("{question}", question)
    body = body.replace("{prefix}", "\n\n".join(prefix) if prefix else "(none)")
    return body.replace("{answer}", step)


class StepVerifier:
    """Verifies steps with any OpenAI-compatible chat model (e.g. gpt-4o-mini), cached by the
    backend's response cache."""

    def __init__(self, backend):
        self.backend = backend

    def __call__(self, items: Sequence[tuple[str, Sequence[str], str]]) -> list[bool | None]:
        messages = [[{"role": "user", "content": render(q, p, s)}] for q, p, s in items]
        return [parse_verdict(t) for t in self.backend.chat_texts(messages)]
