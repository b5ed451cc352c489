"""Jobs in SQLite, so that queued jobs and results survive a restart of the server.

A job's input is kept only until it ends; its output (or error) is kept until the result TTL
has passed since it ended. Status changes out of a final state never happen: every finishing
write is conditional on the job still being IN_QUEUE or IN_PROGRESS, so a cancel and a
completion racing each other cannot overwrite one another.

The input of a FAILED or TIMED_OUT job is kept (until the result TTL) so `/retry` can run it
again; a retry clears the output and queues the job under the same id.

At start-up (`restore`): IN_QUEUE jobs are queued again in their original order. A job that
was IN_PROGRESS when the server stopped is queued again too (its `attempts` counts the tries);
one that was already tried `max_attempts` times is marked FAILED, so a job that crashes the
server cannot crash it forever.
"""
from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

IN_QUEUE, IN_PROGRESS = "IN_QUEUE", "IN_PROGRESS"
COMPLETED, FAILED, CANCELLED, TIMED_OUT = "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"
FINAL_STATES = frozenset({COMPLETED, FAILED, CANCELLED, TIMED_OUT})
RETRYABLE_STATES = frozenset({FAILED, TIMED_OUT})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    input TEXT,
    output TEXT,
    error TEXT,
    streaming INTEGER NOT NULL DEFAULT 0,
    timeout REAL NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    webhook TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at);
"""


@dataclasses.dataclass
class JobRow:
    id: str
    status: str
    streaming: bool
    timeout: float
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    output: Any = None
    error: str | None = None
    attempts: int = 0
    input: Any = None
    webhook: str | None = None

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATES


class JobStore:
    """Synchronous and thread-safe; the job manager calls it from one worker thread."""

    def __init__(self, path: Path, max_attempts: int = 2) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_attempts = max_attempts
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "webhook" not in columns:  # a store written before webhooks existed
            self._db.execute("ALTER TABLE jobs ADD COLUMN webhook TEXT")
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def insert(self, job_id: str, job_input: Any, *, streaming: bool, timeout: float,
               created_at: float | None = None, webhook: str | None = None) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, status, input, streaming, timeout, created_at, webhook) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, IN_QUEUE, json.dumps(job_input), int(streaming), timeout, created_at or time.time(), webhook))

    def get(self, job_id: str, *, with_output: bool = True, with_input: bool = False) -> JobRow | None:
        cols = "id, status, streaming, timeout, created_at, started_at, finished_at, error, attempts, webhook"
        cols += ", output" if with_output else ", NULL"
        cols += ", input" if with_input else ", NULL"
        with self._lock:
            row = self._db.execute(f"SELECT {cols} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        (id_, status, streaming, timeout, created, started, finished, error, attempts, webhook, output, input_) = row
        return JobRow(id_, status, bool(streaming), timeout, created, started, finished,
                      json.loads(output) if output is not None else None, error, attempts,
                      json.loads(input_) if input_ is not None else None, webhook)

    def start(self, job_id: str, now: float | None = None) -> JobRow | None:
        """IN_QUEUE -> IN_PROGRESS; returns the job with its input, or None if it is no longer queued."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET status = ?, started_at = ?, attempts = attempts + 1 WHERE id = ? AND status = ?",
                (IN_PROGRESS, now or time.time(), job_id, IN_QUEUE))
            if cur.rowcount == 0:
                return None
        return self.get(job_id, with_output=False, with_input=True)

    def finish(self, job_id: str, status: str, *, output: Any = None, error: str | None = None,
               now: float | None = None) -> bool:
        """A final status, only from IN_QUEUE / IN_PROGRESS. False if the job had already ended."""
        assert status in FINAL_STATES
        keep_input = "input" if status in RETRYABLE_STATES else "NULL"  # /retry runs it again
        with self._lock:
            cur = self._db.execute(
                f"UPDATE jobs SET status = ?, output = ?, error = ?, finished_at = ?, input = {keep_input} "
                "WHERE id = ? AND status IN (?, ?)",
                (status, json.dumps(output) if output is not None else None, error, now or time.time(),
                 job_id, IN_QUEUE, IN_PROGRESS))
            return cur.rowcount > 0

    def retry(self, job_id: str) -> bool:
        """FAILED / TIMED_OUT -> IN_QUEUE with its kept input; False if it is not retryable."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET status = ?, output = NULL, error = NULL, started_at = NULL, finished_at = NULL, "
                "attempts = 0 WHERE id = ? AND status IN (?, ?) AND input IS NOT NULL",
                (IN_QUEUE, job_id, *sorted(RETRYABLE_STATES)))
            return cur.rowcount > 0

    def requeue(self, job_id: str) -> bool:
        """IN_PROGRESS -> IN_QUEUE (the server is stopping while the job runs)."""
        with self._lock:
            cur = self._db.execute("UPDATE jobs SET status = ?, started_at = NULL WHERE id = ? AND status = ?",
                                   (IN_QUEUE, job_id, IN_PROGRESS))
            return cur.rowcount > 0

    def restore(self) -> list[str]:
        """Jobs to queue again after a restart, oldest first (see the module docstring)."""
        now = time.time()
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = ?, error = ?, finished_at = ?, input = NULL "
                "WHERE status = ? AND attempts >= ?",
                (FAILED, "the server stopped while this job was running, on every attempt", now,
                 IN_PROGRESS, self.max_attempts))
            self._db.execute("UPDATE jobs SET status = ?, started_at = NULL WHERE status = ?",
                             (IN_QUEUE, IN_PROGRESS))
            rows = self._db.execute("SELECT id FROM jobs WHERE status = ? ORDER BY seq", (IN_QUEUE,)).fetchall()
        return [r[0] for r in rows]

    def purge_expired(self, ttl_seconds: float, now: float | None = None) -> list[str]:
        """Delete jobs that ended more than `ttl_seconds` ago; returns their ids."""
        cutoff = (now or time.time()) - ttl_seconds
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?",
                                    (cutoff,)).fetchall()
            self._db.execute("DELETE FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?", (cutoff,))
        return [r[0] for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
            retried = self._db.execute("SELECT COUNT(*) FROM jobs WHERE attempts > 1").fetchone()[0]
        out = {status: count for status, count in rows}
        out["retried"] = retried
        return out
