"""OpenAI's audio API on this server, for apps that speak or listen through a configurable
OpenAI base URL (Open WebUI, Home Assistant, SillyTavern, scripts using the `openai` SDK):

    POST /v1/audio/speech            text -> speech in a saved reference voice (streamed)
    GET  /v1/audio/voices            the saved reference voices (for voice pickers)
    POST /v1/audio/transcriptions    audio file -> text / json / verbose_json / srt / vtt, or SSE
    POST /v1/audio/translations      the same, translated to English
    GET  /v1/models, /v1/models/{id} the loaded TTS, ASR and agent LLM models

Errors come in OpenAI's shape; API_KEY protects every route (scopes: speech = tts,
transcriptions and translations = asr, models = any key).
"""
from __future__ import annotations

from aiohttp import web

from server.openai_audio import models, speech, transcriptions


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/audio/speech", speech.create_speech)
    router.add_get("/v1/audio/voices", speech.list_voices)
    router.add_post("/v1/audio/transcriptions", transcriptions.create_transcription)
    router.add_post("/v1/audio/translations", transcriptions.create_translation)
    router.add_get("/v1/models", models.list_models)
    router.add_get("/v1/models/{model_id}", models.get_model)
