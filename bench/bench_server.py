"""Server overhead: time to the first streamed chunk and jobs per second, through real HTTP on
loopback, next to the same work done by the engine directly (the difference is the server).

    .venv/bin/python bench/bench_server.py                          # a tiny random checkpoint
    .venv/bin/python bench/bench_server.py --checkpoint DIR --device cuda --frames 64

Measured:
  first chunk   POST /run (streaming) -> first audio item on /stream (polled every 5 ms);
                POST /v1/tts (streaming) -> first PCM byte; the engine's own first chunk
  jobs/s        N clients each running /runsync jobs of a fixed number of frames back to back;
                the engine running the same requests with the same concurrency
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import statistics
import tempfile
import time
from pathlib import Path

import requests

from engine.speech.tts import TTSEngine
from engine.speech.types import SamplingOptions, TTSRequest
from server.services import Services
from server.settings import Settings
from server.testing import LiveServer

TEXT = "The quick brown fox jumps over the lazy dog."


def engine_first_chunk(engine: TTSEngine, frames: int, runs: int) -> list[float]:
    async def one() -> float:
        t0 = time.perf_counter()
        stream = engine.stream(TTSRequest(TEXT, sampling=SamplingOptions(max_new_tokens=frames, seed=1)))
        async for _ in stream:
            elapsed = time.perf_counter() - t0
            await stream.aclose()
            return elapsed
        return float("nan")

    async def all_runs() -> list[float]:
        return [await one() for _ in range(runs)]

    return asyncio.run(all_runs())


def job_first_chunk(url: str, frames: int, runs: int) -> list[float]:
    out = []
    with requests.Session() as http:
        for _ in range(runs):
            t0 = time.perf_counter()
            job = http.post(f"{url}/run", json={"input": {"text": TEXT, "streaming": True, "seed": 1,
                                                          "max_new_tokens": frames}}).json()
            while True:
                body = http.get(f"{url}/stream/{job['id']}").json()
                if any(item["output"].get("status") == "streaming" for item in body["stream"]):
                    out.append(time.perf_counter() - t0)
                    break
                time.sleep(0.005)
            while http.get(f"{url}/status/{job['id']}").json()["status"] not in ("COMPLETED", "FAILED"):
                time.sleep(0.01)
    return out


def v1_first_byte(url: str, frames: int, runs: int) -> list[float]:
    out = []
    with requests.Session() as http:
        for _ in range(runs):
            t0 = time.perf_counter()
            with http.post(f"{url}/v1/tts", json={"text": TEXT, "streaming": True, "seed": 1,
                                                  "max_new_tokens": frames}, stream=True) as response:
                first = None
                for chunk in response.iter_content(chunk_size=None):
                    if chunk and first is None:
                        first = time.perf_counter() - t0
                out.append(first)
    return out


def job_throughput(url: str, frames: int, clients: int, jobs_per_client: int) -> float:
    def client(_: int) -> int:
        with requests.Session() as http:
            for _ in range(jobs_per_client):
                body = http.post(f"{url}/runsync", json={"input": {"text": TEXT, "streaming": False,
                                                                   "max_new_tokens": frames}}).json()
                assert body["status"] == "COMPLETED", body
        return jobs_per_client

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        done = sum(pool.map(client, range(clients)))
    return done / (time.perf_counter() - t0)


def engine_throughput(engine: TTSEngine, frames: int, clients: int, jobs_per_client: int) -> float:
    async def client() -> None:
        for _ in range(jobs_per_client):
            await engine.synthesize(TTSRequest(TEXT, sampling=SamplingOptions(max_new_tokens=frames)))

    async def run() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return clients * jobs_per_client / (time.perf_counter() - t0)

    return asyncio.run(run())


def ms(values: list[float]) -> str:
    p90 = sorted(values)[int(0.9 * (len(values) - 1))]
    return f"median {1000 * statistics.median(values):7.1f} ms   p90 {1000 * p90:7.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a checkpoint directory (default: a tiny random one)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--frames", type=int, default=16, help="frames per request (random weights never stop)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=5, help="jobs per client in the throughput run")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from engine.fish.tiny import make_tiny_checkpoint

            checkpoint = make_tiny_checkpoint(Path(tmp) / "tiny", "s1-mini", seed=0)
        engine = TTSEngine.load(checkpoint, device=args.device, dtype=args.dtype)
        settings = Settings(data_dir=Path(tmp) / "data", mode="tts", api_key=None, asr_model="none",
                            llm_enabled=False, concurrent_jobs=args.clients, queue_size=1000, cors_origins=[])
        try:
            engine_first_chunk(engine, args.frames, 2)  # warm-up
            with LiveServer(settings, Services(tts=engine)) as live:
                job_first_chunk(live.url, args.frames, 2)
                print(f"checkpoint {checkpoint} on {engine.models.device}/{engine.models.dtype}, "
                      f"{args.frames} frames per request")
                print(f"first chunk  engine        {ms(engine_first_chunk(engine, args.frames, args.runs))}")
                print(f"first chunk  /run+/stream  {ms(job_first_chunk(live.url, args.frames, args.runs))}")
                print(f"first byte   /v1/tts       {ms(v1_first_byte(live.url, args.frames, args.runs))}")
                direct = engine_throughput(engine, args.frames, args.clients, args.jobs)
                served = job_throughput(live.url, args.frames, args.clients, args.jobs)
                print(f"throughput   engine        {direct:7.2f} requests/s ({args.clients} concurrent)")
                print(f"throughput   /runsync      {served:7.2f} jobs/s     ({args.clients} clients)")
        finally:
            engine.close()


if __name__ == "__main__":
    main()
