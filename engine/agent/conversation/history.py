"""The conversation's items: user turns (typed or spoken), system notes, the replies as heard,
and tool calls with their outputs.

Every item has an id (a client may choose it), so a transport can retrieve, delete or truncate
it; the chat LLM sees Chat Completions messages (calls as an assistant's `tool_calls`, outputs as
`tool` messages).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from engine.agent.llm.base import validate_messages

Role = Literal["user", "assistant", "system", "tool"]
Source = Literal["text", "audio"]  # typed, or spoken (user) / synthesised (assistant)
ItemType = Literal["message", "function_call", "function_call_output"]


@dataclasses.dataclass
class HistoryItem:
    id: str
    role: Role
    text: str  # a message's text, a call's arguments (JSON) or a call's output
    source: Source = "text"
    type: ItemType = "message"
    call_id: str | None = None
    name: str | None = None  # the tool a call is for

    def message(self) -> dict[str, str]:
        return {"role": self.role, "content": self.text}


def chat_messages(items: list[HistoryItem]) -> list[dict]:
    """Items as Chat Completions messages: consecutive calls join the assistant message before them."""
    out: list[dict] = []
    for item in items:
        if item.type == "function_call":
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.text}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_call_id" not in last:
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif item.type == "function_call_output":
            if any(i.type == "function_call" and i.call_id == item.call_id for i in items):
                out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text})
            # else: its call was deleted; a lone tool message is refused by Chat Completions servers
        else:
            out.append(item.message())
    return out


class History:
    def __init__(self, messages: list[dict] | None = None, *, new_id=None) -> None:
        checked = validate_messages([dict(m) for m in (messages or [])], allow_empty=True)
        self._new_id = new_id or (lambda prefix: f"{prefix}_{id(object())}")
        self._items: list[HistoryItem] = [HistoryItem(self._new_id("item"), m["role"], m["content"])
                                          for m in checked]

    @property
    def messages(self) -> list[dict]:
        """Copies as {"role", "content"} (messages only); the live items are never handed out."""
        return [item.message() for item in self._items if item.type == "message"]

    def items(self) -> list[HistoryItem]:
        return [dataclasses.replace(item) for item in self._items]

    def window(self) -> list[dict]:
        """What the chat LLM sees, tool calls and outputs included."""
        return chat_messages(self._items)

    def add_call(self, item_id: str, call_id: str, name: str, arguments: str) -> HistoryItem:
        item = HistoryItem(item_id, "assistant", arguments, type="function_call", call_id=call_id, name=name)
        self._items.append(item)
        return item

    def find_call(self, call_id: str) -> HistoryItem | None:
        return next((i for i in self._items if i.type == "function_call" and i.call_id == call_id), None)

    def add_call_output(self, call_id: str, output: str, *, item_id: str | None = None) -> HistoryItem:
        if item_id is not None and self.get(item_id) is not None:
            raise ValueError(f"an item with id {item_id!r} already exists")
        if self.find_call(call_id) is None:
            raise LookupError(f"no function call with call_id {call_id!r} in this conversation")
        item = HistoryItem(item_id or self._new_id("item"), "tool", output, type="function_call_output",
                           call_id=call_id)
        self._items.append(item)
        return item

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
