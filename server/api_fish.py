"""Upstream Fish Speech's HTTP API: /v1/tts, /v1/references/{add,list,delete,update}, /v1/health.

/v1/tts takes upstream's ServeTTSRequest as JSON or msgpack. With `streaming` the body is raw
16-bit little-endian mono PCM at the model's rate (44.1 kHz), sent chunk by chunk as the engine
produces audio, labelled audio/wav as upstream does. A RunPod-shaped body (`{"input": {...}}`)
is accepted too and runs the job handler, so the original guide's streaming example plays
from here.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import numpy as np
from aiohttp import web
from pydantic import ValidationError

from engine.audio import encode_audio, float_to_pcm16, mime_type
from engine.speech.types import Reference, SamplingOptions, TTSRequest
from server.access import PRINCIPAL
from server.jobs.input import named_voice, prepare_job, probe_audio
from server.jobs.turn import SpeechPiece, TurnResult, frame_limit, run_turn
from server.http import CONVERSATIONS, SERVICES, SETTINGS, fish_error, read_structured, requires_key
from server.references import VoiceError, check_id
from server.schema import RequestError, ServeTTSRequest, describe_validation_error
from server.services import ServiceUnavailable
from server.voice_owners import VoiceOwners

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- /v1/tts
async def _references(req: ServeTTSRequest, request: web.Request) -> tuple[Reference, ...]:
    services, settings = request.app[SERVICES], request.app[SETTINGS]
    if req.reference_id is not None:  # takes priority over inline references, as upstream
        return named_voice(services, req.reference_id)
    refs = []
    for i, ref in enumerate(req.references):
        if len(ref.audio) > settings.max_reference_bytes:
            raise RequestError(413, f"references[{i}].audio is {len(ref.audio)} bytes; "
                                    f"the limit is {settings.max_reference_bytes}")
        await probe_audio(ref.audio, f"references[{i}].audio", services.require_tts().sample_rate,
                          settings.max_reference_seconds)
        refs.append(Reference(text=ref.text, audio=ref.audio))
    return tuple(refs)


async def _stream_pcm(request: web.Request, pieces: AsyncIterator[np.ndarray], sample_rate: int) -> web.StreamResponse:
    async with contextlib.aclosing(pieces):  # closing stops the model work if the client leaves
        try:
            # The first piece comes before any header, so early errors still get a status code.
            first = await anext(pieces)
        except StopAsyncIteration:
            first = None
        response = web.StreamResponse(headers={
            "Content-Type": "audio/wav",  # upstream's label for its raw PCM stream
            "X-Audio-Encoding": "pcm_s16le", "X-Sample-Rate": str(sample_rate), "X-Channels": "1"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            if first is not None:
                await response.write(float_to_pcm16(first).tobytes())
                async for pcm in pieces:
                    await response.write(float_to_pcm16(pcm).tobytes())
        except ConnectionError:  # the client left; closing `pieces` stops the model work
            log.info("/v1/tts client disconnected mid-stream")
            return response
        except Exception:  # noqa: BLE001 - headers are out: cut the stream so the client sees it fail
            log.exception("/v1/tts stream failed after it started")
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
        return response


async def _audio_file(pcm: np.ndarray, sample_rate: int, fmt: str) -> web.Response:
    if len(pcm) == 0:
        raise RequestError(500, "no audio was generated")
    data = await asyncio.to_thread(encode_audio, pcm, sample_rate, fmt)
    return web.Response(body=data, content_type=mime_type(fmt),
                        headers={"Content-Disposition": f"attachment; filename=audio.{fmt}"})


async def _engine_pcm(stream: AsyncIterator[Any]) -> AsyncIterator[np.ndarray]:
    async with contextlib.aclosing(stream):
        async for chunk in stream:
            yield chunk.pcm


async def _turn_pcm(turn: AsyncIterator[SpeechPiece | TurnResult]) -> AsyncIterator[np.ndarray]:
    async with contextlib.aclosing(turn):
        async for item in turn:
            if isinstance(item, SpeechPiece):
                yield item.pcm


async def _tts_job_shaped(request: web.Request, job_input: Any) -> web.StreamResponse:
    """`{"input": {...}}` on /v1/tts: the job handler, answered with audio instead of a job."""
    services, settings = request.app[SERVICES], request.app[SETTINGS]
    job = await prepare_job(job_input, services, settings)
    sample_rate = services.require_tts().sample_rate
    turn = run_turn(job, services, settings, request.app[CONVERSATIONS])
    if job.input.streaming:
        return await _stream_pcm(request, _turn_pcm(turn), sample_rate)
    result = None
    async with contextlib.aclosing(turn):
        async for item in turn:
            if isinstance(item, TurnResult):
                result = item
    assert result is not None
    return await _audio_file(result.pcm, result.sample_rate, job.input.format)


@requires_key("fish")
async def tts(request: web.Request) -> web.StreamResponse:
    try:
        body, _ = await read_structured(request)
        if isinstance(body.get("input"), dict) and "text" not in body:
            return await _tts_job_shaped(request, body["input"])
        try:
            req = ServeTTSRequest.model_validate(body)
        except ValidationError as exc:
            raise RequestError(400, f"invalid request: {describe_validation_error(exc)}") from None
        services, settings = request.app[SERVICES], request.app[SETTINGS]
        engine = services.require_tts()
        if not req.text.strip():
            raise RequestError(400, "text is empty")
        if len(req.text) > settings.max_text_length:
            raise RequestError(400, f"text is {len(req.text)} characters long; the limit is {settings.max_text_length}")
        if req.streaming and req.format not in ("wav", "pcm"):
            raise RequestError(400, "streaming sends raw PCM: use format wav (or pcm), or streaming false")
        tts_request = TTSRequest(
            text=req.text, references=await _references(req, request),
            sampling=SamplingOptions(temperature=req.temperature, top_p=req.top_p,
                                     repetition_penalty=req.repetition_penalty,
                                     max_new_tokens=frame_limit(req.max_new_tokens, settings),
                                     seed=req.seed),
            chunk_length=req.chunk_length, normalize=req.normalize, use_memory_cache=req.use_memory_cache)
        if req.streaming:
            return await _stream_pcm(request, _engine_pcm(engine.stream(tts_request)), engine.sample_rate)
        async with contextlib.aclosing(_engine_pcm(engine.stream(tts_request))) as pieces:
            parts = [pcm async for pcm in pieces]
        pcm = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        return await _audio_file(pcm, engine.sample_rate, req.format)
    except RequestError as exc:
        return fish_error(exc.status, exc.message)
    except ServiceUnavailable as exc:
        return fish_error(503, str(exc))
    except ValueError as exc:  # TTSInputError, AudioDecodeError, AgentInputError
        return fish_error(400, str(exc))
    except Exception as exc:  # noqa: BLE001 - a failed generation is a 500 with its reason, as upstream
        log.exception("/v1/tts failed")
        return fish_error(500, f"generation failed: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- references
def _wants_json(request: web.Request) -> bool:
    if request.query.get("format") == "json":
        return True
    accept = request.headers.get("Accept", "")
    return "application/json" in accept and "application/msgpack" not in accept


def _ref_response(request: web.Request, body: dict[str, Any], status: int = 200) -> web.Response:
    if _wants_json(request):
        return web.json_response(body, status=status)
    return web.Response(body=msgpack.packb(body), status=status, content_type="application/msgpack")


def _ref_error(request: web.Request, status: int, message: str) -> web.Response:
    return _ref_response(request, {"success": False, "message": message}, status)


async def _reference_body(request: web.Request) -> tuple[dict[str, Any], dict[str, str]]:
    """The fields of a reference request and the file names of its multipart uploads."""
    body, filenames = await read_structured(request, allow_form=True) if request.can_read_body else ({}, {})
    for key, value in request.query.items():  # ids may also come in the query string
        if key != "format":
            body.setdefault(key, value)
    return body, filenames


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else value


VOICE_OWNERS = web.AppKey("voice_owners", VoiceOwners)  # set by server.app


def _owners(request: web.Request) -> VoiceOwners:
    return request.app[VOICE_OWNERS]


def _check_owner(request: web.Request, store: Any, reference_id: str) -> None:
    """A key with the references scope changes its own voices; another key's needs admin."""
    if not _owners(request).may_change(request.get(PRINCIPAL), reference_id, store.exists(reference_id)):
        raise RequestError(403, f"reference {reference_id!r} belongs to another key; changing it needs the admin scope")


