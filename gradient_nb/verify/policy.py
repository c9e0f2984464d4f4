"""Which requests and layer ranges get verified: at random, at a configurable rate, unpredictably.

The draw uses the operating system's CSPRNG (``secrets``) on the entry peer, and it is made per
request and per stage. Every shard commits to every request anyway, and a verification job is an
ordinary prefill on a fresh session, so a shard can neither tell which of its answers will be
checked nor behave only when watched.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

DEFAULT_RATE = 0.01
_SCALE = 1 << 53


@dataclass
class SamplingPolicy:
    rate: float = DEFAULT_RATE  # probability that one stage of one request is verified

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"the verification rate must be within [0, 1], not {self.rate}")

    def draw(self) -> bool:
        """One independent, unpredictable draw with probability ``rate``."""
        return secrets.randbelow(_SCALE) < self.rate * _SCALE

    def choose(self, stages: int) -> set[int]:
        """The stage indices of one request to verify (each drawn independently)."""
        return {i for i in range(stages) if self.draw()}
