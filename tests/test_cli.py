"""`python -m engine ...` end to end, as users and checkers drive it (subprocesses, real files)."""
from __future__ import annotations

import json
import subprocess
import sys
import wave

import numpy as np
import pytest


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("wav") / "ref.wav"
    rate = 44100
    t = np.arange(int(0.7 * rate)) / rate
    pcm = (0.4 * np.sin(2 * np.pi * 200 * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


@pytest.mark.parametrize("family", ["s1-mini", "s2-pro"])
def test_make_tiny_checkpoint_writes_the_published_layout(tmp_path, family):
    out = tmp_path / family
    proc = run("make-tiny-checkpoint", "--family", family, str(out))
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "codec.pth"} <= names
    if family == "s1-mini":
        assert {"model.pth", "tokenizer.tiktoken", "special_tokens.json"} <= names
        assert json.loads((out / "config.json").read_text())["model_type"] == "dual_ar"
    else:
        assert {"model.safetensors.index.json", "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors", "tokenizer.json"} <= names
        assert json.loads((out / "config.json").read_text())["model_type"] == "fish_qwen3_omni"


def test_codec_generate_and_tts_commands(tmp_path, tiny_s1_checkpoint, speech_wav):
    ckpt = str(tiny_s1_checkpoint)
    codes = tmp_path / "ref.npy"
    proc = run("codec", "encode", str(speech_wav), str(codes), "--checkpoint", ckpt)
    assert proc.returncode == 0, proc.stderr
    ref = np.load(codes)
    assert ref.shape == (10, 16) and np.issubdtype(ref.dtype, np.integer)  # ceil(0.7*44100/2048)

    decoded = tmp_path / "ref_decoded.npy"
    proc = run("codec", "decode", str(codes), str(decoded), "--checkpoint", ckpt)
    assert proc.returncode == 0, proc.stderr
    assert np.load(decoded).dtype == np.float32 and np.load(decoded).size == 16 * 2048
    wav_out = tmp_path / "ref_decoded.wav"
    assert run("codec", "decode", str(codes), str(wav_out), "--checkpoint", ckpt).returncode == 0
    import av
    with av.open(str(wav_out)) as f:
        stream = f.streams.audio[0]
        assert stream.codec_context.name == "pcm_f32le" and stream.rate == 44100

    out = tmp_path / "codes.npy"
    ids, slow, fast = (tmp_path / n for n in ("ids.npy", "slow.npy", "fast.npy"))
    proc = run("generate", "--checkpoint", ckpt, "--text", "Hello world.", "--prompt-text", "A tone.",
               "--prompt-tokens", str(codes), "--greedy", "--max-new-tokens", "5", "--output", str(out),
               "--dump-prompt-ids", str(ids), "--dump-first-logits", str(slow), "--dump-first-fast-logits", str(fast))
    assert proc.returncode == 0, proc.stderr
    gen = np.load(out)
    assert gen.shape[0] == 10 and 0 < gen.shape[1] <= 5
    prompt = np.load(ids)
    assert prompt.shape[0] == 11 and prompt.shape[1] > 16
    from engine.fish.tokenizer import FishTokenizer
    tok = FishTokenizer.from_dir(tiny_s1_checkpoint)
    semantic = (prompt[0] >= tok.semantic_begin_id) & (prompt[0] <= tok.semantic_end_id)
    assert semantic.sum() == 16 and np.array_equal(prompt[1:, semantic], ref)  # the reference's codes, in order
    config = json.loads((tiny_s1_checkpoint / "config.json").read_text())
    assert np.load(slow).shape == (config["vocab_size"],)
    # every fast codebook of the first frame, each fed the greedy pick of the one before
    assert np.load(fast).shape == (config["num_codebooks"] - 1, config["codebook_size"])
    assert np.array_equal(np.load(fast).argmax(-1), gen[1:, 0])
    # Reproducible: the same greedy command gives the same codes.
    out2 = tmp_path / "codes2.npy"
    assert run("generate", "--checkpoint", ckpt, "--text", "Hello world.", "--prompt-text", "A tone.",
               "--prompt-tokens", str(codes), "--greedy", "--max-new-tokens", "5", "--output", str(out2)).returncode == 0
    assert np.array_equal(np.load(out2), gen)

    speech = tmp_path / "speech.wav"
    proc = run("tts", "--checkpoint", ckpt, "--text", "Hello there.", "--reference", str(speech_wav),
               "--reference-text", "A tone.", "--max-new-tokens", "6", "--seed", "1", "--output", str(speech))
    assert proc.returncode == 0, proc.stderr
    with av.open(str(speech)) as f:
        assert f.streams.audio[0].rate == 44100 and f.duration > 0
    # The static decode path (the CUDA default) gives the same seeded speech on the CPU.
    static_npy, dynamic_npy = tmp_path / "static.npy", tmp_path / "dynamic.npy"
    for out, slots in ((static_npy, "2"), (dynamic_npy, "0")):
        proc = run("tts", "--checkpoint", ckpt, "--text", "Hello there.", "--reference", str(speech_wav),
                   "--reference-text", "A tone.", "--max-new-tokens", "6", "--seed", "1", "--decode-slots", slots,
                   "--output", str(out))
        assert proc.returncode == 0, proc.stderr
    assert np.load(dynamic_npy).size > 0 and np.allclose(np.load(static_npy), np.load(dynamic_npy), atol=1e-5)


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    proc = run("generate", "--checkpoint", str(tmp_path / "nope"), "--text", "x", "--output", str(tmp_path / "o.npy"))
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "make-tiny-checkpoint" in proc.stderr