@requires_key("fish")
async def add_reference(request: web.Request) -> web.Response:
    store = request.app[SERVICES].references
    try:
        body, filenames = await _reference_body(request)
        reference_id = check_id(_text(body.get("id")), "id")
        audio = body.get("audio")
        if isinstance(audio, str):
            from server.schema import decode_base64_audio

            audio = decode_base64_audio(audio, "audio", request.app[SETTINGS].max_reference_bytes)
        if not isinstance(audio, (bytes, bytearray)) or not audio:
            raise RequestError(400, "audio (the reference audio file) is required")
        settings = request.app[SETTINGS]
        if len(audio) > settings.max_reference_bytes:
            raise RequestError(413, f"audio is {len(audio)} bytes; the limit is {settings.max_reference_bytes}")
        await probe_audio(bytes(audio), "audio", 44100, settings.max_reference_seconds)
        assert store is not None
        _check_owner(request, store, reference_id)
        await asyncio.to_thread(store.add, reference_id, bytes(audio), _text(body.get("text")) or "",
                                filenames.get("audio"))
        await asyncio.to_thread(_owners(request).set, reference_id, request.get(PRINCIPAL))
    except (RequestError, VoiceError) as exc:
        return _ref_error(request, getattr(exc, "status", 400), str(exc))
    return _ref_response(request, {"success": True, "message": f"reference {reference_id!r} added",
                                   "reference_id": reference_id})


