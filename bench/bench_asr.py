"""ASR accuracy and latency on varied espeak-ng speech, through the server's own input path.

Each sentence is spoken by espeak-ng in several voices and speeds (22.05 kHz), turned into what a
client sends (24 kHz 16-bit PCM on the WebSocket, or 48 kHz float frames as WebRTC decodes them),
brought to 16 kHz by the server's resampler (`signaling.audio_formats.InputDecoder`, or the PyAV
resampler of `signaling.tracks.InboundAudio`), cut into a turn by the real silero `TurnDetector`
(prefix padding + speech + the silence up to its decision) and transcribed by `Transcriber`.
Printed: WER (lowercase, punctuation dropped, numbers as words) overall, per voice and per
speed, the worst transcripts, and the time per transcription (median / p90).

  PYTHONPATH=. .venv/bin/python bench/bench_asr.py                      # the shipped defaults
  PYTHONPATH=. .venv/bin/python bench/bench_asr.py --beam 5 --temperature-fallback
  PYTHONPATH=. .venv/bin/python bench/bench_asr.py --model base --window-margin full   # the asr-base extra
  PYTHONPATH=. .venv/bin/python bench/bench_asr.py --incremental        # end-of-turn latency, live pacing
  OPENBLAS_NUM_THREADS=2 PYTHONPATH=. .venv/bin/python bench/bench_asr.py   # numpy's BLAS as it was before the server limited it

`--incremental` feeds each utterance in real time (20 ms pushes, as a microphone does) through
`IncrementalTranscriber`, and reports the time from the VAD's end-of-turn decision to the final
transcript next to a whole-turn transcription of the same audio.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

SENTENCES = (
    "What is the capital of France?",
    "Please turn on the kitchen lights.",
    "Set a timer for 15 minutes.",
    "What time is it in Tokyo right now?",
    "Call my sister Sarah tomorrow at 3 o'clock.",
    "How far is it from London to Edinburgh?",
    "My flight number is 472 and it leaves at noon.",
    "Can you book a table for four people on Friday?",
    "What is the weather going to be like tomorrow in Paris?",
    "Remind me to buy milk and eggs after work.",
    "The meeting with John has moved to Thursday morning.",
    "How many ounces are in a pound?",
    "Play some relaxing music in the living room.",
    "Send an email to Doctor Patel about my appointment.",
    "What is 25 times 12?",
    "I would like to order a large pepperoni pizza.",
    "Who wrote the novel Pride and Prejudice?",
    "Turn the thermostat down to 68 degrees.",
    "How do I get to the nearest train station?",
    "Tell me a fun fact about the Pacific Ocean.",
    "My phone number ends in 4 5 6 7.",
    "Is the museum in Berlin open on Sunday?",
    "Cancel my subscription and refund the last payment.",
    "Translate good morning into Spanish.",
)
VOICES = ("en-us", "en", "en-gb-x-rp", "en-us+f3")
SPEEDS = (140, 175, 210)
VOICE_LEVEL = 0.01  # a sample above this is speech (the clients in tests/ mark the end of the words alike)
ESPEAK_RATE = 22_050
LEAD_S, TAIL_S = 0.5, 1.2  # silence around each utterance: the VAD needs room to start and stop


# ------------------------------------------------------------------ scoring
_PUNCT = re.compile(r"[^\w\s']")


def normalize(text: str) -> str:
    """Lowercase words, numbers spelled out, punctuation dropped (so "15" == "fifteen")."""
    from num2words import num2words

    text = text.lower().replace("%", " percent").replace("-", " ").replace("o'clock", "oclock")
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)
    text = re.sub(r"\d+(\.\d+)?", lambda m: " " + num2words(float(m.group()) if m.group(1) else int(m.group()))
                  + " ", text)
    text = _PUNCT.sub(" ", text.replace("-", " "))
    return " ".join(w for w in text.split() if w != "and")  # "four hundred and seventy-two"


def wer(refs: list[str], hyps: list[str]) -> float:
    import jiwer

    return float(jiwer.wer([normalize(r) for r in refs], [normalize(h) or "<empty>" for h in hyps]))


# ------------------------------------------------------------------ audio in
def espeak(text: str, voice: str, speed: int) -> np.ndarray:
    """espeak-ng's own 22.05 kHz output as float32."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", f.name, text], check=True)
        with wave.open(f.name) as w:
            assert w.getframerate() == ESPEAK_RATE and w.getnchannels() == 1
            pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    return pcm.astype(np.float32) / 32768.0


