"""One thread owns all model compute and interleaves requests step by step.

Each request is a generator that yields after every small unit of work (one code frame, one
decoder push). The worker runs one unit of each active job per cycle, so concurrent requests
share the model fairly, a long request never starves a short one, and cancelling a request
takes effect within one unit. Units that can run together (a `BatchableStep`, e.g. one decode
step of several sequences on the same model) are collected during a cycle and run as one batch,
so the weights are read once for all of them. The asyncio loop never runs model code.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import Any

log = logging.getLogger(__name__)


class BatchableStep:
    """Yield one of these from a job to have it run together with others of the same key.
    After the batch ran, the job resumes and reads `.result`."""

    batch_key: Hashable = None
    result: Any = None

    @classmethod
    def run_batch(cls, items: list[BatchableStep]) -> None:
        raise NotImplementedError


class Job:
    def __init__(self, steps: Iterator[Any], on_error: Callable[[BaseException], None],
                 on_done: Callable[[], None]) -> None:
        self.steps = steps
        self.on_error = on_error
        self.on_done = on_done
        self.cancelled = threading.Event()
        self.waiting: BatchableStep | None = None

    def cancel(self) -> None:
        self.cancelled.set()


class ModelWorker:
    def __init__(self, name: str = "model-worker") -> None:
        self._jobs: collections.deque[Job] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._wake = threading.Condition()
        self._stopped = False
        self.batches_run = 0
        self.largest_batch = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # batch size -> batches run (metrics)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def active_jobs(self) -> int:
        return len(self._jobs)

    def submit(self, steps: Iterator[Any], on_error: Callable[[BaseException], None],
               on_done: Callable[[], None]) -> Job:
        job = Job(steps, on_error, on_done)
        with self._wake:
            if self._stopped:
                raise RuntimeError("the model worker has stopped")
            self._jobs.append(job)
            self._wake.notify()
        return job

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run a one-off function (e.g. encoding a reference) on the worker thread, between steps."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if self._stopped:
                raise RuntimeError("the model worker has stopped")
            self._calls.append((fn, fut))
            self._wake.notify()
        return fut

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # --- the worker thread
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._jobs and not self._calls and not self._stopped:
                    self._wake.wait()
                if self._stopped:
                    self._shutdown()
                    return
                calls, self._calls = list(self._calls), collections.deque()
                jobs = list(self._jobs)
            for fn, fut in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except Exception as exc:  # handed to the caller
                        fut.set_exception(exc)
            self._cycle(jobs)

    def _cycle(self, jobs: list[Job]) -> None:
        """One unit for every job; batchable units are gathered and run together at the end."""
        groups: dict[Hashable, list[Job]] = {}
        for job in jobs:
            if (job.waiting is None or job.cancelled.is_set()) and not self._advance(job):
                continue
            if job.waiting is not None:
                groups.setdefault((type(job.waiting), job.waiting.batch_key), []).append(job)
        for members in groups.values():
            items = [j.waiting for j in members]
            try:
                type(items[0]).run_batch(items)
            except Exception as exc:  # the whole batch failed: fail its jobs, keep the worker
                log.exception("batched model step failed")
                for j in members:
                    self._drop(j, exc)
                continue
            self.batches_run += 1
            self.largest_batch = max(self.largest_batch, len(items))
            self.batch_sizes[len(items)] += 1
            for j in members:
                j.waiting = None

    def _advance(self, job: Job) -> bool:
        """Run the job's next unit. False when it is over (done, cancelled or failed)."""
        try:
            if job.cancelled.is_set():
                job.steps.close()
                self._remove(job)
                job.on_done()
                return False
            try:
                out = next(job.steps)
            except StopIteration:
                self._remove(job)
                job.on_done()
                return False
            except Exception as exc:  # one failing request must not stop the worker
                log.exception("model job failed")
                self._drop(job, exc)
                return False
        except Exception:  # a failing callback must not stop the worker either
            log.exception("model job callback failed")
            self._remove(job)
            return False
        if isinstance(out, BatchableStep):
            job.waiting = out
        return True

    def _remove(self, job: Job) -> None:
        with self._wake:
            try:
                self._jobs.remove(job)
            except ValueError:
                pass

    def _drop(self, job: Job, exc: BaseException) -> None:
        self._remove(job)
        try:
            job.steps.close()
            job.on_error(exc)
        except Exception:
            log.exception("model job callback failed")

    def _shutdown(self) -> None:
        jobs, self._jobs = list(self._jobs), collections.deque()
        for job in jobs:
            try:
                job.steps.close()
                job.on_error(RuntimeError("the model worker stopped"))
            except Exception:
                log.exception("closing a model job failed")
        for _, fut in self._calls:
            fut.cancel()
