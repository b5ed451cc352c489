"""Shared fixtures: tiny random checkpoints in the published layouts, written once per session."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models are all per-op overhead: one intra-op thread is faster than two and does not stall
# when other processes (ASR, llama.cpp, a browser) hold the second core.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_s1_checkpoint(tmp_path_factory):
    from engine.fish.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-s1-mini"), "s1-mini", seed=0)


@pytest.fixture(scope="session")
def tiny_s2_checkpoint(tmp_path_factory):
    from engine.fish.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-s2-pro"), "s2-pro", seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_s1_checkpoint):
    """The default tiny checkpoint for transport tests (S1-mini layout)."""
    return tiny_s1_checkpoint


@pytest.fixture(scope="session")
def tts_engine(tiny_checkpoint):
    """One loaded TTS engine shared by the tests that only need a working synthesizer."""
    from engine.speech.tts import TTSEngine

    engine = TTSEngine.load(tiny_checkpoint, device="cpu")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def models(tts_engine, tmp_path_factory):
    """The models a realtime server holds (whisper tiny.en, silero, Smart Turn, SmolLM2, the tiny TTS) and an
    empty reference store, as the server's Services would: one set per test module."""
    import types

    from engine.agent.asr import Transcriber
    from engine.agent.llm.embedded import EmbeddedLLM
    from engine.agent.smart_turn import SmartTurn
    from engine.agent.vad import SileroVAD
    from server.references import ReferenceStore

    llm = EmbeddedLLM.load()
    references = ReferenceStore(tmp_path_factory.mktemp("references"))
    yield types.SimpleNamespace(asr=Transcriber.load(), vad=SileroVAD.load(), smart_turn=SmartTurn.load(), llm=llm,
                                tts=tts_engine, references=references, loading=False)
    llm.close()
