"""Which key added each named voice, so that a key with the `references` scope changes only its own
voices; deleting, renaming or replacing another key's voice (or one of unknown origin) needs `admin`.

Kept as a small JSON file next to the references folder (DATA_DIR/reference_owners.json), written
atomically; the full API_KEY and an open server may change any voice.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from server.keys import Principal

log = logging.getLogger(__name__)


class VoiceOwners:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            self._owners: dict[str, str] = {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
        except FileNotFoundError:
            self._owners = {}
        except (OSError, ValueError) as exc:
            log.error("%s: %s; voice ownership starts empty (only admin keys may change existing voices)", path, exc)
            self._owners = {}

    def may_change(self, principal: Principal | None, reference_id: str, exists: bool) -> bool:
        """Whether `principal` may replace, rename or delete `reference_id` (a new id is anyone's)."""
        if principal is None or principal.kind in ("full", "anonymous") or principal.allows("admin"):
            return True
        return not exists or self._owners.get(reference_id) == principal.name

    def set(self, reference_id: str, principal: Principal | None) -> None:
        with self._lock:
            if principal is not None:
                self._owners[reference_id] = principal.name
            self._save()

    def move(self, old: str, new: str) -> None:
        with self._lock:
            owner = self._owners.pop(old, None)
            if owner is not None:
                self._owners[new] = owner
            self._save()

    def forget(self, reference_id: str) -> None:
        with self._lock:
            if self._owners.pop(reference_id, None) is not None:
                self._save()

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._owners, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.path)
