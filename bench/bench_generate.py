"""Dual-AR generation speed for a full-size config with random weights (values do not matter
for speed). Prints prefill time, frames/s, time to the first frame, and peak memory.

    .venv/bin/python bench/bench_generate.py --family s1-mini --dtype float32 --frames 32
    .venv/bin/python bench/bench_generate.py --quantize int8 --frames 32   # weight-only int8 (CPU)
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from engine.fish.config import parse_config
from engine.fish.dual_ar import DualARTransformer
from engine.fish.generate import DualARRunner
from engine.fish.dual_ar_loader import init_random_weights
from engine.fish.presets import PUBLISHED_IDS, S1_MINI_CONFIG, S2_PRO_CONFIG
from engine.fish.quantize import QUANTIZE_MODES, describe, quantize_model
from engine.speech.types import SamplingOptions


def build(family: str, device: str, dtype: torch.dtype, quantize: str = "none") -> DualARRunner:
    ids = PUBLISHED_IDS[family]
    raw = S1_MINI_CONFIG if family == "s1-mini" else S2_PRO_CONFIG
    config = parse_config(raw).with_semantic_ids(ids["semantic_begin_id"], ids["semantic_end_id"])
    with torch.device("meta"):
        model = DualARTransformer(config)
    model = model.to_empty(device="cpu")
    init_random_weights(model, seed=0)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.init_buffers(device)
    quantize_model(model, quantize)  # type: ignore[arg-type]
    return DualARRunner(model, ids["im_end_id"], fast_vocab=1024)


def realistic_prompt(runner: DualARRunner, text_positions: int, ref_frames: int) -> torch.Tensor:
    """Reference transcript, reference frames, then the target text (the S1-mini layout)."""
    c = runner.config
    g = torch.Generator().manual_seed(0)
    k = c.num_codebooks
    ref_text = text_positions // 2
    t = text_positions + ref_frames
    p = torch.zeros(k + 1, t, dtype=torch.long)
    p[0] = torch.randint(0, 150000, (t,), generator=g)
    codes = torch.randint(0, 1024, (k, ref_frames), generator=g)
    frames = slice(ref_text, ref_text + ref_frames)
    p[1:, frames] = codes
    p[0, frames] = c.semantic_begin_id + codes[0]
    return p


def model_arguments(ap: argparse.ArgumentParser) -> None:
    """Flags shared by the benchmarks that build a full-size model."""
    ap.add_argument("--family", default="s1-mini", choices=["s1-mini", "s2-pro"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--quantize", default="none", choices=QUANTIZE_MODES, help="weight-only int8/int4 (CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--decode", default="auto", choices=["auto", "static", "dynamic"],
                    help="static slots with on-device sampling (CUDA graphs on a GPU); auto = static on CUDA")


def chosen_dtype(args: argparse.Namespace) -> torch.dtype:
    return getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    model_arguments(ap)
    ap.add_argument("--text-positions", type=int, default=45)
    ap.add_argument("--ref-frames", type=int, default=215)
    ap.add_argument("--batch", type=int, nargs="*", default=[2, 4],
                    help="also measure N concurrent sequences decoding together")
    args = ap.parse_args()
    dtype = chosen_dtype(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    runner = build(args.family, args.device, dtype, args.quantize)
    print(f"model: {args.family} {dtype} quantize={args.quantize} on {args.device}, threads={torch.get_num_threads()}, "
          f"built in {time.perf_counter() - t0:.1f} s ({describe(runner.model)})")
    static = args.decode == "static" or (args.decode == "auto" and args.device == "cuda")
    if static:
        runner.enable_static_decode(slots=max([1] + args.batch))
    print(f"decode path: {'static' + (' + CUDA graphs' if runner.static.use_cuda_graphs else '') if static else 'dynamic'}")
    prompt = realistic_prompt(runner, args.text_positions, args.ref_frames)
    sampling = SamplingOptions(temperature=0.7, top_p=0.7, seed=0)

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    # warm-up (allocator, kernels)
    warm = runner.start(prompt[:, :32], sampling, 3)
    while warm.step() is not None:
        pass
    sync()
    gen = runner.start(prompt, sampling, args.frames + 1)
    t0 = time.perf_counter()
    gen.step()  # prefill + first frame
    sync()
    t_first = time.perf_counter() - t0
    t1 = time.perf_counter()
    n = 0
    while gen.step() is not None:
        n += 1
    sync()
    dt = time.perf_counter() - t1
    # A second sentence in the same voice: the prompt shares the reference section, so the prefix
    # KV cache leaves only the new text to prefill (the agent-mode case).
    follow = prompt.clone()
    follow[0, -20:] = torch.randint(0, 150000, (20,), generator=torch.Generator().manual_seed(1))
    gen2 = runner.start(follow, sampling, 2)
    t2 = time.perf_counter()
    gen2.step()
    sync()
    t_follow = time.perf_counter() - t2
    gen2.close()
    batch_lines = []
    for n_seq in args.batch:
        gens = [runner.start(prompt, SamplingOptions(seed=i), args.frames + 1) for i in range(n_seq)]
        runner.step_many(gens)  # prefills
        sync()
        tb = time.perf_counter()
        steps = 0
        while not all(g.finished for g in gens):
            steps += sum(r is not None for r in runner.step_many(gens))
        sync()
        el = time.perf_counter() - tb
        batch_lines.append(f"{n_seq} concurrent sequences: {steps / el:.2f} frames/s in total "
                           f"({steps / el / n_seq:.2f} each)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"prompt positions: {prompt.size(1)} ({args.text_positions} text + {args.ref_frames} reference frames)")
    print(f"prefill + first frame: {t_first:.3f} s")
    print(f"same voice, new text (prefix cache): first frame after {t_follow:.3f} s")
    print(f"decode: {n} frames in {dt:.2f} s = {n / dt:.2f} frames/s (real-time factor {21.53 / (n / dt):.2f})")
    for line in batch_lines:
        print(line)
    if static and runner.static.graph_error:
        print(f"CUDA graphs failed, ran eagerly: {runner.static.graph_error}")
    print(f"peak RSS: {peak:.0f} MiB" + (f", peak CUDA: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
                                          if args.device == "cuda" else ""))


if __name__ == "__main__":
    main()
