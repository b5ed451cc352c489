"""Tools the server runs itself (phone calls have no client to run one): the tools file.

A JSON or YAML file (`TELEPHONY_TOOLS` / `--telephony-tools`), either a list of tools or

    {"tools": [...], "tool_choice": "auto", "timeout": 5, "headers": {...}}

Each tool is the GA shape `{"type": "function", "name", "description", "parameters"}` plus how it
runs: `url` (an http(s) webhook that gets a POST), and optionally `timeout` (seconds) and `headers`
(e.g. a secret; `${NAME}` in a value is read from the environment, so the secret stays out of the
file). Top-level `timeout` and `headers` are defaults for every tool. The definitions go through
the same validation as a session's `tools`; any problem is a `ToolsFileError` naming the file and
the field, raised at start-up.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from yarl import URL

from engine.agent.tools import AUTO, Tool, ToolChoice, ToolConfigError, check_choice, parse_tool_choice, parse_tools

DEFAULT_TIMEOUT = 5.0  # seconds a webhook may take before the model is told it timed out
MAX_TIMEOUT = 60.0
MAX_FILE_BYTES = 1024 * 1024
RUN_FIELDS = ("url", "timeout", "headers")  # how a tool runs; the rest is its GA definition
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ToolsFileError(ValueError):
    """A tools file that cannot be used; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class WebhookTool:
    tool: Tool
    url: str
    timeout: float = DEFAULT_TIMEOUT
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ServerTools:
    """The tools a phone call's model may call, and how the server runs each."""

    webhooks: tuple[WebhookTool, ...]
    tool_choice: ToolChoice = AUTO
    source: str = ""  # the file they came from, for messages

    @property
    def tools(self) -> tuple[Tool, ...]:
        return tuple(w.tool for w in self.webhooks)

    def webhook(self, name: str) -> WebhookTool | None:
        return next((w for w in self.webhooks if w.tool.name == name), None)

    def narrowed(self, names: list[str], tool_choice: Any = None) -> ServerTools:
        """Only the tools named (a call's `tools` parameter), with a call's own `tool_choice`
        ("auto", "none", "required" or a tool's name); ToolConfigError for an unknown name."""
        webhooks = []
        for name in names:
            found = self.webhook(name)
            if found is None:
                raise ToolConfigError("tools", f"no server tool named {name!r} (the tools file has "
                                               f"{', '.join(w.tool.name for w in self.webhooks) or 'none'})")
            if found not in webhooks:
                webhooks.append(found)
        tools = tuple(w.tool for w in webhooks)
        if tool_choice is None:
            choice = self.tool_choice
            if choice.mode == "function" and choice.name not in names or choice.mode == "required" and not tools:
                choice = AUTO  # the file's choice names a tool this call left out
        elif tool_choice in ("auto", "none", "required"):
            choice = parse_tool_choice(tool_choice, tools)
        else:
            choice = parse_tool_choice({"type": "function", "name": tool_choice}, tools)
        check_choice(choice, tools)
        return dataclasses.replace(self, webhooks=tuple(webhooks), tool_choice=choice)


def load_server_tools(path: str | Path, environ: Mapping[str, str] | None = None) -> ServerTools:
    """Read and check a tools file; ToolsFileError says what is wrong, and where."""
    path = Path(path)
    where = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ToolsFileError(f"tools file {where}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > MAX_FILE_BYTES:
        raise ToolsFileError(f"tools file {where}: larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ToolsFileError(f"tools file {where}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}"
                             f" ({exc})") from None
    try:
        return parse_server_tools(raw, os.environ if environ is None else environ, source=where)
    except ToolConfigError as exc:
        raise ToolsFileError(f"tools file {where}: {exc}") from None


def parse_server_tools(raw: Any, environ: Mapping[str, str], *, source: str = "") -> ServerTools:
    """The file's content -> ServerTools; ToolConfigError naming the field (e.g. `tools[1].url`)."""
    if isinstance(raw, list):
        raw = {"tools": raw}
    if not isinstance(raw, Mapping):
        raise ToolConfigError("(top level)", 'must be a list of tools or an object with "tools"')
    unknown = set(raw) - {"tools", "tool_choice", "timeout", "headers"}
    if unknown:
        raise ToolConfigError("(top level)", f"unknown fields {sorted(unknown)}; "
                                             "known: tools, tool_choice, timeout, headers")
    entries = raw.get("tools")
    if not isinstance(entries, list) or not entries:
        raise ToolConfigError("tools", "must be a non-empty list of tools")
    timeout = _timeout("timeout", raw.get("timeout", DEFAULT_TIMEOUT))
    headers = _headers("headers", raw.get("headers") or {}, environ)
    # The GA definitions, checked exactly as a session's tools are.
    tools = parse_tools([{k: v for k, v in e.items() if k not in RUN_FIELDS} if isinstance(e, Mapping) else e
                         for e in entries])
    webhooks = []
    for i, (entry, tool) in enumerate(zip(entries, tools)):
        webhooks.append(WebhookTool(
            tool, _url(f"tools[{i}].url", entry.get("url")),
            _timeout(f"tools[{i}].timeout", entry.get("timeout", timeout)),
            {**headers, **_headers(f"tools[{i}].headers", entry.get("headers") or {}, environ)}))
    choice = parse_tool_choice(raw.get("tool_choice", "auto"), tools)
    check_choice(choice, tools)
    return ServerTools(tuple(webhooks), choice, source)


def _url(param: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ToolConfigError(param, "each tool needs the http(s) URL of its webhook")
    url = URL(value.strip())
    if url.scheme not in ("http", "https") or not url.host:
        raise ToolConfigError(param, f"must be an http:// or https:// URL, got {value!r}")
    return str(url)


def _timeout(param: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_TIMEOUT:
        raise ToolConfigError(param, f"must be a number of seconds in (0, {MAX_TIMEOUT:g}], got {value!r}")
    return float(value)


def _headers(param: str, value: Any, environ: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ToolConfigError(param, "must be an object of header names to string values")

    def expand(match: re.Match) -> str:
        name = match.group(1)
        if name not in environ:
            raise ToolConfigError(param, f"refers to ${{{name}}}, which is not set in the environment")
        return environ[name]

    return {k: _ENV.sub(expand, v) for k, v in value.items()}