def client_audio(pcm: np.ndarray, rate: int) -> np.ndarray:
    """What a client would send: the utterance at `rate`, resampled well (soxr HQ) on its side."""
    import soxr

    lead, tail = np.zeros(int(LEAD_S * ESPEAK_RATE), np.float32), np.zeros(int(TAIL_S * ESPEAK_RATE), np.float32)
    return soxr.resample(np.concatenate([lead, pcm, tail]), ESPEAK_RATE, rate, quality="HQ").astype(np.float32)


def server_16k(pcm: np.ndarray, path: str, resampler: str) -> list[np.ndarray]:
    """The 16 kHz pieces the server's transport would push to the conversation, 20 ms at a time."""
    import av

    from signaling.audio_formats import AudioFormat, InputDecoder

    rate = 24_000 if path == "ws24k" else 48_000
    sent = client_audio(pcm, rate)
    step = rate // 50
    if resampler == "soxr":  # the alternative measured: soxr's streaming resampler on the server
        import soxr

        stream = soxr.ResampleStream(rate, 16_000, 1, dtype="float32", quality="HQ")
        if path == "ws24k":
            sent = np.clip(sent * 32768, -32768, 32767).astype(np.int16).astype(np.float32) / 32768.0
        return [stream.resample_chunk(sent[i:i + step], last=i + step >= len(sent))
                for i in range(0, len(sent), step)]
    if path == "ws24k":
        decoder = InputDecoder(AudioFormat("audio/pcm"))
        pcm16 = np.clip(sent * 32768, -32768, 32767).astype("<i2")
        return [decoder.decode(pcm16[i:i + step].tobytes()) for i in range(0, len(pcm16), step)]
    res = av.AudioResampler(format="fltp", layout="mono", rate=16_000)  # as signaling.tracks.InboundAudio
    out = []
    for i in range(0, len(sent), step):
        frame = av.AudioFrame.from_ndarray(sent[i:i + step].reshape(1, -1), format="fltp", layout="mono")
        frame.sample_rate = rate
        out += [f.to_ndarray().mean(axis=0, dtype=np.float32) for f in res.resample(frame)]
    return out


def vad_turns(pieces: list[np.ndarray], vad) -> list[np.ndarray]:
    """The turns' audio as the server's TurnDetector cuts them (default server_vad settings)."""
    from engine.agent.vad import SpeechStopped, TurnDetector

    detector = TurnDetector(vad)
    turns = [e.audio for p in pieces for e in detector.push(p) if isinstance(e, SpeechStopped)]
    last = detector.flush()
    return turns + ([last.audio] if last is not None else [])


# ------------------------------------------------------------------ runs
def utterances(per_sentence: int, limit: int | None) -> list[tuple[str, str, int]]:
    """Each sentence in `per_sentence` (voice, speed) pairs, spread so every pair is used evenly."""
    combos = [(v, s) for s in SPEEDS for v in VOICES]
    out = [(text, *combos[(i * per_sentence + k) % len(combos)])
           for i, text in enumerate(SENTENCES) for k in range(per_sentence)]
    return out[:limit] if limit else out


