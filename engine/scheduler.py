"""One thread owns all model compute and interleaves requests step by step.

Each request is a generator that yields after every small unit of work (one code frame, one
decoder push). The worker runs one unit of each active job in turn, so concurrent requests
share the model fairly, a long request never starves a short one, and cancelling a request
takes effect within one unit. The asyncio loop never runs model code.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)


class Job:
    def __init__(self, steps: Iterator[Any], on_error: Callable[[BaseException], None],
                 on_done: Callable[[], None]) -> None:
        self.steps = steps
        self.on_error = on_error
        self.on_done = on_done
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


class ModelWorker:
    def __init__(self, name: str = "model-worker") -> None:
        self._jobs: collections.deque[Job] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._wake = threading.Condition()
        self._stopped = False
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

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._jobs and not self._calls and not self._stopped:
                    self._wake.wait()
                if self._stopped:
                    jobs, self._jobs = list(self._jobs), collections.deque()
                    for job in jobs:
                        try:
                            job.steps.close()
                            job.on_error(RuntimeError("the model worker stopped"))
                        except Exception:
                            log.exception("closing a model job failed")
                    for _, fut in self._calls:
                        fut.cancel()
                    return
                call = self._calls.popleft() if self._calls else None
                job = self._jobs.popleft() if (call is None and self._jobs) else None
            if call is not None:
                fn, fut = call
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except Exception as exc:  # handed to the caller
                        fut.set_exception(exc)
                continue
            assert job is not None
            self._step(job)

    def _step(self, job: Job) -> None:
        try:
            if job.cancelled.is_set():
                job.steps.close()
                job.on_done()
                return
            try:
                next(job.steps)
            except StopIteration:
                job.on_done()
                return
            except Exception as exc:  # one failing request must not stop the worker
                log.exception("model job failed")
                job.on_error(exc)
                return
        except Exception:  # a failing callback must not stop the worker either
            log.exception("model job callback failed")
            return
        with self._wake:
            self._jobs.append(job)  # back of the queue: round-robin
