"""The generated results say what they were measured on, and none is stale (decision 92): every
section that depends on the embedded default names the weights and features it ran on, and that
is today's committed default — a retrain or a feature change without regenerating the results
fails here."""

from __future__ import annotations

import re
from pathlib import Path

from generation.main_job import embedded_source

ROOT = Path(__file__).resolve().parents[1]


def test_no_generated_section_is_stale():
    now = embedded_source()
    for doc in (ROOT / "docs" / "results.md", ROOT / "README.md"):
        text = doc.read_text()
        assert "**Stale**" not in text, f"{doc.name} carries a stale section: regenerate it"
        sources = re.findall(r"embedded default `(tinylm:[0-9a-f]+)`", text)
        assert sources, f"{doc.name} names no source"
        assert set(sources) == {now}, (doc.name, set(sources), now)
