"""The job handler behind the job API, the RunPod worker and /v1/tts's job-shaped bodies.

`handle_job` takes a job's `input` (the original endpoint's fields) and yields dicts: with
`streaming`, one `{"status": "streaming", "audio": <base64 s16le PCM>, ...}` per piece of audio
as the engine produces it, then always one final `{"status": "success", "audio": <base64 in
format>, ...}` or `{"status": "error", "error": ...}`. Cancelling the task that iterates it
stops the model work.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from server.conversations import ConversationStore
from server.jobs.input import ParsedJob, prepare_job
from server.jobs.output import error_output, final_output, stream_items
from server.jobs.turn import SpeechPiece, run_turn
from server.schema import RequestError
from server.services import ServiceUnavailable, Services
from server.settings import Settings


async def handle_job(job_input: Any, services: Services, settings: Settings, conversations: ConversationStore,
                     prepared: ParsedJob | None = None) -> AsyncIterator[dict[str, Any]]:
    """`prepared` is the same input already through `prepare_job` (the job API does that when it
    accepts a job); without it the input is validated and decoded here."""
    from engine.agent.reply_stream import ReplyError

    try:
        job = prepared if prepared is not None else await prepare_job(job_input, services, settings)
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