@requires_key("fish")
async def list_references(request: web.Request) -> web.Response:
    store = request.app[SERVICES].references
    ids = await asyncio.to_thread(store.list_ids) if store is not None else []
    return _ref_response(request, {"success": True, "reference_ids": ids, "message": f"{len(ids)} reference(s)"})


@requires_key("fish")
async def delete_reference(request: web.Request) -> web.Response:
    store = request.app[SERVICES].references
    try:
        body, _ = await _reference_body(request)
        reference_id = check_id(_text(body.get("reference_id")))
        assert store is not None
        _check_owner(request, store, reference_id)
        await asyncio.to_thread(store.delete, reference_id)
        await asyncio.to_thread(_owners(request).forget, reference_id)
    except (RequestError, VoiceError) as exc:
        return _ref_error(request, getattr(exc, "status", 400), str(exc))
    return _ref_response(request, {"success": True, "message": f"reference {reference_id!r} deleted",
                                   "reference_id": reference_id})


@requires_key("fish")
async def update_reference(request: web.Request) -> web.Response:
    store = request.app[SERVICES].references
    try:
        body, _ = await _reference_body(request)
        old = check_id(_text(body.get("old_reference_id")), "old_reference_id")
        new = check_id(_text(body.get("new_reference_id")), "new_reference_id")
        assert store is not None
        _check_owner(request, store, old)
        _check_owner(request, store, new)
        await asyncio.to_thread(store.rename, old, new)
        await asyncio.to_thread(_owners(request).move, old, new)
    except (RequestError, VoiceError) as exc:
        return _ref_error(request, getattr(exc, "status", 400), str(exc))
    return _ref_response(request, {"success": True, "message": f"reference {old!r} renamed to {new!r}",
                                   "old_reference_id": old, "new_reference_id": new})


async def v1_health(request: web.Request) -> web.Response:
    from server.api_jobs import model_state

    state = model_state(request)
    return web.json_response({**state, "status": "ok" if state["status"] == "ok" else state["status"]})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/tts", tts)
    router.add_get("/v1/health", v1_health)
    router.add_post("/v1/health", v1_health)
    router.add_post("/v1/references/add", add_reference)
    router.add_get("/v1/references/list", list_references)
    router.add_delete("/v1/references/delete", delete_reference)
    router.add_post("/v1/references/delete", delete_reference)
    router.add_post("/v1/references/update", update_reference)
