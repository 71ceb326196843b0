"""A token bucket: ``rate`` tokens per second, at most ``burst`` saved up.

Used for a WebSocket client's inbound messages and for the edge gateway's drain pace.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    rate: float
    burst: float
    tokens: float = field(default=-1.0)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.burst

    def available(self) -> int:
        """Whole tokens available now."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return int(self.tokens)

    def take(self, n: int = 1) -> bool:
        """Spend ``n`` tokens if they are there."""
        if self.available() < n:
            return False
        self.tokens -= n
        return True
