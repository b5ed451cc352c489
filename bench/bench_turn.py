"""End-of-turn benchmark: server_vad (silence) vs semantic_vad (Smart Turn v3) on the same espeak audio.

  Smart Turn inference: ms per decision (features + model) on 2 s and 8 s of audio.
  Turn end: each utterance (0.3 s lead, speech, then silence) is pushed in 20 ms pieces, as a
  microphone sends them; the delay is end of speech -> speech_stopped, counted as the audio
  pushed past the end of speech plus the time the deciding push took (the model's inference).

  PYTHONPATH=. .venv/bin/python bench/bench_turn.py [--eagerness auto] [--threads 2]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from engine.agent.smart_turn import SemanticEndOfTurn, SemanticTurnDetection, SmartTurn  # noqa: E402
from engine.agent.vad import INPUT_SAMPLE_RATE, SileroVAD, SpeechStopped, TurnDetection, TurnDetector  # noqa: E402
from server.services import limit_blas_threads  # noqa: E402

COMPLETE = ["What is the capital of France?", "Can you tell me the weather for tomorrow?", "Thank you very much.",
            "Hello, how are you today?", "Tell me a joke.", "Please book a table for two at seven."]
UNFINISHED = ["I would like to order a, um", "I was thinking that maybe we could", "so I was going to say that the"]
PIECE = 320  # 20 ms


async def turn_end(push, pcm: np.ndarray, speech_end: int) -> tuple[float | None, float]:
    """ms from the end of speech to the stop decision (None: no stop), and the wall ms of that push."""
    for start in range(0, len(pcm), PIECE):
        t0 = time.perf_counter()
        events = await push(pcm[start:start + PIECE])
        took = (time.perf_counter() - t0) * 1000
        if any(isinstance(e, SpeechStopped) for e in events):
            return (start + PIECE - speech_end) * 1000 / INPUT_SAMPLE_RATE + took, took
    return None, 0.0


async def main(args: argparse.Namespace) -> None:
    import speechkit

    vad = SileroVAD.load()
    model = SmartTurn.load(threads=args.threads)
    limit_blas_threads()  # as the server does after loading its models (OPENBLAS_NUM_THREADS=2: as before)
    for seconds in (2, 8):
        audio = speechkit.espeak_wav(" ".join(COMPLETE))[: seconds * INPUT_SAMPLE_RATE]
        feats, full = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter(); model.features(audio); feats.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter(); model.probability(audio); full.append((time.perf_counter() - t0) * 1000)
        print(f"Smart Turn on {seconds} s of audio, {args.threads} thread(s): "
              f"features median {statistics.median(feats):.1f} ms, "
              f"features+model median {statistics.median(full):.1f} ms (min {min(full):.1f})")

    semantic = SemanticTurnDetection(eagerness=args.eagerness)
    tail = semantic.max_wait_ms / 1000 + 0.5
    print(f"\nend of speech -> speech_stopped (ms), 20 ms pushes; server_vad silence_duration_ms={args.silence_ms}, "
          f"semantic_vad eagerness={args.eagerness} (max wait {semantic.max_wait_ms} ms)")
    rows: dict[str, list[float]] = {"server_vad": [], "semantic_vad": []}
    for text in COMPLETE + UNFINISHED:
        pcm, truth = speechkit.speech_with_gaps([0.3, text, tail])
        speech_end = int(truth[0][1] * INPUT_SAMPLE_RATE)
        server = TurnDetector(vad, TurnDetection(silence_duration_ms=args.silence_ms))

        async def push_server(piece, detector=server):
            return detector.push(piece)

        server_ms, _ = await turn_end(push_server, pcm, speech_end)
        end_of_turn = SemanticEndOfTurn(TurnDetector(vad, semantic.silence_params()), model, semantic)
        semantic_ms, took = await turn_end(end_of_turn.push, pcm, speech_end)
        kind = "complete" if text in COMPLETE else "unfinished"
        if kind == "complete":
            rows["server_vad"].append(server_ms or float("nan"))
            rows["semantic_vad"].append(semantic_ms or float("nan"))
        print(f"  {kind:<10} {text!r:<46} server_vad {server_ms or float('nan'):6.0f}   semantic_vad "
              f"{semantic_ms or float('nan'):6.0f} (last p={end_of_turn.last_probability:.2f}, "
              f"deciding push {took:.0f} ms)")
    print("  (negative: the turn ended at a pause inside the sentence; ~max wait: Smart Turn kept saying incomplete)")
    for name, values in rows.items():
        print(f"  complete sentences, {name:<12}: median {statistics.median(values):6.0f} ms "
              f"(min {min(values):.0f}, max {max(values):.0f})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eagerness", default="auto", choices=["low", "medium", "high", "auto"])
    ap.add_argument("--silence-ms", type=int, default=500, help="server_vad silence_duration_ms")
    ap.add_argument("--threads", type=int, default=1, help="Smart Turn onnxruntime intra-op threads")
    ap.add_argument("--reps", type=int, default=10)
    asyncio.run(main(ap.parse_args()))
