"""Rate limits and concurrency caps per caller (a key's identity; the client address when no key
is configured), by the route group server.scopes assigns.

The request budgets are the `limits` library's moving windows, in memory by default or in Redis
when RATE_LIMIT_STORAGE=redis://host:port/ (then replicas share one budget). Concurrency caps
count requests in flight in this process. Defaults follow the published table for the job API;
RATE_LIMITS / CONCURRENCY_LIMITS (JSON objects by group) override them.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import time
from collections.abc import Iterator, Mapping

from limits import RateLimitItem, parse
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

log = logging.getLogger(__name__)

# group -> (requests per window, concurrent requests or None)
DEFAULT_LIMITS: dict[str, tuple[str, int | None]] = {
    "run": ("1000 per 10 seconds", 200),
    "runsync": ("2000 per 10 seconds", 400),
    "status": ("2000 per 10 seconds", 400),  # /status and /stream
    "cancel": ("100 per 10 seconds", 20),  # /cancel and /retry
    "purge-queue": ("2 per 10 seconds", None),
    "tts": ("200 per 10 seconds", 20),  # /v1/tts, /v1/audio/speech
    "asr": ("100 per 10 seconds", 20),  # /v1/audio/transcriptions, /translations
    "references": ("100 per 10 seconds", 8),  # add, update, delete
    "client-secrets": ("200 per 10 seconds", None),  # an app's backend mints one per visitor
    "realtime-session": ("100 per 10 seconds", None),  # opening calls and WebSockets; live ones are MAX_SESSIONS
    "read": ("1000 per 10 seconds", None),  # listings, call state, models, metrics
}


class LimitsError(ValueError):
    pass


class Limited(Exception):
    def __init__(self, retry_after: int, what: str) -> None:
        super().__init__(what)
        self.retry_after = retry_after


def _storage_uri(uri: str) -> str:
    return uri if uri.startswith("async+") else "async+" + uri


class RateLimiter:
    def __init__(self, storage: str = "memory://", rates: Mapping[str, str] | None = None,
                 concurrency: Mapping[str, int] | None = None) -> None:
        self.items: dict[str, RateLimitItem] = {}
        self.caps: dict[str, int | None] = {}
        for group, (rate, cap) in DEFAULT_LIMITS.items():
            self.items[group] = parse(rate)
            self.caps[group] = cap
        for group, rate in (rates or {}).items():
            if group not in DEFAULT_LIMITS:
                raise LimitsError(f"RATE_LIMITS: unknown group {group!r}; known: {sorted(DEFAULT_LIMITS)}")
            try:
                self.items[group] = parse(rate)
            except ValueError as exc:
                raise LimitsError(f"RATE_LIMITS[{group!r}]: {exc} (write e.g. \"100 per 10 seconds\")") from None
        for group, cap in (concurrency or {}).items():
            if group not in DEFAULT_LIMITS:
                raise LimitsError(f"CONCURRENCY_LIMITS: unknown group {group!r}; known: {sorted(DEFAULT_LIMITS)}")
            if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
                raise LimitsError(f"CONCURRENCY_LIMITS[{group!r}]: must be a positive integer or null")
            self.caps[group] = cap
        self.storage_uri = storage
        self._limiter = MovingWindowRateLimiter(storage_from_string(_storage_uri(storage)))
        self._in_flight: collections.Counter[tuple[str, str]] = collections.Counter()
        self._storage_failing = False

    def describe(self) -> dict[str, dict[str, object]]:
        return {g: {"requests": item.amount, "per_seconds": item.get_expiry(), "concurrent": self.caps[g]}
                for g, item in self.items.items()}

    async def hit(self, group: str, identity: str) -> None:
        """Count one request; Limited when the group's budget for `identity` is spent."""
        item = self.items[group]
        try:
            allowed = await self._limiter.hit(item, group, identity)
            if not allowed:
                stats = await self._limiter.get_window_stats(item, group, identity)
        except Exception as exc:  # noqa: BLE001 - a storage outage must not refuse every request
            if not self._storage_failing:
                log.error("rate-limit storage %s failed (%s: %s); not limiting until it answers",
                          self.storage_uri.split("@")[-1], type(exc).__name__, exc)
            self._storage_failing = True
            return
        self._storage_failing = False
        if not allowed:
            retry = max(1, math.ceil(stats.reset_time - time.time()))
            raise Limited(retry, f"rate limit for {group}: {item.amount} requests per {item.get_expiry()} s")

    @contextlib.contextmanager
    def slot(self, group: str, identity: str) -> Iterator[None]:
        """Hold one of the group's concurrent slots for `identity`; Limited when none is free."""
        cap = self.caps.get(group)
        key = (group, identity)
        if cap is not None and self._in_flight[key] >= cap:
            raise Limited(1, f"concurrency limit for {group}: {cap} requests at once")
        self._in_flight[key] += 1
        try:
            yield
        finally:
            self._in_flight[key] -= 1
            if self._in_flight[key] <= 0:
                del self._in_flight[key]
