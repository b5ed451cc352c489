"""RunPod-shaped job output: streamed audio items, the final result, errors, and the summary a
streaming job ends with (its audio went out in the items)."""
from __future__ import annotations

import asyncio
import base64
from typing import TYPE_CHECKING, Any

from engine.audio import encode_audio, float_to_pcm16

if TYPE_CHECKING:
    from server.jobs.turn import SpeechPiece, TurnResult
    from server.schema import JobInput

STREAM_CHUNK_BYTES = 192 * 1024  # raw PCM per streamed item: ~256 KB of base64, far below RunPod's 1 MB


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


def stream_summary(final: dict[str, Any]) -> dict[str, Any]:
    """The last /stream item of a streaming job: the result without the audio, which came in chunks."""
    return {k: v for k, v in final.items() if k != "audio"} | {"audio_in_chunks": True}
