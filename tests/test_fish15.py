"""fish-speech-1.5 (tag v1.5.1 semantics) through our engine: config reading, the built-in
special-token list, the prompt format, the tiny checkpoint in the published file names, the CLI
contract, and every surface (/v1/tts, jobs, agent mode, a WebRTC call) on a tiny 1.5 checkpoint.

Upstream fidelity (by hand, not in this suite; see README "fish-speech-1.5"): tag v1.5.1 run in a
scratch folder on the tiny checkpoint gave identical prompt ids, first-step logits within 2e-5,
identical greedy codes, identical codec codes and decoded audio within 5e-9."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import subprocess
import sys
import time
import types
import wave

import numpy as np
import pytest
import requests
import torch

from engine.audio import encode_audio
from engine.fish.checkpoint import CheckpointError, resolve_checkpoint
from engine.fish.config import FIREFLY_CODEC_FILE, ConfigError, load_config, parse_config
from engine.fish.firefly import FireflyCodec
from engine.fish.models import load_models
from engine.fish.prompt import build_prompt, clean_text_v15
from engine.fish.tokenizer import FishTokenizer
from engine.speech.types import Reference, SamplingOptions, TTSRequest

K = 8
KEY = "fs15-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FRAMES = 12  # random tiny weights never stop on their own: every request caps its length


@pytest.fixture(scope="session")
def tiny_v15_checkpoint(tmp_path_factory):
    from engine.fish.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-fish-speech-1.5"), "fish-speech-1.5", seed=0)


@pytest.fixture(scope="module")
def models(tiny_v15_checkpoint):
    return load_models(tiny_v15_checkpoint, "cpu")


@pytest.fixture(scope="module")
def engine15(tiny_v15_checkpoint):
    from engine.speech.tts import TTSEngine

    engine = TTSEngine.load(tiny_v15_checkpoint, device="cpu")
    yield engine
    engine.close()


def reference_wav(seconds: float = 1.5, seed: int = 3) -> bytes:
    rate = 44100
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    pcm = sum(np.sin(2 * np.pi * f * t) / (i + 1) for i, f in enumerate((140, 280, 420, 700)))
    pcm = 0.2 * pcm / np.abs(pcm).max() + 0.01 * rng.standard_normal(t.size)
    return encode_audio(pcm.astype(np.float32), rate, "wav")


# --------------------------------------------------------------------------- config, tokenizer, prompt
V15_RAW = {"model_type": "dual_ar", "vocab_size": 2000, "n_layer": 2, "n_head": 4, "n_local_heads": 2,
           "dim": 64, "head_dim": 98, "intermediate_size": 128, "codebook_size": 1024, "num_codebooks": 8,
           "n_fast_layer": 2, "fast_dim": 64, "fast_n_head": 4, "fast_n_local_heads": 2, "fast_head_dim": 6,
           "max_seq_len": 512, "rope_base": 1e6, "norm_eps": 1e-6, "tie_word_embeddings": False,
           "scale_codebook_embeddings": True, "share_codebook_embeddings": True, "is_reward_model": False}


def test_config_reads_as_v151_does():
    c = parse_config(V15_RAW, "fish-speech-1.5")
    assert c.family == "fish-speech-1.5"
    assert c.head_dim == 16 and c.fast_head_dim == 16  # dim / n_head, whatever the file says
    assert not c.attention_qk_norm and not c.scale_codebook_embeddings and not c.norm_fastlayer_input
    assert (c.codebook_size, c.num_codebooks, c.max_seq_len) == (1024, 8, 512)
    s1 = parse_config(V15_RAW)  # the S1-mini reading of the same file would honour head_dim
    assert s1.family == "s1-mini" and s1.head_dim == 98 and s1.scale_codebook_embeddings
    with pytest.raises(ConfigError, match="share_codebook_embeddings"):
        parse_config({**V15_RAW, "share_codebook_embeddings": False}, "fish-speech-1.5")
    with pytest.raises(ConfigError, match="multiple of n_head"):
        parse_config({**V15_RAW, "n_head": 5}, "fish-speech-1.5")


def test_family_follows_the_codec_file(tmp_path, tiny_v15_checkpoint, tiny_s1_checkpoint):
    assert load_config(tiny_v15_checkpoint).family == "fish-speech-1.5"
    assert load_config(tiny_s1_checkpoint).family == "s1-mini"
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps(V15_RAW))
    assert load_config(bare).family == "fish-speech-1.5"  # no q/k-norm field: the 1.5 layout
    (bare / "config.json").write_text(json.dumps({**V15_RAW, "attention_qk_norm": True}))
    assert load_config(bare).family == "s1-mini"


def test_tokenizer_uses_the_v151_builtin_list(tmp_path, tiny_v15_checkpoint):
    d = tmp_path / "tok"
    shutil.copytree(tiny_v15_checkpoint, d)
    ranks = sum(1 for line in (d / "tokenizer.tiktoken").read_text().splitlines() if line)
    # v1.5.1 ignores special_tokens.json: a reordered file changes nothing
    names = list(json.loads((d / "special_tokens.json").read_text()))
    (d / "special_tokens.json").write_text(json.dumps({n: i for i, n in enumerate(reversed(names))}))
    tok = FishTokenizer.from_dir(d, family="fish-speech-1.5")
    assert tok.special_ids["<|begin_of_text|>"] == ranks
    assert tok.im_end_id == ranks + 4 and tok.token_id("<|placeholder:3|>") == ranks + 8
    assert tok.token_id("<|voice|>") == ranks + 10
    assert (tok.semantic_begin_id, tok.semantic_end_id) == (ranks + 12, ranks + 1035)
    assert "<|phoneme_start|>" not in tok.special_ids  # an S1-era token


def _expected(tok, parts):
    cols = []
    for part in parts:
        if isinstance(part, str):
            ids = tok.encode(part)
            col = np.zeros((K + 1, len(ids)), np.int64)
            col[0] = ids
        else:
            col = np.zeros((K + 1, part.shape[1]), np.int64)
            col[0] = tok.semantic_begin_id + part[0]
            col[1:] = part
        cols.append(col)
    return np.concatenate(cols, axis=1)


def _turn(text, codes=None):
    parts = ["<|im_start|>user\n", text, "<|im_end|>", "<|im_start|>assistant\n", "<|voice|>"]
    return parts + ([codes, "<|im_end|>"] if codes is not None else [])


def test_prompt_format_matches_v151_part_sequence(models):
    tok = models.tokenizer
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 1000, size=(K, 7))
    past = rng.integers(0, 1000, size=(K, 5))
    got = build_prompt(tok, models.family, "Hello there.", num_codebooks=K)
    np.testing.assert_array_equal(got, _expected(tok, _turn("Hello there.")))
    got = build_prompt(tok, models.family, "Second part.", references=[("A ref.", ref)],
                       history=[("First part.", past)], num_codebooks=K)
    expected = _expected(tok, ["<|im_start|>system\n", "Speak out the provided text.", "<|im_end|>",
                               *_turn("A ref.", ref), *_turn("First part.", past), *_turn("Second part.")])
    np.testing.assert_array_equal(got, expected)
    assert not b"\n<|im_start|>" in tok.decode(got[0].tolist()).encode()  # no newline after <|im_end|>


def test_text_cleaning_and_history_window(models):
    # v1.5.1 trims before it drops emoji, so the space before one stays
    assert clean_text_v15("  It\u2019s fine,,, really \U0001F600 ") == "It's fine, really "
    tok = models.tokenizer
    rng = np.random.default_rng(1)
    history = [(f"Chunk {i}.", rng.integers(0, 1000, size=(K, 30))) for i in range(6)]
    full = build_prompt(tok, models.family, "Now.", history=history, num_codebooks=K)
    assert build_prompt(tok, models.family, "Now.", history=history, num_codebooks=K, max_length=4096).shape == \
        full.shape  # everything fits
    windowed = build_prompt(tok, models.family, "Now.", history=history, num_codebooks=K, max_length=1024 + 130)
    kept = [h for h in history if np.isin(tok.semantic_begin_id + h[1][0], windowed[0]).all()]
    assert kept[0] is history[0] and kept[-1] is history[-1] and len(kept) < len(history)
    assert windowed.shape[1] < full.shape[1]


# --------------------------------------------------------------------------- checkpoint, loading, CLI
def test_tiny_checkpoint_in_published_names_loads_strictly(tmp_path, tiny_v15_checkpoint, models):
    names = {p.name for p in tiny_v15_checkpoint.iterdir()}
    assert names == {"config.json", "model.pth", "tokenizer.tiktoken", "special_tokens.json", FIREFLY_CODEC_FILE}
    assert models.family == "fish-speech-1.5" and isinstance(models.codec, FireflyCodec)
    assert models.codec.num_codebooks == K and models.runner.fast_vocab == 1000
    assert models.config.semantic_end_id - models.config.semantic_begin_id + 1 == 1024
    assert "layers.0.attention.q_norm.weight" not in models.model.state_dict()
    assert tuple(models.model.layers[0].attention.wo.weight.shape) == (64, 64)  # (dim, dim) in 1.5
    broken = tmp_path / "broken"
    shutil.copytree(tiny_v15_checkpoint, broken)
    state = torch.load(broken / "model.pth", weights_only=True)
    state["layers.0.attention.q_norm.weight"] = torch.ones(16)  # an S1-mini key in a 1.5 model
    torch.save(state, broken / "model.pth")
    with pytest.raises(CheckpointError, match="unexpected 1 key"):
        load_models(broken, "cpu")
    (tmp_path / "nocodec").mkdir()
    for f in ("config.json", "model.pth", "tokenizer.tiktoken"):
        shutil.copy(tiny_v15_checkpoint / f, tmp_path / "nocodec" / f)
    with pytest.raises(CheckpointError, match="firefly-gan-vq-fsq-8x1024-21hz-generator.pth"):
        load_models(tmp_path / "nocodec", "cpu")


def test_published_name_is_fetched_with_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="fishaudio/fish-speech-1.5"):
        resolve_checkpoint("fish-speech-1.5", cache_dir=str(tmp_path / "checkpoints"))


def test_cli_tiny_checkpoint_generate_dumps_and_codec(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=300)

    ckpt = tmp_path / "ckpt"
    proc = run("make-tiny-checkpoint", "--family", "fish-speech-1.5", str(ckpt))
    assert proc.returncode == 0, proc.stderr
    assert (ckpt / FIREFLY_CODEC_FILE).is_file() and (ckpt / "model.pth").is_file()
    wav = tmp_path / "ref.wav"
    wav.write_bytes(reference_wav(1.0))
    codes = tmp_path / "ref.npy"
    assert run("codec", "encode", str(wav), str(codes), "--checkpoint", str(ckpt)).returncode == 0
    ref = np.load(codes)
    assert ref.shape == (K, 22) and ref.max() < 1000  # ceil((44100 // 512) / 4)
    out, slow, fast = tmp_path / "codes.npy", tmp_path / "slow.npy", tmp_path / "fast.npy"
    proc = run("generate", "--checkpoint", str(ckpt), "--text", "Hello world.", "--prompt-text", "A tone.",
               "--prompt-tokens", str(codes), "--greedy", "--max-new-tokens", "4", "--output", str(out),
               "--dump-first-logits", str(slow), "--dump-first-fast-logits", str(fast))
    assert proc.returncode == 0, proc.stderr
    gen, fast_logits = np.load(out), np.load(fast)
    assert gen.shape == (K, 4) and fast_logits.shape == (K - 1, 1024)
    assert np.array_equal(fast_logits.argmax(-1), gen[1:, 0])  # each row fed the greedy pick before it
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    assert np.load(slow).shape == (vocab,)
    decoded = tmp_path / "dec.npy"
    assert run("codec", "decode", str(out), str(decoded), "--checkpoint", str(ckpt)).returncode == 0
    assert np.load(decoded).shape == (4 * 2048,)


async def test_engine_stream_equals_whole_decode(engine15):
    """The TTS pipeline's streamed chunks (every 2 frames) equal one whole Firefly decode of the
    same codes: the seeded request is generated twice, once per decode style."""
    request = TTSRequest(text="Stream check.", sampling=SamplingOptions(max_new_tokens=FRAMES, seed=7),
                         references=(Reference(text="A tone.", audio=reference_wav()),))
    chunks = [c async for c in engine15.stream(request)]
    streamed = np.concatenate([c.pcm for c in chunks])
    assert len(chunks) >= 3 and sum(c.frames for c in chunks) == FRAMES
    assert streamed.shape == (FRAMES * 2048,) and np.abs(streamed).max() > 0
    m = engine15.models
    ref_codes = await engine15.encode_reference(request.references[0].audio)
    prompt = build_prompt(m.tokenizer, m.family, "Stream check.", references=[("A tone.", ref_codes)],
                          num_codebooks=K, max_length=m.config.max_seq_len)
    from engine.fish.generate import generate_codes
    codes = generate_codes(m.runner, torch.as_tensor(prompt), request.sampling, FRAMES)
    whole = m.codec.decode(codes).numpy()
    np.testing.assert_allclose(streamed, whole, atol=2e-5)


# --------------------------------------------------------------------------- every surface
@pytest.fixture(scope="module")
def server15(engine15, tmp_path_factory):
    from server.references import ReferenceStore
    from server.services import Services
    from server.settings import Settings
    from server.testing import LiveServer

    data = tmp_path_factory.mktemp("fs15-data")
    settings = Settings(data_dir=data, checkpoint="fish-speech-1.5", mode="tts", api_key=KEY, asr_model="none",
                        llm_enabled=False, max_new_tokens_limit=FRAMES, max_reference_bytes=512 * 1024,
                        cors_origins=[])
    with LiveServer(settings, Services(tts=engine15, references=ReferenceStore(data / "references"))) as live:
        yield live


def test_v1_tts_streamed_equals_whole(server15):
    body = {"text": "Fish speech one point five.", "seed": 5, "format": "wav",
            "references": [{"audio": base64.b64encode(reference_wav()).decode(), "text": "A tone."}]}
    whole = requests.post(f"{server15.url}/v1/tts", json=body, headers=AUTH, timeout=120)
    assert whole.status_code == 200 and whole.headers["Content-Type"] == "audio/wav"
    with wave.open(io.BytesIO(whole.content)) as w:
        assert w.getframerate() == 44100
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    assert len(pcm) == FRAMES * 2048 and np.abs(pcm).max() > 0
    streamed = requests.post(f"{server15.url}/v1/tts", json={**body, "streaming": True}, headers=AUTH,
                             stream=True, timeout=120)
    pieces = [c for c in streamed.iter_content(chunk_size=None) if c]
    assert streamed.status_code == 200 and len(pieces) >= 2
    np.testing.assert_array_equal(np.frombuffer(b"".join(pieces), "<i2"), pcm)


def test_job_api_runsync(server15):
    response = requests.post(f"{server15.url}/runsync", headers=AUTH, timeout=120, json={"input": {
        "tts": True, "text": "A job for the old model.", "format": "wav", "streaming": False, "seed": 2,
        "system_audio": base64.b64encode(reference_wav(seed=4)).decode(), "reference_text": "A tone."}})
    body = response.json()
    assert response.status_code == 200 and body["status"] == "COMPLETED", body
    out = body["output"]
    assert out["sample_rate"] == 44100 and out["duration"] == pytest.approx(FRAMES * 2048 / 44100, abs=0.01)
    with wave.open(io.BytesIO(base64.b64decode(out["audio"]))) as w:
        assert w.getnframes() == FRAMES * 2048


def test_agent_mode_replies_and_speaks(engine15, tmp_path):
    pytest.importorskip("llama_cpp")
    from engine.agent.llm import create_llm
    from server.services import Services
    from server.settings import Settings
    from server.testing import LiveServer

    llm = create_llm(n_threads=1)
    try:
        settings = Settings(data_dir=tmp_path, checkpoint="fish-speech-1.5", mode="agent", api_key=KEY,
                            asr_model="none", llm_max_tokens=16, max_new_tokens_limit=FRAMES, cors_origins=[])
        with LiveServer(settings, Services(tts=engine15, llm=llm)) as live:
            body = requests.post(f"{live.url}/runsync", headers=AUTH, timeout=180, json={"input": {
                "message": "Say hello.", "conversation_id": "fs15", "streaming": False}}).json()
            out = body["output"]
            assert body["status"] == "COMPLETED", body
            assert out["mode"] == "agent" and out["text"].strip() and out["duration"] > 0
            assert out["history"][0] == {"role": "user", "content": "Say hello."}
    finally:
        asyncio.run(llm.aclose())


async def test_webrtc_call_speaks_a_tts_request(engine15, tmp_path):
    from engine.agent.asr import Transcriber
    from engine.agent.llm.embedded import EmbeddedLLM
    from engine.agent.vad import SileroVAD
    from rtc_client import LocalServer, RealtimeClient, force_loopback_ice
    from server.references import ReferenceStore

    pytest.importorskip("llama_cpp")
    undo = force_loopback_ice()
    llm = EmbeddedLLM.load()
    services = types.SimpleNamespace(asr=Transcriber.load(), vad=SileroVAD.load(), smart_turn=None, llm=llm, tts=engine15,
                                     references=ReferenceStore(tmp_path / "references"))
    server = await LocalServer(services, rtc_liveness_timeout=2.0).start()
    client = RealtimeClient(server.base_url)
    try:
        await client.connect(query={"mode": "tts"})
        await client.wait_for("session.created")
        t_sent = time.monotonic()
        client.send({"type": "tts.request", "text": "Hello from fish speech one point five.",
                     "sampling": {"max_new_tokens": FRAMES, "seed": 1}})
        created = await client.wait_for("response.created")
        rid = created["response_id"]
        done = await client.wait_for("response.done", lambda e: e["response_id"] == rid, timeout=60)
        assert done["response"]["status"] == "completed"
        assert done["audio_seconds"] == pytest.approx(FRAMES * 2048 / 44100, rel=0.1)
        await client.wait_for("output_audio_buffer.stopped", lambda e: e["response_id"] == rid, timeout=15)
        await asyncio.sleep(0.3)
        assert client.sink.first_audible(after=t_sent, level=1e-4) is not None
    finally:
        await client.hang_up()
        await server.stop()
        llm.close()
        undo()
