"""POST /v1/audio/speech: OpenAI's speech request, spoken by the loaded Fish Speech checkpoint.

The text goes through the realtime path's sentence splitter and each sentence is streamed from
the engine as it is decoded; the PCM is time-stretched (when `speed` != 1) and encoded on the
fly, so the first bytes leave after the first decoded chunk, not after the whole text.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from aiohttp import web

from engine.agent.reply_stream import SentenceAudio, one_shot, spoken_reply
from engine.audio_stream import MAX_SPEED, MIN_SPEED, StreamEncoder, TimeStretch
from engine.speech.types import Reference, SamplingOptions, TTSRequest
from engine.text.sentences import speakable
from server.http import SERVICES, SETTINGS, read_json, requires_key
from server.openai_audio.errors import OpenAIError, openai_errors
from signaling.options import OptionsError, resolve_voice

log = logging.getLogger(__name__)

MAX_INPUT_CHARS = 4096  # OpenAI's documented limit
MAX_INSTRUCTIONS_CHARS = 4096
PCM_RATE = 24000  # OpenAI's `pcm`: raw 24 kHz 16-bit little-endian mono
MIME = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac", "wav": "audio/wav",
        "pcm": "audio/pcm"}


@dataclasses.dataclass(frozen=True)
class SpeechRequest:
    input: str
    voice: str
    response_format: str = "mp3"
    speed: float = 1.0
    stream_format: str = "audio"
    seed: int | None = None  # our extension (OpenAI has none): the same seed speaks the same audio


def _string(body: dict[str, Any], name: str, default: str | None, limit: int | None = None) -> str | None:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise OpenAIError(400, f"'{name}' must be a string", name)
    if limit is not None and len(value) > limit:
        raise OpenAIError(400, f"'{name}' is {len(value)} characters long; the limit is {limit}", name,
                          "string_above_max_length")
    return value


def parse_speech(body: Any, max_text_length: int) -> SpeechRequest:
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    _string(body, "model", None)  # any name: there is one loaded checkpoint
    _string(body, "instructions", None, MAX_INSTRUCTIONS_CHARS)  # accepted; Fish Speech takes no style prompt
    limit = min(MAX_INPUT_CHARS, max_text_length)
    text = _string(body, "input", None, limit)
    if text is None:
        raise OpenAIError(400, "'input' is required: the text to speak", "input")
    if not any(ch.isalnum() for ch in speakable(text)):
        raise OpenAIError(400, "'input' has nothing to speak (it is empty or only punctuation)", "input")
    voice = body.get("voice", "alloy")
    if isinstance(voice, dict):
        voice = voice.get("id")
    if not isinstance(voice, str) or not voice.strip():
        raise OpenAIError(400, "'voice' must be a voice name, a saved reference id, or {\"id\": ...}", "voice")
    fmt = _string(body, "response_format", "mp3")
    if fmt not in MIME:
        raise OpenAIError(400, f"'response_format' {fmt!r} is not produced here; use one of {', '.join(MIME)}",
                          "response_format")
    speed = body.get("speed", 1.0)
    if speed is None:
        speed = 1.0
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not MIN_SPEED <= speed <= MAX_SPEED:
        raise OpenAIError(400, f"'speed' must be a number from {MIN_SPEED} to {MAX_SPEED}, got {speed!r}", "speed")
    stream_format = _string(body, "stream_format", "audio")
    if stream_format not in ("audio", "sse"):
        raise OpenAIError(400, f"'stream_format' must be 'audio' or 'sse', got {stream_format!r}", "stream_format")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise OpenAIError(400, "'seed' must be an integer", "seed")
    return SpeechRequest(input=text, voice=voice.strip(), response_format=fmt, speed=float(speed),
                         stream_format=stream_format, seed=seed)


async def voice_references(services: Any, voice: str) -> tuple[Reference, ...]:
    """A saved reference's id -> its audio; an OpenAI preset name without such a reference -> the default voice."""
    try:
        return await resolve_voice(services, voice)
    except OptionsError as exc:
        message = str(exc).removeprefix("voice: ")
        raise OpenAIError(400, f"{message} (saved voices: GET /v1/references/list)", "voice") from None


@dataclasses.dataclass
class _Usage:
    frames: int = 0  # code frames generated: the audio tokens


async def _speech_pcm(tts: Any, text: str, template: TTSRequest, usage: _Usage) -> AsyncIterator[np.ndarray]:
    """The engine's PCM for `text`, sentence by sentence, as the realtime path speaks a reply."""
    async with contextlib.aclosing(spoken_reply(one_shot(text), tts, template)) as items:
        async for item in items:
            if isinstance(item, SentenceAudio):
                usage.frames += item.chunk.frames
                yield item.chunk.pcm


