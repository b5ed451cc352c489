"""The RunPod worker: runpod's own local test mode (--test_input) in a subprocess, and the
generator handler through runpod's own generator runner (what a RunPod worker executes)."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server import worker
from server.services import Services
from server.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def run_worker(args: list[str], checkpoint: Path, data_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CHECKPOINT": str(checkpoint), "MODE": "tts", "ASR_MODEL": "none",
           "LLM_ENABLED": "false", "DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "DEVICE": "cpu"}
    env.pop("RUNPOD_WEBHOOK_GET_JOB", None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_local_test_input_runs_one_job(tiny_checkpoint, tmp_path):
    job = {"input": {"text": "Hello from the worker.", "max_new_tokens": 8, "streaming": False, "seed": 1}}
    done = run_worker(["-m", "server.worker", "--test_input", json.dumps(job)], tiny_checkpoint, tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "Job local_test completed successfully." in log
    assert "'status': 'success'" in log and "'format': 'wav'" in log


def test_local_test_input_failure_exits_1(tiny_checkpoint, tmp_path):
    job = {"input": {"tts": True, "temperature": 9}}
    done = run_worker(["-m", "server", "worker", "--test_input", json.dumps(job)], tiny_checkpoint, tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode == 1, log[-3000:]
    assert "temperature: Input should be less than or equal to 2" in log


@pytest.fixture()
def loaded_worker(tts_engine, tmp_path):
    settings = Settings(data_dir=tmp_path, mode="tts", asr_model="none", llm_enabled=False, max_new_tokens_limit=16)
    worker.setup(settings, Services(tts=tts_engine))
    yield
    worker._state.clear()


async def aggregate(job: dict) -> list:
    """What runpod's worker makes of a generator handler with return_aggregate_stream."""
    from runpod.serverless.modules.rp_job import run_job_generator

    return [part["output"] async for part in run_job_generator(worker.handler, job)]


async def test_streaming_job_through_runpods_generator_runner(loaded_worker):
    items = await aggregate({"id": "job-1", "input": {"text": "Stream it.", "streaming": True}})
    chunks, last = items[:-1], items[-1]
    assert chunks and all(c["status"] == "streaming" and len(json.dumps(c)) < 1_000_000 for c in chunks)
    assert last["status"] == "success" and "audio" not in last and last["chunks"] == len(chunks)
    pcm_bytes = sum(len(base64.b64decode(c["audio"])) for c in chunks)
    assert pcm_bytes // 2 == pytest.approx(last["duration"] * 44100, abs=45)


async def test_whole_job_and_conversation_through_the_worker(loaded_worker):
    first = await aggregate({"id": "j1", "input": {"text": "One.", "streaming": False, "conversation_id": "c"}})
    second = await aggregate({"id": "j2", "input": {"text": "Two.", "streaming": False, "conversation_id": "c"}})
    assert len(first) == 1 and first[0]["audio"] and first[0]["format"] == "wav"
    assert [m["content"] for m in second[0]["history"]] == ["One.", "Two."]


async def test_errors_fail_the_job(loaded_worker):
    items = await aggregate({"id": "bad", "input": {"text": ""}})
    assert items == [{"status": "error", "error": "text is required in TTS mode (the words to speak)"}]
    assert (await worker.collect({"id": "bad", "input": {"text": ""}}))["error"].startswith("text is required")


async def test_cancelling_the_handler_stops_the_model(loaded_worker, tts_engine):
    async def consume():
        async for _ in worker.handler({"id": "long", "input": {"text": "Long. " * 40, "max_new_tokens": 8000}}):
            pass

    worker._state["settings"].max_new_tokens_limit = 0
    task = asyncio.create_task(consume())
    while tts_engine.active_requests == 0:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):  # re-raised, so RunPod reports the job as cancelled
        await task
    for _ in range(50):
        if tts_engine.active_requests == 0:
            break
        await asyncio.sleep(0.01)
    assert tts_engine.active_requests == 0


