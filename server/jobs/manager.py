"""The job queue: a bounded line of waiting jobs, a few workers, timeouts, cancellation, streams.

Each running job is its own asyncio task iterating the handler's generator. `cancel` cancels
that task: the cancellation travels down the generator into the engine's stream, whose
`finally` stops the model work for that request. An execution timeout does the same and marks
the job TIMED_OUT. Streamed items wait in memory until a /stream poll takes them; the final
result lives in the job store. Store writes run on one thread so the event loop never waits
on SQLite. A job that names a webhook has its final status POSTed there (`webhooks.deliver`),
and a FAILED or TIMED_OUT one can be queued again under its id (`retry`).

What the submitter already made of the input (validated, audio decoded) waits in memory with the
job and goes to the runner, so a job is not parsed or decoded twice. A job restored after a
restart, retried, or beyond the memory budget starts from its stored input instead.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from server.jobs import webhooks
from server.jobs.output import stream_summary
from server.jobs.store import (CANCELLED, COMPLETED, FAILED, FINAL_STATES, IN_PROGRESS, IN_QUEUE, RETRYABLE_STATES,
                               TIMED_OUT, JobRow, JobStore)

log = logging.getLogger(__name__)

# (stored input, what `submit` was given as `prepared` or None) -> the job's output items
JobRunner = Callable[[Any, Any], AsyncIterator[dict[str, Any]]]
STREAM_KEEP_SECONDS = 600.0  # streamed items nobody polled are dropped this long after the job ended
PREPARED_BUDGET_BYTES = 256 * 1024 * 1024  # prepared inputs (decoded audio) of waiting jobs, all together


class QueueFull(RuntimeError):
    """The bounded queue has no room (HTTP 503)."""


class NotRetryable(ValueError):
    """/retry of a job that did not fail or time out, or whose input is gone (HTTP 400)."""


def _ms(seconds: float) -> int:
    return max(0, int(round(seconds * 1000)))


def status_body(row: JobRow, now: float | None = None) -> dict[str, Any]:
    """A job in RunPod's /status shape."""
    body: dict[str, Any] = {"id": row.id, "status": row.status}
    if row.started_at is not None:
        body["delayTime"] = _ms(row.started_at - row.created_at)
        body["executionTime"] = _ms((row.finished_at or now or time.time()) - row.started_at)
    if row.status == COMPLETED:
        body["output"] = row.output
    elif row.status in (FAILED, TIMED_OUT) and row.error:
        body["error"] = row.error
        body["output"] = {"status": "error", "error": row.error}
    return body


