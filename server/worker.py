"""The RunPod serverless worker: the same job handler under `runpod.serverless.start`.

    python -m server.worker                                   # on RunPod (RUNPOD_WEBHOOK_GET_JOB is set)
    python -m server.worker --test_input '{"input": {...}}'   # runpod's local test: one job, then exit
    python -m server.worker --rp_serve_api                    # runpod's local dev API

Configuration comes from the environment (CHECKPOINT, MODE, DATA_DIR, ...; see server.settings).
The handler is an async generator started with `return_aggregate_stream`, so on RunPod
/stream yields audio chunks as they are produced and /run, /runsync and /status get the list of
every item, the last being the result. For a streaming job that last item carries no `audio`
(the chunks hold it; each streamed payload must stay under 1 MB); without streaming it holds
the whole file. Conversations persist in DATA_DIR: point it at a network volume to share them
between workers.

runpod's local test mode calls the handler once and does not iterate generators, so there the
generator is wrapped into a plain coroutine returning the same list.
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from server.conversations import ConversationStore
from server.jobs.handler import handle_job
from server.jobs.output import stream_summary
from server.services import Services, load_services_sync
from server.settings import Settings

log = logging.getLogger(__name__)

_state: dict[str, Any] = {}


def setup(settings: Settings | None = None, services: Services | None = None) -> None:
    """Load the models once per worker process (RunPod's cold start)."""
    settings = settings or Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    _state["settings"] = settings
    _state["services"] = services or load_services_sync(settings)
    _state["conversations"] = ConversationStore(settings.data_dir / "conversations.sqlite3",
                                                settings.conversation_ttl, shared=True)


async def handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """RunPod generator handler. An `{"status": "error", "error"}` item fails the job."""
    if not _state:
        setup()
    async for item in handle_job(job.get("input"), _state["services"], _state["settings"], _state["conversations"]):
        if item.get("status") == "success" and "chunks" in item:  # a streaming job: the audio went in chunks
            item = stream_summary(item)
        yield item  # asyncio.CancelledError (RunPod's per-job stop) propagates: never swallowed


async def collect(job: dict[str, Any]) -> Any:
    """The generator's items as one list (what return_aggregate_stream makes of them)."""
    items = [item async for item in handler(job)]
    errors = [item["error"] for item in items if isinstance(item, dict) and item.get("status") == "error"]
    if errors:
        return {"error": errors[-1]}
    return items


def concurrency(current: int) -> int:
    settings = _state.get("settings") or Settings()
    return settings.concurrent_jobs


def _runs_locally(argv: list[str]) -> bool:
    """runpod's own rule: a test input, or no job-take URL, means the one-shot local test."""
    if "--rp_serve_api" in argv:
        return False
    return any(a.startswith("--test_input") for a in argv) or os.environ.get("RUNPOD_WEBHOOK_GET_JOB") is None


def main() -> None:
    import runpod

    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper())
    setup()
    local = _runs_locally(sys.argv[1:])
    runpod.serverless.start({
        "handler": collect if local else handler,
        "return_aggregate_stream": True,
        "concurrency_modifier": concurrency,
    })


if __name__ == "__main__":
    main()
