"""Load everything a checkpoint directory holds: config, tokenizer, Dual-AR weights, codec.

The codec follows the family: S1-mini and S2-Pro ship the modded DAC (`codec.pth`),
fish-speech-1.5 the Firefly VQGAN (`firefly-gan-vq-fsq-8x1024-21hz-generator.pth`). Both have
the same public surface (`engine.fish.audio_codec.AudioCodec`)."""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from engine.fish.audio_codec import AudioCodec
from engine.fish.checkpoint import CheckpointError, resolve_checkpoint
from engine.fish.codec import load_codec
from engine.fish.config import DualARConfig, load_config
from engine.fish.firefly import FireflyCodec, find_firefly_file, load_firefly
from engine.fish.dual_ar import DualARTransformer
from engine.fish.generate import DualARRunner
from engine.fish.dual_ar_loader import load_dual_ar
from engine.fish.quantize import QuantizeMode, check_mode, default_quantize, describe, return_freed_heap
from engine.fish.tokenizer import FishTokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float32 on CPU and bfloat16 on CUDA unless told otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}") from None


DEFAULT_CUDA_DECODE_SLOTS = 4
# Positions per static slot: bounds its KV memory (S1-mini bf16: ~0.9 GiB per slot at 8192).
STATIC_CAPACITY = 8192


@dataclasses.dataclass
class FishModels:
    checkpoint_dir: Path
    config: DualARConfig
    tokenizer: FishTokenizer
    model: DualARTransformer
    runner: DualARRunner
    codec: AudioCodec
    device: torch.device
    dtype: torch.dtype
    quantize: QuantizeMode = "none"

    @property
    def family(self) -> str:
        return self.config.family


def load_codec_only(checkpoint: str | Path, device: str | None = None,
                    dtype: str | torch.dtype | None = None, quantize: str = "none") -> AudioCodec:
    """The directory's codec: the Firefly generator file if there is one, else codec.pth.
    `quantize="int8"` stores codec.pth's linear layers as int8 (CPU, float32; see
    `engine.fish.codec.int8`); the Firefly codec is always float."""
    directory = resolve_checkpoint(checkpoint)
    dev = pick_device(device)
    firefly = find_firefly_file(directory)
    if firefly is not None:
        return load_firefly(firefly, device=dev, dtype=pick_dtype(dtype, dev))
    path = directory / "codec.pth"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: the checkpoint directory must hold the codec weights "
                              "(codec.pth, or firefly-gan-vq-fsq-8x1024-21hz-generator.pth for fish-speech-1.5)")
    return load_codec(path, device=dev, dtype=pick_dtype(dtype, dev), quantize=quantize)


def pick_quantize(quantize: str | None, device: torch.device) -> QuantizeMode:
    """`None` or "auto" picks the device's default (see `engine.fish.quantize.default_quantize`)."""
    mode = default_quantize(device) if quantize in (None, "auto") else check_mode(quantize)
    if mode != "none" and device.type != "cpu":
        raise ValueError(f"--quantize {mode} uses torch's CPU kernels; on {device.type} use --quantize none")
    return mode


def load_models(checkpoint: str | Path, device: str | None = None, dtype: str | torch.dtype | None = None,
                decode_slots: int | None = None, quantize: str | None = "none") -> FishModels:
    """Load a checkpoint directory. `decode_slots` sequences decode through static buffers and
    on-device sampling (CUDA graphs on a GPU): default 4 on CUDA, 0 (the dynamic path) on CPU.
    `quantize` ("none", "int8", "int4"; None = the device's default) stores the transformer's
    weights as integers (CPU only; the float path stays the reference); any mode but "none" also
    stores the codec's linear layers as int8 (a quarter of their ~1 GB; the server always
    decodes through the streaming decoder, so its audio is still the same streamed or whole)."""
    t0 = time.perf_counter()
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    quant = pick_quantize(quantize, dev)  # before any file is read: a bad setting fails fast
    directory = resolve_checkpoint(checkpoint)
    config = load_config(directory)
    tokenizer = FishTokenizer.from_dir(directory, family=config.family)
    # The tokenizer is authoritative for the semantic range (spec §1.5).
    config = config.with_semantic_ids(tokenizer.semantic_begin_id, tokenizer.semantic_end_id)
    if quantize in (None, "auto"):  # the device's default, now that the model's width is known
        quant = default_quantize(dev, config.dim)
    if tokenizer.semantic_end_id >= config.vocab_size or tokenizer.im_end_id >= config.vocab_size:
        raise CheckpointError(f"tokenizer ids exceed the model vocabulary of {config.vocab_size}")
    if tokenizer.semantic_end_id - tokenizer.semantic_begin_id + 1 < config.codebook_size:
        raise CheckpointError("the tokenizer has fewer semantic tokens than the first codebook has entries")
    model = load_dual_ar(directory, config, dev, dt, quant)
    return_freed_heap()  # before the codec: whatever loading the model freed goes back to the OS
    codec = load_codec_only(directory, str(dev), dtype=torch.float32 if dev.type == "cpu" else dt,
                            quantize="none" if quant == "none" else "int8")
    if (config.family == "fish-speech-1.5") != isinstance(codec, FireflyCodec):
        raise CheckpointError(f"{directory} holds a {config.family} model but a {type(codec).__name__} codec")
    if codec.num_codebooks != config.num_codebooks:
        raise CheckpointError(f"codec has {codec.num_codebooks} codebooks but the model predicts {config.num_codebooks}")
    runner = DualARRunner(model, tokenizer.im_end_id, fast_vocab=min(codec.codebook_sizes[1:]))
    slots = (DEFAULT_CUDA_DECODE_SLOTS if dev.type == "cuda" else 0) if decode_slots is None else decode_slots
    if slots > 0:
        runner.enable_static_decode(slots=slots, capacity=min(config.max_seq_len, STATIC_CAPACITY))
    log.info("loaded %s (%s) from %s on %s/%s in %.1f s", config.family, type(model).__name__, directory, dev, dt,
             time.perf_counter() - t0)
    if quant != "none":
        log.info("quantized %s: %s", quant, describe(model))
    return FishModels(directory, config, tokenizer, model, runner, codec, dev, dt, quant)
