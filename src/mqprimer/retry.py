"""Retry policy: pure backoff arithmetic (Symfony Messenger's shape)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how late a failing message is tried again.

    ``max_attempts`` counts every delivery, the first included: ``max_attempts=3`` means
    one try and two retries, then the dead-letter destination. The delay before attempt
    ``n + 1`` is ``initial_delay * multiplier ** (n - 1)``, capped at ``max_delay``, then
    spread by up to ``±jitter`` (a fraction) so that failing consumers do not retry in step.
    """

    max_attempts: int = 3
    initial_delay: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 60.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_delay < 0 or self.max_delay < 0:
            raise ValueError("initial_delay and max_delay must be >= 0")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, got {self.jitter}")

    def should_retry(self, attempt: int) -> bool:
        """Whether a message that failed on ``attempt`` gets another one."""
        return attempt < self.max_attempts

    def delay_for(self, attempt: int) -> float:
        """Seconds to wait before the attempt after ``attempt`` (1-based)."""
        base = min(self.initial_delay * self.multiplier ** max(attempt - 1, 0), self.max_delay)
        if self.jitter and base:
            base *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(base, 0.0)


NO_RETRY = RetryPolicy(max_attempts=1)
