"""Codec speed for the full-size published architecture with random weights (values do not
matter for speed). Prints real-time factors (compute time / audio time; < 1 is faster than real
time) for whole-utterance decode, streaming decode every N frames, and encode, plus the time to
the first streamed chunk and peak memory.

    .venv/bin/python bench/bench_codec.py --seconds 2 --every 4
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from engine.fish.codec import Codec, CodecConfig, StreamingDecoder
from engine.fish.codec.int8 import quantize_codec_linears


def build(device: str, dtype: torch.dtype) -> Codec:
    torch.manual_seed(0)
    codec = Codec(CodecConfig()).requires_grad_(False).eval()
    codec.fold_weight_norm()  # as load_codec does, in float32 before the cast
    return codec.to(device=device, dtype=dtype)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> tuple[float, object]:
    """Best of `repeats` wall-clock times (after the caller's warm-up)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--seconds", type=float, default=2.0, help="audio length")
    ap.add_argument("--every", type=int, default=4, help="frames per streaming push")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--quantize", default="none", choices=["none", "int8"],
                    help="int8: the quantizer's linear layers as int8 (CPU); prints the SNR against float32")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    t0 = time.perf_counter()
    codec = build(args.device, dtype)
    params = sum(p.numel() for p in codec.state_dict().values())
    print(f"full-size codec: {params:,} parameters, {args.device}/{args.dtype}, "
          f"{torch.get_num_threads()} threads, built in {time.perf_counter() - t0:.1f} s")

    hop, rate = codec.hop_length, codec.sample_rate
    frames = max(1, round(args.seconds * rate / hop))
    audio_s = frames * hop / rate
    codes = torch.stack([torch.randint(0, n, (frames,)) for n in codec.codebook_sizes]).to(args.device)
    audio = (0.3 * torch.randn(frames * hop)).to(args.device)

    with torch.inference_mode():
        if args.quantize == "int8":
            reference = codec.decode(codes)
            quantize_codec_linears(codec)
            out = codec.decode(codes)
            snr = 10 * torch.log10(reference.pow(2).sum() / (out - reference).pow(2).sum())
            print(f"int8 linears: whole decode {snr:.1f} dB SNR against float32")
        codec.decode(codes[:, :8])  # warm-up: allocator, kernels
        dec_t, _ = timed(lambda: codec.decode(codes), args.device, args.repeats)

        def stream() -> float:
            decoder = StreamingDecoder(codec)
            t_start = time.perf_counter()
            first = None
            for i in range(0, frames, args.every):
                decoder.push(codes[:, i:i + args.every])
                if first is None:
                    sync(args.device)
                    first = time.perf_counter() - t_start
            return first

        stream_t, first_chunk = timed(stream, args.device, args.repeats)
        codec.encode(audio[: 8 * hop])
        enc_t, _ = timed(lambda: codec.encode(audio), args.device, args.repeats)

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"audio: {frames} frames = {audio_s:.2f} s")
    print(f"decode whole:            {dec_t * 1000:8.1f} ms   RTF {dec_t / audio_s:.3f}")
    print(f"decode streaming /{args.every:<3d}:   {stream_t * 1000:8.1f} ms   RTF {stream_t / audio_s:.3f}   "
          f"first chunk ({args.every} frames = {args.every * hop / rate * 1000:.0f} ms audio) after "
          f"{first_chunk * 1000:.1f} ms")
    print(f"encode:                  {enc_t * 1000:8.1f} ms   RTF {enc_t / audio_s:.3f}")
    print(f"peak RSS: {peak_mib:,.0f} MiB")
    if args.device.startswith("cuda"):
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB")


if __name__ == "__main__":
    main()
