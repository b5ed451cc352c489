"""POST /v1/audio/transcriptions and /v1/audio/translations: OpenAI's multipart requests,
answered by the loaded faster-whisper model.

The upload is read part by part with a size cap (413 beyond it) and decoded in memory (no
temporary file); subtitles are written by pysubs2.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
from typing import Any

import aiohttp
import pysubs2
from aiohttp import web

from engine.agent.transcript import (Segment, TranscribeOptions, TranscriptInfo, TranscriptionError, check_language,
                                     transcribe_stream)
from engine.audio import decode_audio
from server.http import SERVICES, SETTINGS, requires_key
from server.openai_audio.errors import OpenAIError, openai_errors
from server.openai_audio.speech import sse_event
from server.services import ServiceUnavailable

ASR_RATE = 16000
RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
MAX_FIELD_BYTES = 64 * 1024  # any non-file form field (a prompt is a few hundred tokens at most)
_CHUNK = 64 * 1024


@dataclasses.dataclass
class TranscriptionForm:
    audio: bytes
    filename: str | None
    fields: dict[str, list[str]]

    def get(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else None

    def all(self, name: str) -> list[str]:
        return self.fields.get(name, []) + self.fields.get(f"{name}[]", [])


async def _read_part(part: Any, limit: int, name: str) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(_CHUNK):
        data += chunk
        if len(data) > limit:
            what = "file" if name == "file" else f"form field {name!r}"
            raise OpenAIError(413, f"the {what} is larger than the {limit} byte limit", name)
    return bytes(data)


async def read_form(request: web.Request, max_file_bytes: int) -> TranscriptionForm:
    if not request.content_type.startswith("multipart/"):
        raise OpenAIError(400, f"send multipart/form-data with a 'file' field (got {request.content_type!r})", "file")
    audio: bytes | None = None
    filename = None
    fields: dict[str, list[str]] = {}
    try:
        reader = await request.multipart()
        async for part in reader:
            if isinstance(part, aiohttp.MultipartReader):
                raise OpenAIError(400, "nested multipart parts are not supported")
            name = part.name or ""
            if name == "file":
                audio, filename = await _read_part(part, max_file_bytes, "file"), part.filename
            else:
                raw = await _read_part(part, MAX_FIELD_BYTES, name)
                fields.setdefault(name, []).append(raw.decode("utf-8", "replace"))
    except OpenAIError:
        raise
    except (ValueError, aiohttp.ClientPayloadError, AssertionError) as exc:  # malformed multipart
        raise OpenAIError(400, f"the multipart body cannot be read: {exc}") from None
    if not audio:
        raise OpenAIError(400, "'file' is required: the audio to transcribe", "file")
    return TranscriptionForm(audio=audio, filename=filename, fields=fields)


def _flag(form: TranscriptionForm, name: str) -> bool:
    value = (form.get(name) or "false").strip().lower()
    if value not in ("true", "false", "1", "0"):
        raise OpenAIError(400, f"'{name}' must be true or false, got {value!r}", name)
    return value in ("true", "1")


def parse_options(form: TranscriptionForm, task: str) -> tuple[TranscribeOptions, str, bool]:
    """(options, response_format, stream) from the form; the model field may name anything."""
    fmt = (form.get("response_format") or "json").strip()
    if fmt not in RESPONSE_FORMATS:
        raise OpenAIError(400, f"'response_format' must be one of {', '.join(RESPONSE_FORMATS)}, got {fmt!r}",
                          "response_format")
    temperature = 0.0
    if form.get("temperature") not in (None, ""):
        try:
            temperature = float(form.get("temperature"))  # type: ignore[arg-type]
        except ValueError:
            temperature = math.nan
        if not 0.0 <= temperature <= 1.0:
            raise OpenAIError(400, f"'temperature' must be a number from 0 to 1, got {form.get('temperature')!r}",
                              "temperature")
    granularities = form.all("timestamp_granularities")
    unknown = sorted(set(granularities) - {"word", "segment"})
    if unknown:
        raise OpenAIError(400, f"'timestamp_granularities[]' may hold 'word' and 'segment', got {unknown}",
                          "timestamp_granularities")
    if "word" in granularities and fmt != "verbose_json":
        raise OpenAIError(400, "word timestamps need response_format 'verbose_json'", "timestamp_granularities")
    stream = _flag(form, "stream") if task == "transcribe" else False
    if stream and fmt not in ("json", "text"):
        raise OpenAIError(400, "stream=true sends transcript.text events; use response_format json or text", "stream")
    language = (form.get("language") or "").strip() or None if task == "transcribe" else None
    options = TranscribeOptions(task=task, language=language, prompt=form.get("prompt") or None,  # type: ignore[arg-type]
                                temperature=temperature, word_timestamps="word" in granularities)
    return options, fmt, stream


def _usage(info: TranscriptInfo) -> dict[str, Any]:
    return {"type": "duration", "seconds": math.ceil(info.duration)}


def _text(segments: list[Segment]) -> str:
    return " ".join(seg.text.strip() for seg in segments if seg.text.strip())


def _subtitles(segments: list[Segment], fmt: str) -> str:
    subs = pysubs2.SSAFile()
    for seg in segments:
        if seg.text.strip():
            subs.append(pysubs2.SSAEvent(start=pysubs2.make_time(s=seg.start), end=pysubs2.make_time(s=seg.end),
                                         text=seg.text.strip()))
    return subs.to_string("srt" if fmt == "srt" else "vtt")


def _segment_json(seg: Segment) -> dict[str, Any]:
    return {"id": seg.id, "seek": seg.seek, "start": seg.start, "end": seg.end, "text": seg.text,
            "tokens": seg.tokens, "temperature": seg.temperature, "avg_logprob": seg.avg_logprob,
            "compression_ratio": seg.compression_ratio, "no_speech_prob": seg.no_speech_prob}


def format_transcript(info: TranscriptInfo, segments: list[Segment], fmt: str, task: str,
                      words: bool) -> web.Response:
    text = _text(segments)
    if fmt == "text":
        return web.Response(text=text + "\n", content_type="text/plain")
    if fmt in ("srt", "vtt"):
        return web.Response(text=_subtitles(segments, fmt), content_type="text/vtt" if fmt == "vtt" else "text/plain")
    if fmt == "json":
        return web.json_response({"text": text, "usage": _usage(info)})
    body: dict[str, Any] = {"task": task, "language": info.language, "duration": info.duration, "text": text,
                            "segments": [_segment_json(s) for s in segments], "usage": _usage(info)}
    if words:
        body["words"] = [{"word": w.word.strip(), "start": w.start, "end": w.end}
                         for s in segments for w in (s.words or [])]
    return web.json_response(body)


async def _stream(request: web.Request, results) -> web.StreamResponse:
    """SSE: a transcript.text.delta per segment, then transcript.text.done with the whole text."""
    info = await anext(results)  # before the headers: a failing model still gets a status code
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    parts: list[str] = []
    try:
        async for seg in results:
            piece = seg.text.strip()
            if piece:
                delta = piece if not parts else " " + piece
                parts.append(delta)
                await response.write(sse_event({"type": "transcript.text.delta", "delta": delta}))
        await response.write(sse_event({"type": "transcript.text.done", "text": "".join(parts),
                                        "usage": _usage(info)}))
    except ConnectionError:
        return response
    except Exception as exc:  # noqa: BLE001 - headers are out: say so in the stream, then end it
        with contextlib.suppress(ConnectionError):
            await response.write(sse_event({"type": "error", "error": {
                "message": f"transcription failed: {exc}", "type": "server_error", "param": None, "code": None}}))
    await response.write_eof()
    return response


async def _answer(request: web.Request, task: str) -> web.StreamResponse:
    services, settings = request.app[SERVICES], request.app[SETTINGS]
    asr = services.asr
    if asr is None:
        reason = "still loading; retry shortly" if services.loading else services.errors.get("asr", "not configured")
        raise ServiceUnavailable(f"the ASR model is not loaded: {reason}")
    form = await read_form(request, settings.max_transcription_bytes)
    options, fmt, stream = parse_options(form, task)
    try:
        options = dataclasses.replace(options, language=check_language(asr, options.language))
    except TranscriptionError as exc:
        raise OpenAIError(400, str(exc), "language") from None
    pcm = await asyncio.to_thread(decode_audio, form.audio, ASR_RATE, settings.max_transcription_seconds)
    results = transcribe_stream(asr, pcm, options)
    async with contextlib.aclosing(results):
        if stream:
            return await _stream(request, results)
        info = None
        segments: list[Segment] = []
        async for item in results:
            if isinstance(item, TranscriptInfo):
                info = item
            else:
                segments.append(item)
    assert info is not None
    return format_transcript(info, segments, fmt, task, options.word_timestamps)


@requires_key()
@openai_errors
async def create_transcription(request: web.Request) -> web.StreamResponse:
    return await _answer(request, "transcribe")


@requires_key()
@openai_errors
async def create_translation(request: web.Request) -> web.StreamResponse:
    return await _answer(request, "translate")
