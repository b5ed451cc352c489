"""Weight-only int8/int4 quantization (issue #21): every quantized linear layer stays within a
stated relative error of the float layer, on the tiny checkpoint and on full-size S1-mini layer
shapes; the kernels compute what our dequantized numbers say; a quantized checkpoint loads with
no float copy left behind (the codec's linear layers int8 too), runs end to end through `/v1/tts`, and QUANTIZE reaches the engine."""
from __future__ import annotations

import io
import wave

import numpy as np
import pytest
import requests
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from engine.fish.codec.int8 import RowExactInt8Linear
from engine.fish.config import parse_config
from engine.fish.dual_ar import TransformerBlock
from engine.fish.dual_ar_loader import init_random_weights
from engine.fish.generate import generate_codes
from engine.fish.models import load_models
from engine.fish.presets import S1_MINI_CONFIG
from engine.fish.quantize import (MIN_INT8_DIM, Int4Linear, Int8Embedding, Int8Linear, default_quantize,
                                  dequantize_int4, int4_groups, int8_rows, quantize_module, weight_bytes)
from engine.speech.types import SamplingOptions
from server.__main__ import settings_from_args, settings_parser
from server.services import Services, _load_tts
from server.settings import Settings
from server.testing import LiveServer

# Relative error of a quantized layer's output against the float32 layer, on activations of unit
# scale (what RMSNorm hands the layers). int8 per channel: ~0.4 % measured. int4 in groups of 32
# with round-to-nearest: ~8 % measured on Gaussian weights, which is what 16 levels spanning a
# group's range give (step/sqrt(12) ≈ 0.08 σ); the 5 % is out of reach without
# calibration data (GPTQ/AWQ), so the bound states what RTN int4 achieves.
INT8_BOUND = 0.01
INT4_BOUND = 0.10


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def linears(module: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.fixture(scope="module")
def full_size_block():
    """One slow-transformer block of S1-mini at full size, random weights at the published
    initializer scale (the whole model is 3.4 GB in float32; its layers all share these shapes)."""
    c = parse_config(S1_MINI_CONFIG)
    block = TransformerBlock(c.dim, c.n_head, c.n_local_heads, c.head_dim, c.intermediate_size, c.norm_eps,
                             c.attention_qkv_bias, c.attention_o_bias, c.attention_qk_norm)
    init_random_weights(block, seed=3, std=S1_MINI_CONFIG["initializer_range"])
    return block.requires_grad_(False)


@pytest.mark.parametrize("mode,cls,bound", [("int8", Int8Linear, INT8_BOUND), ("int4", Int4Linear, INT4_BOUND)])
def test_full_size_layers_stay_within_the_stated_error(full_size_block, mode, cls, bound):
    x = torch.randn(3, 1, 3072, generator=torch.Generator().manual_seed(0))
    for name, lin in linears(full_size_block).items():
        q = quantize_module(lin.weight, lin.bias, mode, torch.float32)
        assert isinstance(q, cls)
        inp = x[..., :lin.in_features]
        ref = lin(inp)
        err = rel_err(q(inp), ref)
        assert err <= bound, (name, err)
        assert err > 1e-4, (name, err)  # really quantized, not passed through
        # a prefill (many rows) multiplies the dequantized weight: the kernel's numbers, up to summation order
        rows = torch.randn(40, lin.in_features, generator=torch.Generator().manual_seed(5))
        assert rel_err(torch.cat([q(rows[i:i + 8]) for i in range(0, 40, 8)]), q(rows)) < 1e-3
        # for scale: bfloat16 weights and activations alone are ~0.4 % off
        print(f"{name}: {mode} {err:.4f}, bfloat16 {rel_err(F.linear(inp.bfloat16(), lin.weight.bfloat16()), ref):.4f}")


@pytest.mark.parametrize("mode,bound", [("int8", INT8_BOUND), ("int4", INT4_BOUND)])
def test_tiny_checkpoint_layers_stay_within_the_stated_error(tiny_s1_checkpoint, mode, bound):
    float_model = load_models(tiny_s1_checkpoint, "cpu").model
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    found = linears(float_model.layers) | {"fast." + n: m for n, m in linears(float_model.fast_layers).items()}
    assert len(found) == 5 * (2 + 2)  # wqkv, wo, w1, w2, w3 per block, slow and fast
    for name, lin in found.items():
        inp = x[:, :lin.in_features]
        err = rel_err(quantize_module(lin.weight, lin.bias, mode, torch.float32)(inp), lin(inp))
        assert 1e-4 < err <= bound, (name, err)


def test_kernels_compute_the_numbers_we_store():
    """torch's packed kernels against our own dequantization: what the tests above bound is
    the error of the numbers, not of a layout mix-up."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(96, 128, generator=g) * 0.05
    x = torch.randn(7, 128, generator=g)
    q8, s8 = int8_rows(w)
    assert q8.dtype == torch.int8 and int(q8.abs().max()) == 127
    lin8 = Int8Linear.from_weight(w)
    expected = F.linear(x.bfloat16().float(), q8.float() * s8.bfloat16().float()[:, None])
    assert rel_err(lin8(x), expected) < 5e-3  # the kernel's output is rounded to bfloat16
    torch.testing.assert_close(lin8.dequantize(), q8.float() * s8.bfloat16().float()[:, None])

    q4, sz = int4_groups(w)
    assert q4.min() >= 0 and q4.max() <= 15 and sz.shape == (128 // 32, 96, 2)
    lin4 = Int4Linear.from_weight(w)
    w4 = dequantize_int4(q4, sz.bfloat16())
    assert rel_err(lin4(x), F.linear(x.bfloat16().float(), w4)) < 5e-3
    torch.testing.assert_close(lin4.dequantize(), w4)  # our reading of torch's packed layout


def test_int4_falls_back_to_int8_for_shapes_it_cannot_pack():
    w = torch.randn(24, 64)  # 24 output rows: the CPU int4 packing works in blocks of 32
    assert not Int4Linear.supports(24, 64)
    assert isinstance(quantize_module(w, None, "int4", torch.float32), Int8Linear)
    assert quantize_module(w, None, "none", torch.float32) is None


@pytest.mark.parametrize("family", ["s1-mini", "s2-pro"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_checkpoint_loads_and_generates(family, mode, tiny_s1_checkpoint, tiny_s2_checkpoint):
    checkpoint = tiny_s1_checkpoint if family == "s1-mini" else tiny_s2_checkpoint
    ref = load_models(checkpoint, "cpu")
    quant = load_models(checkpoint, "cpu", quantize=mode)
    m = quant.model
    assert quant.quantize == mode
    assert not linears(m.layers) and not linears(m.fast_layers)  # every transformer linear replaced
    assert isinstance(m.embeddings, Int8Embedding) and isinstance(m.codebook_embeddings, Int8Embedding)
    assert not any(t.is_meta for t in [*m.parameters(), *m.buffers()])
    assert weight_bytes(m) < 0.45 * weight_bytes(ref.model)
    assert m.dtype == torch.float32 and quant.runner.slow_head.dtype == torch.float32
    # the codec's linear layers follow (int8 whatever the mode); the float load keeps them float
    assert not linears(quant.codec.quantizer) and linears(ref.codec.quantizer)
    assert any(isinstance(x, RowExactInt8Linear) for x in quant.codec.quantizer.modules())

    # The last prompt position's slow logits: same prompt, quantized against float.
    prompt = torch.zeros(11, 24, dtype=torch.long)
    prompt[0] = torch.arange(24) * 7 % 300
    with torch.inference_mode():
        logits = {name: (models.model.forward_slow(prompt.unsqueeze(0), None, 0)[1][0, -1]
                         @ models.runner.slow_head.T) for name, models in (("ref", ref), ("q", quant))}
    err = rel_err(logits["q"], logits["ref"])
    print(f"{family} {mode}: last-position slow logits off by {err:.4f}")
    # the tiny model (weights of std 0.5, two layers) amplifies the per-layer error: bounds with room
    assert 1e-4 < err < (0.1 if mode == "int8" else 0.6), err

    codes = generate_codes(quant.runner, prompt, SamplingOptions(seed=3), max_new_tokens=12)
    assert codes.shape == (quant.config.num_codebooks, 12)
    assert int(codes.min()) >= 0 and int(codes.max()) < quant.config.codebook_size


def test_quantize_mode_is_checked():
    with pytest.raises(ValueError, match="quantize must be one of"):
        load_models("does-not-matter", "cpu", quantize="int3")
    assert default_quantize("cpu") in ("int8", "int4", "none") and default_quantize("cuda") == "none"


def test_auto_quantizes_only_models_wide_enough_to_gain(tiny_s1_checkpoint):
    """int8 pays where weight bytes bound a CPU step (the published widths), not for narrow models."""
    assert default_quantize("cpu", MIN_INT8_DIM) == "int8" and default_quantize("cpu", 1024) == "int8"
    assert default_quantize("cpu", 64) == "none" and default_quantize("cuda", 1024) == "none"
    auto = load_models(tiny_s1_checkpoint, "cpu", quantize="auto")
    assert auto.config.dim < MIN_INT8_DIM
    assert not any(isinstance(m, (Int8Linear, Int4Linear)) for m in auto.model.modules())
    forced = load_models(tiny_s1_checkpoint, "cpu", quantize="int8")
    assert any(isinstance(m, Int8Linear) for m in forced.model.modules())


def test_quantize_setting_reaches_the_engine(monkeypatch, tiny_checkpoint):
    monkeypatch.setenv("QUANTIZE", "int4")
    settings = settings_from_args(settings_parser().parse_args(["--checkpoint", str(tiny_checkpoint), "--device", "cpu"]))
    assert settings.quantize == "int4"
    engine = _load_tts(settings)  # in its own process (TTS_PROCESS defaults on)
    try:
        assert engine.facts["quantize"] == "int4"
    finally:
        engine.close()
    settings.tts_process = False
    engine = _load_tts(settings)
    try:
        assert engine.models.quantize == "int4"
        assert isinstance(engine.models.model.layers[0].feed_forward.w1, Int4Linear)
    finally:
        engine.close()
    flags = settings_parser().parse_args(["--checkpoint", str(tiny_checkpoint), "--quantize", "none"])
    assert settings_from_args(flags).quantize == "none"  # the flag wins over the environment
    with pytest.raises(ValidationError):
        Settings(quantize="int2")


@pytest.fixture(scope="module")
def int8_server(tiny_checkpoint, tmp_path_factory):
    from engine.speech.tts import TTSEngine
    from server.references import ReferenceStore

    engine = TTSEngine.load(tiny_checkpoint, device="cpu", quantize="int8")
    data = tmp_path_factory.mktemp("quantized-data")
    settings = Settings(data_dir=data, checkpoint=str(tiny_checkpoint), mode="tts", asr_model="none",
                        llm_enabled=False, max_new_tokens_limit=16, quantize="int8")
    with LiveServer(settings, Services(tts=engine, references=ReferenceStore(data / "references"))) as live:
        yield live
    engine.close()


def test_quantized_engine_serves_v1_tts_streamed(int8_server):
    """Upstream's /v1/tts on the int8 engine: streamed raw PCM equals the whole file (same seed)."""
    body = {"text": "Quantized, and still talking.", "format": "wav", "streaming": False, "seed": 4,
            "max_new_tokens": 16, "references": []}
    whole = requests.post(f"{int8_server.url}/v1/tts", json=body, timeout=60)
    assert whole.status_code == 200 and whole.content.startswith(b"RIFF")
    streamed = requests.post(f"{int8_server.url}/v1/tts", json={**body, "streaming": True}, stream=True, timeout=60)
    assert streamed.status_code == 200
    raw = b"".join(c for c in streamed.iter_content(chunk_size=None) if c)
    pcm = np.frombuffer(raw, "<i2")
    assert pcm.size > 0.3 * 44100 and np.abs(pcm).max() > 0
    with wave.open(io.BytesIO(whole.content)) as w:
        np.testing.assert_array_equal(pcm, np.frombuffer(w.readframes(w.getnframes()), "<i2"))


def test_static_decode_slots_run_quantized(tiny_s1_checkpoint):
    """The static-slot decoder (fixed buffers, sampling on the device) over int8 layers gives the
    dynamic path's codes, as it does in float."""
    prompt = torch.zeros(11, 20, dtype=torch.long)
    prompt[0] = torch.arange(20) * 5 % 300
    dynamic = load_models(tiny_s1_checkpoint, "cpu", quantize="int8")
    static = load_models(tiny_s1_checkpoint, "cpu", quantize="int8", decode_slots=2)
    assert static.runner.static is not None and static.runner.static.k[0].dtype == torch.float32
    greedy = SamplingOptions(greedy=True)
    torch.testing.assert_close(generate_codes(static.runner, prompt, greedy, 10),
                               generate_codes(dynamic.runner, prompt, greedy, 10), rtol=0, atol=0)


def test_engine_cli_generates_quantized(tmp_path, tiny_s1_checkpoint):
    """`python -m engine generate --quantize int8`: codes, and a first-step logits dump (the whole
    dequantized head) close to the float one."""
    import subprocess
    import sys

    dumps = {}
    for mode in ("none", "int8"):
        out, slow = tmp_path / f"codes-{mode}.npy", tmp_path / f"slow-{mode}.npy"
        proc = subprocess.run([sys.executable, "-m", "engine", "generate", "--checkpoint", str(tiny_s1_checkpoint),
                               "--text", "Hello world.", "--greedy", "--max-new-tokens", "4", "--quantize", mode,
                               "--output", str(out), "--dump-first-logits", str(slow)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert np.load(out).shape[0] == 10
        dumps[mode] = torch.from_numpy(np.load(slow))
    assert dumps["int8"].shape == dumps["none"].shape
    assert 1e-4 < rel_err(dumps["int8"], dumps["none"]) < 0.1
    proc = subprocess.run([sys.executable, "-m", "engine", "generate", "--checkpoint", str(tiny_s1_checkpoint),
                           "--text", "x", "--output", str(tmp_path / "x.npy"), "--quantize", "int3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "int3" in proc.stderr
