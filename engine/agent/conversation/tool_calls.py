"""A reply's tool calls: backend call deltas -> calls whose arguments validate, in order.

The LLM stream yields text and `ToolCallDelta`s; this collects each call's arguments, checks
them against the tool's JSON Schema, and gives a call that fails one constrained retry (the
backend is asked again with `tool_choice` naming that tool, which the embedded model answers
under a grammar). A call that still fails ends the reply with a clear reason.
"""
from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence

from engine.agent.reply_stream import ReplyError
from engine.agent.tools import Tool, ToolCallDelta, ToolChoice, argument_problem, tool_by_name

StreamFactory = Callable[[ToolChoice | None], AsyncIterator[object]]  # None: the response's own choice


@dataclasses.dataclass(frozen=True)
class CallStarted:
    index: int
    call_id: str
    name: str


@dataclasses.dataclass(frozen=True)
class CallReady:
    index: int
    call_id: str
    name: str
    arguments: str
    deltas: tuple[str, ...]


@dataclasses.dataclass
class _Pending:
    call_id: str
    name: str | None
    deltas: list[str] = dataclasses.field(default_factory=list)
    announced: bool = False


async def with_tool_calls(stream: StreamFactory, tools: Sequence[Tool],
                          new_call_id: Callable[[], str]) -> AsyncIterator[object]:
    """Text as it comes, `CallStarted` when a call of a configured tool begins, and `CallReady`
    for each call once its arguments validate (after the text, in the backend's call order)."""
    pending: dict[int, _Pending] = {}
    async for item in stream(None):
        if not isinstance(item, ToolCallDelta):
            yield item
            continue
        call = pending.get(item.index)
        if call is None:
            call = pending[item.index] = _Pending(item.call_id or new_call_id(), item.name)
        elif item.name and not call.name:
            call.name = item.name
        if item.arguments:
            call.deltas.append(item.arguments)
        if not call.announced and tool_by_name(tools, call.name) is not None:
            call.announced = True
            yield CallStarted(item.index, call.call_id, call.name)  # type: ignore[arg-type]
    for index in sorted(pending):
        call = pending[index]
        problem = argument_problem(tool_by_name(tools, call.name), "".join(call.deltas))
        if problem is not None:
            await _retry(stream, tools, call)
            again = argument_problem(tool_by_name(tools, call.name), "".join(call.deltas))
            if again is not None:
                raise ReplyError("llm", f"{problem}; a constrained retry failed too: {again}",
                                 code="invalid_tool_call")
        if not call.announced:
            call.announced = True
            yield CallStarted(index, call.call_id, call.name)  # type: ignore[arg-type]
        yield CallReady(index, call.call_id, call.name, "".join(call.deltas), tuple(call.deltas))  # type: ignore[arg-type]


async def _retry(stream: StreamFactory, tools: Sequence[Tool], call: _Pending) -> None:
    """Ask again for this one call, constrained to its tool (or to any tool if the name was wrong)."""
    known = tool_by_name(tools, call.name) is not None
    choice = ToolChoice("function", call.name) if known else ToolChoice("required")
    deltas: list[str] = []
    name = call.name if known else None
    async for item in stream(choice):
        if isinstance(item, ToolCallDelta) and item.index == 0:
            if item.name and name is None:
                name = item.name
            if item.arguments:
                deltas.append(item.arguments)
    if call.announced and name != call.name:
        return  # announced under its name already; the retry may not rename it
    call.name, call.deltas = name, deltas


OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"


async def without_tool_markup(stream: AsyncIterator[object]) -> AsyncIterator[object]:
    """Text with any `<tool_call>...</tool_call>` block left out. Small chat models trained on the
    Hermes format (SmolLM2 among them) write one as plain text when no tools are offered, and it
    must not be spoken. Text that may be the start of a tag is held until it is not."""
    held, inside = "", False
    async for item in stream:
        if not isinstance(item, str):
            yield item
            continue
        held += item
        out = []
        while held:
            tag = CLOSE_TAG if inside else OPEN_TAG
            at = held.find(tag)
            if at >= 0:
                if not inside:
                    out.append(held[:at])
                held, inside = held[at + len(tag):], not inside
                continue
            keep = _partial_tag_length(held, tag)
            if not inside:
                out.append(held[:len(held) - keep])
            held = held[len(held) - keep:]
            break
        if "".join(out):
            yield "".join(out)
    if held and not inside:
        yield held


def _partial_tag_length(text: str, tag: str) -> int:
    """How many characters at the end of `text` could begin `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
