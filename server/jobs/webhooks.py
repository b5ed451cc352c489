"""Webhook delivery: when a job submitted with `"webhook": URL` ends, its /status body is POSTed
there, as RunPod does. A delivery that fails (no answer, or not 2xx) is tried again after a
delay, a few times in all; it never affects the job itself.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

ATTEMPTS = 3  # RunPod: the first try plus two retries
TIMEOUT = aiohttp.ClientTimeout(total=10)


async def deliver(session: aiohttp.ClientSession, url: str, body: dict[str, Any], *,
                  attempts: int = ATTEMPTS, delay: float = 10.0) -> bool:
    """POST `body` as JSON to `url` until it answers 2xx; False when every attempt failed."""
    for attempt in range(1, attempts + 1):
        try:
            async with session.post(url, json=body, timeout=TIMEOUT) as response:
                if 200 <= response.status < 300:
                    return True
                reason = f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        log.warning("webhook for job %s to %s failed (%s), attempt %d of %d", body.get("id"), url, reason,
                    attempt, attempts)
        if attempt < attempts:
            await asyncio.sleep(delay)
    return False