# --------------------------------------------------------------------------- on RunPod, for real
class FakeRunPod:
    """RunPod's side of a queue worker, on loopback: job-take and job-stop long polls, and the stream
    and job-done posts that runpod's own worker loop makes (URLs from the RUNPOD_WEBHOOK_* variables)."""

    def __init__(self) -> None:
        self.jobs: asyncio.Queue = asyncio.Queue()
        self.stops: asyncio.Queue = asyncio.Queue()
        self.streamed: dict[str, list] = {}
        self.done: dict[str, dict] = {}
        self.events: dict[str, asyncio.Event] = {}

    def event(self, name: str) -> asyncio.Event:
        return self.events.setdefault(name, asyncio.Event())

    def app(self):
        from aiohttp import web

        async def long_poll(queue: asyncio.Queue):
            try:
                return await asyncio.wait_for(queue.get(), 0.3)
            except TimeoutError:
                return None

        async def job_take(request):
            job = await long_poll(self.jobs)
            return web.Response(status=204) if job is None else web.json_response(job)

        async def job_stop(request):
            job_id = await long_poll(self.stops)
            return web.Response(status=204) if job_id is None else web.json_response({"jobsToStop": [job_id]})

        async def stream(request):
            job_id = request.match_info["job_id"]
            assert request.query["isStream"] == "false"
            self.streamed.setdefault(job_id, []).append(json.loads(await request.text()))
            self.event(f"stream:{job_id}").set()
            return web.json_response({})

        async def done(request):
            job_id = request.match_info["job_id"]
            self.done[job_id] = {"isStream": request.query["isStream"], **json.loads(await request.text())}
            self.event(f"done:{job_id}").set()
            return web.json_response({})

        app = web.Application()
        app.router.add_get("/v2/ep/job-take/{worker}", job_take)
        app.router.add_get("/v2/ep/job-stop/{worker}", job_stop)
        app.router.add_post("/v2/ep/job-stream/{worker}/{job_id}", stream)
        app.router.add_post("/v2/ep/job-done/{worker}/{job_id}", done)
        return app


async def test_the_image_entrypoint_runs_the_worker_under_runpods_job_loop(tiny_checkpoint, tmp_path):
    """docker/entrypoint.sh on RunPod (RUNPOD_WEBHOOK_GET_JOB set) starts the worker; runpod's own job
    loop takes jobs, streams each chunk, posts the aggregate, and stops a job when told to."""
    from aiohttp import web

    fake = FakeRunPod()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v2/ep"  # type: ignore[union-attr]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "CHECKPOINT": str(tiny_checkpoint), "MODE": "tts", "ASR_MODEL": "none", "LLM_ENABLED": "false",
           "DATA_DIR": str(tmp_path), "DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "CONCURRENT_JOBS": "1",
           "OMP_NUM_THREADS": "1", "RUNPOD_LOG_LEVEL": "INFO",
           "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?gpu=none",
           "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=none",
           "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=none",
           "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true", "RUNPOD_SKIP_GPU_CHECK": "true"}
    for name in ("RUNPOD_POD_ID", "RUNPOD_AI_API_KEY", "RUNPOD_WEBHOOK_PING"):
        env.pop(name, None)
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        proc = await asyncio.create_subprocess_exec("sh", str(REPO / "docker" / "entrypoint.sh"), cwd=tmp_path,
                                                    env=env, stdout=log, stderr=subprocess.STDOUT)

    async def finished(job_id: str, timeout: float) -> dict:
        try:
            await asyncio.wait_for(fake.event(f"done:{job_id}").wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"no result for {job_id}; worker log:\n{log_path.read_text()[-3000:]}") from None
        return fake.done[job_id]

    try:
        # A streaming job: every chunk is posted as it comes, and the result is the list of them all.
        await fake.jobs.put({"id": "job-a", "input": {"text": "Hello from a RunPod worker.", "streaming": True,
                                                      "max_new_tokens": 16, "seed": 1}})
        result = await finished("job-a", 120)
        items = result["output"]
        assert result["isStream"] == "true" and items[-1]["status"] == "success" and "audio" not in items[-1]
        assert len(items) >= 3 and items[-1]["chunks"] == len(items) - 1
        assert [post["output"] for post in fake.streamed["job-a"]] == items
        pcm = b"".join(base64.b64decode(item["audio"]) for item in items[:-1])
        assert len(pcm) // 2 == pytest.approx(items[-1]["duration"] * 44100, abs=45)

        # A bad input fails the job with our message.
        await fake.jobs.put({"id": "job-b", "input": {"text": "Hi", "format": "aiff"}})
        failed = await finished("job-b", 30)
        assert "output" not in failed and "format: Input should be 'wav'" in failed["error"]

        # A stop signal for a running job (RunPod's /cancel) ends it; with one job at a time, the
        # next job only starts once the model has let the stopped one go.
        await fake.jobs.put({"id": "job-c", "input": {"text": "A very long speech. " * 30, "streaming": True,
                                                      "max_new_tokens": 8000}})
        await asyncio.wait_for(fake.event("stream:job-c").wait(), 30)
        await fake.stops.put("job-c")
        await fake.jobs.put({"id": "job-d", "input": {"text": "Next one.", "streaming": False,
                                                      "max_new_tokens": 8}})
        after = await finished("job-d", 30)
        assert after["output"][0]["status"] == "success" and after["output"][0]["audio"]
        assert "job-c" not in fake.done  # RunPod already knows it stopped it: no result is posted
        assert "Job stopped." in log_path.read_text()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await runner.cleanup()
