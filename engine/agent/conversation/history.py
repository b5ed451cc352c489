"""The conversation's items: user turns (typed or spoken), system notes and the replies as heard.

Every item has an id (a client may choose it), so a transport can retrieve, delete or truncate
it; the chat LLM sees plain {"role", "content"} messages.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from engine.agent.llm.base import validate_messages

Role = Literal["user", "assistant", "system"]
Source = Literal["text", "audio"]  # typed, or spoken (user) / synthesised (assistant)


@dataclasses.dataclass
class HistoryItem:
    id: str
    role: Role
    text: str
    source: Source = "text"

    def message(self) -> dict[str, str]:
        return {"role": self.role, "content": self.text}


class History:
    def __init__(self, messages: list[dict] | None = None, *, new_id=None) -> None:
        checked = validate_messages([dict(m) for m in (messages or [])], allow_empty=True)
        self._new_id = new_id or (lambda prefix: f"{prefix}_{id(object())}")
        self._items: list[HistoryItem] = [HistoryItem(self._new_id("item"), m["role"], m["content"])
                                          for m in checked]

    @property
    def messages(self) -> list[dict]:
        """Copies as {"role", "content"}; the live items are never handed out."""
        return [item.message() for item in self._items]

    def items(self) -> list[HistoryItem]:
        return [dataclasses.replace(item) for item in self._items]

    def window(self) -> list[dict]:
        return self.messages

    def add(self, role: Role, text: str, *, item_id: str | None = None, source: Source = "text") -> HistoryItem:
        if item_id is not None and self.get(item_id) is not None:
            raise ValueError(f"an item with id {item_id!r} already exists")
        item = HistoryItem(item_id or self._new_id("item"), role, text, source)
        self._items.append(item)
        return item

    def add_user(self, text: str, *, item_id: str | None = None, source: Source = "text") -> HistoryItem:
        return self.add("user", text, item_id=item_id, source=source)

    def get(self, item_id: str) -> HistoryItem | None:
        return next((item for item in self._items if item.id == item_id), None)

    def previous_id(self, item_id: str) -> str | None:
        ids = [item.id for item in self._items]
        index = ids.index(item_id) if item_id in ids else len(ids)
        return ids[index - 1] if index > 0 else None

    def delete(self, item_id: str) -> None:
        item = self.get(item_id)
        if item is None:
            raise KeyError(item_id)
        self._items.remove(item)

    def record_reply(self, resp, text: str) -> None:
        """Put the heard reply in the history (agent replies only; TTS requests are not turns).
        Called again as what was heard shrinks; an empty reply leaves no item."""
        if resp.kind != "agent":
            return
        text = text.strip()
        current = self.get(resp.item_id) if resp.in_history else None
        if current is None:
            if text:
                self._items.append(HistoryItem(resp.item_id, "assistant", text,
                                               "audio" if resp.audio_seconds > 0 else "text"))
                resp.in_history = True
        elif text:
            current.text = text
        else:
            self._items.remove(current)
            resp.in_history = False
