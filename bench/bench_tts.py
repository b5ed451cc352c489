"""Streaming TTS latency for full-size models with random weights: the Dual-AR language model
(S1-mini or S2-Pro config) plus the full-size codec, exactly the per-request loop the TTS
pipeline runs (frame steps, a streaming decoder push every N frames).

Prints time to first audio for a realistic prompt (45 text positions + 215 reference frames),
the same for a follow-up sentence in the same voice (prefix cache), and the steady-state
real-time factor with the codec included.

--server instead measures the product end to end: `python -m server serve` on a full-size random
S1-mini checkpoint in the published layout (written once by bench_load_memory.py's writer; the
model and codec loaded as the server loads them, QUANTIZE=auto unless --server-quantize), one
warm-up request, then one streamed /v1/tts request of --frames frames (a short sentence, no
reference): time to the first PCM byte, wall-clock real-time factor, and the server process's
CPU time per second of audio (all its threads; on a shared machine the figure the load disturbs least).

    .venv/bin/python bench/bench_tts.py --family s1-mini --frames 32 --every 4
    .venv/bin/python bench/bench_tts.py --server --frames 215        # ~10 s of audio
"""
from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import torch

from bench_generate import build, chosen_dtype, model_arguments, realistic_prompt
from engine.fish.codec import Codec, CodecConfig, StreamingDecoder
from engine.speech.types import SamplingOptions


def full_size_codec(device: str) -> Codec:
    torch.manual_seed(0)
    codec = Codec(CodecConfig()).to(device).eval()
    return codec.fold_weight_norm()


def run_request(runner, codec, prompt, frames: int, every: int, sync) -> tuple[float, float, float]:
    """Returns (time to first audio, total time, seconds of audio)."""
    decoder = StreamingDecoder(codec)
    gen = runner.start(prompt, SamplingOptions(seed=0), frames)
    t0 = time.perf_counter()
    first = None
    pending, samples = [], 0
    while True:
        codes = gen.step()
        if codes is not None:
            pending.append(codes)
        if pending and (codes is None or len(pending) >= every):
            audio = decoder.push(torch.stack(pending, dim=1))
            sync()
            samples += audio.numel()
            pending = []
            if first is None:
                first = time.perf_counter() - t0
        if codes is None:
            break
    total = time.perf_counter() - t0
    return first or total, total, samples / codec.sample_rate


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def server_run(directory: Path, quantize: str, frames: int) -> None:
    from bench_load_memory import cpu_seconds, memory, running_server, tts_stream, write_checkpoint, write_server_files

    if not (directory / "model.pth").is_file():
        write_checkpoint(directory)
    if not (directory / "codec.pth").is_file():
        write_server_files(directory)
    print(f"load average {load_average()}; server on {directory}, QUANTIZE={quantize}", flush=True)
    with running_server(directory, quantize) as (proc, url):
        tts_stream(url, "Warm up.", 4)
        cpu0 = cpu_seconds(proc.pid)
        first, total, audio = tts_stream(url, "The quick brown fox jumps over the lazy dog.", frames)
        cpu = cpu_seconds(proc.pid) - cpu0
        rss = memory(proc.pid)
    print(f"streamed /v1/tts, {frames} frames = {audio:.2f} s of audio: first PCM byte after {first:.2f} s, "
          f"all in {total:.1f} s (real-time factor {total / audio:.2f}); server CPU {cpu:.1f} s = "
          f"{cpu / audio:.2f} CPU-s per audio-s")
    print(f"server RSS after it {rss['VmRSS']:.0f} MiB, peak {rss['VmHWM']:.0f} MiB")
    print(f"load average {load_average()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    model_arguments(ap)
    ap.add_argument("--every", type=int, default=2, help="decoder push every N frames")
    ap.add_argument("--server", action="store_true", help="end to end through the server's /v1/tts (CPU)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/s1-mini-random"), help="--server: checkpoint directory")
    ap.add_argument("--server-quantize", default="auto", help="--server: QUANTIZE for the server")
    args = ap.parse_args()
    if args.server:
        server_run(args.dir, args.server_quantize, args.frames)
        return
    dtype = chosen_dtype(args)
    if args.threads:
        torch.set_num_threads(args.threads)

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    runner = build(args.family, args.device, dtype, args.quantize)
    codec = full_size_codec(args.device)
    prompt = realistic_prompt(runner, 45, 215)
    run_request(runner, codec, prompt[:, :40], 4, args.every, sync)  # warm-up
    runner.prefix_cache._entries.clear()
    ttfa, total, seconds = run_request(runner, codec, prompt, args.frames, args.every, sync)
    follow = prompt.clone()
    follow[0, -20:] = torch.randint(0, 150000, (20,), generator=torch.Generator().manual_seed(1))
    ttfa2, _, _ = run_request(runner, codec, follow, args.every, args.every, sync)
    print(f"{args.family} {dtype} quantize={args.quantize} on {args.device}, threads={torch.get_num_threads()}; codec float32; decoder push every {args.every} frames")
    print(f"time to first audio (cold prompt of {prompt.size(1)} positions): {ttfa:.3f} s")
    print(f"time to first audio (same voice, new sentence): {ttfa2:.3f} s")
    print(f"{seconds:.2f} s of audio in {total:.2f} s: real-time factor {total / seconds:.2f}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
