"""The one job handler behind the job API, the RunPod worker and /v1/tts's job-shaped bodies.

`handle_job` takes a job's `input` (the original endpoint's fields) and yields dicts: with
`streaming`, one `{"status": "streaming", "audio": <base64 s16le PCM>, ...}` per piece of audio
as the engine produces it, then always one final `{"status": "success", "audio": <base64 in
format>, ...}` or `{"status": "error", "error": ...}`. `run_turn` is the same work yielding
numpy audio, for transports that write raw PCM themselves.

Cancelling the task that iterates either generator stops the model work: the engine's stream
is closed on the way out.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from pydantic import ValidationError

from engine.audio import AudioDecodeError, decode_audio, encode_audio, float_to_pcm16
from engine.speech.types import Reference, SamplingOptions, TTSRequest
from server.conversations import Conversation, ConversationStore
from server.schema import JobInput, RequestError, decode_base64_audio, describe_validation_error
from server.services import ServiceUnavailable, Services
from server.settings import Settings

STREAM_CHUNK_BYTES = 192 * 1024  # raw PCM per streamed item: ~256 KB of base64, far below RunPod's 1 MB
VOICE_FROM_OUTPUT_MAX_SECONDS = 20.0  # a conversation without a reference keeps its first reply's voice
USER_AUDIO_RATE = 16_000
MAX_USER_AUDIO_SECONDS = 120.0


@dataclasses.dataclass(frozen=True)
class ParsedJob:
    """A validated job: the input, the mode it runs in and its decoded audio fields."""

    input: JobInput
    mode: str  # "tts" | "agent"
    text: str | None  # TTS mode: what to speak; agent mode: the user's message
    system_audio: bytes | None
    user_audio: bytes | None


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


# --------------------------------------------------------------------------- validation
def parse_job_input(raw: Any, services: Services, settings: Settings) -> ParsedJob:
    """Validate a job's input; RequestError (400 / 404 / 413 / 503) says what is wrong."""
    if not isinstance(raw, dict):
        raise RequestError(400, f"input must be a JSON object, got {type(raw).__name__}")
    try:
        inp = JobInput.model_validate(raw)
    except ValidationError as exc:
        raise RequestError(400, f"invalid input: {describe_validation_error(exc)}") from None
    mode = ("tts" if inp.tts else "agent") if inp.tts is not None else settings.mode
    limit = settings.max_text_length
    for name in ("text", "message", "reference_text"):
        value = getattr(inp, name)
        if value is not None and len(value) > limit:
            raise RequestError(400, f"{name} is {len(value)} characters long; the limit is {limit}")
    if inp.system_message is not None and len(inp.system_message) > 4 * limit:
        raise RequestError(400, f"system_message is longer than {4 * limit} characters")
    if mode == "tts":
        text = inp.text or inp.message
        if text is None:
            raise RequestError(400, "text is required in TTS mode (the words to speak)")
        if inp.user_audio is not None:
            raise RequestError(400, "user_audio is only used in agent mode")
    else:
        text = inp.message or inp.text
        if text is not None and inp.user_audio is not None:
            raise RequestError(400, "give either message or user_audio, not both")
        if text is None and inp.user_audio is None:
            raise RequestError(400, "message is required in agent mode (or send \"tts\": true with text to speak)")
    max_bytes = settings.max_reference_bytes
    system_audio = decode_base64_audio(inp.system_audio, "system_audio", max_bytes) if inp.system_audio else None
    user_audio = decode_base64_audio(inp.user_audio, "user_audio", max_bytes) if inp.user_audio else None
    if system_audio is not None and inp.reference_id is not None:
        raise RequestError(400, "give either system_audio or reference_id, not both")
    try:
        services.require_tts()
        if mode == "agent":
            services.require_llm()
    except ServiceUnavailable as exc:
        raise RequestError(503, str(exc)) from None
    if services.asr is None:
        if user_audio is not None:
            raise RequestError(503, "user_audio needs the ASR model to transcribe it, and it is not loaded")
        if system_audio is not None and not inp.reference_text:
            raise RequestError(400, "system_audio without reference_text needs the ASR model to transcribe it, "
                                    "and it is not loaded; send reference_text (the transcript of system_audio)")
    if inp.reference_id is not None:
        named_voice(services, inp.reference_id)  # unknown ids fail now, not inside the job
    return ParsedJob(inp, mode, text, system_audio, user_audio)


async def probe_audio(data: bytes, field: str, sample_rate: int, max_seconds: float) -> np.ndarray:
    """Decode `data` now so that undecodable or over-long audio is refused with 400 / 413."""
    try:
        return await asyncio.to_thread(decode_audio, data, sample_rate, max_seconds)
    except AudioDecodeError as exc:
        status = 413 if "longer than" in str(exc) else 400
        raise RequestError(status, f"{field}: {exc}") from None


