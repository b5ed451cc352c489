"""Named reference voices on disk, in upstream Fish Speech's layout.

    DATA_DIR/references/<id>/sample.<ext>   the reference audio
    DATA_DIR/references/<id>/sample.lab     its transcript

Ids are checked against upstream's pattern (letters, digits, '-', '_' and spaces, at most 255
characters) before they touch the file system, and every path is resolved and checked to stay
inside the references directory, so no id can reach outside it.
"""
from __future__ import annotations

import re
import shutil
import tempfile
import threading
from pathlib import Path

from engine.speech.types import Reference

ID_PATTERN = re.compile(r"[a-zA-Z0-9\-_ ]+")  # whole ids only: always fullmatch (`$` would pass a trailing newline)
MAX_ID_LENGTH = 255
AUDIO_EXTENSIONS = (".wav", ".mp3", ".flac", ".ogg", ".opus", ".m4a", ".wma", ".aac", ".aiff", ".aif", ".aifc")
# FFmpeg demuxer names -> the extension we store the upload under
_FORMAT_EXTENSIONS = {"wav": ".wav", "mp3": ".mp3", "flac": ".flac", "ogg": ".ogg", "aiff": ".aiff",
                      "aac": ".aac", "asf": ".wma", "mov,mp4,m4a,3gp,3g2,mj2": ".m4a"}


class VoiceError(ValueError):
    """A reference request that cannot be honoured; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_id(reference_id: object, what: str = "reference_id") -> str:
    if not isinstance(reference_id, str) or not reference_id.strip():
        raise VoiceError(400, f"{what} is required")
    if len(reference_id) > MAX_ID_LENGTH:
        raise VoiceError(400, f"{what} is longer than {MAX_ID_LENGTH} characters")
    if not ID_PATTERN.fullmatch(reference_id):
        raise VoiceError(400, f"{what} may only contain letters, digits, '-', '_' and spaces")
    return reference_id


def audio_extension(data: bytes, filename: str | None) -> str:
    """The extension to store an upload under: the file name's if it is an audio one, else sniffed."""
    if filename:
        suffix = Path(filename).suffix.lower()
        if suffix in AUDIO_EXTENSIONS:
            return suffix
    import io

    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise VoiceError(400, "the uploaded file holds no audio stream")
            name = container.format.name
    except VoiceError:
        raise
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise VoiceError(400, f"the uploaded file is not audio FFmpeg can read: {exc}") from exc
    ext = _FORMAT_EXTENSIONS.get(name)
    if ext is None:
        raise VoiceError(400, f"unsupported audio container {name!r}; use one of {', '.join(AUDIO_EXTENSIONS)}")
    return ext


class ReferenceStore:
    """Add, list, rename and delete named voices; read them back as engine References."""

    def __init__(self, root: Path, *, max_bytes: int = 10 * 1024 * 1024) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()  # add/rename/delete are check-then-act on the file system

    def _dir(self, reference_id: str) -> Path:
        check_id(reference_id)
        root = self.root.resolve()
        path = (root / reference_id).resolve()
        if path.parent != root:  # belt and braces: the pattern already excludes separators and dots
            raise VoiceError(400, "reference_id must name a directory directly under the references root")
        return path

    @staticmethod
    def _samples(directory: Path) -> list[tuple[Path, Path]]:
        """(audio, transcript) pairs: audio files that have a .lab with the same stem."""
        if not directory.is_dir():
            return []
        pairs = []
        for audio in sorted(directory.iterdir()):
            lab = audio.with_suffix(".lab")
            if audio.suffix.lower() in AUDIO_EXTENSIONS and audio.is_file() and lab.is_file():
                pairs.append((audio, lab))
        return pairs

    def exists(self, reference_id: str) -> bool:
        return bool(self._samples(self._dir(reference_id)))

    def list_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and ID_PATTERN.fullmatch(p.name) and self._samples(p))

    def add(self, reference_id: str, audio: bytes, text: str, filename: str | None = None) -> None:
        """Store a new voice. The audio must already be known to decode (the caller checks)."""
        directory = self._dir(reference_id)
        if not audio:
            raise VoiceError(400, "audio is required")
        if len(audio) > self.max_bytes:
            raise VoiceError(413, f"reference audio is {len(audio)} bytes; the limit is {self.max_bytes}")
        if not isinstance(text, str) or not text.strip():
            raise VoiceError(400, "text (the transcript of the audio) is required")
        try:
            transcript = text.strip().encode("utf-8")
        except UnicodeEncodeError:
            raise VoiceError(400, "text (the transcript) is not valid Unicode (it holds a lone surrogate)") from None
        ext = audio_extension(audio, filename)
        with self._lock:
            if directory.exists():
                raise VoiceError(409, f"reference {reference_id!r} already exists")
            self.root.mkdir(parents=True, exist_ok=True)
            # Written in a private folder that is renamed into place: the voice appears complete
            # or not at all, and the folder is removed whatever goes wrong on the way.
            tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=self.root))
            try:
                (tmp / f"sample{ext}").write_bytes(audio)
                (tmp / "sample.lab").write_bytes(transcript)
                tmp.rename(directory)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

    def delete(self, reference_id: str) -> None:
        directory = self._dir(reference_id)
        with self._lock:
            if not directory.is_dir():
                raise VoiceError(404, f"reference {reference_id!r} not found")
            # Renamed away first, so the voice is gone at once even if removing its files fails.
            trash = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".deleted", dir=self.root))
            directory.rename(trash / directory.name)
            shutil.rmtree(trash, ignore_errors=True)

    def rename(self, old_id: str, new_id: str) -> None:
        old, new = self._dir(old_id), self._dir(check_id(new_id, "new_reference_id"))
        with self._lock:
            if not old.is_dir():
                raise VoiceError(404, f"reference {old_id!r} not found")
            if new.exists():
                raise VoiceError(409, f"reference {new_id!r} already exists")
            old.rename(new)

    def get_references(self, reference_id: str) -> tuple[Reference, ...]:
        """Every (audio, transcript) pair of a voice; KeyError for an unknown id."""
        pairs = self._samples(self._dir(reference_id))
        if not pairs:
            raise KeyError(reference_id)
        return tuple(Reference(text=lab.read_text(encoding="utf-8").strip(), audio=audio.read_bytes())
                     for audio, lab in pairs)
