"""The server runs a conversation's tool calls itself, through their webhooks (see server_tools).

A transport that has no client to run tools (a phone call) feeds every conversation event to
`ToolExecutor.observe`. Each call's webhook is POSTed as soon as its arguments are done (parallel
calls run concurrently); when the response ends, the results join the conversation as
`function_call_output` items in call order and the follow-up response is created, so the caller
hears the answer. A webhook that fails, times out or answers non-2xx gives the model
`{"error": ...}` instead: the call goes on. Barge-in (the caller speaks while tools run) and a
cancelled or failed response cancel the runs; their calls are answered with an error output, so
the history never holds a call without its output.

Transport-agnostic: only the conversation's events and methods are used.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from engine.agent.conversation import ConversationSession
from engine.agent.conversation.events import (ConversationEvent, FunctionCallDone, ResponseCreated, ResponseDone,
                                              UserSpeechStarted)
from engine.agent.tools import ToolChoice
from signaling.server_tools import ServerTools

log = logging.getLogger(__name__)

MAX_ROUNDS = 3  # follow-ups in a row that may call tools again (then the model must answer)
MAX_OUTPUT_BYTES = 16 * 1024  # a webhook's answer; longer is an error (it would swamp the model)
KEEP_RUNS = 64
NONE = ToolChoice("none")

# Called with (tool name, outcome, seconds) for every run: outcome is ok, http_error, timeout,
# unreachable, too_long or cancelled.
ObserveRun = Callable[[str, str, float], None]


@dataclasses.dataclass
class ToolRun:
    response_id: str
    call_id: str
    name: str
    arguments: Any
    t_started: float = 0.0
    t_answered: float | None = None
    outcome: str = "running"
    output: str | None = None
    task: asyncio.Task | None = None


@dataclasses.dataclass
class ExecutorStats:
    runs: int = 0
    failures: int = 0  # http_error, timeout, unreachable, too_long
    cancelled: int = 0
    follow_ups: int = 0


class ToolExecutor:
    def __init__(self, conversation: ConversationSession, tools: ServerTools, *, session: Mapping[str, Any],
                 observe: ObserveRun | None = None, max_rounds: int = MAX_ROUNDS) -> None:
        self.conversation = conversation
        self.tools = tools
        self.session = dict(session)  # sent with every webhook: which call this is
        self.observe_run = observe
        self.max_rounds = max_rounds
        self.stats = ExecutorStats()
        self.runs: collections.deque[ToolRun] = collections.deque(maxlen=KEEP_RUNS)
        self._open: dict[str, list[ToolRun]] = {}  # response id -> its runs, until answered
        self._finishing: dict[str, asyncio.Task] = {}
        self._follow_ups: set[str] = set()  # responses this executor created
        self._rounds = 0
        self._http: aiohttp.ClientSession | None = None
        self._closed = False

    # ------------------------------------------------------------------ events in
    def observe(self, event: ConversationEvent) -> None:
        """Feed every conversation event, in order."""
        if self._closed:
            return
        if isinstance(event, FunctionCallDone):
            self._start(event)
        elif isinstance(event, ResponseDone) and event.response_id in self._open:
            if event.status == "completed":
                self._finishing[event.response_id] = asyncio.get_running_loop().create_task(
                    self._answer(event.response_id), name=f"tools:{event.response_id}")
            else:
                self._abandon(event.response_id, f"not run: the response was {event.status}")
        elif isinstance(event, UserSpeechStarted):
            self._rounds = 0
            detection = self.conversation.turn_detection
            if detection is not None and detection.interrupt_response:
                for response_id in list(self._open):
                    self._abandon(response_id, "cancelled: the caller spoke before the tool answered")
        elif isinstance(event, ResponseCreated) and event.response_id not in self._follow_ups:
            self._rounds = 0  # a new user turn (spoken or typed)

    def _start(self, event: FunctionCallDone) -> None:
        webhook = self.tools.webhook(event.name)
        run = ToolRun(event.response_id, event.call_id, event.name, json.loads(event.arguments),
                      t_started=time.monotonic())
        self._open.setdefault(event.response_id, []).append(run)
        self.runs.append(run)
        self.stats.runs += 1
        if webhook is None:  # the session's tools are the file's, so this is a configuration slip
            self._done(run, "unreachable", _error(f"the server has no webhook for tool {event.name!r}"))
            return
        run.task = asyncio.get_running_loop().create_task(self._call(run, webhook), name=f"tool:{event.call_id}")

    # ------------------------------------------------------------------ one webhook
    async def _call(self, run: ToolRun, webhook) -> None:
        body = {"call_id": run.call_id, "name": run.name, "arguments": run.arguments, "session": self.session}
        if self._http is None:
            self._http = aiohttp.ClientSession()
        try:
            async with self._http.post(webhook.url, json=body, headers=dict(webhook.headers),
                                       timeout=aiohttp.ClientTimeout(total=webhook.timeout),
                                       allow_redirects=False) as resp:
                data = await resp.content.read(MAX_OUTPUT_BYTES + 1)
                text = data.decode("utf-8", "replace").strip()
                if not 200 <= resp.status < 300:
                    detail = {"detail": text[:200]} if text else {}
                    self._done(run, "http_error", _error(f"the tool {run.name} failed (HTTP {resp.status})", **detail))
                elif len(data) > MAX_OUTPUT_BYTES:
                    self._done(run, "too_long", _error(f"the tool {run.name} answered more than "
                                                       f"{MAX_OUTPUT_BYTES} bytes"))
                else:
                    self._done(run, "ok", text or "{}")
        except asyncio.TimeoutError:
            self._done(run, "timeout", _error(f"the tool {run.name} did not answer within {webhook.timeout:g} s"))
        except aiohttp.ClientError as exc:
            log.debug("tool webhook %s: %r", webhook.url, exc)
            self._done(run, "unreachable", _error(f"the tool {run.name} could not be reached"))

    def _done(self, run: ToolRun, outcome: str, output: str) -> None:
        run.t_answered = time.monotonic()
        run.outcome, run.output = outcome, output
        seconds = run.t_answered - run.t_started
        if outcome == "ok":
            log.info("tool %s (%s) answered in %.0f ms", run.name, run.call_id, seconds * 1000)
        elif outcome == "cancelled":
            self.stats.cancelled += 1
            log.info("tool %s (%s) cancelled: %s", run.name, run.call_id, output)
        else:
            self.stats.failures += 1
            log.warning("tool %s (%s) %s after %.0f ms: %s", run.name, run.call_id, outcome, seconds * 1000, output)
        if self.observe_run is not None:
            self.observe_run(run.name, outcome, seconds)

    # ------------------------------------------------------------------ results -> the conversation
    async def _answer(self, response_id: str) -> None:
        """The response has ended: wait for its runs, add their outputs, create the follow-up."""
        try:
            runs = self._open.get(response_id, [])
            await asyncio.gather(*(r.task for r in runs if r.task is not None), return_exceptions=True)
            if self._open.pop(response_id, None) is None:
                return  # abandoned meanwhile
            for run in runs:
                self.conversation.add_function_output(run.call_id, run.output or _error("no output"))
            self._rounds += 1
            choice = self.tools.tool_choice
            # A forced choice (a named tool, "required") is for the turn's first response; the
            # follow-up must be free to answer, and a chain of calls stops after max_rounds.
            if choice.mode in ("function", "required") or self._rounds >= self.max_rounds:
                choice = NONE
            self.stats.follow_ups += 1
            follow_up = await self.conversation.create_response(tool_choice=choice)
            if follow_up is not None:
                self._follow_ups.add(follow_up)
        except RuntimeError:
            return  # the conversation closed meanwhile
        except Exception:  # never the call's end: log it, the caller can speak again
            log.exception("answering the tool calls of %s failed", response_id)
        finally:
            self._finishing.pop(response_id, None)

    def _abandon(self, response_id: str, why: str) -> None:
        """Cancel a response's runs and answer its calls with `why` (so none is left without output)."""
        runs = self._open.pop(response_id, [])
        finishing = self._finishing.pop(response_id, None)
        if finishing is not None:
            finishing.cancel()
        for run in runs:
            if run.task is not None and not run.task.done():
                run.task.cancel()
            if run.t_answered is None:
                self._done(run, "cancelled", _error(why))
            try:
                self.conversation.add_function_output(run.call_id, _error(why) if run.outcome == "cancelled"
                                                      else run.output or _error(why))
            except (LookupError, RuntimeError):
                pass  # the call never joined the conversation, or it is closed

    @property
    def busy(self) -> bool:
        """Tools are running (or their answer is being prepared)."""
        return bool(self._open)

    async def close(self) -> None:
        self._closed = True
        tasks = [r.task for runs in self._open.values() for r in runs if r.task is not None]
        tasks += list(self._finishing.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()


def _error(message: str, **extra: Any) -> str:
    return json.dumps({"error": message, **extra})
