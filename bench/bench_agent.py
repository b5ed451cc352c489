"""Agent-mode latency per stage on this machine: a spoken question goes through the real
conversation pipeline (silero VAD -> faster-whisper -> agent LLM -> sentences -> TTS) and the
times from the end of the user's turn are printed:

    VAD stop -> transcript -> first LLM token -> first audio chunk

"VAD stop" is when the turn detector decides the user has finished, silence_duration_ms after
the last voiced frame, so the user-perceived delay adds that hangover (also printed).

    .venv/bin/python bench/bench_agent.py                      # embedded SmolLM2 + tiny TTS checkpoint
    .venv/bin/python bench/bench_agent.py --tts none           # text only
    .venv/bin/python bench/bench_agent.py --tts /path/to/checkpoint --llm-base-url http://127.0.0.1:8000/v1
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.agent.asr import Transcriber  # noqa: E402
from engine.agent.conversation import ConversationSession  # noqa: E402
from engine.agent.conversation import AudioOut, ConversationError, TurnDetection  # noqa: E402
from engine.agent.conversation.events import ResponseDone  # noqa: E402
from engine.agent.llm import ChatOptions, create_llm  # noqa: E402
from engine.speech.types import SamplingOptions  # noqa: E402
from engine.agent.vad import FRAME_SAMPLES, SileroVAD  # noqa: E402

SAMPLE_RATE = 16_000


def espeak(text: str, rate: int = 150) -> np.ndarray:
    wav = subprocess.run(["espeak-ng", "-v", "en-us", "-s", str(rate), "--stdout", text],
                         check=True, capture_output=True).stdout
    raw = subprocess.run(["sox", "-t", "wav", "-", "-r", str(SAMPLE_RATE), "-c", "1", "-e", "floating-point",
                          "-b", "32", "-t", "raw", "-"], input=wav, check=True, capture_output=True).stdout
    return np.frombuffer(raw, np.float32)


def load_tts(spec: str):
    if spec == "none":
        return None, "none"
    from engine.speech.tts import TTSEngine

    if spec == "tiny":
        from engine.fish.tiny import make_tiny_checkpoint

        path = make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="bench-agent-")), family="s1-mini", seed=0)
        return TTSEngine.load(path, device="cpu"), "tiny s1-mini (random weights)"
    return TTSEngine.load(spec), spec


async def one_turn(session: ConversationSession, pcm: np.ndarray, realtime: bool) -> dict[str, float]:
    piece = 320  # 20 ms, what a WebRTC transport delivers
    for start in range(0, len(pcm), piece):
        await session.push_audio(pcm[start:start + piece])
        if realtime:
            await asyncio.sleep(piece / SAMPLE_RATE)
    result: dict[str, float] = {}
    audio_seconds = 0.0
    async for item in session.outputs():
        if isinstance(item, AudioOut):
            audio_seconds += len(item.pcm) / item.sample_rate
        elif isinstance(item, ConversationError):
            raise RuntimeError(item.message)
        elif isinstance(item, ResponseDone):
            result.update({k: v for k, v in dataclasses.asdict(item.latency).items() if v is not None})
            result["reply_chars"] = len(item.transcript)
            result["audio_s"] = audio_seconds
            print(f"    reply: {item.transcript!r}")
            return result
    raise RuntimeError("session closed before the reply finished")


def summary(name: str, values: list[float]) -> str:
    if not values:
        return f"  {name:<34} n/a"
    return (f"  {name:<34} median {statistics.median(values):7.1f} ms   min {min(values):7.1f}   "
            f"max {max(values):7.1f}")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--question", default="What is the capital of France?")
    ap.add_argument("--tts", default="tiny", help="'tiny', 'none', or a checkpoint directory")
    ap.add_argument("--tts-frames", type=int, default=16, help="max_new_tokens per sentence (random weights never stop)")
    ap.add_argument("--asr-model", default=None)
    ap.add_argument("--llm-base-url", default=None)
    ap.add_argument("--llm-model", default="default")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--realtime", action="store_true", help="pace the input audio in real time")
    args = ap.parse_args()

    loads = {}
    t = time.perf_counter(); vad = SileroVAD.load(); loads["VAD (silero ONNX)"] = time.perf_counter() - t
    t = time.perf_counter(); asr = Transcriber.load(args.asr_model); loads["ASR (faster-whisper)"] = time.perf_counter() - t
    t = time.perf_counter()
    llm = create_llm(base_url=args.llm_base_url, model=args.llm_model)
    loads[f"LLM ({llm.name})"] = time.perf_counter() - t
    t = time.perf_counter(); tts, tts_name = load_tts(args.tts); loads[f"TTS ({tts_name})"] = time.perf_counter() - t
    print(f"CPU cores: {os.cpu_count()}   runs: {args.runs}   realtime input: {args.realtime}")
    for name, seconds in loads.items():
        print(f"  load {name:<40} {seconds * 1000:8.1f} ms (incl. warm-up)")

    speech = np.concatenate([np.zeros(int(0.3 * SAMPLE_RATE), np.float32), espeak(args.question),
                             np.zeros(int(0.8 * SAMPLE_RATE), np.float32)])
    stream = vad.stream()
    t = time.perf_counter()
    n = len(speech) // FRAME_SAMPLES
    for i in range(n):
        stream.probability(speech[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES])
    vad_ms = (time.perf_counter() - t) * 1000 / n
    t = time.perf_counter(); await asr.transcribe(speech); asr_s = time.perf_counter() - t
    print(f"  VAD cost per 32 ms frame: {vad_ms:.3f} ms;  ASR RTF: {asr_s / (len(speech) / SAMPLE_RATE):.3f}")

    turn = TurnDetection()
    rows: list[dict[str, float]] = []
    for run in range(args.runs):
        session = ConversationSession(tts=tts, asr=asr, llm=llm, vad_model=vad, turn_detection=turn,
                                      chat=ChatOptions(max_tokens=args.max_tokens, temperature=0.0),
                                      sampling=SamplingOptions(max_new_tokens=args.tts_frames, seed=run))
        print(f"  run {run + 1}:")
        rows.append(await one_turn(session, speech, args.realtime))
        await session.close()

    print("\nLatency from the VAD's end-of-turn decision:")
    for key, name in (("transcript", "-> transcript (ASR)"), ("first_token", "-> first LLM token"),
                      ("first_audio", "-> first audio chunk")):
        print(summary(name, [r[key] for r in rows if key in r]))
    stage = {
        "ASR": [r["transcript"] for r in rows],
        "LLM time to first token": [r["first_token"] - r["transcript"] for r in rows],
        "TTS time to first audio": [r["first_audio"] - r["first_token"] for r in rows if "first_audio" in r],
    }
    print("Per stage:")
    for name, values in stage.items():
        print(summary(name, values))
    if any("first_audio" in r for r in rows):
        hangover = turn.silence_duration_ms
        perceived = [hangover + r["first_audio"] for r in rows if "first_audio" in r]
        print(summary(f"user end of speech -> first audio (+{hangover} ms VAD hangover)", perceived))
    if llm is not None and hasattr(llm, "aclose"):
        await llm.aclose()
    if tts is not None:
        tts.close()


if __name__ == "__main__":
    asyncio.run(main())
