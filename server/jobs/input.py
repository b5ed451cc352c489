"""A job's input, validated and decoded once: the RunPod fields checked (400 / 404 / 413 / 503
with a reason), the mode chosen, base64 audio turned into bytes and those bytes into PCM.

`prepare_job` is what every transport calls before it runs or queues a job: the job API when it
accepts one, /v1/tts for job-shaped bodies, the RunPod worker for each job it takes. The
`ParsedJob` it returns carries the decoded audio, so the turn never decodes it again.
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import numpy as np
from pydantic import ValidationError

from engine.audio import AudioDecodeError, decode_audio
from engine.speech.types import Reference, TTSRequest
from server.schema import JobInput, RequestError, decode_base64_audio, describe_validation_error
from server.services import ServiceUnavailable, Services
from server.settings import Settings

USER_AUDIO_RATE = 16_000  # what the ASR model takes
MAX_USER_AUDIO_SECONDS = 120.0


@dataclasses.dataclass(frozen=True)
class ParsedJob:
    """A validated job: the input, the mode it runs in and its audio fields.

    `input` no longer holds the base64 audio: `system_audio` / `user_audio` hold the bytes, and
    once `prepare_job` has run, `system_pcm` / `user_pcm` hold them decoded."""

    input: JobInput
    mode: str  # "tts" | "agent"
    text: str | None  # TTS mode: what to speak; agent mode: the user's message
    system_audio: bytes | None
    user_audio: bytes | None
    system_pcm: np.ndarray | None = None  # mono float32 at the TTS model's rate
    user_pcm: np.ndarray | None = None  # mono float32 at USER_AUDIO_RATE

    @property
    def nbytes(self) -> int:
        """Memory the audio takes (a queued job holds it until it runs)."""
        return sum(len(a) for a in (self.system_audio, self.user_audio) if a is not None) + \
            sum(p.nbytes for p in (self.system_pcm, self.user_pcm) if p is not None)


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
    without_base64 = inp.model_copy(update={"system_audio": None, "user_audio": None})
    return ParsedJob(without_base64, mode, text, system_audio, user_audio)


async def probe_audio(data: bytes, field: str, sample_rate: int, max_seconds: float) -> np.ndarray:
    """Decode `data` (off the loop); undecodable or over-long audio is refused with 400 / 413."""
    try:
        return await asyncio.to_thread(decode_audio, data, sample_rate, max_seconds)
    except AudioDecodeError as exc:
        status = 413 if "longer than" in str(exc) else 400
        raise RequestError(status, f"{field}: {exc}") from None


async def decode_job(job: ParsedJob, services: Services, settings: Settings) -> ParsedJob:
    """The checks that need the model's text step or decoding, and the decoding itself: the job
    with its PCM. Run before a job is queued, so bad input is a 400 rather than a failed job."""
    tts = services.require_tts()
    if job.mode == "tts":
        try:
            tts.prepare_text(TTSRequest(text=job.text or "", chunk_length=job.input.chunk_length,
                                        normalize=job.input.normalize))
        except ValueError:
            raise RequestError(400, "text has nothing to speak once normalized (only punctuation or symbols?)") \
                from None
    system_pcm = user_pcm = None
    if job.system_audio is not None:
        system_pcm = await probe_audio(job.system_audio, "system_audio", tts.sample_rate,
                                       settings.max_reference_seconds)
    if job.user_audio is not None:
        user_pcm = await probe_audio(job.user_audio, "user_audio", USER_AUDIO_RATE, MAX_USER_AUDIO_SECONDS)
    return dataclasses.replace(job, system_pcm=system_pcm, user_pcm=user_pcm)


async def prepare_job(raw: Any, services: Services, settings: Settings) -> ParsedJob:
    """`parse_job_input`, then `decode_job`: a job ready to run, or RequestError."""
    return await decode_job(parse_job_input(raw, services, settings), services, settings)


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
