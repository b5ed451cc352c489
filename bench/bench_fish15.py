"""fish-speech-1.5 beside OpenAudio S1-mini on this machine, in one run: codec speed (the Firefly
VQGAN vs the modded DAC) and full streaming TTS time to first audio (Dual-AR + codec), all
full-size with random weights (values do not matter for speed; lengths are fixed).

Prints, per family: codec encode / whole decode / streaming decode real-time factors (compute time
/ audio time; < 1 is faster than real time), and TTS time to first audio for a prompt of 45 text
positions + 215 reference frames, the steady real-time factor and peak memory.

    .venv/bin/python bench/bench_fish15.py --seconds 2 --frames 16 --every 2
"""
from __future__ import annotations

import argparse
import gc
import resource
import time

import torch

from bench_tts import run_request
from engine.fish.codec import Codec, CodecConfig
from engine.fish.config import parse_config
from engine.fish.dual_ar import DualARTransformer
from engine.fish.dual_ar_loader import init_random_weights
from engine.fish.firefly import FireflyCodec, FireflyConfig
from engine.fish.generate import DualARRunner
from engine.fish.presets import FISH_SPEECH_15_CONFIG, PUBLISHED_IDS, S1_MINI_CONFIG

FAMILIES = {"fish-speech-1.5": (FISH_SPEECH_15_CONFIG, "Firefly VQGAN"), "s1-mini": (S1_MINI_CONFIG, "modded DAC")}


def build_codec(family: str) -> Codec | FireflyCodec:
    torch.manual_seed(0)
    codec = FireflyCodec(FireflyConfig()) if family == "fish-speech-1.5" else Codec(CodecConfig())
    return codec.requires_grad_(False).eval().fold_weight_norm()


def build_runner(family: str, fast_vocab: int) -> DualARRunner:
    raw, _ = FAMILIES[family]
    ids = PUBLISHED_IDS[family]
    config = parse_config(raw, family).with_semantic_ids(ids["semantic_begin_id"], ids["semantic_end_id"])
    with torch.device("meta"):
        model = DualARTransformer(config)
    model = init_random_weights(model.to_empty(device="cpu"), seed=0).eval().requires_grad_(False)
    model.init_buffers("cpu")
    return DualARRunner(model, ids["im_end_id"], fast_vocab=fast_vocab)


def prompt_for(runner: DualARRunner, text_positions: int = 45, ref_frames: int = 215) -> torch.Tensor:
    """Reference transcript, reference frames, target text; text ids below the special tokens."""
    c = runner.config
    g = torch.Generator().manual_seed(0)
    t = text_positions + ref_frames
    p = torch.zeros(c.num_codebooks + 1, t, dtype=torch.long)
    p[0] = torch.randint(0, c.semantic_begin_id - 1100, (t,), generator=g)
    codes = torch.randint(0, 1000, (c.num_codebooks, ref_frames), generator=g)
    frames = slice(text_positions // 2, text_positions // 2 + ref_frames)
    p[1:, frames] = codes
    p[0, frames] = c.semantic_begin_id + codes[0]
    return p


def best_of(fn, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def codec_figures(codec, seconds: float, every: int) -> dict[str, float]:
    from engine.fish.codec import StreamingDecoder

    hop, rate = codec.hop_length, codec.sample_rate
    frames = max(1, round(seconds * rate / hop))
    audio_s = frames * hop / rate
    codes = torch.stack([torch.randint(0, n, (frames,)) for n in codec.codebook_sizes])
    audio = 0.3 * torch.randn(frames * hop)
    with torch.inference_mode():
        codec.decode(codes[:, :4])
        codec.encode(audio[: 4 * hop])

        def stream() -> None:
            decoder = StreamingDecoder(codec)
            for i in range(0, frames, every):
                decoder.push(codes[:, i:i + every])

        return {"encode": best_of(lambda: codec.encode(audio)) / audio_s,
                "decode": best_of(lambda: codec.decode(codes)) / audio_s,
                "stream": best_of(stream) / audio_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=2.0, help="codec benchmark audio length")
    ap.add_argument("--frames", type=int, default=16, help="TTS frames generated per request")
    ap.add_argument("--every", type=int, default=2, help="decoder push every N frames")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU float32, {torch.get_num_threads()} threads; codec audio {args.seconds} s; "
          f"TTS {args.frames} frames, decoder push every {args.every}", flush=True)
    for family, (_, codec_name) in FAMILIES.items():
        codec = build_codec(family)
        params = sum(p.numel() for p in codec.parameters())
        c = codec_figures(codec, args.seconds, args.every)
        print(f"{family:16s} {codec_name:14s} ({params / 1e6:5.1f} M params): encode RTF {c['encode']:.3f}, "
              f"decode RTF {c['decode']:.3f}, streaming decode /{args.every} RTF {c['stream']:.3f}", flush=True)
        runner = build_runner(family, fast_vocab=min(codec.codebook_sizes[1:]))
        prompt = prompt_for(runner)
        run_request(runner, codec, prompt[:, :40], 2, args.every, lambda: None)  # warm-up
        runner.prefix_cache._entries.clear()
        ttfa, total, seconds = run_request(runner, codec, prompt, args.frames, args.every, lambda: None)
        n_params = sum(p.numel() for p in runner.model.parameters())
        print(f"{family:16s} TTS ({n_params / 1e6:.0f} M-param Dual-AR): time to first audio {ttfa:.3f} s "
              f"(cold prompt of {prompt.size(1)} positions); {seconds:.2f} s of audio in {total:.2f} s, "
              f"RTF {total / seconds:.2f}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB",
              flush=True)
        del codec, runner
        gc.collect()


if __name__ == "__main__":
    main()
