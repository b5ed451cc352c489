"""float32 / bfloat16 / int8 / int4 side by side from one run: one full-size model with random
weights is built once, and each variant is derived from the same float weights, so the figures
(prefill, decode frames/s, weight memory, fidelity against float32) are comparable.

Fidelity is measured teacher-forced: float32 decodes `--agree-frames` frames greedily; every
variant then reads the same frames in one pass and we compare its logits and argmax codes with
float32's at every position (free-running decodes diverge after the first different code, which
says little about how close the numbers are).

    .venv/bin/python bench/bench_quantize.py --frames 8 --agree-frames 64 --threads 2
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from bench_generate import build, realistic_prompt
from engine.fish.dual_ar import DualARTransformer
from engine.fish.dual_ar_loader import build_on_meta
from engine.fish.generate import DualARRunner, generate_codes
from engine.fish.quantize import describe, quantize_state, weight_bytes
from engine.speech.types import SamplingOptions

VARIANTS = ("float32", "bfloat16", "int8", "int4")


def variant(reference: DualARRunner, name: str) -> DualARRunner:
    """A runner over `reference`'s weights: cast to bfloat16, or quantized (sharing the float
    tensors it leaves alone)."""
    model = reference.model
    if name == "float32":
        return reference
    if name == "bfloat16":
        twin = build_on_meta(model.config)
        twin.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, assign=True)
    else:
        twin = build_on_meta(model.config)
        state = dict(model.state_dict())
        quantize_state(twin, state, name, torch.float32)  # type: ignore[arg-type]
        twin.load_state_dict(state, strict=False, assign=True)
    twin.init_buffers("cpu")
    twin.eval().requires_grad_(False)
    return DualARRunner(twin, reference.im_end_id, fast_vocab=reference.fast_vocab)


@torch.inference_mode()
def teacher_forced(runner: DualARRunner, prompt: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow logits (T, candidates) at the positions that chose a frame, and fast logits
    (T, K-1, fast_vocab), given the reference frames."""
    model: DualARTransformer = runner.model
    c = model.config
    frames = torch.cat([(codes[:1] + c.semantic_begin_id), codes], dim=0)  # (K+1, T)
    seq = torch.cat([prompt, frames[:, :-1]], dim=1).unsqueeze(0)
    x = model.embed(seq)
    rope = model.rope[:x.size(1)]
    for layer in model.layers:
        x = layer(x, rope, None, 0)
    hidden = x[0, prompt.size(1) - 1:]
    normed = model.norm(hidden)
    slow = (normed @ runner.slow_head.T).float()
    fast_in = torch.cat([model.to_fast_input(hidden, normed).unsqueeze(1),
                         model.fast_embeddings(codes[:-1].T)], dim=1)  # (T, K, fast_dim)
    y = fast_in
    for layer in model.fast_layers:
        y = layer(y, model.fast_rope[:c.num_codebooks], None, 0)
    fast = (model.fast_norm(y[:, 1:]) @ runner.fast_head.T).float()
    return slow, fast


def speed(runner: DualARRunner, prompt: torch.Tensor, frames: int) -> tuple[float, float, float, float]:
    """Prefill + first frame seconds and decode frames/s, each by the wall clock and by this
    process's CPU time (on a shared machine the CPU time shows the work; with one thread,
    frames per CPU-second is the speed of one dedicated core)."""
    sampling = SamplingOptions(temperature=0.7, top_p=0.7, seed=0)
    runner.prefix_cache.max_entries = 0  # every variant prefills the whole prompt
    warm = runner.start(prompt[:, :32], sampling, 2)
    while warm.step() is not None:
        pass
    gen = runner.start(prompt, sampling, frames + 1)
    t0, c0 = time.perf_counter(), time.process_time()
    gen.step()
    t_first, c_first = time.perf_counter() - t0, time.process_time() - c0
    t1, c1 = time.perf_counter(), time.process_time()
    n = 0
    while gen.step() is not None:
        n += 1
    return t_first, n / (time.perf_counter() - t1), c_first, n / (time.process_time() - c1)


