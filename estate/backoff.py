"""Exponential backoff with jitter, for every retry against a peer that is down."""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Exponential backoff with full jitter: 1 s, 2 s, 4 s ... at most `ceiling`."""

    def __init__(self, ceiling: float = 60.0, rng: random.Random | None = None) -> None:
        self.ceiling, self.failures = ceiling, 0
        self.rng = rng or random.Random()

    def failed(self) -> float:
        """Seconds to wait after one more failure."""
        self.failures += 1
        return self.rng.uniform(0.5, 1.0) * min(self.ceiling, 2.0 ** (self.failures - 1))

    def succeeded(self) -> None:
        self.failures = 0
