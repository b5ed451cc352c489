"""The loaded models every transport shares, and their start-up.

A model that cannot be loaded (missing or gated checkpoint, no ASR model, no LLM) never stops
the server: its slot stays None and `errors` keeps the reason, which /health reports and the
routes that need it return as a 503.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from server.settings import Settings

if TYPE_CHECKING:
    from engine.agent.asr import Transcriber
    from engine.agent.llm.base import ChatLLM
    from engine.agent.smart_turn import SmartTurn
    from engine.speech.types import SpeechSynthesizer
    from engine.agent.vad import SileroVAD
    from server.references import ReferenceStore

log = logging.getLogger(__name__)


class ServiceUnavailable(RuntimeError):
    """A request needs a model that is not loaded (HTTP 503)."""


@dataclasses.dataclass
class Services:
    tts: SpeechSynthesizer | None = None
    asr: Transcriber | None = None
    vad: SileroVAD | None = None
    smart_turn: SmartTurn | None = None  # semantic_vad's end-of-turn model
    llm: ChatLLM | None = None
    references: ReferenceStore | None = None
    errors: dict[str, str] = dataclasses.field(default_factory=dict)  # component -> why it is not loaded
    loading: bool = False
    load_seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def require_tts(self) -> SpeechSynthesizer:
        if self.tts is None:
            raise ServiceUnavailable(self._why("tts", "the TTS model"))
        return self.tts

    def require_llm(self) -> ChatLLM:
        if self.llm is None:
            raise ServiceUnavailable(self._why("llm", "the agent LLM") + "; send \"tts\": true for plain TTS")
        return self.llm

    def _why(self, name: str, what: str) -> str:
        if self.loading:
            return f"{what} is still loading; retry shortly"
        reason = self.errors.get(name)
        return f"{what} is not loaded: {reason}" if reason else f"{what} is not loaded"

    def describe(self) -> dict[str, Any]:
        """Per-component state for /health."""
        out: dict[str, Any] = {}
        for name in ("tts", "asr", "vad", "smart_turn", "llm"):
            obj = getattr(self, name)
            item: dict[str, Any] = {"loaded": obj is not None}
            if obj is None and name in self.errors:
                item["error"] = self.errors[name]
            if name == "tts" and obj is not None:
                item["sample_rate"] = obj.sample_rate
            if name == "llm" and obj is not None:
                item["name"] = getattr(obj, "name", None)
            out[name] = item
        return out

    async def aclose(self) -> None:
        if self.tts is not None:
            self.tts.close()
        if self.asr is not None:
            self.asr.close()
        if self.llm is not None:
            try:
                await self.llm.aclose()
            except Exception:  # noqa: BLE001 - closing is best effort
                log.exception("closing the agent LLM failed")


def _timed(services: Services, name: str, fn):
    t0 = time.perf_counter()
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - every load failure becomes a reported reason
        services.errors[name] = str(exc) or type(exc).__name__
        log.warning("%s not loaded: %s", name, services.errors[name])
        return None
    services.load_seconds[name] = round(time.perf_counter() - t0, 2)
    services.errors.pop(name, None)
    return value


def _load_tts(settings: Settings):
    load = dict(checkpoint=settings.checkpoint, device=settings.device, dtype=settings.dtype,
                decode_slots=settings.decode_slots, quantize=settings.quantize, threads=settings.torch_threads)
    if settings.tts_process:
        from engine.speech.tts_process import TTSProcess

        return TTSProcess(load)
    from engine.speech.tts import TTSEngine

    return TTSEngine.load(**load)


def _load_asr(settings: Settings):
    from engine.agent.asr import Transcriber

    model = None if settings.asr_model.strip().lower() == "default" else settings.asr_model
    return Transcriber.load(model)


def _load_vad(settings: Settings):
    from engine.agent.vad import SileroVAD

    return SileroVAD.load()


def _load_smart_turn(settings: Settings):
    from engine.agent.smart_turn import SmartTurn

    return SmartTurn.load()


def _load_llm(settings: Settings):
    from engine.agent.llm import create_llm

    return create_llm(base_url=settings.llm_base_url, model=settings.llm_model, api_key=settings.llm_api_key,
                      gguf_path=settings.llm_gguf)


def limit_blas_threads() -> None:
    """numpy's BLAS (OpenBLAS) on one thread in the serving process, unless OPENBLAS_NUM_THREADS says otherwise.

    The only matrix products numpy does here are small: the mel filterbanks of Whisper's and Smart
    Turn's features. A second BLAS thread buys nothing there, and OpenBLAS's idle threads spin for
    ~0.1 s after each call, taking a core from the CTranslate2 encoder that runs next. On the 2-core
    dev VM that made a tiny.en pass 310 ms instead of 225, and a Smart Turn inference 145 ms instead
    of 85. Called after the models load, so that every BLAS the process loaded by then is covered.
    """
    if "OPENBLAS_NUM_THREADS" in os.environ:
        return
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def load_services_sync(settings: Settings, services: Services | None = None) -> Services:
    """Load every configured model into `services` (a new one if None). Never raises for a model."""
    from server.references import ReferenceStore

    services = services or Services()
    services.loading = True
    try:
        services.references = ReferenceStore(settings.references_dir, max_bytes=settings.max_reference_bytes)
        services.tts = _timed(services, "tts", lambda: _load_tts(settings))
        if settings.asr_enabled:
            services.asr = _timed(services, "asr", lambda: _load_asr(settings))
            services.vad = _timed(services, "vad", lambda: _load_vad(settings))
            services.smart_turn = _timed(services, "smart_turn", lambda: _load_smart_turn(settings))
        else:
            for name in ("asr", "vad", "smart_turn"):
                services.errors[name] = "disabled (ASR_MODEL=none)"
        if settings.llm_enabled:
            services.llm = _timed(services, "llm", lambda: _load_llm(settings))
        else:
            services.errors["llm"] = "disabled (LLM_ENABLED=false)"
        limit_blas_threads()
    finally:
        services.loading = False
    return services


async def load_services(settings: Settings, services: Services | None = None) -> Services:
    """`load_services_sync` on a worker thread, so the event loop stays free while models load."""
    services = services or Services()
    services.loading = True
    return await asyncio.to_thread(load_services_sync, settings, services)