def kernels(layers: int = 40) -> None:
    """One (1, 1024) x (1024 -> 3072) product per layer over `layers` distinct weights (more than
    the last-level cache holds, as in decoding): time per product and weights per second."""
    from engine.fish.quantize import Int4Linear, Int8Linear

    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(3072, 1024, generator=g) * 0.02 for _ in range(layers)]
    x = torch.randn(1, 1024, generator=g)
    fns = {
        "float32": [lambda w=w: torch.nn.functional.linear(x, w) for w in weights],
        "bfloat16": [lambda w=w.bfloat16(): torch.nn.functional.linear(x.bfloat16(), w) for w in weights],
        "int8": [Int8Linear.from_weight(w).__call__ for w in weights],
        "int4": [Int4Linear.from_weight(w).__call__ for w in weights],
    }
    print("matrix-vector kernels, 3072x1024 weights, out of cache:")
    for name, calls in fns.items():
        arg = () if name in ("float32", "bfloat16") else (x,)
        for f in calls[:4]:
            f(*arg)
        t0, c0 = time.perf_counter(), time.process_time()
        for f in calls * 3:
            f(*arg)
        n = 3 * len(calls)
        wall, cpu = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
        print(f"  {name:9} {wall * 1e3:7.3f} ms wall, {cpu * 1e3:7.3f} ms CPU = {3072 * 1024 / cpu / 1e9:5.2f} G weights "
              "per CPU-second")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--family", default="s1-mini", choices=["s1-mini", "s2-pro"])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--frames", type=int, default=8, help="decoded frames timed per variant")
    ap.add_argument("--agree-frames", type=int, default=64, help="frames compared teacher-forced (0: skip)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kernels", action="store_true", help="only time the matrix-vector kernels")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kernels:
        kernels()
        return
    t0 = time.perf_counter()
    reference = build(args.family, "cpu", torch.float32)
    prompt = realistic_prompt(reference, 45, 215)
    print(f"{args.family}, random weights, threads={torch.get_num_threads()}, built in {time.perf_counter() - t0:.0f} s; "
          f"prompt {prompt.size(1)} positions")
    ref_codes = ref_slow = ref_fast = None
    if args.agree_frames:
        ref_codes = generate_codes(reference, prompt, SamplingOptions(greedy=True), args.agree_frames)
        ref_slow, ref_fast = teacher_forced(reference, prompt, ref_codes)
    print(f"{'variant':9} {'prefill s':>9} {'frames/s':>8} {'CPU s':>6} {'/CPU-s':>6} {'weights MiB':>11} {'slow logit err':>14} "
          f"{'fast logit err':>14} {'slow argmax':>11} {'fast argmax':>11}")
    for name in args.variants:
        runner = variant(reference, name)
        first, fps, cpu_first, cpu_fps = speed(runner, prompt, args.frames)
        line = (f"{name:9} {first:9.2f} {fps:8.2f} {cpu_first:6.2f} {cpu_fps:6.2f} "
                f"{weight_bytes(runner.model) / 2**20:11.0f}")
        if ref_codes is not None:
            slow, fast = teacher_forced(runner, prompt, ref_codes)
            slow_agree = float((slow.argmax(-1) == ref_slow.argmax(-1)).float().mean())
            fast_agree = float((fast.argmax(-1) == ref_fast.argmax(-1)).float().mean())
            line += f" {rel(slow, ref_slow):14.4f} {rel(fast, ref_fast):14.4f} {slow_agree:11.3f} {fast_agree:11.3f}"
        print(line, flush=True)
        if name not in ("float32",):
            print(f"          ({describe(runner.model)})")
        del runner
    print("prefill s / frames/s: wall clock; CPU s / frames per CPU-s: this process's CPU time")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
          "(holds the float32 model the variants are derived from)")


if __name__ == "__main__":
    main()
