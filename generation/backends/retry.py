"""The retry policy of every HTTP request (decisions 36, 71): which failures stop the run
(`FatalBackendError`), the circuit breaker (closed → open → half-open), the backoff delays, and
how long a server's `Retry-After` asks to wait. Transport-free: the OpenAI backend applies it."""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable


class CircuitOpen(RuntimeError):
    pass



class FatalBackendError(RuntimeError):
    """A failure that would make every later result wrong (refused key, unknown model, a server
    that cannot be reached, too many failures): the run stops at once with this message."""



class CircuitBreaker:
    """Closed → open after `threshold` consecutive failed requests → half-open after `cooldown`
    seconds (one probe request passes) → closed on its success, open again on its failure."""

    def __init__(self, threshold: int = 10, cooldown: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.threshold, self.cooldown, self.clock = threshold, cooldown, clock
        self.failures, self.opened_at, self.probing = 0, None, False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self.opened_at >= self.cooldown else "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self.probing:
            self.probing = True
            return True
        return False

    def record(self, ok: bool) -> None:
        self.probing = False
        if ok:
            self.failures, self.opened_at = 0, None
            return
        self.failures += 1
        if self.opened_at is not None or self.failures >= self.threshold:
            self.opened_at = self.clock()



def retry_after_seconds(headers, cap: float) -> float | None:
    """Seconds from a `Retry-After` (or `retry-after-ms`) header, capped; None if absent."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return min(cap, max(0.0, float(ms) / 1000.0))
        except ValueError:
            pass
    val = headers.get("retry-after")
    if val is None:
        return None
    try:
        return min(cap, max(0.0, float(val)))
    except ValueError:
        when = email.utils.parsedate_to_datetime(val)
        return None if when is None else min(cap, max(0.0, when.timestamp() - time.time()))


class Backoff:
    """Exponential backoff with jitter: attempt a waits min(max, base·2^a)·U(0.5, 1.5) seconds,
    or a server's `Retry-After` hint when that is longer. Seeded, so a run's delays repeat."""

    def __init__(self, base: float = 0.5, maximum: float = 8.0, seed: int = 0):
        self.base, self.maximum = base, maximum
        self._rng = random.Random(seed)

    def delay(self, attempt: int, hint: float | None = None) -> float:
        d = min(self.maximum, self.base * 2**attempt) * self._rng.uniform(0.5, 1.5)
        return max(d, hint or 0.0)
