"""One job's turn: speak the text (TTS mode) or answer the message and speak the reply (agent
mode), in the conversation's voice, and remember the conversation.

`run_turn` yields numpy audio as the engine produces it, then a `TurnResult`; transports shape
that into their own output (`server.jobs.output` for RunPod items, /v1/tts for raw PCM).
Cancelling the task that iterates it stops the model work: the engine's stream is closed on the
way out.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import numpy as np

from engine.audio import encode_audio, resample
from engine.speech.types import Reference, SamplingOptions, TTSRequest
from server.conversations import Conversation, ConversationStore
from server.jobs.input import USER_AUDIO_RATE, ParsedJob, named_voice
from server.schema import JobInput
from server.services import Services
from server.settings import Settings

VOICE_FROM_OUTPUT_MAX_SECONDS = 20.0  # a conversation without a reference keeps its first reply's voice


@dataclasses.dataclass(frozen=True)
class SpeechPiece:
    pcm: np.ndarray  # float32 mono
    sample_rate: int
    sentence: str | None = None  # agent mode: the reply sentence it belongs to


@dataclasses.dataclass
class TurnResult:
    mode: str
    pcm: np.ndarray
    sample_rate: int
    conversation: Conversation
    text: str  # what was spoken (TTS) or the agent's reply
    transcript: str | None = None  # agent mode with user_audio: what the user said
    latency_ms: dict[str, float] = dataclasses.field(default_factory=dict)


def frame_limit(requested: int, settings: Settings) -> int:
    """A request's max_new_tokens under the operator's cap (0 means "until the model stops")."""
    cap = settings.max_new_tokens_limit
    if cap <= 0:
        return requested
    return cap if requested <= 0 else min(requested, cap)


def sampling_of(inp: JobInput, settings: Settings) -> SamplingOptions:
    return SamplingOptions(temperature=inp.temperature, top_p=inp.top_p, top_k=inp.top_k,
                           repetition_penalty=inp.repetition_penalty,
                           max_new_tokens=frame_limit(inp.max_new_tokens, settings), seed=inp.seed)


async def _voice(job: ParsedJob, conv: Conversation, services: Services) -> tuple[Reference, ...]:
    """The references to speak with; a new system_audio also becomes the conversation's voice."""
    tts = services.require_tts()
    inp = job.input
    if job.system_audio is not None:
        assert job.system_pcm is not None, "run_turn takes a job from prepare_job (audio decoded)"
        text = inp.reference_text
        if not text:
            assert services.asr is not None  # parse_job_input checked
            pcm = await asyncio.to_thread(resample, job.system_pcm, tts.sample_rate, USER_AUDIO_RATE)
            text = (await services.asr.transcribe(pcm)).strip()
        codes = await tts.encode_reference(job.system_audio, use_memory_cache=inp.use_memory_cache,
                                           pcm=job.system_pcm)
        conv.voice_text, conv.voice_codes = text, codes
        return (Reference(text=text, codes=codes),)
    if inp.reference_id is not None:
        refs = named_voice(services, inp.reference_id)
        if refs[0].audio is not None:  # later turns keep this voice without naming it again
            conv.voice_text = refs[0].text
            conv.voice_codes = await tts.encode_reference(refs[0].audio, use_memory_cache=inp.use_memory_cache)
        return refs
    if conv.has_voice:
        return (Reference(text=conv.voice_text or "", codes=conv.voice_codes),)
    return ()


async def run_turn(job: ParsedJob, services: Services, settings: Settings,
                   conversations: ConversationStore) -> AsyncIterator[SpeechPiece | TurnResult]:
    """Speak (TTS mode) or answer and speak (agent mode); yields audio pieces, then a TurnResult.
    `job` comes from `prepare_job`, with its audio decoded."""
    t0 = time.monotonic()
    tts = services.require_tts()
    inp = job.input
    conv_id = inp.conversation_id or f"conv-{uuid.uuid4().hex}"
    async with conversations.turn_lock(conv_id):
        conv = await conversations.load(conv_id)
        references = await _voice(job, conv, services)
        template = TTSRequest(text="", references=references, sampling=sampling_of(inp, settings),
                              chunk_length=inp.chunk_length, normalize=inp.normalize,
                              use_memory_cache=inp.use_memory_cache)
        parts: list[np.ndarray] = []
        latency: dict[str, float] = {}
        transcript = None
        if job.mode == "tts":
            assert job.text is not None
            async with aclosing(tts.stream(dataclasses.replace(template, text=job.text))) as chunks:
                async for chunk in chunks:
                    latency.setdefault("first_audio", _ms(time.monotonic() - t0))
                    parts.append(chunk.pcm)
                    yield SpeechPiece(chunk.pcm, chunk.sample_rate)
            spoken = reply_text = job.text
            history = conv.history + [{"role": "assistant", "content": job.text}]
        else:
            from engine.agent.job_turn import AgentReply, stream_agent_reply
            from engine.agent.llm.base import ChatOptions
            from engine.agent.reply_stream import SentenceAudio

            assert job.user_audio is None or job.user_pcm is not None, "run_turn takes a job from prepare_job"
            reply: AgentReply | None = None
            chat = ChatOptions(max_tokens=inp.max_tokens or settings.llm_max_tokens)
            source = stream_agent_reply(
                llm=services.require_llm(), tts=tts, message=job.text, user_audio=job.user_pcm, asr=services.asr,
                system_message=inp.system_message or settings.instructions, history=conv.history,
                speech=template, chat=chat)
            async with aclosing(source) as items:
                async for item in items:
                    if isinstance(item, SentenceAudio):
                        parts.append(item.chunk.pcm)
                        yield SpeechPiece(item.chunk.pcm, item.chunk.sample_rate, item.text)
                    elif isinstance(item, AgentReply):
                        reply = item
            assert reply is not None
            latency.update(reply.latency_ms)
            reply_text, transcript, history = reply.text, reply.transcript, reply.history
            spoken = " ".join(reply.sentences)
        pcm = np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, np.float32)
        named = inp.conversation_id is not None  # the caller means to continue this conversation
        short = 0 < len(pcm) <= VOICE_FROM_OUTPUT_MAX_SECONDS * tts.sample_rate
        if named and not conv.has_voice and spoken and short:
            # No reference was ever given: keep this reply's voice for the rest of the conversation.
            wav = await asyncio.to_thread(encode_audio, pcm, tts.sample_rate, "wav")
            conv.voice_codes = await tts.encode_reference(wav, use_memory_cache=False)
            conv.voice_text = spoken
        conv.history = history
        await conversations.save(conv)
        latency["total"] = _ms(time.monotonic() - t0)
        yield TurnResult(job.mode, pcm, tts.sample_rate, conv, reply_text, transcript, latency)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)
