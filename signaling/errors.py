"""The one error type of call set-up, carrying the HTTP status the signaling route answers with."""
from __future__ import annotations


class CallError(Exception):
    """A call that cannot be set up; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param
