"""Agent calls taking turns on one shared embedded LLM: the end of each turn -> the reply's first text.

Two conversations (different instructions, different questions) share one `EmbeddedLLM`, as the
calls of one server do; their users speak in turn (A, B, A, B, ...), each question pushed in real
time, 20 ms at a time. llama.cpp keeps one context, so each reply finds the other call's prompt in
it; the conversation's prefill at speech start (`EmbeddedLLM.prefill`) re-evaluates the call's own
conversation while its user speaks. `--no-prefill` runs the sessions without it, as before.

  PYTHONPATH=. .venv/bin/python bench/bench_shared_llm.py [--turns 4] [--turn-detection server_vad]
                                                          [--no-prefill] [--no-speculation]

Models: silero VAD, whisper tiny.en, Smart Turn, SmolLM2 (no TTS: text replies). Printed per turn
and as a median: milliseconds from the VAD's end of turn to the first text delta.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

QUESTIONS = {"A": ["What is the capital of France?", "And what about Germany?", "What is the largest ocean?",
                   "Thank you."],
             "B": ["Tell me a joke.", "Please book a table for two at seven.", "How do I get to the train station?",
                   "Goodbye."]}
INSTRUCTIONS = {"A": "You are a geography tutor. Answer in one short sentence.",
                "B": "You are a friendly concierge at a hotel. Answer in one short sentence."}
PIECE = 320  # 20 ms at 16 kHz


async def main(args: argparse.Namespace) -> None:
    import speechkit
    from engine.agent.asr import Transcriber
    from engine.agent.conversation.session import ConversationSession
    from engine.agent.llm.base import ChatOptions
    from engine.agent.llm.embedded import EmbeddedLLM
    from engine.agent.smart_turn import SemanticTurnDetection, SmartTurn
    from engine.agent.vad import SileroVAD, TurnDetection
    from server.services import limit_blas_threads

    if args.no_prefill:
        ConversationSession._prefill_llm = lambda self: None  # type: ignore[method-assign]
    asr, vad, llm, smart_turn = Transcriber.load(), SileroVAD.load(), EmbeddedLLM.load(), SmartTurn.load()
    limit_blas_threads()  # as the server does after loading its models
    detection = SemanticTurnDetection() if args.turn_detection == "semantic_vad" else TurnDetection()
    sessions = {name: ConversationSession(tts=None, asr=asr, llm=llm, vad_model=vad, smart_turn=smart_turn,
                                          instructions=INSTRUCTIONS[name], turn_detection=detection,
                                          chat=ChatOptions(max_tokens=30, temperature=0.0),
                                          speculate=not args.no_speculation)
                for name in "AB"}
    marks: dict[str, dict[str, float]] = {name: {} for name in "AB"}

    async def read(name: str) -> None:
        async for item in sessions[name].outputs():
            marks[name].setdefault(type(item).__name__, time.monotonic())

    readers = [asyncio.create_task(read(name)) for name in "AB"]
    results: list[tuple[str, float | None]] = []
    for turn in range(args.turns):
        for name in "AB":
            marks[name].clear()
            # Silence after the question, as a microphone keeps sending: semantic_vad may wait 2 s on it.
            pcm, _ = speechkit.speech_with_gaps([0.3, QUESTIONS[name][turn % 4], args.silence])
            t0 = time.monotonic()
            for i in range(0, len(pcm), PIECE):
                await asyncio.sleep(max(0.0, t0 + i / 16000 - time.monotonic()))
                await sessions[name].push_audio(pcm[i:i + PIECE])
            await asyncio.sleep(0.5)  # the last of a reply, before the other call's user speaks
            got = marks[name]
            ms = ((got["ResponseTextDelta"] - got["UserSpeechStopped"]) * 1000
                  if "ResponseTextDelta" in got and "UserSpeechStopped" in got else None)
            results.append((f"{name}{turn}", ms))
    for session in sessions.values():
        await session.close()
    for reader in readers:
        reader.cancel()
    measured = [ms for _, ms in results if ms is not None]
    print(f"{args.turn_detection}, prefill {'off' if args.no_prefill else 'on'}, "
          f"speculation {'off' if args.no_speculation else 'on'}: end of turn -> first text delta "
          f"median {statistics.median(measured):.0f} ms over {len(measured)} turns "
          f"[{', '.join(f'{k} {ms:.0f}' if ms is not None else f'{k} -' for k, ms in results)}]")
    llm.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=4, help="turns per call")
    parser.add_argument("--turn-detection", choices=("server_vad", "semantic_vad"), default="semantic_vad")
    parser.add_argument("--no-prefill", action="store_true", help="sessions without the prefill at speech start")
    parser.add_argument("--no-speculation", action="store_true",
                        help="no speculative replies (a reply started in a pause hides the LLM's prompt time)")
    parser.add_argument("--silence", type=float, default=2.6, help="seconds of silence pushed after each question")
    asyncio.run(main(parser.parse_args()))
