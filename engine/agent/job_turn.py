"""One agent turn for the job API: (user audio ->) message -> LLM reply -> speech.

The same LLM, sentence splitting and TTS path as the realtime session (engine.agent.reply_stream),
without VAD or barge-in. `stream_agent_reply` yields items as they are produced (for /stream);
`agent_reply` collects them into one `AgentReply`.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from engine.agent.conversation import DEFAULT_INSTRUCTIONS
from engine.agent.vad import INPUT_SAMPLE_RATE
from engine.agent.llm.base import ChatLLM, ChatOptions, Message, build_messages, validate_messages
from engine.agent.reply_stream import ReplyDone, SentenceAudio, SentenceSpoken, TextDelta, spoken_reply
from engine.speech.types import AudioChunk, SpeechSynthesizer, TTSRequest

if TYPE_CHECKING:
    from engine.agent.asr import Transcriber

MAX_USER_AUDIO_SECONDS = 120.0


class AgentInputError(ValueError):
    """The request cannot be answered as given (no message, no speech in the audio, ...)."""


@dataclasses.dataclass(frozen=True)
class Transcript:
    """What the user said in `user_audio`."""

    text: str
    t: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass
class AgentReply:
    text: str  # the assistant's reply
    history: list[dict]  # the input history + this user message + the reply
    transcript: str | None  # the recognised user_audio, if audio was given
    chunks: list[AudioChunk]  # the reply's speech, in order (empty without TTS)
    sample_rate: int | None
    sentences: list[str]  # the reply as spoken, one TTS request each
    latency_ms: dict[str, float]  # from the call: transcript, first_token, first_audio, total

    @property
    def audio(self) -> np.ndarray:
        if not self.chunks:
            return np.zeros(0, np.float32)
        return np.concatenate([c.pcm for c in self.chunks]).astype(np.float32, copy=False)


AgentItem = Transcript | TextDelta | SentenceAudio | SentenceSpoken | AgentReply


def _user_pcm(user_audio: np.ndarray | bytes) -> np.ndarray:
    if isinstance(user_audio, (bytes, bytearray, memoryview)):
        from engine.audio import decode_audio  # any container/codec -> mono float32 at the rate asked

        try:
            return decode_audio(bytes(user_audio), INPUT_SAMPLE_RATE, max_seconds=MAX_USER_AUDIO_SECONDS)
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - undecodable input is the caller's error
            raise AgentInputError(f"user_audio could not be decoded: {exc}") from exc
    pcm = np.asarray(user_audio)
    if len(pcm) > MAX_USER_AUDIO_SECONDS * INPUT_SAMPLE_RATE:
        raise AgentInputError(f"user_audio is longer than {MAX_USER_AUDIO_SECONDS:g} s")
    return pcm


async def stream_agent_reply(
    *,
    llm: ChatLLM,
    tts: SpeechSynthesizer | None,
    message: str | None = None,
    user_audio: np.ndarray | bytes | None = None,
    asr: "Transcriber | None" = None,
    system_message: str | None = None,
    history: Sequence[Message] | None = None,
    speech: TTSRequest | None = None,
    chat: ChatOptions = ChatOptions(),
) -> AsyncIterator[AgentItem]:
    """Yield Transcript (if audio), TextDelta / SentenceAudio / SentenceSpoken as produced, then AgentReply.

    `user_audio` is float32/int16 mono 16 kHz samples, or encoded audio bytes (wav, mp3, ...).
    `speech` is the TTS request template (voice references, sampling, chunk_length, normalize).
    Raises AgentInputError for unusable input, ReplyError when the LLM or TTS fails.
    """
    t0 = time.monotonic()
    past = validate_messages(list(history or ()), allow_empty=True)
    message = (message or "").strip() or None
    if message is not None and user_audio is not None:
        raise AgentInputError("give either message or user_audio, not both")
    transcript: str | None = None
    latency: dict[str, float] = {}
    if user_audio is not None:
        if asr is None:
            raise AgentInputError("user_audio needs an ASR model, and none is loaded")
        transcript = (await asr.transcribe(_user_pcm(user_audio))).strip()
        latency["transcript"] = _ms(time.monotonic() - t0)
        yield Transcript(transcript)
        if not transcript:
            raise AgentInputError("no speech was recognised in user_audio")
        message = transcript
    if message is None:
        raise AgentInputError("message (or user_audio) is required in agent mode")

    turn = past + [{"role": "user", "content": message}]
    instructions = system_message if system_message is not None else DEFAULT_INSTRUCTIONS
    messages = build_messages(instructions, turn, chat.history_window)
    source = llm.stream_chat(messages, max_tokens=chat.max_tokens, temperature=chat.temperature)
    template = speech or TTSRequest(text="")
    chunks: list[AudioChunk] = []
    sentences: list[str] = []
    text = ""
    async for item in spoken_reply(source, tts, template):
        if isinstance(item, TextDelta):
            latency.setdefault("first_token", _ms(item.t - t0))
        elif isinstance(item, SentenceAudio):
            latency.setdefault("first_audio", _ms(item.t - t0))
            chunks.append(item.chunk)
        elif isinstance(item, SentenceSpoken):
            sentences.append(item.text)
        elif isinstance(item, ReplyDone):
            text = item.text
            continue
        yield item
    latency["total"] = _ms(time.monotonic() - t0)
    new_history = turn + ([{"role": "assistant", "content": text}] if text else [])
    yield AgentReply(text=text, history=new_history, transcript=transcript, chunks=chunks,
                     sample_rate=chunks[0].sample_rate if chunks else (tts.sample_rate if tts else None),
                     sentences=sentences, latency_ms=latency)


async def agent_reply(**kwargs) -> AgentReply:
    """`stream_agent_reply` collected: the reply text, the updated history and all audio."""
    reply: AgentReply | None = None
    async for item in stream_agent_reply(**kwargs):
        if isinstance(item, AgentReply):
            reply = item
    assert reply is not None  # stream_agent_reply always ends with one
    return reply


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)