async def precheck_job(job: ParsedJob, services: Services, settings: Settings) -> None:
    """The checks of `parse_job_input` that need the model's helpers or decoding (run before a job
    is queued, so bad input is a 400 rather than a failed job)."""
    tts = services.require_tts()
    prepare_text = getattr(tts, "prepare_text", None)  # the engine's normalise-and-split step
    if job.mode == "tts" and prepare_text is not None:
        try:
            prepare_text(TTSRequest(text=job.text or "", chunk_length=job.input.chunk_length,
                                    normalize=job.input.normalize))
        except ValueError:
            raise RequestError(400, "text has nothing to speak once normalized (only punctuation or symbols?)") \
                from None
    if job.system_audio is not None:
        await probe_audio(job.system_audio, "system_audio", tts.sample_rate, settings.max_reference_seconds)
    if job.user_audio is not None:
        await probe_audio(job.user_audio, "user_audio", USER_AUDIO_RATE, MAX_USER_AUDIO_SECONDS)


def named_voice(services: Services, reference_id: str) -> tuple[Reference, ...]:
    from server.references import VoiceError

    if services.references is None:
        raise RequestError(400, "this server keeps no named references")
    try:
        return services.references.get_references(reference_id)
    except VoiceError as exc:
        raise RequestError(exc.status, str(exc)) from None
    except KeyError:
        raise RequestError(404, f"reference_id {reference_id!r} not found (see /v1/references/list)") from None


# --------------------------------------------------------------------------- the turn
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
        text = inp.reference_text
        if not text:
            pcm = await probe_audio(job.system_audio, "system_audio", USER_AUDIO_RATE, MAX_USER_AUDIO_SECONDS)
            assert services.asr is not None  # parse_job_input checked
            text = (await services.asr.transcribe(pcm)).strip()
        codes = await tts.encode_reference(job.system_audio, use_memory_cache=inp.use_memory_cache)
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
    """Speak (TTS mode) or answer and speak (agent mode); yields audio pieces, then a TurnResult."""
    from contextlib import aclosing

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

            reply: AgentReply | None = None
            chat = ChatOptions(max_tokens=inp.max_tokens or settings.llm_max_tokens)
            source = stream_agent_reply(
                llm=services.require_llm(), tts=tts, message=job.text, user_audio=job.user_audio, asr=services.asr,
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


# --------------------------------------------------------------------------- job-shaped output
def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def stream_items(piece: SpeechPiece, first_index: int) -> list[dict[str, Any]]:
    """One piece of audio as streamed items (split so each stays far below 1 MB)."""
    raw = float_to_pcm16(piece.pcm).tobytes()
    items = []
    for offset in range(0, len(raw), STREAM_CHUNK_BYTES):
        item: dict[str, Any] = {"status": "streaming", "index": first_index + len(items),
                                "audio": _b64(raw[offset:offset + STREAM_CHUNK_BYTES]), "format": "pcm",
                                "encoding": "s16le", "sample_rate": piece.sample_rate, "channels": 1}
        if piece.sentence is not None:
            item["text"] = piece.sentence
        items.append(item)
    return items


async def final_output(result: TurnResult, inp: JobInput, chunks: int) -> dict[str, Any]:
    audio = b""
    if len(result.pcm):
        audio = await asyncio.to_thread(encode_audio, result.pcm, result.sample_rate, inp.format)
    out: dict[str, Any] = {
        "status": "success",
        "mode": result.mode,
        "audio": _b64(audio),
        "format": inp.format,
        "sample_rate": result.sample_rate,
        "duration": round(len(result.pcm) / result.sample_rate, 3),
        "conversation_id": result.conversation.id,
        "history": result.conversation.history,
        "text": result.text,
        "latency_ms": result.latency_ms,
    }
    if inp.streaming:
        out["chunks"] = chunks
    if result.transcript is not None:
        out["transcript"] = result.transcript
    return out


def error_output(message: str) -> dict[str, Any]:
    return {"status": "error", "error": message}


async def handle_job(job_input: Any, services: Services, settings: Settings,
                     conversations: ConversationStore) -> AsyncIterator[dict[str, Any]]:
    """The job handler shared by the job API and the RunPod worker (see the module docstring)."""
    from engine.agent.reply_stream import ReplyError

    try:
        job = parse_job_input(job_input, services, settings)
        index = 0
        async for item in run_turn(job, services, settings, conversations):
            if isinstance(item, SpeechPiece):
                if job.input.streaming:
                    for out in stream_items(item, index):
                        index += 1
                        yield out
            else:
                yield await final_output(item, job.input, index)
    except RequestError as exc:
        yield error_output(exc.message)
    except ServiceUnavailable as exc:
        yield error_output(str(exc))
    except ReplyError as exc:
        yield error_output(f"{exc.stage} failed: {exc}")
    except ValueError as exc:  # TTSInputError, AudioDecodeError, AgentInputError: the input's fault
        yield error_output(f"invalid input: {exc}")
