"""Finding a checkpoint directory and reading the Dual-AR weights in their published layouts.

Layouts (spec §1.2–1.3): S2-Pro ships sharded safetensors with `text_model.model.*` and
`audio_decoder.*` names; S1-mini ships `model.pth` with bare internal names. Both end up as a
state dict with the internal names of `engine.fish.dual_ar.DualARTransformer`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the model it should hold."""


# Short names users may pass instead of a directory; fetched with huggingface_hub when reachable.
KNOWN_REPOS = {
    "s1-mini": "fishaudio/openaudio-s1-mini",
    "openaudio-s1-mini": "fishaudio/openaudio-s1-mini",
    "s2-pro": "fishaudio/s2-pro",
    "fish-speech-1.5": "fishaudio/fish-speech-1.5",
}


def resolve_checkpoint(spec: str | os.PathLike[str], cache_dir: str | None = None) -> Path:
    """Return a local checkpoint directory for a path, a short name or a Hugging Face repo id.

    A path that exists is used as is. Otherwise the published repo is downloaded with
    huggingface_hub when the machine can reach it; failing that, one clear error says where
    to put the files (the published repos are gated).
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    repo_id = KNOWN_REPOS.get(str(spec), str(spec))
    looks_like_repo = repo_id.count("/") == 1 and not path.exists() and not str(spec).startswith((".", "/", "~"))
    if not looks_like_repo:
        raise CheckpointError(
            f"checkpoint directory {path} does not exist. Download a published checkpoint "
            "(huggingface-cli download fishaudio/openaudio-s1-mini --local-dir checkpoints/openaudio-s1-mini; "
            "the repos are gated: accept the licence on the model page and `huggingface-cli login` first) "
            "or write a tiny random one with `python -m engine make-tiny-checkpoint --family s1-mini DIR` "
            "(families: s1-mini, s2-pro, fish-speech-1.5)."
        )
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(f"{spec} is not a local directory and huggingface_hub is unavailable") from exc
    target = Path(cache_dir or "checkpoints") / repo_id.split("/")[-1]
    if (target / "config.json").is_file():
        return target
    try:
        return Path(snapshot_download(repo_id, local_dir=str(target)))
    except GatedRepoError as exc:
        raise CheckpointError(
            f"{repo_id} is a gated repository: accept its licence on huggingface.co/{repo_id}, run "
            f"`huggingface-cli login` (or set HF_TOKEN), then retry; or download it elsewhere and pass "
            f"--checkpoint DIR"
        ) from exc
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise CheckpointError(
            f"cannot fetch {repo_id} ({type(exc).__name__}: {exc}). This machine may have no access to "
            f"huggingface.co: download the gated repo elsewhere (accept its licence first), copy it to "
            f"{target} and pass --checkpoint {target}"
        ) from exc


def _remap_published_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """S2-Pro safetensors names -> internal names (spec §2.3). A no-op for internal names."""
    if not any(k.startswith(("text_model.", "audio_decoder.")) for k in state):
        return state
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("text_model.model."):
            key = key[len("text_model.model."):]
        elif key.startswith("audio_decoder.codebook_embeddings."):
            key = key[len("audio_decoder."):]
        elif key.startswith("audio_decoder."):
            key = "fast_" + key[len("audio_decoder."):]
        out[key] = value
    return out


def _load_safetensors(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"shard {f} listed in the index is missing")
        try:
            state.update(load_file(str(f)))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {f}: {exc}") from exc
    return state


def _load_pth(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} does not hold a state dict")
    if next(iter(obj)).startswith("model."):
        obj = {k[len("model."):]: v for k, v in obj.items()}
    # Old checkpoints carry audio-projector weights that the TTS model does not use.
    return {k: v for k, v in obj.items() if "audio_" not in k}


def load_llm_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """Read the language-model weights, preferring the sharded index, then a single
    safetensors file, then model.pth (the upstream order)."""
    index = checkpoint_dir / "model.safetensors.index.json"
    single = checkpoint_dir / "model.safetensors"
    pth = checkpoint_dir / "model.pth"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = sorted({checkpoint_dir / name for name in weight_map.values()})
        state = _load_safetensors(files)
    elif single.is_file():
        state = _load_safetensors([single])
    elif pth.is_file():
        state = _load_pth(pth)
    else:
        raise CheckpointError(
            f"no language-model weights in {checkpoint_dir}: expected model.safetensors.index.json, "
            "model.safetensors or model.pth"
        )
    return _fuse_legacy_qkv(_remap_published_names(state))


def _fuse_legacy_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old checkpoints store separate wq/wk/wv; concatenate them in q, k, v order (spec §2.3)."""
    for key in [k for k in state if k.endswith(".attention.wq.weight")]:
        prefix = key[: -len("wq.weight")]
        parts = [state.pop(prefix + f"w{n}.weight") for n in "qkv"]
        state[prefix + "wqkv.weight"] = torch.cat(parts, dim=0)
    return state


def check_keys(expected: Iterable[str], found: Iterable[str], what: str) -> None:
    """Strict key check with a message that names the offending keys."""
    expected, found = set(expected), set(found)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" … (+{len(keys) - 8} more)" if len(keys) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {show(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {show(unexpected)}")
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(parts))
