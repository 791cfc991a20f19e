"""The OpenAI backend's persistent response cache: an SQLite map from a request's canonical key to
the raw JSON response body (only validated bodies are stored, decision 36), shared by threads."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path


class ResponseCache:
    """SQLite map from a request key to the raw JSON response."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, body TEXT)")
        self._db.commit()

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT body FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, body: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)",
                             (key, json.dumps(body)))
            self._db.commit()
