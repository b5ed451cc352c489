"""The one error the codec loader raises for a file that does not hold a usable codec."""
from __future__ import annotations

from engine.fish.checkpoint import CheckpointError


class CodecCheckpointError(CheckpointError):
    """codec.pth is unreadable, has missing/unexpected keys, or shapes that do not fit together.

    A subclass of the engine's CheckpointError so callers that already report checkpoint
    problems (CLI, server start-up) report this one too.
    """
