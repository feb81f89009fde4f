"""How long a socket client waits before each reconnect attempt: :class:`Backoff`.

Exponential backoff with full jitter: the n-th consecutive failure (counting from
0) waits a delay drawn uniformly from ``[0, min(cap, base * factor**n)]``. The
ceiling doubles (with the default factor) until it reaches the cap; the jitter
spreads a fleet of clients that lost the same server over the whole window, so
they do not come back in one wave. A successful connection resets the count.

Like the protocol machine, it does no I/O and reads no clock: the client asks it
for the next delay and sleeps that long itself. The source of randomness is
injectable, so tests can pin the delays.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import attrs

from .._errors import InvalidArgumentError

__all__ = ["Backoff", "Jitter", "ReconnectOptions"]

Jitter = Callable[[float, float], float]
"""Picks a delay between its two arguments (``low``, ``high``), like :func:`random.uniform`."""


def _check_options(options: ReconnectOptions) -> None:
    if not (math.isfinite(options.base) and options.base >= 0):
        raise InvalidArgumentError(f"base must be finite and >= 0 seconds: {options.base!r}")
    if not (math.isfinite(options.cap) and options.cap >= options.base):
        raise InvalidArgumentError(f"cap must be finite and >= base: {options.cap!r}")
    if not (math.isfinite(options.factor) and options.factor >= 1):
        raise InvalidArgumentError(f"factor must be finite and >= 1: {options.factor!r}")
    if options.max_attempts is not None and options.max_attempts < 1:
        raise InvalidArgumentError(f"max_attempts must be at least 1: {options.max_attempts!r}")


@attrs.frozen
class ReconnectOptions:
    """How a socket client reconnects after it lost its connection.

    The delay before the n-th consecutive attempt (n from 0) is drawn uniformly
    from ``[0, min(cap, base * factor**n)]`` ("full jitter"). Each attempt has
    the client's connect timeout.
    """

    base: float = 0.5
    """Seconds: the ceiling of the first delay."""
    cap: float = 30.0
    """Seconds: the ceiling never grows past this."""
    factor: float = 2.0
    """How much the ceiling grows after each failed attempt."""
    max_attempts: int | None = None
    """Give up (the client then fails for good) after this many consecutive failed
    attempts; None: never give up on a server that may come back."""
    jitter: Jitter = random.uniform
    """Draws each delay between 0 and the ceiling; :func:`random.uniform` by
    default. Tests pass a function of their own to pin the delays."""

    def __attrs_post_init__(self) -> None:
        _check_options(self)


class Backoff:
    """The sans-IO reconnect schedule of one client (see the module).

    :meth:`next_delay` after each loss or failed attempt, :meth:`reset` once a
    connection succeeded.
    """

    def __init__(self, options: ReconnectOptions) -> None:
        self.options = options
        self.attempt = 0
        """Consecutive attempts scheduled since the last reset."""

    def ceiling(self, attempt: int) -> float:
        """The largest delay of attempt number ``attempt`` (from 0)."""
        options = self.options
        if options.base == 0:
            return 0.0
        # Compare exponents rather than compute factor**attempt, which overflows.
        if options.factor == 1 or attempt < math.log(options.cap / options.base, options.factor):
            return min(options.cap, options.base * options.factor**attempt)
        return options.cap

    def next_delay(self) -> float:
        """The delay before the next attempt, counting it as scheduled.

        Always between 0 and the current ceiling, whatever the jitter returns.
        """
        high = self.ceiling(self.attempt)
        self.attempt += 1
        delay = self.options.jitter(0.0, high)
        if not 0 <= delay <= high:  # a jitter out of its bounds (NaN included)
            delay = min(max(delay, 0.0), high) if math.isfinite(delay) else high
        return delay

    @property
    def exhausted(self) -> bool:
        """Whether :attr:`ReconnectOptions.max_attempts` attempts were scheduled
        since the last reset."""
        limit = self.options.max_attempts
        return limit is not None and self.attempt >= limit

    def reset(self) -> None:
        """A connection succeeded: the next loss starts again from ``base``."""
        self.attempt = 0
