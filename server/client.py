"""Test client for the job API (ours or a RunPod endpoint): submit a job, follow it, save the audio.

    # our server
    python -m server.client --url http://127.0.0.1:8000 --message "Hello, how are you today?"
    # TTS voice cloning, streamed
    python -m server.client --url http://127.0.0.1:8000 --tts --message "Text to speak" \\
        --system-audio ref.wav --reference-text "What ref.wav says" --streaming --output out.wav
    # a RunPod endpoint
    python -m server.client --endpoint ENDPOINT_ID --api-key KEY --message "Hello"
    # no server at all: run the handler in this process (needs CHECKPOINT or --checkpoint)
    python -m server.client --local --checkpoint checkpoints/openaudio-s1-mini --tts --message "Hello"

Only `requests` and the standard library are needed, except for --local.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import time
import wave
from pathlib import Path
from typing import Any

FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")


def build_input(args: argparse.Namespace) -> dict[str, Any]:
    job: dict[str, Any] = {"format": args.format, "streaming": bool(args.streaming)}
    if args.tts:
        job["tts"] = True
        job["text"] = args.text or args.message
    else:
        job["message"] = args.message
        if args.text:
            job["text"] = args.text
    if args.system:
        job["system_message"] = args.system
    if args.system_audio:
        job["system_audio"] = base64.b64encode(Path(args.system_audio).read_bytes()).decode("ascii")
    if args.reference_text:
        job["reference_text"] = args.reference_text
    if args.conversation_id:
        job["conversation_id"] = args.conversation_id
    for name in ("temperature", "top_p", "max_new_tokens", "seed", "chunk_length"):
        value = getattr(args, name)
        if value is not None:
            job[name] = value
    return job


def base_url(args: argparse.Namespace) -> str:
    if args.url:
        url = args.url.rstrip("/")
        return f"{url}/v2/{args.endpoint}" if args.endpoint else url
    if not args.endpoint:
        raise SystemExit("give --url (this server) or --endpoint (a RunPod endpoint id), or --local")
    return f"https://api.runpod.ai/v2/{args.endpoint}"


def follow_job(base: str, api_key: str | None, job_input: dict[str, Any], *, timeout: float = 300.0,
               poll: float = 0.5, log=print) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """POST /run, then /stream (streaming jobs) or /status until the end. Returns (status body, chunks)."""
    import requests

    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    response = requests.post(f"{base}/run", json={"input": job_input}, headers=headers, timeout=60)
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {_error_of(response)}")
    job_id = response.json()["id"]
    log(f"job {job_id} submitted")
    chunks: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        if job_input.get("streaming"):
            body = requests.get(f"{base}/stream/{job_id}", headers=headers, timeout=60).json()
            for item in body.get("stream", []):
                output = item.get("output")
                if isinstance(output, dict) and output.get("status") == "streaming":
                    if not chunks:
                        log(f"first audio chunk after {time.monotonic() - t0:.2f} s")
                    chunks.append(output)
            if body.get("status") in FINAL_STATES and not body.get("stream"):
                break
        else:
            body = requests.get(f"{base}/status/{job_id}", headers=headers, timeout=60).json()
            if body.get("status") in FINAL_STATES:
                break
            log(f"status {body.get('status')}...")
        time.sleep(poll)
    else:
        requests.post(f"{base}/cancel/{job_id}", headers=headers, timeout=10)
        raise TimeoutError(f"job {job_id} did not finish in {timeout:g} s (cancelled)")
    status = requests.get(f"{base}/status/{job_id}", headers=headers, timeout=60).json()
    return status, chunks


def _error_of(response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    return str(body.get("error") or body.get("output", {}).get("error") or body)


def final_result(output: Any) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Our server returns the result dict; a RunPod worker returns the list of every yielded item."""
    if isinstance(output, list):
        chunks = [o for o in output if isinstance(o, dict) and o.get("status") == "streaming"]
        finals = [o for o in output if isinstance(o, dict) and o.get("status") != "streaming"]
        return (finals[-1] if finals else None), chunks
    return (output if isinstance(output, dict) else None), []


