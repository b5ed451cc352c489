"""The TTS pipeline that every transport calls: text + reference voice -> streamed PCM chunks.

Text is normalised and split into chunks; each chunk's prompt carries the reference (its
transcript and codes) and the earlier chunks' generated codes, so the voice stays the same.
Frames are decoded every few frames by one streaming codec decoder per request (more at once when
the listener is well ahead), so the first audio leaves after a handful of frames instead of a
whole sentence. All model work runs on the `ModelWorker` thread; the asyncio side only moves
numpy arrays.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from engine.audio import AudioDecodeError, decode_audio
from engine.fish.codec import StreamingDecoder
from engine.fish.models import FishModels, load_models
from engine.fish.prompt import build_prompt
from engine.fish.generate import FrameGenerator
from engine.speech.scheduler import BatchableStep, ModelWorker
from engine.speech.text import TTSInputError, speakable_chunks
from engine.speech.types import AudioChunk, Reference, TTSRequest, synthesize_whole

log = logging.getLogger(__name__)

# ≈93 ms of audio per decoder push. On CPU the codec costs about the same per frame either way,
# and the first audio leaves two frames earlier than with 4 (measured: 1.41 s vs 1.70 s cold).
DEFAULT_STREAM_FRAMES = 2
# Once the listener is well ahead, fewer and longer decoder pushes: a push costs mostly its fixed
# overhead on CPU (tiny codec, 1 thread: 7.8 ms for 2 frames, 13.3 ms for 8).
MAX_STREAM_FRAMES = 8
AHEAD_SECONDS = 0.5  # emitted audio beyond real-time playback before pushes may grow
REQUESTS_PER_FIRST_FRAME = 3  # concurrent requests per extra frame in a first chunk (first_push_frames)
MAX_REFERENCE_SECONDS = 90.0


def model_threads(device: torch.device, requested: int = 0) -> int | None:
    """Torch threads for the model worker: `requested`, or on a CPU all cores but one (at least
    one), None (torch's default) on a GPU. The core left over is the asyncio loop's, which carries
    every call's RTP, Opus and VAD: with all cores, OpenMP workers spin against the loop, and on a
    busy machine wait for a descheduled partner (10x the CPU per tiny-model frame at load 10)."""
    if requested > 0:
        return requested
    if device.type != "cpu":
        return None
    return max(1, len(os.sched_getaffinity(0)) - 1)


class ReferenceCache:
    """Reference codes by SHA-256 of the audio bytes, least recently used evicted first."""

    def __init__(self, max_entries: int = 256) -> None:
        self._items: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries

    @staticmethod
    def key(audio: bytes) -> str:
        return hashlib.sha256(audio).hexdigest()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            codes = self._items.get(key)
            if codes is not None:
                self._items.move_to_end(key)
            return codes

    def put(self, key: str, codes: np.ndarray) -> None:
        with self._lock:
            self._items[key] = codes
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def first_push_frames(every: int, active_requests: int) -> int:
    """Frames in a request's first chunk. Its second chunk waits for every other request's push
    on the worker, so under load the first must play longer to cover that wait: one more frame
    per `REQUESTS_PER_FIRST_FRAME` requests in progress (with 6 calls starting together, 2-frame
    first chunks ran dry before the second arrived; 3 frames did not)."""
    return every + max(0, active_requests - 1) // REQUESTS_PER_FIRST_FRAME


class PushCadence:
    """When a request's pending code frames go to the decoder.

    Every `every` frames while the audio emitted is less than `AHEAD_SECONDS` ahead of playing
    it in real time from the first chunk; up to `most` frames a push once it is. Waiting for a
    longer push never lets a real-time listener run dry: the lead is checked at every frame,
    and a push is made as soon as it falls under the margin. The first push waits for `first()`
    frames (at least `every`), asked when it is due, i.e. under the load of that moment.
    (Tried: a 0.2 s margin plus the last frame's time, to reach long pushes sooner under load;
    6-8 calls underran more, not less.)"""

    def __init__(self, every: int, most: int, clock=time.monotonic,
                 first: Callable[[], int] | None = None) -> None:
        self.every, self.most = every, max(every, most)
        self._first = first
        self._clock = clock
        self._t_first: float | None = None
        self._emitted = 0.0  # seconds of audio emitted so far

    def lead(self) -> float:
        if self._t_first is None:
            return 0.0
        return self._emitted - (self._clock() - self._t_first)

    def due(self, pending: int) -> bool:
        if self._t_first is None:
            first = self.every if self._first is None else min(max(self._first(), self.every), self.most)
            return pending >= first
        return pending >= self.most or (pending >= self.every and self.lead() < AHEAD_SECONDS)

    def emitted(self, seconds: float) -> None:
        if self._t_first is None:
            self._t_first = self._clock()
        self._emitted += seconds


class FrameStep(BatchableStep):
    """One frame of one request; frames of concurrent requests on one model run as a batch."""

    def __init__(self, gen: FrameGenerator) -> None:
        self.gen = gen
        self.batch_key = id(gen.runner)

    @classmethod
    def run_batch(cls, items: list[BatchableStep]) -> None:
        steps = [item for item in items if isinstance(item, FrameStep)]
        results = steps[0].gen.runner.step_many([s.gen for s in steps])
        for step, codes in zip(steps, results):
            step.result = codes


class TTSEngine:
    """Implements `engine.speech.types.SpeechSynthesizer` for a loaded Fish Speech checkpoint."""

    def __init__(self, models: FishModels, stream_every_frames: int = DEFAULT_STREAM_FRAMES,
                 max_stream_frames: int = MAX_STREAM_FRAMES) -> None:
        self.models = models
        self.stream_every_frames = stream_every_frames
        self.max_stream_frames = max_stream_frames  # the cadence's ceiling when a request sets none
        self.references = ReferenceCache()
        self.worker = ModelWorker()

    @classmethod
    def load(cls, checkpoint: str | Path, device: str | None = None, dtype: str | torch.dtype | None = None,
             decode_slots: int | None = None, quantize: str | None = "none", threads: int | None = None,
             **kwargs: object) -> TTSEngine:
        """`threads`: torch's thread count for the process (0 = `model_threads`' choice; None
        leaves torch's setting alone)."""
        models = load_models(checkpoint, device, dtype, decode_slots, quantize)
        if threads is not None and (count := model_threads(models.device, threads)) is not None:
            torch.set_num_threads(count)
            log.info("torch uses %d thread(s) for model work", count)
        return cls(models, **kwargs)  # type: ignore[arg-type]

    @property
    def sample_rate(self) -> int:
        return self.models.codec.sample_rate

    @property
    def num_codebooks(self) -> int:
        return self.models.config.num_codebooks

    @property
    def active_requests(self) -> int:
        return self.worker.active_jobs

    def close(self) -> None:
        self.worker.stop()

    # --- references
    def _encode_now(self, pcm: np.ndarray) -> np.ndarray:
        codec = self.models.codec
        with torch.inference_mode():
            audio = torch.from_numpy(pcm).to(codec.device, torch.float32)
            return codec.encode(audio).cpu().numpy().astype(np.int64)

    async def encode_reference(self, audio: bytes, *, use_memory_cache: bool = True,
                               pcm: np.ndarray | None = None) -> np.ndarray:
        key = ReferenceCache.key(audio)
        if use_memory_cache and (hit := self.references.get(key)) is not None:
            return hit
        if pcm is None:
            loop = asyncio.get_running_loop()
            # Decoding is plain CPU work: keep it off both the loop and the model thread.
            pcm = await loop.run_in_executor(None, lambda: decode_audio(audio, self.sample_rate,
                                                                        max_seconds=MAX_REFERENCE_SECONDS))
        elif len(pcm) > MAX_REFERENCE_SECONDS * self.sample_rate:  # the limit decoding applies
            raise AudioDecodeError(f"audio is longer than the {MAX_REFERENCE_SECONDS:g} s limit")
        codes = await asyncio.wrap_future(self.worker.call(lambda: self._encode_now(pcm)))
        # "off" still refreshes the cache, as upstream does.
        self.references.put(key, codes)
        return codes

    async def _reference_codes(self, refs: tuple[Reference, ...], use_cache: bool) -> list[tuple[str, np.ndarray]]:
        out = []
        for ref in refs:
            if ref.codes is not None:
                codes = np.asarray(ref.codes)
                if codes.ndim != 2 or codes.shape[0] != self.num_codebooks or codes.shape[1] == 0:
                    raise TTSInputError(f"reference codes must be shaped [{self.num_codebooks}, frames], "
                                        f"got {list(codes.shape)}")
            elif ref.audio:
                codes = await self.encode_reference(ref.audio, use_memory_cache=use_cache)
            else:
                raise TTSInputError("a reference needs audio or codes")
            out.append((ref.text, codes))
        return out

    # --- synthesis
    def prepare_text(self, request: TTSRequest) -> list[str]:
        return speakable_chunks(request)

    async def stream(self, request: TTSRequest) -> AsyncIterator[AudioChunk]:
        chunks = self.prepare_text(request)
        references = await self._reference_codes(request.references, request.use_memory_cache)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        end = object()

        def emit(item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the consumer's loop is gone; nothing is listening
                pass

        steps = self._steps(request, chunks, references, emit)
        job = self.worker.submit(steps, on_error=emit, on_done=lambda: emit(end))
        try:
            while True:
                item = await queue.get()
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancel()  # closing or cancelling the consumer stops the model work

    async def synthesize(self, request: TTSRequest) -> np.ndarray:
        return await synthesize_whole(self, request)

    def _steps(self, request: TTSRequest, chunks: list[str], references: list[tuple[str, np.ndarray]],
               emit) -> Iterator[BatchableStep | None]:
        """The request as a sequence of small units of work for the model worker."""
        m = self.models
        every = max(1, request.stream_every_frames or self.stream_every_frames)
        # A request's own cadence is kept exactly; the default one grows once the listener is ahead,
        # and its first chunk is longer while other requests share the worker.
        if request.stream_every_frames:
            cadence = PushCadence(every, every)
        else:
            cadence = PushCadence(every, self.max_stream_frames,
                                  first=lambda: first_push_frames(every, self.worker.active_jobs))
        decoder = StreamingDecoder(m.codec)  # one per request: chunk boundaries stay seamless
        history: list[tuple[str, np.ndarray]] = []
        for index, text in enumerate(chunks):
            prompt = build_prompt(m.tokenizer, m.family, text, references=references, history=history,
                                  num_codebooks=m.config.num_codebooks, max_length=m.config.max_seq_len)
            gen = m.runner.start(torch.as_tensor(prompt), request.sampling, request.sampling.max_new_tokens)
            frames: list[torch.Tensor] = []
            pending: list[torch.Tensor] = []
            try:
                while True:
                    step = FrameStep(gen)
                    yield step
                    codes = step.result
                    if codes is not None:
                        frames.append(codes)
                        pending.append(codes)
                    if pending and (codes is None or cadence.due(len(pending))):
                        with torch.inference_mode():
                            audio = decoder.push(torch.stack(pending, dim=1))
                        pcm = audio.float().cpu().numpy().reshape(-1)
                        cadence.emitted(len(pcm) / m.codec.sample_rate)
                        emit(AudioChunk(pcm=pcm, sample_rate=m.codec.sample_rate, frames=len(pending),
                                        text_chunk=index))
                        pending = []
                    if codes is None:
                        break
            finally:
                gen.close()  # a cancelled request gives its decode slot back at once
            if frames:
                history.append((text, torch.stack(frames, dim=1).cpu().numpy()))
            yield