class JobManager:
    def __init__(self, store: JobStore, runner: JobRunner, *, queue_size: int, concurrency: int,
                 execution_timeout: float, result_ttl: float,
                 on_janitor: Callable[[], None] | None = None, webhook_retry_delay: float = 10.0,
                 prepared_budget: int = PREPARED_BUDGET_BYTES) -> None:
        self.store = store
        self.runner = runner
        self.queue_size = queue_size
        self.concurrency = concurrency
        self.execution_timeout = execution_timeout
        self.result_ttl = result_ttl
        self.on_janitor = on_janitor  # extra periodic clean-up (conversations)
        self._pending: collections.deque[str] = collections.deque()
        self._reserved = 0
        self._cond = asyncio.Condition()
        self._running: dict[str, asyncio.Task] = {}
        self._streams: dict[str, list[dict[str, Any]]] = {}
        self._ended: dict[str, float] = {}  # job id -> monotonic end time, for dropping unpolled streams
        self._done: dict[str, asyncio.Event] = {}
        self._prepared: dict[str, tuple[Any, int]] = {}  # job id -> (prepared input, its bytes)
        self.prepared_budget = prepared_budget
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self.webhook_retry_delay = webhook_retry_delay
        self._deliveries: set[asyncio.Task] = set()
        self._http: aiohttp.ClientSession | None = None
        self._db_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobdb")

    async def _db(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db_thread, lambda: fn(*args, **kwargs))

    # ------------------------------------------------------------------ lifetime
    async def start(self) -> None:
        restored = await self._db(self.store.restore)
        self._pending.extend(restored)  # restored jobs may exceed queue_size: none is dropped
        for job_id in restored:
            self._streams[job_id] = []
            self._done[job_id] = asyncio.Event()
        if restored:
            log.info("restored %d queued job(s) from %s", len(restored), self.store.path)
        self._tasks = [asyncio.create_task(self._worker(), name=f"job-worker-{i}") for i in range(self.concurrency)]
        self._tasks.append(asyncio.create_task(self._janitor(), name="job-janitor"))

    async def stop(self) -> None:
        """Stop accepting work; running jobs go back to IN_QUEUE so a restart runs them again."""
        self._stopping = True
        for task in self._tasks:  # workers first, so none picks up another job meanwhile
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        running = list(self._running.values())
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=10)
        for task in list(self._deliveries):
            task.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
        self._db_thread.shutdown(wait=True)

    # ------------------------------------------------------------------ submitting and reading
    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._running)

    async def submit(self, job_input: Any, *, streaming: bool, timeout: float | None = None,
                     id_prefix: str = "", webhook: str | None = None, prepared: Any = None,
                     prepared_bytes: int = 0) -> str:
        """Store and queue a job. `prepared` (about `prepared_bytes` large) is what the caller made
        of `job_input`; the runner gets it back when the job runs in this process."""
        self._check_room()
        job_id = f"{id_prefix}{uuid.uuid4()}"
        limit = min(timeout, self.execution_timeout) if timeout else self.execution_timeout
        self._reserved += 1  # holds the place while the insert is on the store thread
        try:
            await self._db(self.store.insert, job_id, job_input, streaming=streaming, timeout=limit,
                           webhook=webhook)
        finally:
            self._reserved -= 1
        held = sum(size for _, size in self._prepared.values())
        if prepared is not None and held + prepared_bytes <= self.prepared_budget:
            self._prepared[job_id] = (prepared, prepared_bytes)
        await self._enqueue(job_id)
        return job_id

    def _check_room(self) -> None:
        if self._stopping:
            raise QueueFull("the server is shutting down")
        if len(self._pending) + self._reserved >= self.queue_size:
            raise QueueFull(f"the job queue is full ({len(self._pending)} waiting, {self.running} running); "
                            "retry later")

    async def _enqueue(self, job_id: str) -> None:
        self._streams[job_id] = []
        self._ended.pop(job_id, None)
        self._done[job_id] = asyncio.Event()
        async with self._cond:
            self._pending.append(job_id)
            self._cond.notify()

    async def retry(self, job_id: str) -> dict[str, Any] | None:
        """Queue a FAILED or TIMED_OUT job again under its id, with its input (RunPod's /retry)."""
        row = await self._db(self.store.get, job_id, with_output=False)
        if row is None:
            return None
        if row.status not in RETRYABLE_STATES:
            raise NotRetryable(f"job {job_id!r} is {row.status}; only FAILED or TIMED_OUT jobs can be retried")
        self._check_room()
        if not await self._db(self.store.retry, job_id):
            raise NotRetryable(f"job {job_id!r} cannot be retried: its input is no longer kept")
        await self._enqueue(job_id)
        return {"id": job_id, "status": IN_QUEUE}

    async def get(self, job_id: str) -> JobRow | None:
        return await self._db(self.store.get, job_id)

    async def status(self, job_id: str) -> dict[str, Any] | None:
        row = await self.get(job_id)
        return status_body(row) if row is not None else None

    async def wait(self, job_id: str, timeout: float) -> None:
        """Until the job ends or `timeout` seconds pass."""
        event = self._done.get(job_id)
        if event is None:
            return  # finished before a restart, or unknown: the store has the answer
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await event.wait()

    async def take_stream(self, job_id: str) -> dict[str, Any] | None:
        """Items produced since the last poll, RunPod's /stream shape."""
        row = await self._db(self.store.get, job_id, with_output=False)
        if row is None:
            return None
        buffered = self._streams.get(job_id)
        items = list(buffered) if buffered else []
        if buffered:
            buffered.clear()
        if row.is_final and buffered is not None:
            if row.status == COMPLETED and not row.streaming:
                # A whole result is only read from the store when a poll asks for it.
                full = await self._db(self.store.get, job_id)
                items.append(full.output if full is not None else None)
            del self._streams[job_id]  # drained: nothing more will come
            self._ended.pop(job_id, None)
        return {"id": job_id, "status": row.status, "stream": [{"output": item} for item in items]}

    async def cancel(self, job_id: str) -> dict[str, Any] | None:
        row = await self._db(self.store.get, job_id, with_output=False)
        if row is None:
            return None
        if row.status == IN_QUEUE:
            with contextlib.suppress(ValueError):
                self._pending.remove(job_id)
            await self._finish(job_id, CANCELLED)
        elif row.status == IN_PROGRESS:
            await self._finish(job_id, CANCELLED)  # first, so the unwinding task cannot complete it
            task = self._running.get(job_id)
            if task is not None:
                task.cancel()
                await asyncio.wait([task], timeout=10)  # returns once the model work has stopped
        row = await self._db(self.store.get, job_id, with_output=False)
        return {"id": job_id, "status": row.status if row else CANCELLED}

    async def purge_queue(self) -> int:
        """Cancel every job still waiting; running jobs go on."""
        removed = list(self._pending)
        self._pending.clear()
        for job_id in removed:
            await self._finish(job_id, CANCELLED)
        return len(removed)

    async def health(self) -> dict[str, Any]:
        counts = await self._db(self.store.counts)
        return {
            "jobs": {"completed": counts.get(COMPLETED, 0), "failed": counts.get(FAILED, 0),
                     "inProgress": counts.get(IN_PROGRESS, 0), "inQueue": counts.get(IN_QUEUE, 0),
                     "retried": counts.get("retried", 0), "cancelled": counts.get(CANCELLED, 0),
                     "timedOut": counts.get(TIMED_OUT, 0)},
            "workers": {"idle": max(0, self.concurrency - self.running), "running": self.running},
            "queue": {"size": self.queued, "max": self.queue_size},
        }

    # ------------------------------------------------------------------ running
    async def _finish(self, job_id: str, status: str, *, output: Any = None, error: str | None = None) -> bool:
        self._prepared.pop(job_id, None)  # a cancelled or purged job never runs
        changed = await self._db(self.store.finish, job_id, status, output=output, error=error)
        event = self._done.pop(job_id, None)
        if event is not None:
            event.set()
        if job_id in self._streams:
            self._ended[job_id] = time.monotonic()
        if changed:
            row = await self._db(self.store.get, job_id, with_output=False)
            if row is not None and row.webhook:
                task = asyncio.create_task(self._send_webhook(job_id, row.webhook), name=f"webhook-{job_id}")
                self._deliveries.add(task)
                task.add_done_callback(self._deliveries.discard)
        return changed

    async def _send_webhook(self, job_id: str, url: str) -> None:
        row = await self._db(self.store.get, job_id)
        if row is None:
            return
        if self._http is None:
            self._http = aiohttp.ClientSession()
        try:
            await webhooks.deliver(self._http, url, status_body(row), delay=self.webhook_retry_delay)
        except Exception:  # noqa: BLE001 - a broken webhook never touches the job or the server
            log.exception("webhook for job %s failed", job_id)

    async def _worker(self) -> None:
        while True:
            async with self._cond:
                await self._cond.wait_for(lambda: bool(self._pending))
                job_id = self._pending.popleft()
            task = asyncio.create_task(self._execute(job_id), name=f"job-{job_id}")
            self._running[job_id] = task
            task.add_done_callback(lambda _t, job_id=job_id: self._running.pop(job_id, None))
            await asyncio.wait([task])  # a cancelled worker leaves the job to stop()

    async def _execute(self, job_id: str) -> None:
        prepared, _ = self._prepared.pop(job_id, (None, 0))
        row = await self._db(self.store.start, job_id)
        if row is None:
            return  # cancelled while it waited
        self._done.setdefault(job_id, asyncio.Event())
        buffer = self._streams.setdefault(job_id, [])
        final: dict[str, Any] | None = None
        try:
            async with asyncio.timeout(row.timeout):
                items = self.runner(row.input, prepared)
                try:
                    async for item in items:
                        if isinstance(item, dict) and item.get("status") == "streaming":
                            buffer.append(item)
                        else:
                            final = item
                finally:
                    await items.aclose()  # type: ignore[attr-defined]
        except TimeoutError:
            await self._finish(job_id, TIMED_OUT, error=f"the job ran longer than its execution timeout "
                                                        f"({row.timeout:g} s) and was stopped")
            return
        except asyncio.CancelledError:
            if self._stopping and await self._db(self.store.requeue, job_id):
                log.info("job %s goes back to the queue (server stopping)", job_id)
            raise
        except Exception as exc:  # noqa: BLE001 - a failing job never takes the server down
            log.exception("job %s failed", job_id)
            await self._finish(job_id, FAILED, error=f"internal error: {type(exc).__name__}: {exc}")
            return
        if not isinstance(final, dict):
            await self._finish(job_id, FAILED, error="the handler produced no result")
        elif final.get("status") == "error" or "error" in final and final.get("status") != "success":
            await self._finish(job_id, FAILED, error=str(final.get("error")))
        else:
            if row.streaming:
                buffer.append(stream_summary(final))
            await self._finish(job_id, COMPLETED, output=final)

    async def _janitor(self) -> None:
        period = min(60.0, self.result_ttl / 4)
        while True:
            await asyncio.sleep(period)
            try:
                expired = await self._db(self.store.purge_expired, self.result_ttl)
                for job_id in expired:
                    self._streams.pop(job_id, None)
                    self._done.pop(job_id, None)
                    self._ended.pop(job_id, None)
                cutoff = time.monotonic() - STREAM_KEEP_SECONDS
                for job_id in [j for j, t in self._ended.items() if t < cutoff]:
                    self._streams.pop(job_id, None)
                    self._ended.pop(job_id, None)
                if self.on_janitor is not None:
                    await self._db(self.on_janitor)
            except Exception:  # noqa: BLE001 - clean-up must keep running
                log.exception("job clean-up failed")


__all__ = ["FINAL_STATES", "JobManager", "NotRetryable", "QueueFull", "status_body"]
