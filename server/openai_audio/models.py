"""GET /v1/models and /v1/models/{id}: the loaded models in OpenAI's list shape, so apps that
check a base URL by listing models accept this server.

Listed: the TTS checkpoint, the ASR model and the agent LLM (whichever are loaded). OpenAI's own
model names (tts-1, whisper-1, ...) are accepted by the audio routes and answered here too,
each as an alias whose `root` is the loaded model it runs on.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from aiohttp import web

from server.http import SERVICES, SETTINGS, requires_key
from server.openai_audio.errors import OpenAIError, openai_errors
from server.services import Services
from server.settings import Settings

OWNER = "fishvoice"
TTS_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
ASR_ALIASES = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe")
_STARTED = int(time.time())


def _name(value: str) -> str:
    return Path(value.rstrip("/")).name or value


def loaded_models(services: Services, settings: Settings) -> dict[str, dict[str, Any]]:
    """kind ("tts", "asr", "llm") -> model card, for each loaded model."""
    cards: dict[str, dict[str, Any]] = {}

    def card(model_id: str, kind: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": _STARTED, "owned_by": OWNER, "type": kind}

    if services.tts is not None:
        cards["tts"] = card(_name(settings.checkpoint), "tts")
    if services.asr is not None:
        default = settings.asr_model.strip().lower() == "default"
        cards["asr"] = card("whisper-tiny.en" if default else _name(settings.asr_model), "asr")
    if services.llm is not None:
        name = getattr(services.llm, "name", None) or settings.llm_model or "llm"
        cards["llm"] = card(name.split("@", 1)[0], "llm")  # the remote endpoint's URL is not the model's name
    return cards


@requires_key()
@openai_errors
async def list_models(request: web.Request) -> web.Response:
    cards = loaded_models(request.app[SERVICES], request.app[SETTINGS])
    return web.json_response({"object": "list", "data": list(cards.values())})


@requires_key()
@openai_errors
async def get_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    cards = loaded_models(request.app[SERVICES], request.app[SETTINGS])
    for found in cards.values():
        if found["id"] == model_id:
            return web.json_response(found)
    for kind, aliases in (("tts", TTS_ALIASES), ("asr", ASR_ALIASES)):
        if model_id in aliases and kind in cards:
            return web.json_response({**cards[kind], "id": model_id, "root": cards[kind]["id"]})
    raise OpenAIError(404, f"the model {model_id!r} does not exist here (see GET /v1/models)", "model",
                      "model_not_found")
