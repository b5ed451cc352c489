"""Would decoding chunk N+1 while the codec turns chunk N into audio help on a small CPU?
(issue #21, item 3)

Full-size S1-mini (int8, random weights) and the full-size codec (int8 linears), as the server
holds them on CPU. The same work, `--chunks` chunks of `--every` frames each, is run two ways:

  serial      one thread, torch on `--threads` threads: decode a chunk, push it through the
              streaming codec decoder, repeat (what the TTS pipeline does now);
  overlapped  two Python threads, torch on one thread each: the decoder hands each chunk to the
              codec thread and goes on with the next chunk at once (--decoder-threads 2: the
              decoder's own ops on two threads, 3 threads on 2 cores; torch's OpenMP thread count
              is per calling thread, MKL's, which only the codec's GEMMs use, is process-wide).

The variants alternate (`--repeats` times each) so that a change in the machine's load hits both.
Printed per run: wall seconds and this process's CPU seconds. Overlap helps only if its wall time
is clearly lower at about the same CPU time.

    .venv/bin/python bench/bench_overlap.py --chunks 4 --every 8 --repeats 2
"""
from __future__ import annotations

import argparse
import os
import queue
import threading
import time

import torch

from bench_codec import build as build_codec
from bench_generate import build, realistic_prompt
from engine.fish.codec import StreamingDecoder
from engine.fish.codec.int8 import quantize_codec_linears
from engine.speech.types import SamplingOptions


def frames_of(gen, n: int) -> torch.Tensor:
    return torch.stack([gen.step() for _ in range(n)], dim=1)


def serial(runner, codec, prompt, chunks: int, every: int, threads: int) -> tuple[float, float]:
    torch.set_num_threads(threads)
    gen = runner.start(prompt, SamplingOptions(seed=0), chunks * every + 1)
    gen.step()  # prefill (+ first frame) before the clock starts, as in the overlapped run
    decoder = StreamingDecoder(codec)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(chunks):
        decoder.push(frames_of(gen, every))
    return time.perf_counter() - t0, time.process_time() - c0


def overlapped(runner, codec, prompt, chunks: int, every: int, decoder_threads: int = 1) -> tuple[float, float]:
    torch.set_num_threads(decoder_threads)
    gen = runner.start(prompt, SamplingOptions(seed=0), chunks * every + 1)
    gen.step()
    decoder = StreamingDecoder(codec)
    handoff: queue.Queue = queue.Queue()

    def codec_thread() -> None:
        torch.set_num_threads(1)
        with torch.inference_mode():
            while (codes := handoff.get()) is not None:
                decoder.push(codes)

    t0, c0 = time.perf_counter(), time.process_time()
    worker = threading.Thread(target=codec_thread)
    worker.start()
    for _ in range(chunks):
        handoff.put(frames_of(gen, every))
    handoff.put(None)
    worker.join()
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--every", type=int, default=8, help="frames per chunk (decoder push)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the serial run")
    ap.add_argument("--decoder-threads", type=int, default=1, help="torch threads of the overlapped run's decoder")
    args = ap.parse_args()
    t0 = time.perf_counter()
    runner = build("s1-mini", "cpu", torch.float32, "int8")
    codec = build_codec("cpu", torch.float32)
    quantize_codec_linears(codec)
    prompt = realistic_prompt(runner, 45, 43)
    print(f"built in {time.perf_counter() - t0:.0f} s; {args.chunks} chunks x {args.every} frames "
          f"({args.chunks * args.every / 21.5:.1f} s of audio) per run; load average "
          + " ".join(f"{x:.1f}" for x in os.getloadavg()), flush=True)
    results: dict[str, list[tuple[float, float]]] = {"serial": [], "overlapped": []}
    with torch.inference_mode():
        serial(runner, codec, prompt, 1, 2, args.threads)  # warm-up
        overlapped(runner, codec, prompt, 1, 2, args.decoder_threads)
        for _ in range(args.repeats):
            for name in results:
                runner.prefix_cache._entries.clear()
                r = (serial(runner, codec, prompt, args.chunks, args.every, args.threads) if name == "serial"
                     else overlapped(runner, codec, prompt, args.chunks, args.every, args.decoder_threads))
                results[name].append(r)
                print(f"  {name:10} wall {r[0]:6.2f} s  CPU {r[1]:6.2f} s  load "
                      + " ".join(f"{x:.1f}" for x in os.getloadavg()), flush=True)
    for name, runs in results.items():
        print(f"{name:10} best wall {min(w for w, _ in runs):6.2f} s, mean CPU {sum(c for _, c in runs) / len(runs):6.2f} s")


if __name__ == "__main__":
    main()