def decode_options(args: argparse.Namespace) -> dict:
    options: dict = {}
    if args.temperature_fallback:  # faster-whisper's own default
        options["temperature"] = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    if args.prompt:
        options["initial_prompt"] = args.prompt
    if args.hotwords:
        options["hotwords"] = args.hotwords
    if args.chunk_length:
        options["chunk_length"] = args.chunk_length
    return options


def pad(pcm: np.ndarray, ms: int) -> np.ndarray:
    if not ms:
        return pcm
    silence = np.zeros(16 * ms, np.float32)
    return np.concatenate([silence, pcm, silence])


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def report(rows: list[dict], title: str) -> None:
    refs, hyps = [r["ref"] for r in rows], [r["hyp"] for r in rows]
    print(f"\n{title}: {len(rows)} utterances, WER {wer(refs, hyps):.1%}")
    for key, values in (("voice", VOICES), ("speed", SPEEDS)):
        parts = []
        for value in values:
            sel = [r for r in rows if r[key] == value]
            if sel:
                parts.append(f"{value}: {wer([r['ref'] for r in sel], [r['hyp'] for r in sel]):.1%}")
        print(f"  per {key}: " + ", ".join(parts))
    for name, label in (("asr_ms", "whole-turn transcription"), ("final_ms", "end of turn -> final transcript")):
        times = [r[name] for r in rows if name in r]
        if times:
            print(f"  {label}: median {statistics.median(times):.0f} ms, p90 {percentile(times, 90):.0f} ms")
    worst = sorted(rows, key=lambda r: -wer([r["ref"]], [r["hyp"]]))[:6]
    for r in worst:
        if wer([r["ref"]], [r["hyp"]]) > 0:
            print(f"  {r['voice']:>10} {r['speed']}: {r['ref']!r} -> {r['hyp']!r}")


def run_whole(args, asr, vad, items) -> list[dict]:
    rows = []
    for text, voice, speed in items:
        turns = vad_turns(server_16k(espeak(text, voice, speed), args.path, args.resampler), vad)
        hyp, spent = [], 0.0
        for audio in turns:
            t0 = time.perf_counter()
            hyp.append(asr.transcribe_sync(pad(audio, args.pad_ms), turn=True))
            spent += time.perf_counter() - t0
        rows.append({"ref": text, "hyp": " ".join(hyp), "voice": voice, "speed": speed, "asr_ms": spent * 1000,
                     "turns": len(turns)})
    split = sum(r["turns"] != 1 for r in rows)
    if split:
        print(f"  ({split} utterances were not cut as exactly one turn; their turns' transcripts are joined)")
    return rows


