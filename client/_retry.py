"""Retry policy of the shared core: which answers to retry, backoff with jitter, ``Retry-After``. No I/O."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

from ._constants import INITIAL_BACKOFF, JITTER, MAX_BACKOFF, MAX_RETRY_AFTER, RETRYABLE_STATUSES


def is_retryable_status(status: int) -> bool:
    """408, 429 and every 5xx: the same request may well succeed later. Other 4xx never will."""
    return status in RETRYABLE_STATUSES or status >= 500


def backoff_delay(
    retries_taken: int,
    rng: Callable[[], float] = random.random,
    *,
    initial: float = INITIAL_BACKOFF,
    maximum: float = MAX_BACKOFF,
    jitter: float = JITTER,
) -> float:
    """Seconds before retry number ``retries_taken + 1``: ``min(initial * 2**n, maximum) * (1 - jitter * rng())``.

    >>> [backoff_delay(n, lambda: 0.0) for n in range(6)]
    [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    """
    base = min(initial * 2.0**retries_taken, maximum)
    return base * (1.0 - jitter * rng())


def retry_after_delay(
    advised: float, rng: Callable[[], float] = random.random, *, jitter: float = JITTER, cap: float = MAX_RETRY_AFTER
) -> float:
    """Seconds to wait when the server advised ``advised``: never less, plus up to ``jitter`` of it at random, so
    the hundreds of workers one overloaded server turned away do not all come back in the same instant.

    >>> retry_after_delay(2.0, lambda: 0.5), retry_after_delay(2.0, lambda: 0.0), retry_after_delay(59.0, lambda: 1.0)
    (2.25, 2.0, 60.0)
    """
    return min(advised * (1.0 + jitter * rng()), max(cap, advised))


def parse_retry_after(value: str | None, *, cap: float = MAX_RETRY_AFTER, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), clamped to ``[0, cap]``.

    ``None`` when absent or unparseable, so the caller falls back to its own backoff.

    >>> parse_retry_after("2.5"), parse_retry_after("3600"), parse_retry_after("soon")
    (2.5, 60.0, None)
    """
    if value is None or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 7231 dates are GMT; a naive parse means the zone was left out
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), cap)
