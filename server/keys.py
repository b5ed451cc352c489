"""Who a presented key is: the full `API_KEY`, or a named key from the keys file with its scopes.

The keys file (KEYS_FILE) is TOML, re-read when it changes (checked at most once a second):

    [[key]]
    name = "web-backend"              # shown in logs and used as the rate-limit identity
    key = "sk-live-..."               # the key itself, or instead:
    sha256 = "9f86d08..."             # its SHA-256 in hex (`printf %s KEY | sha256sum`)
    scopes = ["realtime", "tts"]      # realtime, tts, asr, jobs, references, admin, or "*"

A file that does not parse keeps the last good one in force; `error` says why (logged, and shown
by /health). Keys are looked up by their SHA-256, so no plain key is kept in memory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import time
import tomllib
from pathlib import Path
from typing import Any, Literal

from server.scopes import ANY, SCOPES

log = logging.getLogger(__name__)
RECHECK_SECONDS = 1.0


@dataclasses.dataclass(frozen=True)
class Principal:
    """The caller of one request."""

    name: str  # the rate-limit identity: "key:<name>", or "ip:<address>" when no key is configured
    kind: Literal["full", "scoped", "ephemeral", "anonymous"]
    scopes: frozenset[str] = frozenset({"*"})
    session: dict[str, Any] | None = None  # an ephemeral secret's session configuration
    secret_id: str | None = None  # an ephemeral secret's id

    def allows(self, scope: str) -> bool:
        return scope == ANY or "*" in self.scopes or scope in self.scopes


class KeysFileError(ValueError):
    pass


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def parse_keys(text: str) -> dict[bytes, Principal]:
    """The keys file's text -> principals by key digest; KeysFileError says what is wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KeysFileError(f"not valid TOML: {exc}") from None
    entries = data.get("key", [])
    if not isinstance(entries, list):
        raise KeysFileError("`key` must be an array of tables ([[key]])")
    out: dict[bytes, Principal] = {}
    names: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"key #{i + 1}"
        if not isinstance(entry, dict):
            raise KeysFileError(f"{where}: must be a table")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise KeysFileError(f"{where}: needs a `name`")
        where = f"key {name!r}"
        if name in names:
            raise KeysFileError(f"{where}: the name is used twice")
        names.add(name)
        scopes = entry.get("scopes")
        if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes):
            raise KeysFileError(f"{where}: `scopes` must be a non-empty list of strings")
        unknown = set(scopes) - set(SCOPES) - {"*"}
        if unknown:
            raise KeysFileError(f"{where}: unknown scopes {sorted(unknown)}; known: {list(SCOPES)} or \"*\"")
        if ("key" in entry) == ("sha256" in entry):
            raise KeysFileError(f"{where}: give exactly one of `key` and `sha256`")
        if "key" in entry:
            if not isinstance(entry["key"], str) or len(entry["key"]) < 16:
                raise KeysFileError(f"{where}: `key` must be a string of at least 16 characters")
            if entry["key"].startswith("ek_"):
                raise KeysFileError(f"{where}: keys may not start with ek_ (client secrets do)")
            key_digest = digest(entry["key"])
        else:
            try:
                key_digest = bytes.fromhex(entry["sha256"])
            except (TypeError, ValueError):
                key_digest = b""
            if len(key_digest) != 32:
                raise KeysFileError(f"{where}: `sha256` must be 64 hex digits")
        if key_digest in out:
            raise KeysFileError(f"{where}: the same key as {out[key_digest].name!r}")
        out[key_digest] = Principal(name=f"key:{name}", kind="scoped", scopes=frozenset(scopes))
    return out


class KeyRing:
    """The full key and the keys file; `lookup` is the one place a presented key is identified."""

    def __init__(self, api_key: str | None, keys_file: Path | None) -> None:
        self._full = digest(api_key) if api_key else None
        self.keys_file = keys_file
        self.error: str | None = None
        self._keys: dict[bytes, Principal] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        if keys_file is not None:
            self.reload()

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (else every route is open, limited per client address)."""
        return self._full is not None or self.keys_file is not None

    def lookup(self, key: str) -> Principal | None:
        self._maybe_reload()
        presented = digest(key)
        if self._full is not None and hmac.compare_digest(presented, self._full):
            return Principal(name="key:API_KEY", kind="full")
        return self._keys.get(presented)

    def describe(self) -> dict[str, Any]:
        """For /health: where the keys come from and whether the file is in force."""
        self._maybe_reload()
        out: dict[str, Any] = {"api_key": self._full is not None}
        if self.keys_file is not None:
            out["keys_file"] = {"path": str(self.keys_file), "keys": len(self._keys), "error": self.error}
        return out

    def _maybe_reload(self) -> None:
        if self.keys_file is None or time.monotonic() - self._checked < RECHECK_SECONDS:
            return
        self.reload()

    def reload(self) -> None:
        assert self.keys_file is not None
        self._checked = time.monotonic()
        try:
            st = os.stat(self.keys_file)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            self._stamp = stamp
            keys = parse_keys(self.keys_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, KeysFileError) as exc:
            message = f"keys file {self.keys_file}: {exc}"
            if message != self.error:
                log.error("%s; keeping the last good keys (%d)", message, len(self._keys))
            self.error = message
            if isinstance(exc, OSError):
                self._stamp = None
            return
        self._keys, self.error = keys, None
        log.info("keys file %s: %d keys loaded", self.keys_file, len(keys))