async def run_incremental(args, asr, vad, items) -> list[dict]:
    """Live pacing: 20 ms pushes every 20 ms, the incremental transcriber working meanwhile; then
    a whole-turn pass over the same turn audio (what the server did before), for comparison."""
    from engine.agent.incremental_asr import IncrementalTranscriber
    from engine.agent.vad import SpeechStarted, TurnDetection, TurnDetector

    rows = []
    for text, voice, speed in items:
        pieces = server_16k(espeak(text, voice, speed), args.path, args.resampler)
        detector = TurnDetector(vad)
        live: IncrementalTranscriber | None = None
        deltas: list[str] = []
        finals: list[dict] = []
        landed: list[tuple[float, int]] = []  # (wall time, speech end in turn ms) of each pause pass
        speech_end: int | None = None  # turn ms where the VAD puts the end of the speech so far
        # The words end at the utterance's last loud sample: its piece, and how long before that piece's end.
        last_piece = max(n for n, piece in enumerate(pieces) if (np.abs(piece) > VOICE_LEVEL).any())
        tail = pieces[last_piece]
        after_words = (len(tail) - 1 - np.flatnonzero(np.abs(tail) > VOICE_LEVEL)[-1]) / 16_000
        t_words_end = None
        t0 = time.monotonic()
        for n, piece in enumerate(pieces):
            await asyncio.sleep(max(0.0, t0 + n * 0.02 - time.monotonic()))
            if n == last_piece:  # a live microphone sends each piece once it has been recorded
                t_words_end = time.monotonic() - after_words
            for event in detector.push(piece):
                if isinstance(event, SpeechStarted):
                    live = IncrementalTranscriber(
                        asr, on_delta=deltas.append, interval_ms=args.interval_ms, pause_ms=args.pause_ms,
                        on_pause_pass=lambda _text, end: landed.append((time.monotonic(), end)))
                    landed.clear()
                    speech_end = None
                    continue
                t_stop = time.monotonic()
                final = await live.finish(event.audio, event.audio_end_ms - event.audio_start_ms)
                final_ms = (time.monotonic() - t_stop) * 1000
                after_words_ms = (time.monotonic() - t_words_end) * 1000 if t_words_end is not None else None
                w0 = time.perf_counter()
                whole = await asr.transcribe(event.audio, turn=True)
                # End of the words -> a pause pass covering all of them: when a reply could be speculated (server_vad),
                # and what semantic_vad's answer waits for.
                likely = [t for t, end in landed if t_words_end is not None and end == speech_end]
                finals.append({"final": final, "final_ms": final_ms, "after_words_ms": after_words_ms,
                               "whole": whole, "passes": live.passes,
                               "whole_ms": (time.perf_counter() - w0) * 1000, "reused": live.reused,
                               "likely_ms": (likely[0] - t_words_end) * 1000 if likely else None})
                live = None
            if live is not None and detector.in_speech:
                live.update(detector)
                speech_end = detector.turn_ms - detector.pause_ms
        row = {"ref": text, "voice": voice, "speed": speed, "hyp": " ".join(f["final"] for f in finals),
               "whole": " ".join(f["whole"] for f in finals), "final_ms": sum(f["final_ms"] for f in finals),
               "asr_ms": sum(f["whole_ms"] for f in finals), "passes": sum(f["passes"] for f in finals),
               "reused": all(f["reused"] for f in finals), "deltas": "".join(deltas), "turns": len(finals),
               "likely_ms": finals[-1]["likely_ms"] if finals else None,
               "after_words_ms": finals[-1]["after_words_ms"] if finals else None}
        rows.append(row)
        note = "" if row["deltas"] == row["hyp"] else f" deltas {row['deltas']!r} != final"
        note += "" if row["whole"] == row["hyp"] else f" whole pass {row['whole']!r} != final {row['hyp']!r}"
        likely = "none" if row["likely_ms"] is None else f"{row['likely_ms']:4.0f} ms"
        print(f"  {voice:>10} {speed}: end of the words -> pause pass {likely}; end of turn -> final "
              f"{row['final_ms']:4.0f} ms (whole pass {row['asr_ms']:4.0f} ms), {row['passes']} passes, "
              f"reused {row['reused']}{note}")
    likely = sorted(r["likely_ms"] for r in rows if r["likely_ms"] is not None)
    if likely:
        print(f"  end of the words -> a pause pass over all of them: median {statistics.median(likely):.0f} ms, "
              f"p90 {likely[int(0.9 * (len(likely) - 1))]:.0f} ms, in {len(likely)}/{len(rows)} turns")
    done = sorted(r["after_words_ms"] for r in rows if r["after_words_ms"] is not None)
    if done:
        print(f"  end of the words -> the final transcript (server_vad, {TurnDetection().silence_duration_ms} ms "
              f"of silence): median {statistics.median(done):.0f} ms, p90 {done[int(0.9 * (len(done) - 1))]:.0f} ms")
    whole_wer = wer([r["ref"] for r in rows], [r["whole"] for r in rows])
    print(f"  whole-turn passes over the same audio: WER {whole_wer:.1%}; "
          f"final reused a live pass in {sum(r['reused'] for r in rows)}/{len(rows)}; deltas add up to the final in "
          f"{sum(r['deltas'] == r['hyp'] for r in rows)}/{len(rows)}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a CTranslate2 Whisper directory (default: bundled tiny.en)")
    ap.add_argument("--compute-type", default="int8")
    ap.add_argument("--beam", type=int, default=None, help="beam size (default: the shipped one)")
    ap.add_argument("--temperature-fallback", action="store_true",
                    help="faster-whisper's re-decoding at higher temperatures on a doubtful result")
    ap.add_argument("--prompt", default=None, help="initial_prompt")
    ap.add_argument("--hotwords", default=None)
    ap.add_argument("--chunk-length", type=int, default=None, help="faster-whisper's chunk_length (seconds)")
    ap.add_argument("--window-margin", default=None,
                    help="encoder window: the turn plus this many seconds, or 'full' for Whisper's 30 s "
                         "(default: the shipped margin)")
    ap.add_argument("--pad-ms", type=int, default=0, help="silence added before and after each turn")
    ap.add_argument("--path", choices=("ws24k", "webrtc48k"), default="ws24k")
    ap.add_argument("--resampler", choices=("av", "soxr"), default="av", help="the server's 16 kHz resampler")
    ap.add_argument("--per-sentence", type=int, default=3, help="(voice, speed) pairs per sentence")
    ap.add_argument("--limit", type=int, default=None, help="only the first N utterances")
    ap.add_argument("--threads", type=int, default=0, help="CTranslate2 cpu_threads (0: its default)")
    ap.add_argument("--incremental", action="store_true")
    ap.add_argument("--json", default=None, help="write every utterance's reference and transcript here")
    ap.add_argument("--interval-ms", type=int, default=500, help="incremental: new speech per pass")
    ap.add_argument("--pause-ms", type=int, default=None,
                    help="incremental: a pause this long starts a pass (default: the shipped PAUSE_MS)")
    args = ap.parse_args()
    if args.pause_ms is None:
        from engine.agent.incremental_asr import PAUSE_MS

        args.pause_ms = PAUSE_MS

    from engine.agent.asr import DEFAULT_BEAM_SIZE, DEFAULT_WINDOW_MARGIN_S, Transcriber
    from engine.agent.vad import SileroVAD
    from server.services import limit_blas_threads

    options = decode_options(args)
    margin = (DEFAULT_WINDOW_MARGIN_S if args.window_margin is None
              else None if args.window_margin == "full" else float(args.window_margin))
    asr = Transcriber.load(args.model, compute_type=args.compute_type, beam_size=args.beam or DEFAULT_BEAM_SIZE,
                           cpu_threads=args.threads, decode_options=options, window_margin_s=margin)
    vad = SileroVAD.load()
    limit_blas_threads()  # as the server does after loading its models
    items = utterances(args.per_sentence, args.limit)
    print(f"model {args.model or 'tiny.en (bundled)'} {args.compute_type}, beam {asr.beam_size}, options {options}, "
          f"encoder window {'30 s' if margin is None else f'turn + {margin} s'}, pad {args.pad_ms} ms, "
          f"{args.path} via {args.resampler}; cores {os.cpu_count()}, "
          f"OpenBLAS threads {os.environ.get('OPENBLAS_NUM_THREADS', 1)}"
          + (f"; incremental: pause pass after {args.pause_ms} ms, interval {args.interval_ms} ms"
             if args.incremental else ""))
    print(f"load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    if args.incremental:
        rows = asyncio.run(run_incremental(args, asr, vad, items))
        title = "incremental"
    else:
        rows = run_whole(args, asr, vad, items)
        title = "whole turn"
    report(rows, title)
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"  fitted-window passes redone with the full window (looks_hallucinated): {asr.window_retries}")
    counts = collections.Counter(r["turns"] for r in rows if "turns" in r)
    print(f"load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; turns per utterance {dict(counts)}")
    asr.close()


if __name__ == "__main__":
    main()
