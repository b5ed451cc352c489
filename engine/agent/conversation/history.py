"""The conversation's chat history: user turns and the replies as heard."""
from __future__ import annotations

from engine.agent.conversation.playout import Response
from engine.agent.llm.base import validate_messages


class History:
    def __init__(self, messages: list[dict] | None = None) -> None:
        self._messages: list[dict] = [dict(m) for m in (messages or [])]
        validate_messages(self._messages, allow_empty=True)  # bad history fails here, not at the first reply

    @property
    def messages(self) -> list[dict]:
        """A copy; the live list is never handed out."""
        return [dict(m) for m in self._messages]

    def add_user(self, text: str) -> None:
        self._messages.append({"role": "user", "content": text})

    def window(self) -> list[dict]:
        return self._messages

    def record_reply(self, resp: Response, text: str) -> None:
        """Put the heard reply in the history (agent replies only; TTS requests are not turns).
        Called again as what was heard shrinks; an empty reply leaves no message."""
        if resp.kind != "agent":
            return
        text = text.strip()
        if resp.history_item is None:
            if text:
                resp.history_item = {"role": "assistant", "content": text}
                self._messages.append(resp.history_item)
        elif text:
            resp.history_item["content"] = text
        else:
            self._messages = [m for m in self._messages if m is not resp.history_item]
            resp.history_item = None
