"""Streaming TTS latency for full-size models with random weights: the Dual-AR language model
(S1-mini or S2-Pro config) plus the full-size codec, exactly the per-request loop the TTS
pipeline runs (frame steps, a streaming decoder push every N frames).

Prints time to first audio for a realistic prompt (45 text positions + 215 reference frames),
the same for a follow-up sentence in the same voice (prefix cache), and the steady-state
real-time factor with the codec included.

    .venv/bin/python bench/bench_tts.py --family s1-mini --frames 32 --every 4
"""
from __future__ import annotations

import argparse
import resource
import time

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    model_arguments(ap)
    ap.add_argument("--every", type=int, default=2, help="decoder push every N frames")
    args = ap.parse_args()
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
