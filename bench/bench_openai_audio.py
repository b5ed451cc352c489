"""The OpenAI audio routes through real HTTP on loopback, next to the server's own routes doing
the same work in the same run.

    .venv/bin/python bench/bench_openai_audio.py                       # a tiny random checkpoint
    .venv/bin/python bench/bench_openai_audio.py --checkpoint DIR --device cuda --frames 64

Measured (same text, same saved reference voice, same sampling, same frame cap):
  speech      time to the first byte and real-time factor (wall time / seconds of audio) of
              POST /v1/audio/speech streamed (pcm, mp3; speed 1 and 1.5; SSE) and of
              POST /v1/tts streamed (raw PCM). The text is one sentence, so both routes generate
              the same number of frames (/v1/audio/speech splits by sentence, /v1/tts by length).
              RTF is wall time over the audio returned, so speed 1.5 returns less audio for the
              same work.
  transcribe  real-time factor of POST /v1/audio/transcriptions (json) on espeak-ng speech,
              next to the loaded faster-whisper model called directly.
"""
from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's code, and tests.speechkit

from engine.audio import decode_audio, encode_audio
from engine.speech.tts import TTSEngine
from server.references import ReferenceStore
from server.services import Services
from server.settings import Settings
from server.testing import LiveServer

TEXT = "The quick brown fox jumps over the lazy dog."  # one sentence: one text chunk on both routes
SPOKEN = ("Please turn on the kitchen lights. What is the weather going to be like tomorrow in Paris? "
          "What is the capital of France? Hello from the server.")


def timed_post(http: requests.Session, url: str, body: dict) -> tuple[float, float, bytes]:
    """(seconds to the first body byte, seconds to the last, the body) of a streamed POST."""
    t0 = time.perf_counter()
    first = None
    parts = []
    with http.post(url, json=body, stream=True) as response:
        response.raise_for_status()
        for chunk in response.iter_content(chunk_size=None):
            if chunk:
                first = first if first is not None else time.perf_counter() - t0
                parts.append(chunk)
    return first or float("nan"), time.perf_counter() - t0, b"".join(parts)


def audio_seconds(data: bytes, kind: str) -> float:
    if kind == "pcm24":
        return len(data) / 2 / 24000
    if kind == "pcm44":
        return len(data) / 2 / 44100
    if kind == "sse":
        events = [json.loads(line[5:]) for line in data.decode().splitlines() if line.startswith("data:")]
        pcm = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
        return len(pcm) / 2 / 24000
    return len(decode_audio(data, 44100)) / 44100


def run_cases(url: str, cases: list[tuple[str, str, dict, str]], runs: int) -> dict[str, tuple[list[float], list[float]]]:
    """Round-robin over the cases, so a load change on a shared machine hits them all alike."""
    results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name, *_ in cases}
    with requests.Session() as http:
        for name, path, body, kind in cases:
            timed_post(http, url + path, body)  # warm-up
        for _ in range(runs):
            for name, path, body, kind in cases:
                first, total, data = timed_post(http, url + path, body)
                results[name][0].append(first)
                results[name][1].append(total / audio_seconds(data, kind))
    return results


def transcribe_rtf(url: str, services: Services, wav: bytes, seconds: float, runs: int) -> tuple[list[float], list[float]]:
    served, direct = [], []
    pcm16k = decode_audio(wav, 16000)
    with requests.Session() as http:
        for i in range(runs + 1):
            t0 = time.perf_counter()
            r = http.post(url + "/v1/audio/transcriptions", files={"file": ("speech.wav", wav)},
                          data={"model": "whisper-1"})
            r.raise_for_status()
            if i:
                served.append((time.perf_counter() - t0) / seconds)
            t0 = time.perf_counter()
            services.asr.transcribe_sync(pcm16k)  # type: ignore[union-attr]
            if i:
                direct.append((time.perf_counter() - t0) / seconds)
    return served, direct


def summary(values: list[float], unit: str) -> str:
    """Median and best: on a shared machine the best run shows the route's own cost."""
    scale, fmt = (1000, "{:6.0f} / {:4.0f} ms") if unit == "ms" else (1, "{:5.2f} / {:4.2f}")
    return fmt.format(scale * statistics.median(values), scale * min(values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a checkpoint directory (default: a tiny random one)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--frames", type=int, default=32, help="frame cap per text chunk (random weights never stop)")
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()

    from engine.agent.asr import Transcriber
    from tests.speechkit import espeak_wav

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from engine.fish.tiny import make_tiny_checkpoint

            checkpoint = make_tiny_checkpoint(Path(tmp) / "tiny", "s1-mini", seed=0)
        engine = TTSEngine.load(checkpoint, device=args.device, dtype=args.dtype)
        asr = Transcriber.load()
        store = ReferenceStore(Path(tmp) / "data" / "references")
        t = np.arange(2 * 44100) / 44100
        store.add("bench", encode_audio((0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 44100, "wav"),
                  "A steady tone.", "bench.wav")
        settings = Settings(data_dir=Path(tmp) / "data", mode="tts", api_key=None, llm_enabled=False,
                            max_new_tokens_limit=args.frames, cors_origins=[])
        services = Services(tts=engine, asr=asr, references=store)
        sampling = {"temperature": 0.7, "top_p": 0.7, "repetition_penalty": 1.2, "seed": 1}
        speech = {"model": "tts-1", "voice": "bench", "input": TEXT, "seed": 1}
        cases = [
            ("/v1/tts            pcm 44.1k", "/v1/tts", {"text": TEXT, "reference_id": "bench", "streaming": True,
                                                        "use_memory_cache": "on", **sampling}, "pcm44"),
            ("/v1/audio/speech   pcm 24k  ", "/v1/audio/speech", {**speech, "response_format": "pcm"}, "pcm24"),
            ("/v1/audio/speech   mp3      ", "/v1/audio/speech", {**speech, "response_format": "mp3"}, "mp3"),
            ("/v1/audio/speech   mp3 x1.5 ", "/v1/audio/speech", {**speech, "response_format": "mp3",
                                                                   "speed": 1.5}, "mp3"),
            ("/v1/audio/speech   sse pcm  ", "/v1/audio/speech", {**speech, "response_format": "pcm",
                                                                   "stream_format": "sse"}, "sse"),
        ]
        try:
            with LiveServer(settings, services) as live:
                print(f"checkpoint {checkpoint} ({engine.models.device}, {engine.models.dtype}), "
                      f"{args.frames} frames per text chunk, {args.runs} runs, median / best")
                print("route                          first byte          RTF")
                for name, (firsts, rtfs) in run_cases(live.url, cases, args.runs).items():
                    print(f"{name}  {summary(firsts, 'ms')}   {summary(rtfs, '')}")
                pcm = espeak_wav(SPOKEN)
                wav = encode_audio(pcm, 16000, "wav")
                served, direct = transcribe_rtf(live.url, services, wav, pcm.size / 16000, args.runs)
                print(f"transcription of {pcm.size / 16000:.1f} s espeak-ng speech (whisper tiny.en, int8)")
                print(f"/v1/audio/transcriptions json   RTF {summary(served, '')}")
                print(f"faster-whisper called directly  RTF {summary(direct, '')}")
        finally:
            engine.close()
            asr.close()


if __name__ == "__main__":
    main()