async def encoded_audio(pcm: AsyncIterator[np.ndarray], sample_rate: int, fmt: str, speed: float) -> AsyncIterator[bytes]:
    """PCM pieces -> (time-stretched) encoded bytes, yielded as the encoder produces them.

    Encoding runs on a worker thread: mp3 / aac cost ~5-10 ms per 93 ms chunk on a busy CPU, too
    long to hold the event loop that also paces realtime calls."""
    stretch = TimeStretch(speed, sample_rate) if speed != 1.0 else None
    encoder = StreamEncoder(fmt, sample_rate, out_rate=PCM_RATE if fmt == "pcm" else None)

    def step(piece: np.ndarray) -> bytes:
        return encoder.push(stretch.push(piece) if stretch else piece)

    def finish() -> bytes:
        tail = encoder.push(stretch.flush()) if stretch else b""
        return tail + encoder.close()

    async with contextlib.aclosing(pcm):
        async for piece in pcm:
            if data := await asyncio.to_thread(step, piece):
                yield data
    if tail := await asyncio.to_thread(finish):
        yield tail


def _input_tokens(tts: Any, text: str) -> int:
    tokenizer = getattr(getattr(tts, "models", None), "tokenizer", None)
    try:
        return len(tokenizer.encode(text)) if tokenizer is not None else len(text.split())
    except Exception:  # noqa: BLE001 - usage is informative; never fail a request over it
        return len(text.split())


async def _first(chunks: AsyncIterator[bytes]) -> bytes | None:
    """The first bytes, before any header goes out, so early failures still get a status code."""
    try:
        return await anext(chunks)
    except StopAsyncIteration:
        return None


async def _send_audio(request: web.Request, chunks: AsyncIterator[bytes], fmt: str) -> web.StreamResponse:
    first = await _first(chunks)
    response = web.StreamResponse(headers={"Content-Type": MIME[fmt],
                                           "Content-Disposition": f"attachment; filename=speech.{fmt}"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        if first:
            await response.write(first)
        async for data in chunks:
            await response.write(data)
    except ConnectionError:  # the client left; closing `chunks` stops the synthesis
        log.info("/v1/audio/speech client disconnected mid-stream")
        return response
    except Exception:  # noqa: BLE001 - headers are out: cut the stream so the client sees it fail
        log.exception("/v1/audio/speech stream failed after it started")
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response


def sse_event(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


async def _send_sse(request: web.Request, chunks: AsyncIterator[bytes],
                    done_usage: Callable[[], dict[str, int]]) -> web.StreamResponse:
    first = await _first(chunks)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        if first:
            await response.write(sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(first).decode()}))
        async for data in chunks:
            await response.write(sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}))
        await response.write(sse_event({"type": "speech.audio.done", "usage": done_usage()}))
    except ConnectionError:
        log.info("/v1/audio/speech SSE client disconnected mid-stream")
        return response
    except Exception as exc:  # noqa: BLE001 - headers are out: say so in the stream, then end it
        log.exception("/v1/audio/speech SSE stream failed after it started")
        with contextlib.suppress(ConnectionError):
            await response.write(sse_event({"type": "error", "error": {
                "message": f"speech synthesis failed: {exc}", "type": "server_error", "param": None, "code": None}}))
    await response.write_eof()
    return response


@requires_key()
@openai_errors
async def list_voices(request: web.Request) -> web.Response:
    """GET /v1/audio/voices, the listing self-hosted OpenAI-style servers offer (Kokoro-FastAPI's
    shape), which voice pickers such as Home Assistant's OpenAI TTS integration read."""
    store = request.app[SERVICES].references
    ids = await asyncio.to_thread(store.list_ids) if store is not None else []
    return web.json_response({"voices": [{"id": i, "name": i} for i in ids]})


@requires_key()
@openai_errors
async def create_speech(request: web.Request) -> web.StreamResponse:
    services, settings = request.app[SERVICES], request.app[SETTINGS]
    req = parse_speech(await read_json(request), settings.max_text_length)
    tts = services.require_tts()
    template = TTSRequest(text="", references=await voice_references(services, req.voice),
                          sampling=SamplingOptions(max_new_tokens=settings.max_new_tokens_limit, seed=req.seed))
    usage = _Usage()
    chunks = encoded_audio(_speech_pcm(tts, req.input, template, usage), tts.sample_rate, req.response_format,
                           req.speed)
    async with contextlib.aclosing(chunks):
        if req.stream_format == "sse":
            def done_usage() -> dict[str, int]:
                tokens = _input_tokens(tts, req.input)
                return {"input_tokens": tokens, "output_tokens": usage.frames, "total_tokens": tokens + usage.frames}

            return await _send_sse(request, chunks, done_usage)
        return await _send_audio(request, chunks, req.response_format)
