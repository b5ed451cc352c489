"""Ephemeral client secrets (`ek_...`): what an app's backend mints so a browser can open realtime
sessions without holding a key.

A secret is a signed token (itsdangerous: HMAC-SHA256, constant-time check) over its id, expiry,
scope, the identity that minted it and the session configuration, so any replica with the same
signing secret verifies it without shared state. The signing secret is CLIENT_SECRET_KEY, or is
derived from API_KEY; with neither, a random one per process (secrets then only work on the
replica that minted them).
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import time
import uuid
from typing import Any

from itsdangerous import BadSignature, URLSafeSerializer

PREFIX = "ek_"
DEFAULT_SECONDS, MIN_SECONDS, MAX_SECONDS = 600, 10, 7200  # OpenAI's documented default and bounds
MAX_TOKEN_CHARS = 6000  # it travels in a header (and a WebSocket subprotocol); aiohttp allows 8190


class InvalidSecret(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Claims:
    id: str
    expires_at: int
    scope: str
    minted_by: str  # the rate-limit identity of the key that minted it
    session: dict[str, Any]


def signing_secret(configured: str | None, api_key: str | None) -> tuple[bytes, bool]:
    """(secret, shared): `shared` is False for a per-process random secret."""
    if configured:
        return configured.encode(), True
    if api_key:
        return hmac.new(api_key.encode(), b"fishvoice client secrets v1", hashlib.sha256).digest(), True
    return secrets.token_bytes(32), False


class ClientSecrets:
    def __init__(self, secret: bytes) -> None:
        self._serializer = URLSafeSerializer(secret, salt="fishvoice.client-secret.v1")

    def mint(self, session: dict[str, Any], seconds: int, minted_by: str, now: float | None = None) -> Claims:
        now = time.time() if now is None else now
        return Claims(id=uuid.uuid4().hex, expires_at=int(now) + seconds, scope="realtime",
                      minted_by=minted_by, session=session)

    def encode(self, claims: Claims) -> str:
        token = PREFIX + self._serializer.dumps({"id": claims.id, "exp": claims.expires_at, "scope": claims.scope,
                                                 "by": claims.minted_by, "session": claims.session})
        if len(token) > MAX_TOKEN_CHARS:
            raise InvalidSecret("session_too_large", f"the session makes a client secret of {len(token)} "
                                                     f"characters; at most {MAX_TOKEN_CHARS} fit in a header "
                                                     "(shorten the instructions)")
        return token

    def verify(self, token: str, now: float | None = None) -> Claims:
        """The claims of a valid, unexpired secret; InvalidSecret otherwise (never echoing the token)."""
        if not token.startswith(PREFIX) or len(token) > MAX_TOKEN_CHARS:
            raise InvalidSecret("invalid_client_secret", "malformed client secret")
        try:
            data = self._serializer.loads(token[len(PREFIX):])
        except (BadSignature, ValueError, UnicodeError):
            raise InvalidSecret("invalid_client_secret", "invalid client secret (bad signature or format)") from None
        if not isinstance(data, dict) or not isinstance(data.get("exp"), int) or data.get("scope") != "realtime" \
                or not isinstance(data.get("session"), dict):
            raise InvalidSecret("invalid_client_secret", "invalid client secret (unexpected content)")
        now = time.time() if now is None else now
        if now >= data["exp"]:
            raise InvalidSecret("expired_client_secret", "the client secret has expired; mint a new one")
        return Claims(id=str(data.get("id")), expires_at=data["exp"], scope="realtime",
                      minted_by=str(data.get("by")), session=data["session"])


def expiry_seconds(body: dict[str, Any]) -> int:
    """`expires_after` of a mint request -> seconds; ValueError (with the param) for bad values."""
    after = body.get("expires_after")
    if after is None:
        return DEFAULT_SECONDS
    if not isinstance(after, dict):
        raise ValueError("expires_after", "must be an object {anchor, seconds}")
    if after.get("anchor", "created_at") != "created_at":
        raise ValueError("expires_after.anchor", 'must be "created_at"')
    seconds = after.get("seconds", DEFAULT_SECONDS)
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        raise ValueError("expires_after.seconds", "must be an integer number of seconds")
    if not MIN_SECONDS <= seconds <= MAX_SECONDS:
        raise ValueError("expires_after.seconds", f"must be between {MIN_SECONDS} and {MAX_SECONDS}")
    return seconds
