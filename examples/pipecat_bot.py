"""A Pipecat voice bot whose speech-to-speech brain is a fishvoice server.

Pipecat's own `OpenAIRealtimeLLMService` talks to our `GET /v1/realtime` WebSocket unchanged:
only `base_url` points at the server. Two ways to run it (the server must be up, e.g.
`make serve`):

    # talk to it through the microphone and speakers (needs `pip install "pipecat-ai[local]"`)
    python examples/pipecat_bot.py --url ws://127.0.0.1:8000/v1/realtime

    # or play a recording into it and write its spoken reply to a file (no audio devices needed)
    python examples/pipecat_bot.py --url ws://127.0.0.1:8000/v1/realtime --wav question.wav --out reply.wav

The file mode uses the two small transports below, `PcmInput` and `PcmSpeaker`, which the
Pipecat tests (tests/test_pipecat.py) use too.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import time
import wave

from pipecat.frames.frames import (BotStoppedSpeakingFrame, EndFrame, Frame, InputAudioRawFrame, LLMRunFrame,
                                   MetricsFrame, OutputAudioRawFrame, StartFrame)
from pipecat.metrics.metrics import TTFBMetricsData
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.openai.realtime.events import (AudioConfiguration, AudioInput, AudioOutput,
                                                     InputAudioTranscription, SemanticTurnDetection, SessionProperties,
                                                     TurnDetection)
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
from pipecat.transports.base_input import BaseInputTransport
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import TransportParams
from pipecat.workers.runner import WorkerRunner

RATE = 24_000  # the Realtime API's PCM rate, both ways
FRAME_SECONDS = 0.02
INSTRUCTIONS = ("You are a helpful voice assistant. Greet the user in a few words when the call starts, "
                "then answer in one short sentence.")


def realtime_service(url: str, api_key: str, *, voice: str = "alloy", model: str = "gpt-realtime",
                     instructions: str = INSTRUCTIONS, text_only: bool = False,
                     turn_detection: TurnDetection | SemanticTurnDetection | None = None) -> OpenAIRealtimeLLMService:
    """Pipecat's OpenAI Realtime service pointed at a fishvoice server. `voice` is an OpenAI voice
    name (our default voice) or a saved reference id (a cloned voice); turns are the server's
    VAD (default: end of speech after 500 ms of silence)."""
    session = SessionProperties(
        output_modalities=["text"] if text_only else ["audio"],
        audio=AudioConfiguration(
            input=AudioInput(transcription=InputAudioTranscription(model="whisper-1"),
                             turn_detection=turn_detection or TurnDetection(silence_duration_ms=500)),
            output=AudioOutput(voice=voice)))
    return OpenAIRealtimeLLMService(
        api_key=api_key, base_url=url,
        settings=OpenAIRealtimeLLMService.Settings(model=model, system_instruction=instructions,
                                                   session_properties=session))


class PcmInput(BaseInputTransport):
    """An input transport fed from memory: 16-bit mono PCM at 24 kHz, sent at the pace of a
    microphone (20 ms frames in real time)."""

    def __init__(self) -> None:
        super().__init__(TransportParams(audio_in_enabled=True, audio_in_sample_rate=RATE))

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def speak(self, pcm: bytes) -> None:
        step = int(RATE * FRAME_SECONDS) * 2
        t0 = time.monotonic()
        for n, i in enumerate(range(0, len(pcm), step)):
            await self.push_audio_frame(InputAudioRawFrame(audio=pcm[i:i + step], sample_rate=RATE, num_channels=1))
            await asyncio.sleep(max(0.0, t0 + (n + 1) * FRAME_SECONDS - time.monotonic()))

    async def silence(self, seconds: float) -> None:
        await self.speak(bytes(int(RATE * seconds) * 2))


class PcmSpeaker(BaseOutputTransport):
    """An output transport that plays into memory at the pace of a speaker, noting when each
    reply starts and ends and what Pipecat measured (its TTFB metrics)."""

    def __init__(self) -> None:
        super().__init__(TransportParams(audio_out_enabled=True, audio_out_sample_rate=RATE))
        self.audio = bytearray()
        self.first_audio_at: list[float] = []  # monotonic time of each reply's first played chunk
        self.stopped = asyncio.Event()  # the bot stopped speaking (set each time)
        self.ttfb: list[float] = []
        self._speaking = False

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        if not self._speaking:
            self._speaking = True
            self.first_audio_at.append(time.monotonic())
        self.audio += frame.audio
        await asyncio.sleep(len(frame.audio) / 2 / frame.sample_rate)  # a speaker plays in real time
        return True

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, MetricsFrame):
            self.ttfb += [m.value for m in frame.data if isinstance(m, TTFBMetricsData) and m.value > 0]

    async def push_frame(self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM) -> None:
        if isinstance(frame, BotStoppedSpeakingFrame) and direction == FrameDirection.DOWNSTREAM:
            self._speaking = False  # the transport itself says so, after the last chunk played
            self.stopped.set()
        await super().push_frame(frame, direction)


def voice_pipeline(transport_in, llm: OpenAIRealtimeLLMService, transport_out,
                   context: LLMContext | None = None) -> tuple[Pipeline, LLMContext]:
    """The usual Pipecat speech-to-speech pipeline: input, user context, the realtime service,
    output, assistant context."""
    context = context or LLMContext()
    user, assistant = LLMContextAggregatorPair(context)
    return Pipeline([transport_in, user, llm, transport_out, assistant]), context


def read_pcm24k(path: str) -> bytes:
    """Any audio file -> 16-bit mono PCM at 24 kHz (PyAV)."""
    import av

    out = bytearray()
    with av.open(path) as container:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        for frame in container.decode(audio=0):
            for f in resampler.resample(frame):
                out += f.to_ndarray().tobytes()
        for f in resampler.resample(None):
            out += f.to_ndarray().tobytes()
    return bytes(out)


async def run_file(args: argparse.Namespace) -> None:
    mic, speaker = PcmInput(), PcmSpeaker()
    llm = realtime_service(args.url, args.api_key, voice=args.voice)
    pipeline, context = voice_pipeline(mic, llm, speaker)
    worker = PipelineWorker(pipeline, params=PipelineParams(enable_metrics=True), cancel_on_idle_timeout=False)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)

    async def converse() -> None:
        # As Pipecat's own bots do: run the LLM once at start, so the service sets up its
        # conversation now (not after the first server-VAD turn) and the bot greets first.
        await worker.queue_frame(LLMRunFrame())
        await asyncio.wait_for(speaker.stopped.wait(), args.timeout)
        speaker.stopped.clear()
        greeting = len(speaker.audio)
        pcm = read_pcm24k(args.wav)
        await mic.speak(pcm)
        ended = time.monotonic()
        talking = asyncio.create_task(mic.silence(args.timeout))  # the microphone stays open
        try:
            await asyncio.wait_for(speaker.stopped.wait(), args.timeout)
        finally:
            talking.cancel()
        await asyncio.sleep(0.5)  # the assistant aggregator records the reply once it has played
        with wave.open(args.out, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(RATE)
            w.writeframes(bytes(speaker.audio[greeting:]))
        for message in context.get_messages():
            print(f"{message.get('role')}: {message.get('content')}")
        print(f"reply: {(len(speaker.audio) - greeting) / 2 / RATE:.2f} s of audio -> {args.out}")
        if speaker.first_audio_at:
            print(f"end of input -> first reply audio played: {speaker.first_audio_at[-1] - ended:.2f} s")
        if speaker.ttfb:
            print(f"Pipecat TTFB (end of speech -> first audio delta): {speaker.ttfb[-1]:.2f} s")
        await worker.queue_frame(EndFrame())

    await asyncio.gather(runner.run(), converse())


async def run_local(args: argparse.Namespace) -> None:
    from pipecat.transports.local.audio import LocalAudioTransport, LocalAudioTransportParams

    transport = LocalAudioTransport(LocalAudioTransportParams(audio_in_enabled=True, audio_out_enabled=True,
                                                              audio_in_sample_rate=RATE, audio_out_sample_rate=RATE))
    llm = realtime_service(args.url, args.api_key, voice=args.voice)
    pipeline, _ = voice_pipeline(transport.input(), llm, transport.output())
    worker = PipelineWorker(pipeline, params=PipelineParams(enable_metrics=True))
    runner = WorkerRunner()
    await runner.add_workers(worker)
    await worker.queue_frame(LLMRunFrame())  # set the conversation up now; the bot greets first
    print("Speak; Ctrl-C ends the call.")
    await runner.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="ws://127.0.0.1:8000/v1/realtime", help="the server's realtime WebSocket")
    parser.add_argument("--api-key", default=os.environ.get("API_KEY", "none"),
                        help="the server's API key (default: $API_KEY)")
    parser.add_argument("--voice", default="alloy", help="an OpenAI voice name or a saved reference id")
    parser.add_argument("--wav", help="play this recording into the bot instead of the microphone")
    parser.add_argument("--out", default="reply.wav", help="with --wav: where to write the spoken reply")
    parser.add_argument("--timeout", type=float, default=60.0, help="with --wav: seconds to wait for the reply")
    args = parser.parse_args()
    asyncio.run(run_file(args) if args.wav else run_local(args))


if __name__ == "__main__":
    main()
