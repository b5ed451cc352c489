"""Conversations by `conversation_id`: the chat history and the voice (reference codes), in SQLite.

A later request in the same conversation keeps the voice without resending `system_audio`:
the codes are stored once and handed to the engine as an already-encoded reference.
"""
from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import sqlite3
import threading
import time
import weakref
from pathlib import Path

import numpy as np

MAX_HISTORY_MESSAGES = 200  # older messages are dropped; the LLM only sees a window anyway

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    history TEXT NOT NULL,
    voice_text TEXT,
    voice_codes BLOB,
    updated_at REAL NOT NULL
)
"""


@dataclasses.dataclass
class Conversation:
    id: str
    history: list[dict[str, str]] = dataclasses.field(default_factory=list)
    voice_text: str | None = None
    voice_codes: np.ndarray | None = None  # int [num_codebooks, frames]
    is_new: bool = True

    @property
    def has_voice(self) -> bool:
        return self.voice_codes is not None


def _codes_to_blob(codes: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(codes, dtype=np.int16 if codes.max(initial=0) < 32768 else np.int32),
            allow_pickle=False)
    return buf.getvalue()


def _blob_to_codes(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False).astype(np.int64)


class ConversationStore:
    def __init__(self, path: Path, ttl_seconds: float = 7 * 24 * 3600.0, *, shared: bool = False) -> None:
        """`shared`: the file is used by processes on other machines (RunPod workers on one network
        volume), where SQLite's WAL mode cannot work; use the rollback journal and file locks."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.ttl_seconds = ttl_seconds
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute(f"PRAGMA journal_mode={'DELETE' if shared else 'WAL'}")
        self._db.execute(_SCHEMA)
        self._db_lock = threading.Lock()
        self._turn_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def turn_lock(self, conversation_id: str) -> asyncio.Lock:
        """Turns of one conversation run one at a time, so each sees the previous one's history."""
        lock = self._turn_locks.get(conversation_id)
        if lock is None:
            lock = asyncio.Lock()
            self._turn_locks[conversation_id] = lock
        return lock

    def load_sync(self, conversation_id: str) -> Conversation:
        with self._db_lock:
            row = self._db.execute("SELECT history, voice_text, voice_codes FROM conversations WHERE id = ?",
                                   (conversation_id,)).fetchone()
        if row is None:
            return Conversation(conversation_id)
        history, voice_text, blob = row
        return Conversation(conversation_id, json.loads(history), voice_text,
                            _blob_to_codes(blob) if blob is not None else None, is_new=False)

    def save_sync(self, conv: Conversation) -> None:
        history = conv.history[-MAX_HISTORY_MESSAGES:]
        blob = _codes_to_blob(conv.voice_codes) if conv.voice_codes is not None else None
        with self._db_lock:
            self._db.execute(
                "INSERT INTO conversations (id, history, voice_text, voice_codes, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET history = excluded.history, voice_text = excluded.voice_text, "
                "voice_codes = excluded.voice_codes, updated_at = excluded.updated_at",
                (conv.id, json.dumps(history), conv.voice_text, blob, time.time()))
        conv.is_new = False

    async def load(self, conversation_id: str) -> Conversation:
        return await asyncio.to_thread(self.load_sync, conversation_id)

    async def save(self, conv: Conversation) -> None:
        await asyncio.to_thread(self.save_sync, conv)

    def purge_expired(self, now: float | None = None) -> int:
        cutoff = (now if now is not None else time.time()) - self.ttl_seconds
        with self._db_lock:
            return self._db.execute("DELETE FROM conversations WHERE updated_at < ?", (cutoff,)).rowcount

    def close(self) -> None:
        with self._db_lock:
            self._db.close()
