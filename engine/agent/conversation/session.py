"""`ConversationSession`: one conversation's configuration, history, turns and responses.

Speech in -> VAD turn -> ASR transcript -> LLM reply streamed -> sentences -> TTS per sentence
-> audio out, each stage starting as soon as its input exists. A transport feeds `push_audio` /
`send_text` / `speak` and forwards what `outputs()` yields (see `events`).

Barge-in: when the user starts speaking while a response is generating or its audio is still
playing, generation stops, queued audio is cleared, and the history keeps only what was heard.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Literal

import numpy as np

from engine.agent.conversation.events import Output, TurnDetection, UserDtmf, UserTranscript
from engine.agent.conversation.history import History, HistoryItem, Role
from engine.agent.conversation.outputs import OutputQueue
from engine.agent.conversation.responses import Responder, tts_request
from engine.agent.conversation.speculation import ReplyPlan, Speculation
from engine.agent.conversation.tool_calls import with_tool_calls, without_tool_markup
from engine.agent.conversation.turns import TurnInput
from engine.agent.llm.base import ChatOptions, build_messages
from engine.agent.reply_stream import ReplyError, one_shot, spoken_reply
from engine.agent.smart_turn import SemanticTurnDetection
from engine.agent.tools import AUTO, Tool, ToolChoice, check_choice, may_call_tools
from engine.speech.types import Reference, SamplingOptions, SpeechSynthesizer, TTSRequest

if TYPE_CHECKING:
    from engine.agent.asr import Transcriber
    from engine.agent.llm.base import ChatLLM
    from engine.agent.smart_turn import SmartTurn
    from engine.agent.vad import SileroVAD

log = logging.getLogger(__name__)

DEFAULT_INSTRUCTIONS = (
    "You are a friendly voice assistant. Answer in one or two short spoken sentences, "
    "without lists, markdown or emoji."
)
Mode = Literal["agent", "tts"]
DTMF_DIGITS = "0123456789*#ABCD"


def _choice_fits(choice: ToolChoice, tools: tuple[Tool, ...]) -> bool:
    try:
        check_choice(choice, tools)
    except ValueError:
        return False
    return True


class ConversationSession:
    """All methods are called from one asyncio loop. Model work (ASR, LLM, TTS) runs off the loop
    inside the model wrappers; VAD (~0.1 ms per 32 ms frame) runs inline in `push_audio`, which
    awaits semantic_vad's Smart Turn (run on a thread) when a pause asks it."""

    def __init__(
        self,
        *,
        tts: SpeechSynthesizer | None,
        asr: "Transcriber",
        llm: "ChatLLM | None",
        vad_model: "SileroVAD",
        smart_turn: "SmartTurn | None" = None,
        mode: Mode = "agent",
        voice: tuple[Reference, ...] = (),
        instructions: str = DEFAULT_INSTRUCTIONS,
        turn_detection: TurnDetection | SemanticTurnDetection | None = TurnDetection(),
        sampling: SamplingOptions = SamplingOptions(),
        history: list[dict] | None = None,
        chat: ChatOptions = ChatOptions(),
        speech: TTSRequest = TTSRequest(text=""),
        tools: tuple[Tool, ...] = (),
        tool_choice: ToolChoice = AUTO,
        speculate: bool = True,
        on_speculation: Callable[[str], None] | None = None,
    ) -> None:
        """`smart_turn` (the shared Smart Turn model) makes `SemanticTurnDetection` available.
        `chat` sets the LLM's reply length/temperature; `speech` is the TTS request template
        (chunk_length, normalize, ...): its text, voice and sampling are filled in per sentence.
        `speculate`: start a turn's reply from the transcript of its pause, before the turn ends
        (speculation.py); it is dropped unseen if the turn does not end as that transcript said.
        `on_speculation(outcome)` is told each "started", "adopted" and "dropped" (server metrics)."""
        self._tts = tts
        self._llm = llm
        self._ids = itertools.count(1)
        self._history = History(history, new_id=self._new_id)
        self.mode: Mode = "agent"
        self.voice: tuple[Reference, ...] = ()
        self.instructions = instructions
        self.sampling = sampling
        self.chat = chat
        self.speech = speech
        self.tools: tuple[Tool, ...] = ()
        self.tool_choice: ToolChoice = AUTO
        # Whether the responses a user turn starts (server VAD) are spoken; a text-only session says no.
        self.speak_replies = True
        self._outputs = OutputQueue()
        self._tts_text: list[str] = []  # TTS mode: typed text waiting for create_response
        self._tasks: set[asyncio.Task] = set()
        self.speculate = speculate
        self._speculation: Speculation | None = None  # a reply started before its turn ended
        self.speculations = {"started": 0, "adopted": 0, "dropped": 0}
        self._on_speculation = on_speculation
        self._responses = Responder(tts=tts, outputs=self._outputs, history=self._history, spawn=self._spawn,
                                    new_id=self._new_id)
        self._turns = TurnInput(asr=asr, vad_model=vad_model, outputs=self._outputs, spawn=self._spawn,
                                new_id=self._new_id, on_speech_started=self._on_speech_started,
                                on_transcript=self._on_transcript, smart_turn=smart_turn,
                                on_likely_transcript=self._speculate, on_transcript_void=self._drop_speculation)
        self.update(mode=mode, voice=voice, turn_detection=turn_detection, tools=tools, tool_choice=tool_choice)

    # ------------------------------------------------------------------ configuration
    def update(self, *, mode: Mode | None = None, voice: tuple[Reference, ...] | None = None,
               instructions: str | None = None,
               turn_detection: TurnDetection | SemanticTurnDetection | None | Literal["keep"] = "keep",
               sampling: SamplingOptions | None = None, chat: ChatOptions | None = None,
               tools: tuple[Tool, ...] | None = None, tool_choice: ToolChoice | None = None) -> None:
        """Change session settings (session.update). `turn_detection=None` switches to manual turns
        (push_audio buffers; commit_audio ends a turn); leave it out to keep the current setting.
        Tools and tool choice are checked together before either changes (ToolConfigError)."""
        new_tools = self.tools if tools is None else tuple(tools)
        new_choice = self.tool_choice if tool_choice is None else tool_choice
        check_choice(new_choice, new_tools)
        if turn_detection != "keep":
            self._turns.check(turn_detection)  # type: ignore[arg-type]
        if mode is not None:
            if mode not in ("agent", "tts"):
                raise ValueError(f"mode must be 'agent' or 'tts', got {mode!r}")
            if mode == "agent" and self._llm is None:
                raise ValueError("agent mode needs an agent LLM (none is configured)")
            self.mode = mode
        if voice is not None:
            if not all(isinstance(r, Reference) for r in voice):
                raise ValueError("voice must be a tuple of Reference")
            self.voice = tuple(voice)
        if instructions is not None:
            self.instructions = instructions
        if sampling is not None:
            self.sampling = sampling
        if chat is not None:
            self.chat = chat
        if turn_detection != "keep":
            self._turns.configure(turn_detection)  # type: ignore[arg-type]
        self.tools, self.tool_choice = new_tools, new_choice

    @property
    def turn_detection(self) -> TurnDetection | SemanticTurnDetection | None:
        return self._turns.turn_detection

    @property
    def history(self) -> list[dict]:
        return self._history.messages

    # ------------------------------------------------------------------ input
    async def push_audio(self, pcm16k: np.ndarray) -> None:
        """Float32 mono 16 kHz, any length. Runs VAD; may emit turns and barge-in."""
        self._check_open()
        await self._turns.push(pcm16k)

    async def commit_audio(self) -> None:
        """Manual turns: treat the buffered audio (or a turn in progress) as one user turn."""
        self._check_open()
        await self._turns.commit()

    def clear_audio(self) -> None:
        """Drop buffered input audio and any turn in progress (input_audio_buffer.clear)."""
        self._turns.clear()

    async def send_text(self, text: str, *, respond: bool = True) -> None:
        """A typed user message (conversation.item.create + optional response.create).
        In TTS mode the text is spoken as given instead."""
        self.add_message("user", text)
        if respond:
            await self.create_response()

    def add_message(self, role: Role, text: str, *, item_id: str | None = None) -> str:
        """Add a typed item to the conversation; returns its id. In TTS mode user text waits to be
        spoken by the next create_response instead (it does not enter the history)."""
        self._check_open()
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text must be a non-empty string")
        if role not in ("user", "assistant", "system"):
            raise ValueError(f"role must be user, assistant or system, got {role!r}")
        if self.mode == "tts" and role == "user":
            self._tts_text.append(text.strip())
            return item_id or self._new_id("item")
        return self._history.add(role, text.strip(), item_id=item_id).id

    async def create_response(self, *, instructions: str | None = None, text_only: bool = False,
                              voice: tuple[Reference, ...] | None = None, tools: tuple[Tool, ...] | None = None,
                              tool_choice: ToolChoice | None = None) -> str | None:
        """Respond to the history as it stands; in TTS mode, speak the text sent since the last
        response. `instructions`, `voice`, `tools` and `tool_choice` apply to this response only.
        Returns its id."""
        self._check_open()
        if self.mode == "tts":
            if not self._tts_text:
                raise ValueError("in TTS mode, response.create speaks the text of conversation.item.create "
                                 "events; send one first (or use tts.request)")
            text, self._tts_text = " ".join(self._tts_text), []
            return await self.speak(text, voice=voice)
        if self._llm is None:
            self._outputs.error("invalid_request_error", "no_agent", "response.create needs agent mode with an LLM")
            return None
        tools = self.tools if tools is None else tuple(tools)
        # The session's choice, unless this response's own tools leave out the tool it names.
        tool_choice = tool_choice or (self.tool_choice if _choice_fits(self.tool_choice, tools) else AUTO)
        check_choice(tool_choice, tools)
        return self._start_agent_response(instructions=instructions, speak=not text_only, voice=voice,
                                          tools=tools, tool_choice=tool_choice)

    async def speak(self, text: str, *, sampling: SamplingOptions | None = None,
                    voice: tuple[Reference, ...] | None = None) -> str:
        """Say exactly `text` in the session voice (a TTS request); returns the response id.
        The speech queues behind a response in progress; it does not enter the history."""
        self._check_open()
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text must be a non-empty string")
        if self._tts is None:
            raise ValueError("no TTS engine is configured")
        exact = text.strip()
        return self._responses.start("tts", lambda: one_shot(exact), self._speech_request(sampling, voice))

    async def cancel_response(self, reason: str = "client_cancelled") -> None:
        """Stop LLM and TTS now; clear queued audio; keep only the heard text in the history."""
        await self._responses.cancel(reason)

    def dtmf(self, digit: str) -> None:
        """A telephone key press from the caller: yielded as a UserDtmf event, in order with the rest."""
        self._check_open()
        if not isinstance(digit, str) or len(digit) != 1 or digit.upper() not in DTMF_DIGITS:
            raise ValueError(f"a DTMF digit is one of {DTMF_DIGITS}, got {digit!r}")
        self._outputs.emit(UserDtmf(digit=digit.upper()))

    # ------------------------------------------------------------------ items
    def items(self) -> list[HistoryItem]:
        return self._history.items()

    def get_item(self, item_id: str) -> HistoryItem | None:
        return self._history.get(item_id)

    def previous_item_id(self, item_id: str) -> str | None:
        return self._history.previous_id(item_id)

    def add_function_output(self, call_id: str, output: str, *, item_id: str | None = None) -> HistoryItem:
        """The client's result of a tool call (function_call_output); LookupError for an unknown call."""
        self._check_open()
        if not isinstance(output, str):
            raise ValueError("a function call's output must be a string")
        return self._history.add_call_output(call_id, output, item_id=item_id)

    def delete_item(self, item_id: str) -> None:
        """Remove an item from the history (KeyError if there is none with that id)."""
        self._history.delete(item_id)

    async def truncate_item(self, item_id: str, audio_end_ms: int) -> None:
        """Only `audio_end_ms` of this reply was heard: the history keeps that much of its text; a
        reply still playing is stopped there (barge-in by a client that only truncates)."""
        self._check_open()
        resp = self._responses.by_item(item_id)
        if resp is None:
            item = self._history.get(item_id)
            if item is None:
                raise KeyError(item_id)
            if item.role != "assistant" or item.type != "message":
                raise ValueError("only assistant messages can be truncated")
            return  # an old reply whose audio schedule is gone: nothing more is known of what was heard
        if audio_end_ms < 0 or audio_end_ms > resp.audio_seconds * 1000 + 1:
            raise ValueError(f"audio_end_ms must be between 0 and the reply's {int(resp.audio_seconds * 1000)} ms")
        await self._responses.truncate(resp, audio_end_ms)

    def mark_played(self, response_id: str, seconds: float) -> None:
        """The transport reports how many seconds of a response's audio were actually played.
        Report as audio goes out (say per 20 ms frame); the latest report wins."""
        self._responses.mark_played(response_id, seconds)

    # ------------------------------------------------------------------ output
    def outputs(self) -> AsyncIterator[Output]:
        """Events and audio, in order; ends after close(). One consumer at a time: leaving an
        `async for` early loses nothing, and a later outputs() call continues where it stopped."""
        return self._outputs.stream()

    async def close(self) -> None:
        """Stop every task of this session and end outputs(). Shared models stay loaded."""
        if self._outputs.closed:
            return
        self._outputs.closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._outputs.close()

    # ------------------------------------------------------------------ turns -> responses
    async def _on_speech_started(self, item_id: str) -> None:
        self._drop_speculation()  # it answered a turn that has ended, or one that was dropped
        detection = self.turn_detection
        if detection is not None and detection.interrupt_response and self._responses.active():
            await self._responses.cancel("turn_detected")
        self._prefill_llm()

    def _prefill_llm(self) -> None:
        """While the user speaks, have the LLM evaluate the conversation up to their turn (a backend
        that can: EmbeddedLLM.prefill), so that the reply evaluates only their words."""
        prefill = getattr(self._llm, "prefill", None)
        if prefill is None or self.mode != "agent":
            return
        # The messages the reply will be asked with, less the turn being spoken (which may push
        # the oldest message out of the history window, so it is counted in).
        window = self._history.window() + [{"role": "user", "content": ""}]
        try:
            messages = build_messages(self.instructions, window, self.chat.history_window)[:-1]
        except ValueError:
            return
        if messages:
            self._spawn(prefill(messages, tools=self.tools, tool_choice=self.tool_choice))

    def _on_transcript(self, event: UserTranscript, t_speech_stopped: float, respond: bool) -> None:
        speculation, self._speculation = self._speculation, None
        if not event.transcript.strip() or self.mode != "agent":
            self._void(speculation)
            return  # a cough or noise, or TTS mode: nothing to answer
        self._history.add_user(event.transcript, item_id=event.item_id, source="audio")
        # If the user has already started another turn, answering now would talk over them:
        # that turn's response will answer both.
        detection = self.turn_detection
        talking_again = self._turns.user_speaking and detection is not None and detection.interrupt_response
        if respond and self._llm is not None and not talking_again:
            self._start_agent_response(speak=self.speak_replies, t_speech_stopped=t_speech_stopped,
                                       t_transcript=event.t, speculation=speculation)
        else:
            self._void(speculation)

    def _void(self, speculation: Speculation | None) -> None:
        if speculation is not None:
            speculation.cancel()
            self._count_speculation("dropped")

    def _start_agent_response(self, *, instructions: str | None = None, speak: bool = True,
                              voice: tuple[Reference, ...] | None = None, tools: tuple[Tool, ...] | None = None,
                              tool_choice: ToolChoice | None = None, speculation: Speculation | None = None,
                              **times: float) -> str:
        tools = self.tools if tools is None else tools
        choice = tool_choice or self.tool_choice
        request = self._speech_request(None, voice)

        def plan() -> ReplyPlan:
            try:
                return self._plan(self._history.window(), instructions=instructions or self.instructions,
                                  speak=speak, tools=tools, choice=choice, request=request)
            except ValueError as exc:  # nothing to answer: the response fails, the session goes on
                raise ReplyError("llm", str(exc), code="empty_conversation") from exc

        prepared = None
        if speculation is not None:
            if not self._responses.generating and speculation.plan.same_as(plan()):
                prepared = speculation.replay()
                self._count_speculation("adopted")
                log.debug("speculative reply adopted %.0f ms after it started (%d items made)",
                          (time.monotonic() - speculation.t_started) * 1000, speculation.made)
            else:
                self._void(speculation)
        # Built when the response's turn comes, so it sees every earlier reply as heard.
        return self._responses.start("agent", lambda: self._reply_text(plan()), request, speak=speak,
                                     tools=may_call_tools(tools, choice), prepared=prepared, **times)

    def _plan(self, window: list[dict], *, instructions: str, speak: bool, tools: tuple[Tool, ...],
              choice: ToolChoice, request: TTSRequest) -> ReplyPlan:
        """A reply to the conversation `window` (ValueError when there is nothing to answer)."""
        messages = build_messages(instructions, window, self.chat.history_window)
        return ReplyPlan(messages=messages, max_tokens=self.chat.max_tokens, temperature=self.chat.temperature,
                         tools=tools, choice=choice, speak=speak and self._tts is not None, request=request)

    def _reply_text(self, plan: ReplyPlan) -> AsyncIterator[object]:
        """The LLM's reply to `plan`: text deltas, and typed tool-call items when it may call tools."""
        calling = plan.calls_tools

        def stream(override: ToolChoice | None) -> AsyncIterator[object]:
            return self._llm.stream_chat(  # type: ignore[union-attr]
                plan.messages, max_tokens=plan.max_tokens, temperature=plan.temperature,
                **({"tools": plan.tools, "tool_choice": override or plan.choice} if calling else {}))

        if calling:
            return with_tool_calls(stream, plan.tools, lambda: self._new_id("call"))
        return without_tool_markup(stream(None))

    # ------------------------------------------------------------------ speculative replies
    def _speculate(self, transcript: str) -> None:
        """The open turn's transcript is likely final (a pause pass covered all its speech): start
        the reply it would get now, held until the turn ends (see speculation.py)."""
        self._drop_speculation()
        detection = self.turn_detection
        if (not self.speculate or self.mode != "agent" or self._llm is None or detection is None
                or not detection.create_response or self._responses.generating or not transcript.strip()):
            return
        if getattr(self._llm, "busy", False):
            return  # a guess must not queue in front of another call's real reply on a shared model
        window = self._history.window() + [{"role": "user", "content": transcript}]
        try:
            plan = self._plan(window, instructions=self.instructions, speak=self.speak_replies, tools=self.tools,
                              choice=self.tool_choice, request=self._speech_request(None, None))
        except ValueError:
            return
        items = spoken_reply(self._reply_text(plan), self._tts if plan.speak else None, plan.request)
        self._speculation = Speculation(plan, items, self._spawn)
        self._count_speculation("started")

    def _count_speculation(self, outcome: str) -> None:
        self.speculations[outcome] += 1
        if self._on_speculation is not None:
            self._on_speculation(outcome)

    def _drop_speculation(self) -> None:
        speculation, self._speculation = self._speculation, None
        self._void(speculation)

    def _speech_request(self, sampling: SamplingOptions | None, voice: tuple[Reference, ...] | None) -> TTSRequest:
        return tts_request(self.speech, references=self.voice if voice is None else tuple(voice),
                           sampling=sampling or self.sampling)

    # ------------------------------------------------------------------ plumbing
    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("conversation task failed", exc_info=task.exception())
            self._outputs.error("server_error", "internal_error", f"internal error: {task.exception()}")

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids)}"

    def _check_open(self) -> None:
        if self._outputs.closed:
            raise RuntimeError("the conversation session is closed")
