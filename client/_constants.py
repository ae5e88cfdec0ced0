"""Defaults of the client SDK, in one place so the sync and async clients cannot drift apart."""

from __future__ import annotations

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
BASE_URL_ENV = "RMSERVE_BASE_URL"
API_KEY_ENV = "RMSERVE_API_KEY"

# Seconds per attempt (connect, read, write and pool each), not for the whole call with its retries.
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_RETRIES = 3

# Below the server's default limit (1,024 items per request) so a default client never hits a 413,
# and small enough that a 4,096-item rollout is spread over several replicas.
MAX_ITEMS_PER_REQUEST = 256
# The most chunk requests one call keeps in flight.
MAX_CONCURRENCY = 8

# Backoff: min(INITIAL_BACKOFF * 2**retry, MAX_BACKOFF), minus up to JITTER of it at random so that
# many trainer workers shed by the same 429 do not come back in lockstep.
INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 8.0
JITTER = 0.25
# A Retry-After longer than this is cut to it: a trainer step should not stall for minutes on one header.
MAX_RETRY_AFTER = 60.0

# Statuses worth another attempt besides every 5xx: request timeout and load shedding.
RETRYABLE_STATUSES = frozenset({408, 429})

USER_AGENT = "rmserve-client/0.1.0"
