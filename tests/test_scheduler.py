"""The model worker: round-robin fairness, cancellation within one step, failure isolation."""
from __future__ import annotations

import threading
import time

from engine.speech.scheduler import ModelWorker


def _collect(worker, steps):
    done, errors = threading.Event(), []
    worker.submit(steps, on_error=lambda e: (errors.append(e), done.set()), on_done=done.set)
    return done, errors


def test_jobs_are_interleaved_step_by_step():
    worker = ModelWorker()
    order: list[str] = []
    gate = threading.Event()

    def job(name, n):
        gate.wait()
        for _ in range(n):
            order.append(name)
            yield

    try:
        d1, _ = _collect(worker, job("a", 4))
        d2, _ = _collect(worker, job("b", 4))
        gate.set()
        assert d1.wait(5) and d2.wait(5)
    finally:
        worker.stop()
    assert order == ["a", "b"] * 4


def test_cancel_stops_a_job_within_one_step_and_frees_the_worker():
    worker = ModelWorker()
    steps_run = []

    def endless():
        try:
            while True:
                steps_run.append(1)
                time.sleep(0.001)
                yield
        finally:
            steps_run.append("closed")

    try:
        done, errors = threading.Event(), []
        job = worker.submit(endless(), on_error=errors.append, on_done=done.set)
        time.sleep(0.05)
        job.cancel()
        assert done.wait(2)
        assert steps_run[-1] == "closed" and not errors
        assert worker.call(lambda: 41 + 1).result(timeout=2) == 42
        assert worker.active_jobs == 0
    finally:
        worker.stop()


def test_a_failing_job_does_not_hurt_the_others():
    worker = ModelWorker()

    def bad():
        yield
        raise ValueError("boom")

    def good(out):
        for i in range(3):
            out.append(i)
            yield

    out: list[int] = []
    try:
        d_bad, errors = _collect(worker, bad())
        d_good, good_errors = _collect(worker, good(out))
        assert d_bad.wait(2) and d_good.wait(2)
        assert isinstance(errors[0], ValueError) and str(errors[0]) == "boom"
        assert out == [0, 1, 2] and not good_errors
        fut = worker.call(lambda: 1 / 0)
        try:
            fut.result(timeout=2)
            raise AssertionError("expected ZeroDivisionError")
        except ZeroDivisionError:
            pass
        assert worker.call(lambda: "alive").result(timeout=2) == "alive"
    finally:
        worker.stop()


def test_batchable_steps_of_concurrent_jobs_run_together():
    from engine.speech.scheduler import BatchableStep

    batches: list[list[int]] = []

    class Square(BatchableStep):
        batch_key = "model"

        def __init__(self, x):
            self.x = x

        @classmethod
        def run_batch(cls, items):
            batches.append([i.x for i in items])
            for i in items:
                i.result = i.x * i.x

    results: dict[str, list[int]] = {"a": [], "b": []}
    gate = threading.Event()

    def job(name, xs):
        gate.wait()
        for x in xs:
            step = Square(x)
            yield step
            results[name].append(step.result)

    worker = ModelWorker()
    try:
        d1, e1 = _collect(worker, job("a", [1, 2, 3]))
        d2, e2 = _collect(worker, job("b", [4, 5]))
        gate.set()
        assert d1.wait(5) and d2.wait(5) and not e1 and not e2
    finally:
        worker.stop()
    assert results == {"a": [1, 4, 9], "b": [16, 25]}
    assert [1, 4] in batches and [2, 5] in batches and [3] in batches
    assert worker.largest_batch == 2
