"""Command line for driving the engine without a server (modelled on upstream's own flow).

    python -m engine codec encode IN.wav OUT.npy --checkpoint DIR
    python -m engine codec decode IN.npy OUT.wav --checkpoint DIR
    python -m engine generate --checkpoint DIR --text T [--prompt-text PT --prompt-tokens REF.npy] --output OUT.npy
    python -m engine tts --checkpoint DIR --text T [--reference REF.wav --reference-text RT] --output OUT.wav
    python -m engine make-tiny-checkpoint --family s1-mini|s2-pro|fish-speech-1.5 OUT_DIR
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine.fish.checkpoint import CheckpointError
from engine.fish.config import ConfigError
from engine.speech.types import Reference, SamplingOptions, TTSRequest


def _add_runtime(p: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    if checkpoint:
        p.add_argument("--checkpoint", required=True, help="checkpoint directory (or a published repo name)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--greedy", action="store_true", help="argmax everywhere (deterministic)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=30)
    p.add_argument("--repetition-penalty", type=float, default=1.2)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=0, help="frames per text chunk; 0 = until the end token")


def _sampling(args: argparse.Namespace) -> SamplingOptions:
    return SamplingOptions(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                           repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                           seed=args.seed, greedy=args.greedy)


def _read_audio(path: str, sample_rate: int) -> np.ndarray:
    from engine.audio import decode_audio

    return decode_audio(Path(path).read_bytes(), sample_rate)


def write_float_wav(path: str | Path, pcm: np.ndarray, sample_rate: int) -> None:
    """32-bit float mono WAV through PyAV (the CLI's lossless output)."""
    import av

    pcm = np.ascontiguousarray(pcm, dtype=np.float32).reshape(1, -1)
    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream("pcm_f32le", rate=sample_rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm, format="flt", layout="mono")
        frame.sample_rate = sample_rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def cmd_codec(args: argparse.Namespace) -> None:
    from engine.fish.models import load_codec_only

    codec = load_codec_only(args.checkpoint, args.device, args.dtype)
    with torch.inference_mode():
        if args.action == "encode":
            pcm = _read_audio(args.input, codec.sample_rate)
            codes = codec.encode(torch.from_numpy(pcm).to(codec.device, torch.float32))
            np.save(args.output, codes.cpu().numpy().astype(np.int64))
            print(f"encoded {len(pcm) / codec.sample_rate:.2f} s -> codes {list(codes.shape)} in {args.output}")
        else:
            codes = np.load(args.input)
            if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
                raise SystemExit(f"{args.input}: codes must be an integer array shaped [codebooks, frames]")
            audio = codec.decode(torch.from_numpy(codes.astype(np.int64)).to(codec.device)).float().cpu().numpy()
            audio = audio.reshape(-1)
            if args.output.endswith(".npy"):
                np.save(args.output, audio.astype(np.float32))
            else:
                write_float_wav(args.output, audio, codec.sample_rate)
            print(f"decoded codes {list(codes.shape)} -> {len(audio) / codec.sample_rate:.2f} s in {args.output}")


def cmd_generate(args: argparse.Namespace) -> None:
    from engine.fish.generate import FirstStepDump, generate_codes
    from engine.fish.models import load_models
    from engine.fish.prompt import build_prompt

    models = load_models(args.checkpoint, args.device, args.dtype)
    references = []
    if args.prompt_tokens:
        codes = np.load(args.prompt_tokens)
        if codes.ndim != 2 or codes.shape[0] != models.config.num_codebooks:
            raise SystemExit(f"--prompt-tokens must be shaped [{models.config.num_codebooks}, frames]")
        references.append((args.prompt_text or "", codes.astype(np.int64)))
    elif args.prompt_text:
        raise SystemExit("--prompt-text needs --prompt-tokens (the reference's codes)")
    prompt = build_prompt(models.tokenizer, models.family, args.text, references=references, history=[],
                          num_codebooks=models.config.num_codebooks, max_length=models.config.max_seq_len)
    if args.dump_prompt_ids:
        np.save(args.dump_prompt_ids, np.asarray(prompt, dtype=np.int64))
    dump = FirstStepDump()
    t0 = time.perf_counter()
    codes = generate_codes(models.runner, torch.as_tensor(prompt), _sampling(args), args.max_new_tokens, dump)
    dt = time.perf_counter() - t0
    np.save(args.output, codes.numpy().astype(np.int64))
    if args.dump_first_logits:
        np.save(args.dump_first_logits, dump.slow_logits.numpy())
    if args.dump_first_fast_logits and dump.fast_logits is not None:
        np.save(args.dump_first_fast_logits, dump.fast_logits.numpy())
    print(f"prompt {np.asarray(prompt).shape[1]} positions -> codes {list(codes.shape)} in {dt:.2f} s "
          f"-> {args.output}")


def cmd_tts(args: argparse.Namespace) -> None:
    from engine.speech.tts import TTSEngine

    engine = TTSEngine.load(args.checkpoint, args.device, args.dtype, args.decode_slots)
    refs: tuple[Reference, ...] = ()
    if args.reference:
        refs = (Reference(text=args.reference_text or "", audio=Path(args.reference).read_bytes()),)
    request = TTSRequest(text=args.text, references=refs, sampling=_sampling(args), chunk_length=args.chunk_length,
                         normalize=not args.no_normalize, stream_every_frames=args.stream_every)

    async def run() -> np.ndarray:
        t0 = time.perf_counter()
        parts, first = [], None
        async for chunk in engine.stream(request):
            first = first if first is not None else time.perf_counter() - t0
            parts.append(chunk.pcm)
        audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        dur = len(audio) / engine.sample_rate
        total = time.perf_counter() - t0
        print(f"{dur:.2f} s of audio in {total:.2f} s (first audio after {first or 0:.2f} s, "
              f"real-time factor {total / max(dur, 1e-9):.2f})")
        return audio

    try:
        audio = asyncio.run(run())
    finally:
        engine.close()
    if args.output.endswith(".npy"):
        np.save(args.output, audio)
    else:
        from engine.audio import encode_audio

        fmt = Path(args.output).suffix.lstrip(".").lower() or "wav"
        if fmt == "wav":
            write_float_wav(args.output, audio, engine.sample_rate)
        else:
            Path(args.output).write_bytes(encode_audio(audio, engine.sample_rate, fmt))
    print(f"wrote {args.output}")


def cmd_make_tiny(args: argparse.Namespace) -> None:
    from engine.fish.tiny import make_tiny_checkpoint

    out = make_tiny_checkpoint(args.output, args.family, seed=args.seed)
    print(f"wrote a tiny random {args.family} checkpoint to {out}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m engine", description="Fish Speech engine command line")
    sub = ap.add_subparsers(dest="command", required=True)

    codec = sub.add_parser("codec", help="encode audio to codes or decode codes to audio")
    codec.add_argument("action", choices=["encode", "decode"])
    codec.add_argument("input")
    codec.add_argument("output")
    _add_runtime(codec)
    codec.set_defaults(func=cmd_codec)

    gen = sub.add_parser("generate", help="text (+ reference codes) -> semantic codes")
    _add_runtime(gen)
    gen.add_argument("--text", required=True)
    gen.add_argument("--prompt-text", help="transcript of the reference")
    gen.add_argument("--prompt-tokens", help="reference codes .npy [codebooks, frames]")
    _add_sampling(gen)
    gen.add_argument("--output", required=True, help="codes .npy [codebooks, frames], end frame excluded")
    gen.add_argument("--dump-prompt-ids", help="save the (K+1, T) prompt")
    gen.add_argument("--dump-first-logits", help="save the first step's slow logits (full vocabulary)")
    gen.add_argument("--dump-first-fast-logits",
                     help="save the first frame's fast logits, shape (num_codebooks - 1, codebook_size): codebooks "
                          "1..K-1, each step fed the greedy pick of the one before")
    gen.set_defaults(func=cmd_generate)

    tts = sub.add_parser("tts", help="text (+ reference audio) -> speech")
    _add_runtime(tts)
    tts.add_argument("--text", required=True)
    tts.add_argument("--reference", help="reference audio file (any common format)")
    tts.add_argument("--reference-text", help="transcript of the reference audio")
    _add_sampling(tts)
    tts.add_argument("--chunk-length", type=int, default=200)
    tts.add_argument("--stream-every", type=int, default=None, help="decoder cadence in frames")
    tts.add_argument("--no-normalize", action="store_true")
    tts.add_argument("--decode-slots", type=int, default=None,
                     help="static decode slots with on-device sampling (CUDA graphs); default 4 on CUDA, 0 on CPU")
    tts.add_argument("--output", required=True, help=".wav (32-bit float), .mp3, .flac, .opus or .npy")
    tts.set_defaults(func=cmd_tts)

    tiny = sub.add_parser("make-tiny-checkpoint", help="write a tiny random checkpoint in the published layout")
    tiny.add_argument("--family", choices=["s1-mini", "s2-pro", "fish-speech-1.5"], default="s1-mini")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("output")
    tiny.set_defaults(func=cmd_make_tiny)
    return ap


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
