"""Finding checkpoints: local directories, published names, and the offline/gated error."""
from __future__ import annotations

import pytest

from engine.fish.checkpoint import CheckpointError, resolve_checkpoint


def test_existing_directory_is_used_as_is(tmp_path):
    assert resolve_checkpoint(tmp_path) == tmp_path


def test_missing_path_says_where_to_put_weights(tmp_path):
    with pytest.raises(CheckpointError, match="gated.*make-tiny-checkpoint"):
        resolve_checkpoint(tmp_path / "absent")


def test_published_name_without_network_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="fishaudio/openaudio-s1-mini") as info:
        resolve_checkpoint("s1-mini", cache_dir=str(tmp_path / "checkpoints"))
    assert "--checkpoint" in str(info.value)
