"""Shared fixtures: tiny random checkpoints in the published layouts, written once per session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_s1_checkpoint(tmp_path_factory):
    from engine.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-s1-mini"), "s1-mini", seed=0)


@pytest.fixture(scope="session")
def tiny_s2_checkpoint(tmp_path_factory):
    from engine.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-s2-pro"), "s2-pro", seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_s1_checkpoint):
    """The default tiny checkpoint for transport tests (S1-mini layout)."""
    return tiny_s1_checkpoint


@pytest.fixture(scope="session")
def tts_engine(tiny_checkpoint):
    """One loaded TTS engine shared by the tests that only need a working synthesizer."""
    from engine.tts import TTSEngine

    engine = TTSEngine.load(tiny_checkpoint, device="cpu")
    yield engine
    engine.close()
