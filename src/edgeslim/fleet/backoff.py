"""Capped exponential backoff with jitter, and the one connection-state enum.

The agents (controller, node) reconnect to the broker with the delays drawn here. The rules,
learnt from long-running MQTT agents:

- the delay doubles after each failed attempt and never exceeds ``cap`` seconds;
- jitter spreads a fleet's reconnects so a restarted broker is not hit by every node at once
  ("equal jitter": half the envelope fixed, half uniform, so a delay is never near zero);
- the attempt counter resets only after a real CONNACK (``reset()`` is called from the
  on-connect callback, never from a TCP connect that the broker then refuses);
- waits go through ``threading.Event.wait`` so a shutdown request ends them at once.
"""

from __future__ import annotations

import enum
import math
import random
import threading

from edgeslim._validate import check_positive
from edgeslim.errors import ConfigError

__all__ = ["Backoff", "LinkState", "wait_or_stop"]


class LinkState(enum.Enum):
    """Where a broker connection stands; exactly one at a time."""

    IDLE = "idle"  # created, not started
    CONNECTING = "connecting"  # TCP connect + CONNECT sent, no CONNACK (or SUBACK) yet
    CONNECTED = "connected"  # CONNACK accepted and every subscription acknowledged
    BACKOFF = "backoff"  # lost or refused; waiting before the next attempt
    CLOSED = "closed"  # stopped on request; never leaves this state


class Backoff:
    """Delays for reconnect attempts: ``min(cap, initial * factor**n)`` with equal jitter.

    ``next_delay()`` returns the delay in seconds before attempt ``n + 1`` and increments
    ``n``; ``reset()`` sets ``n`` back to 0. With ``jitter=False`` the delays are exact, which
    tests use. ``rng`` may be a seeded ``random.Random``.
    """

    def __init__(
        self,
        *,
        initial: float = 0.5,
        cap: float = 30.0,
        factor: float = 2.0,
        jitter: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.initial = check_positive(initial, "initial", "Backoff")
        self.cap = check_positive(cap, "cap", "Backoff")
        self.factor = check_positive(factor, "factor", "Backoff")
        if self.factor < 1.0:
            raise ConfigError(
                f"The 'factor' parameter of Backoff must be a float >= 1.0. Got {factor!r} instead."
            )
        if self.cap < self.initial:
            raise ConfigError(
                f"The 'cap' parameter of Backoff must be a float >= initial ({self.initial}). "
                f"Got {cap!r} instead."
            )
        self.jitter = jitter
        self._rng = rng or random.Random()
        self.attempts = 0

    def envelope(self, attempt: int) -> float:
        """The un-jittered delay before attempt ``attempt + 1`` (seconds)."""
        # Stop the exponent where the envelope reaches the cap, so large attempt counts never
        # overflow a float (a fixed limit such as 64 stopped a slow factor short of the cap).
        if self.factor == 1.0:
            return min(self.cap, self.initial)
        reach = math.ceil(math.log(self.cap / self.initial) / math.log(self.factor)) + 1
        return min(self.cap, self.initial * self.factor ** min(attempt, reach))

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt; counts the attempt."""
        env = self.envelope(self.attempts)
        self.attempts += 1
        if not self.jitter:
            return env
        return env / 2.0 + self._rng.uniform(0.0, env / 2.0)

    def reset(self) -> None:
        """Call after a CONNACK that accepted the connection."""
        self.attempts = 0


def wait_or_stop(stop: threading.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; return True when ``stop`` was set (the caller should exit)."""
    return stop.wait(max(0.0, seconds))
