"""Rate limits per API key and per route group, counted by the ``limits`` library (moving window).

A route group is the scope its routes require (``embed``, ``verify``, ``identify``, ``enroll``,
``delete``, ``crops``, ``admin``), so one key's enrolment burst does not use up its searches. The
caller is the authenticated key's id, or the client address when the gateway runs without keys.
The limit is taken after authentication (``dependencies.require``): unknown keys are refused with 401
without touching the counts, and ``/healthz``, ``/readyz``, ``/metrics`` and ``/ui`` require no scope,
so they are never limited.

Counts live where ``rate_limit_storage`` says: ``memory://`` in this process (with several replicas, each
limits on its own), or a shared Redis/Memcached so replicas limit together.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

from limits import RateLimitItem, parse_many
from limits.errors import ConfigurationError
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import MovingWindowRateLimiter

from cdface.core.errors import CdfaceError
from cdface.serving.errors import ServingError
from cdface.serving.settings import Settings, rate_limit_off

log = logging.getLogger("cdface.serving")

NAMESPACE = "cdface"  # the first part of every counter's key in the storage (shared storages may hold others)


class RateLimited(ServingError):
    """The caller has used up its requests of a route group for now (429, with ``Retry-After``)."""

    code = "rate_limited"


class RateLimiter:
    """Counts each caller's requests per route group against the configured limits."""

    def __init__(self, settings: Settings) -> None:
        self._default = _parse(settings.rate_limit)
        self._by_group = {group: _parse(limit) for group, limit in settings.rate_limits.items()}
        self.enabled = bool(self._default) or any(self._by_group.values())
        # The storage is created even when everything is off: a wrong URI is found at start, not later.
        try:
            storage = storage_from_string(settings.rate_limit_storage.get_secret_value())
        except ConfigurationError as exc:  # e.g. redis:// without the redis package; the message holds no URI
            raise CdfaceError(f"CDFACE_SERVE_RATE_LIMIT_STORAGE cannot be used: {exc}") from None
        self._window = MovingWindowRateLimiter(storage)
        # Counts in this process's memory are a few microseconds to update; a shared storage is a network call.
        self.in_process = isinstance(storage, MemoryStorage)

    def limits_of(self, group: str) -> Sequence[RateLimitItem]:
        return self._by_group.get(group, self._default)

    def hit(self, group: str, caller: str) -> None:
        """Count one request of ``caller`` to ``group``; ``RateLimited`` when one of its limits is used up.

        Every limit is checked before any is counted, so a refused request uses up nothing: a client
        that keeps retrying too early is not kept out longer than the window it was told to wait.
        """
        limits = self.limits_of(group)
        try:
            for limit in limits:
                if not self._window.test(limit, NAMESPACE, group, caller):
                    raise self._refusal(limit, group, caller)
            for limit in limits:
                # Another request of the same caller may have taken the last slot since the test above.
                if not self._window.hit(limit, NAMESPACE, group, caller):
                    raise self._refusal(limit, group, caller)
        except RateLimited:
            raise
        except Exception as exc:  # a shared storage (Redis, Memcached) that is away: its client's own errors
            # Refused rather than let through unlimited: the limit guards a biometric gallery against scraping.
            log.warning("rate limit storage unavailable: %s", type(exc).__name__)
            error = ServingError("the rate limit storage is unavailable; retry shortly",
                                 code="rate_limiter_unavailable")
            error.retry_after = 1.0
            raise error from None

    def _refusal(self, limit: RateLimitItem, group: str, caller: str) -> RateLimited:
        stats = self._window.get_window_stats(limit, NAMESPACE, group, caller)
        error = RateLimited(f"rate limit of {limit} for '{group}' requests reached; retry after the Retry-After "
                            "header's seconds")
        # Whole seconds (the header's unit), rounded up so that a retry at that time is let through.
        error.retry_after = float(max(1, math.ceil(stats.reset_time - time.time())))
        return error


def _parse(limit: str) -> list[RateLimitItem]:
    return [] if rate_limit_off(limit) else parse_many(limit)
