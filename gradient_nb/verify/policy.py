"""Which requests and layer ranges get verified, and how verifiers are held to account.

The draw uses the operating system's CSPRNG (``secrets``) on the entry peer, and it is made per
request and per stage. Every shard commits to every request anyway, and a verification job is an
ordinary prefill on a fresh session, so a shard can neither tell which of its answers will be
checked nor behave only when watched.

Where another peer recomputes a stage for the entry (a *helper*), its answer is itself checked:
``recheck`` is the chance that a helper's answer which cleared the shard is recomputed here too (a
failing one always is), and ``canary`` the chance that the helper is also sent a job whose answer
the entry already knows (a past job it recomputed itself, sent as one more fresh prefill: a helper
cannot tell it from a real one; while the entry knows no job for those layers yet, the real job is
recomputed here instead, and becomes one). A helper that colludes with a shard, or answers without
computing, is caught by either and loses its standing as a verifier.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

DEFAULT_RATE = 0.01
DEFAULT_CANARY = 0.2
_SCALE = 1 << 53


def _draw(p: float) -> bool:
    return secrets.randbelow(_SCALE) < p * _SCALE


@dataclass
class SamplingPolicy:
    rate: float = DEFAULT_RATE  # probability that one stage of one request is verified
    recheck: float | None = None  # probability that a helper's passing answer is recomputed here (None: rate)
    canary: float = DEFAULT_CANARY  # probability that a helper also gets a job of known answer

    def __post_init__(self) -> None:
        for name in ("rate", "recheck", "canary"):
            x = getattr(self, name)
            if x is not None and not 0.0 <= x <= 1.0:
                raise ValueError(f"the verification {name} must be within [0, 1], not {x}")

    def draw(self) -> bool:
        """One independent, unpredictable draw with probability ``rate``."""
        return _draw(self.rate)

    def choose(self, stages: int) -> set[int]:
        """The stage indices of one request to verify (each drawn independently)."""
        return {i for i in range(stages) if self.draw()}

    def draw_recheck(self) -> bool:
        return _draw(self.rate if self.recheck is None else self.recheck)

    def draw_canary(self) -> bool:
        return _draw(self.canary)
