"""The SQLite job and conversation stores: what a crash leaves behind, the result TTL, final states."""
from __future__ import annotations

import time

import numpy as np

from server.conversations import Conversation, ConversationStore
from server.jobs import CANCELLED, COMPLETED, FAILED, IN_PROGRESS, IN_QUEUE, TIMED_OUT, JobStore, status_body


def test_a_crash_requeues_running_jobs_once(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path, max_attempts=2)
    for name in ("a", "b", "c"):
        store.insert(name, {"text": name}, streaming=False, timeout=60)
    assert store.start("a") is not None and store.start("a") is None  # only a queued job can start
    store.close()  # the process dies here: "a" is IN_PROGRESS in the file

    after_crash = JobStore(path, max_attempts=2)
    assert after_crash.restore() == ["a", "b", "c"]  # original order, the interrupted one included
    row = after_crash.start("a")
    assert row.input == {"text": "a"} and row.attempts == 2
    after_crash.close()

    after_second_crash = JobStore(path, max_attempts=2)
    assert after_second_crash.restore() == ["b", "c"]  # tried twice: no third time
    failed = after_second_crash.get("a")
    assert failed.status == FAILED and "every attempt" in failed.error and failed.input is None


def test_final_states_are_never_overwritten(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.insert("j", {}, streaming=True, timeout=5)
    store.start("j")
    assert store.finish("j", CANCELLED) is True
    assert store.finish("j", COMPLETED, output={"audio": "x"}) is False  # a late completion loses
    row = store.get("j", with_input=True)
    assert row.status == CANCELLED and row.output is None and row.input is None
    assert store.requeue("j") is False


def test_results_expire_after_the_ttl(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    now = time.time()
    for name in ("old", "fresh", "queued"):
        store.insert(name, {}, streaming=False, timeout=5, created_at=now - 4000)
    store.start("old")
    store.finish("old", COMPLETED, output={"ok": 1}, now=now - 1900)
    store.start("fresh")
    store.finish("fresh", COMPLETED, output={"ok": 2}, now=now - 60)
    assert store.purge_expired(1800, now=now) == ["old"]
    assert store.get("old") is None and store.get("fresh").output == {"ok": 2}
    assert store.get("queued").status == IN_QUEUE  # unfinished jobs never expire
    assert store.counts() == {COMPLETED: 1, IN_QUEUE: 1, "retried": 0}


def test_status_body_has_runpods_fields(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.insert("s", {}, streaming=False, timeout=5, created_at=100.0)
    assert status_body(store.get("s")) == {"id": "s", "status": IN_QUEUE}
    store.start("s", now=100.25)
    running = status_body(store.get("s"), now=101.0)
    assert running == {"id": "s", "status": IN_PROGRESS, "delayTime": 250, "executionTime": 750}
    store.finish("s", FAILED, error="boom", now=102.0)
    assert status_body(store.get("s")) == {"id": "s", "status": FAILED, "delayTime": 250, "executionTime": 1750,
                                           "error": "boom", "output": {"status": "error", "error": "boom"}}


def test_conversations_keep_history_and_voice_codes(tmp_path):
    store = ConversationStore(tmp_path / "conv.sqlite3", ttl_seconds=100)
    conv = store.load_sync("c1")
    assert conv.is_new and conv.history == [] and not conv.has_voice
    codes = np.arange(40, dtype=np.int64).reshape(10, 4) * 97
    store.save_sync(Conversation("c1", [{"role": "user", "content": "hi"}], "ref words", codes))
    store.close()
    reopened = ConversationStore(tmp_path / "conv.sqlite3", ttl_seconds=100)
    again = reopened.load_sync("c1")
    assert not again.is_new and again.history == [{"role": "user", "content": "hi"}]
    assert again.voice_text == "ref words" and again.voice_codes.dtype == np.int64
    np.testing.assert_array_equal(again.voice_codes, codes)
    assert reopened.purge_expired(now=time.time() + 50) == 0
    assert reopened.purge_expired(now=time.time() + 200) == 1 and reopened.load_sync("c1").is_new


def test_a_shared_conversation_file_serves_two_workers(tmp_path):
    """RunPod workers on one network volume: no WAL (it needs shared memory on one host), and each
    worker sees the other's turns."""
    path = tmp_path / "volume" / "conversations.sqlite3"
    first, second = ConversationStore(path, shared=True), ConversationStore(path, shared=True)
    assert first._db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    first.save_sync(Conversation("c", [{"role": "user", "content": "from worker one"}]))
    conv = second.load_sync("c")
    conv.history.append({"role": "assistant", "content": "from worker two"})
    second.save_sync(conv)
    assert [m["content"] for m in first.load_sync("c").history] == ["from worker one", "from worker two"]
    assert not path.with_name(path.name + "-wal").exists()
    first.close()
    second.close()


def test_failed_jobs_keep_their_input_for_retry(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    for name in ("failed", "timed-out", "done"):
        store.insert(name, {"text": name}, streaming=False, timeout=5, webhook="http://127.0.0.1:9/hook")
        store.start(name)
    store.finish("failed", FAILED, error="boom")
    store.finish("timed-out", TIMED_OUT, error="too slow")
    store.finish("done", COMPLETED, output={"audio": "x"})
    assert store.get("done", with_input=True).input is None  # results drop the input
    assert store.retry("done") is False
    for name in ("failed", "timed-out"):
        assert store.retry(name) is True
        row = store.get(name, with_input=True)
        assert (row.status, row.error, row.output, row.finished_at) == (IN_QUEUE, None, None, None)
        assert row.input == {"text": name} and row.webhook == "http://127.0.0.1:9/hook"
        assert store.retry(name) is False  # queued again: nothing to retry
        assert store.start(name).attempts == 1


def test_a_store_from_before_webhooks_opens(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, status TEXT "
               "NOT NULL, input TEXT, output TEXT, error TEXT, streaming INTEGER NOT NULL DEFAULT 0, timeout REAL "
               "NOT NULL, created_at REAL NOT NULL, started_at REAL, finished_at REAL, "
               "attempts INTEGER NOT NULL DEFAULT 0)")
    db.execute("INSERT INTO jobs (id, status, input, timeout, created_at) VALUES ('old', 'IN_QUEUE', '{}', 5, 1)")
    db.commit()
    db.close()
    store = JobStore(path)
    assert store.restore() == ["old"] and store.get("old").webhook is None
    store.insert("new", {}, streaming=False, timeout=5, webhook="https://example.com/done")
    assert store.get("new").webhook == "https://example.com/done"
