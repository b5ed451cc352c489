"""Function calling (tools): definitions, the tool choice, calls and argument validation.

A tool is the GA Realtime shape `{"type": "function", "name", "description", "parameters"}` with
a JSON Schema for its arguments. Schemas are checked with `jsonschema` when a session is
configured, and a call's arguments are validated against them before the call is announced done.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jsonschema

TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_TOOLS = 128
ChoiceMode = Literal["auto", "none", "required", "function"]


class ToolConfigError(ValueError):
    """A bad tool definition or tool choice; `param` names the field (relative, e.g. `tools[0].name`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: Mapping[str, Any]

    def wire(self) -> dict[str, Any]:
        """The GA Realtime shape (also what the session reports back)."""
        return {"type": "function", "name": self.name, "description": self.description,
                "parameters": dict(self.parameters)}

    def chat_completions(self) -> dict[str, Any]:
        """The Chat Completions shape that OpenAI-compatible servers take."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": dict(self.parameters)}}


@dataclasses.dataclass(frozen=True)
class ToolChoice:
    mode: ChoiceMode = "auto"
    name: str | None = None  # mode == "function": the one tool to call

    def wire(self) -> str | dict[str, str]:
        return {"type": "function", "name": self.name or ""} if self.mode == "function" else self.mode

    def chat_completions(self) -> str | dict[str, Any]:
        return {"type": "function", "function": {"name": self.name}} if self.mode == "function" else self.mode


AUTO = ToolChoice()


def may_call_tools(tools: Sequence[Tool], choice: ToolChoice | None) -> bool:
    """Whether a request with these tools lets the model call one (no choice means "auto")."""
    return bool(tools) and (choice is None or choice.mode != "none")


@dataclasses.dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a call streamed by an LLM backend. `index` tells parallel calls apart; the
    first piece of a call carries its name (and the backend's id, when it has one)."""

    index: int
    name: str | None = None
    call_id: str | None = None
    arguments: str = ""


@dataclasses.dataclass(frozen=True)
class ToolCall:
    call_id: str
    name: str
    arguments: str  # a JSON object, as text

    def chat_completions(self) -> dict[str, Any]:
        return {"id": self.call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_tools(raw: Any) -> tuple[Tool, ...]:
    """GA tool definitions -> Tools, or ToolConfigError naming the bad field."""
    if not isinstance(raw, list):
        raise ToolConfigError("tools", "must be a list of tool definitions")
    if len(raw) > MAX_TOOLS:
        raise ToolConfigError("tools", f"at most {MAX_TOOLS} tools")
    tools: list[Tool] = []
    for i, entry in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(entry, Mapping):
            raise ToolConfigError(where, "must be an object")
        if entry.get("type", "function") != "function":
            raise ToolConfigError(f"{where}.type", "only function tools are supported")
        if "function" in entry and "name" not in entry:  # the Chat Completions nesting, taken as well
            entry = {**entry["function"]} if isinstance(entry["function"], Mapping) else entry
        name = entry.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise ToolConfigError(f"{where}.name", "must match ^[a-zA-Z0-9_-]{1,64}$")
        if any(t.name == name for t in tools):
            raise ToolConfigError(f"{where}.name", f"duplicate tool name {name!r}")
        description = entry.get("description") or ""
        if not isinstance(description, str):
            raise ToolConfigError(f"{where}.description", "must be a string")
        parameters = entry.get("parameters", {"type": "object", "properties": {}})
        tools.append(Tool(name, description, _check_schema(f"{where}.parameters", parameters)))
    return tuple(tools)


def _check_schema(param: str, schema: Any) -> dict[str, Any]:
    if not isinstance(schema, Mapping) or schema.get("type", "object") != "object":
        raise ToolConfigError(param, 'must be a JSON Schema of type "object"')
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ToolConfigError(param, f"not a valid JSON Schema: {exc.message}") from None
    return {"type": "object", **schema}


def parse_tool_choice(raw: Any, tools: Sequence[Tool] | None) -> ToolChoice:
    """"auto" | "none" | "required" | {"type": "function", "name"} (the Chat Completions nesting too).
    With `tools` None the name is checked later, against the tools in force (`check_choice`)."""
    if raw in ("auto", "none", "required"):
        return ToolChoice(raw)
    if isinstance(raw, Mapping) and raw.get("type") == "function":
        name = raw.get("name") or (raw.get("function") or {}).get("name")
        if not isinstance(name, str):
            raise ToolConfigError("tool_choice.name", "must name a tool")
        if tools is not None and not any(t.name == name for t in tools):
            raise ToolConfigError("tool_choice.name", f"no tool named {name!r} is configured")
        return ToolChoice("function", name)
    raise ToolConfigError("tool_choice", 'must be "auto", "none", "required" or {"type": "function", "name": ...}')


def check_choice(choice: ToolChoice, tools: Sequence[Tool]) -> None:
    """A named choice must name one of `tools` (kept consistent when tools change alone)."""
    if choice.mode == "function" and not any(t.name == choice.name for t in tools):
        raise ToolConfigError("tool_choice.name", f"no tool named {choice.name!r} is configured")
    if choice.mode == "required" and not tools:
        raise ToolConfigError("tool_choice", '"required" needs at least one tool')


def argument_problem(tool: Tool | None, arguments: str) -> str | None:
    """Why `arguments` cannot be this tool's arguments, or None when they validate."""
    if tool is None:
        return "the model called a tool that is not configured"
    try:
        value = json.loads(arguments)
    except (json.JSONDecodeError, RecursionError) as exc:
        return f"the arguments of {tool.name} are not JSON ({exc})"
    if not isinstance(value, dict):
        return f"the arguments of {tool.name} are not a JSON object"
    error = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(tool.parameters)(
        tool.parameters).iter_errors(value))
    return None if error is None else f"the arguments of {tool.name} do not match its schema: {error.message}"


def tool_by_name(tools: Sequence[Tool], name: str | None) -> Tool | None:
    return next((t for t in tools if t.name == name), None)