def pcm_to_wav(pcm: bytes, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
    return buf.getvalue()


def audio_bytes(result: dict[str, Any], chunks: list[dict[str, Any]]) -> tuple[bytes, str]:
    """The result's audio file, or (when only chunks carry it) the chunks as a WAV file."""
    if result.get("audio"):
        return base64.b64decode(result["audio"]), result.get("format", "wav")
    if chunks:
        pcm = b"".join(base64.b64decode(c["audio"]) for c in sorted(chunks, key=lambda c: c.get("index", 0)))
        return pcm_to_wav(pcm, int(chunks[0].get("sample_rate", 44100))), "wav"
    return b"", result.get("format", "wav")


def run_local(job_input: dict[str, Any], checkpoint: str | None) -> dict[str, Any]:
    """Run the job through the handler in this process, as the RunPod worker would."""
    import asyncio

    from server.conversations import ConversationStore
    from server.jobs.handler import handle_job
    from server.services import load_services_sync
    from server.settings import Settings

    settings = Settings(**({"checkpoint": checkpoint} if checkpoint else {}))
    services = load_services_sync(settings)
    conversations = ConversationStore(settings.data_dir / "conversations.sqlite3")

    async def go() -> list[dict[str, Any]]:
        return [item async for item in handle_job(job_input, services, settings, conversations)]

    try:
        items = asyncio.run(go())
    finally:
        asyncio.run(services.aclose())
    final = items[-1]
    if final.get("status") == "error":
        return {"status": "FAILED", "error": final["error"]}
    return {"status": "COMPLETED", "output": items}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.client", description=__doc__.split("\n")[0])
    parser.add_argument("--endpoint", help="RunPod endpoint id (with --url: served under /v2/ID)")
    parser.add_argument("--api-key", help="API key (Authorization: Bearer KEY)")
    parser.add_argument("--url", help="base URL of this server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--local", action="store_true", help="run the handler in this process, no server")
    parser.add_argument("--checkpoint", help="with --local: the checkpoint (default: CHECKPOINT env)")
    parser.add_argument("--message", default="Hello, how are you today?", help="the message (or text with --tts)")
    parser.add_argument("--text", help="text to speak (TTS mode; default: --message)")
    parser.add_argument("--system", help="system message (agent mode)")
    parser.add_argument("--system-audio", help="reference audio file for voice cloning")
    parser.add_argument("--reference-text", help="transcript of --system-audio")
    parser.add_argument("--tts", action="store_true", help="direct TTS instead of an agent reply")
    parser.add_argument("--streaming", action="store_true", help="follow the audio chunks on /stream")
    parser.add_argument("--format", default="wav", choices=["wav", "mp3", "flac", "opus", "pcm"])
    parser.add_argument("--conversation-id", help="continue a conversation")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--chunk-length", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--output", help="audio file to write (default outputs/response.FORMAT)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the job")
    args = parser.parse_args(argv)

    job_input = build_input(args)
    try:
        if args.local:
            status, chunks = run_local(job_input, args.checkpoint), []
        else:
            status, chunks = follow_job(base_url(args), args.api_key, job_input, timeout=args.timeout)
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if status.get("status") != "COMPLETED":
        print(f"job {status.get('status')}: {status.get('error', '')}", file=sys.stderr)
        return 1
    result, listed_chunks = final_result(status.get("output"))
    if result is None:
        print(f"unexpected output: {str(status.get('output'))[:500]}", file=sys.stderr)
        return 1
    data, fmt = audio_bytes(result, chunks or listed_chunks)
    output = Path(args.output or f"outputs/response.{fmt}")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(data)
    summary = {k: v for k, v in result.items() if k != "audio"}
    output.with_suffix(output.suffix + ".json").write_text(json.dumps(summary, indent=2))
    if result.get("text"):
        print(f"text: {result['text']}")
    print(f"audio: {output} ({len(data)} bytes, {result.get('duration', '?')} s); "
          f"conversation_id {result.get('conversation_id')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
