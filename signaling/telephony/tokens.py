"""Short-lived, single-use stream tokens: a carrier's media stream is accepted only for a call
that a voice webhook admitted, so nobody can open a stream with a guessed URL.

A token is `<base64url JSON {call, exp, nonce}>.<HMAC-SHA256>`, signed with the configured secret
(or a random one per process). The webhook puts it in the stream URL or a stream parameter.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time


class TokenError(ValueError):
    pass


class StreamTokens:
    def __init__(self, secret: str | None, ttl: float) -> None:
        self._key = (secret or secrets.token_hex(32)).encode()
        self.ttl = ttl
        self._used: dict[str, float] = {}  # nonce -> expiry, so a token opens one stream only

    def issue(self, call_id: str | None) -> str:
        body = json.dumps({"call": call_id or "", "exp": round(time.time() + self.ttl, 3),
                           "nonce": secrets.token_hex(8)}, separators=(",", ":")).encode()
        encoded = base64.urlsafe_b64encode(body).rstrip(b"=").decode()
        return f"{encoded}.{self._sign(encoded)}"

    def redeem(self, token: str | None, call_id: str | None = None) -> None:
        """Accept `token` once; TokenError says why not. `call_id`, when the carrier reports the
        same id to the webhook and the stream (Twilio's CallSid), must match the token's."""
        if not token:
            raise TokenError("no stream token")
        encoded, _, signature = token.partition(".")
        if not hmac.compare_digest(signature.encode(), self._sign(encoded).encode()):
            raise TokenError("bad stream token signature")
        try:
            claims = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
            expiry, nonce, bound = float(claims["exp"]), str(claims["nonce"]), str(claims["call"])
        except (binascii.Error, ValueError, KeyError, TypeError):
            raise TokenError("malformed stream token") from None
        now = time.time()
        if now > expiry:
            raise TokenError("expired stream token")
        if call_id is not None and bound and bound != call_id:
            raise TokenError("the stream token belongs to another call")
        self._used = {n: exp for n, exp in self._used.items() if exp >= now}
        if nonce in self._used:
            raise TokenError("the stream token was used already")
        self._used[nonce] = expiry

    def _sign(self, encoded: str) -> str:
        return hmac.new(self._key, encoded.encode(), hashlib.sha256).hexdigest()
