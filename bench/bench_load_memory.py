"""Peak memory of loading a full-size Dual-AR checkpoint, per quantize mode; with --server, of the
real server process holding the full-size S1-mini and its codec.

Writes (once) a full-size S1-mini `model.pth` with random weights in bfloat16, the published
checkpoint's dtype, then loads it in a fresh process per mode through the server's own loader and
prints that process's peak RSS and the weights' bytes. The codec is not part of this figure.

--server also writes the rest of the published layout (a tokenizer with the 4096 semantic tokens,
a full-size float32 `codec.pth` with random weights), starts `python -m server serve` on it (TTS
only: no ASR, no agent LLM) per mode, and reads the server's RSS from /proc: peak while loading,
steady after loading, and after one short streamed /v1/tts request.

    .venv/bin/python bench/bench_load_memory.py --dir /tmp/s1-mini-random --modes none int8 int4
    .venv/bin/python bench/bench_load_memory.py --server --modes auto
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

LOAD = """
import json, resource, sys, time
import torch
from engine.fish.config import parse_config
from engine.fish.dual_ar_loader import load_dual_ar
from engine.fish.presets import PUBLISHED_IDS, S1_MINI_CONFIG
from engine.fish.quantize import weight_bytes
ids = PUBLISHED_IDS["s1-mini"]
config = parse_config(S1_MINI_CONFIG).with_semantic_ids(ids["semantic_begin_id"], ids["semantic_end_id"])
t0 = time.perf_counter()
model = load_dual_ar(__import__("pathlib").Path(sys.argv[1]), config, "cpu", torch.float32, sys.argv[2])
seconds = time.perf_counter() - t0
import gc; gc.collect()
rss = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")) / 1024
print(json.dumps({"seconds": seconds, "weights_mib": weight_bytes(model) / 2**20, "rss_mib": rss,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_checkpoint(directory: Path) -> None:
    from engine.fish.dual_ar_loader import build_on_meta, init_random_weights
    from engine.fish.config import parse_config
    from engine.fish.presets import PUBLISHED_IDS, S1_MINI_CONFIG

    ids = PUBLISHED_IDS["s1-mini"]
    config = parse_config(S1_MINI_CONFIG).with_semantic_ids(ids["semantic_begin_id"], ids["semantic_end_id"])
    model = init_random_weights(build_on_meta(config).to_empty(device="cpu"), seed=0)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, directory / "model.pth")
    (directory / "config.json").write_text(json.dumps(S1_MINI_CONFIG))


def write_server_files(directory: Path) -> None:
    """The tokenizer and codec.pth the server needs beside model.pth (random full-size codec, float32
    with weight norm unfolded, as published)."""
    from engine.fish.codec import Codec, CodecConfig
    from engine.fish.tiny_tokenizer import write_tiny_tokenizer

    write_tiny_tokenizer(directory, "s1-mini", 4096)
    torch.manual_seed(0)
    torch.save(Codec(CodecConfig()).state_dict(), directory / "codec.pth")


def memory(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM (peak), RssAnon and RssFile of a process, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads, so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def running_server(directory: Path, quantize: str, extra: list[str] = ()):
    """`python -m server serve` on `directory` (TTS only, CPU) until it answers /ping; yields
    (process, base url) and stops it afterwards."""
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="bench-server-"))
    cmd = [sys.executable, "-m", "server", "serve", "--checkpoint", str(directory), "--port", str(port),
           "--mode", "tts", "--asr-model", "none", "--llm-enabled", "false", "--device", "cpu",
           "--quantize", quantize, "--data-dir", str(data), "--log-level", "WARNING", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")  # type: ignore[union-attr]
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(1)
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(30)


def tts_stream(url: str, text: str, frames: int, seed: int = 1) -> tuple[float, float, float]:
    """POST a streamed /v1/tts; returns (seconds to the first PCM byte, total seconds, seconds of audio)."""
    body = json.dumps({"text": text, "streaming": True, "seed": seed, "max_new_tokens": frames}).encode()
    request = urllib.request.Request(f"{url}/v1/tts", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first, size = None, 0
    with urllib.request.urlopen(request, timeout=3600) as r:
        rate = int(r.headers["X-Sample-Rate"])
        while chunk := r.read1(65536):
            if first is None:
                first = time.perf_counter() - t0
            size += len(chunk)
    return first or float("nan"), time.perf_counter() - t0, size / 2 / rate  # 16-bit mono


def server_memory(directory: Path, mode: str, frames: int, extra: list[str]) -> None:
    """Start the server on `directory`, wait until it answers, read its memory, send one streamed
    /v1/tts request of `frames` frames, read it again."""
    t0 = time.perf_counter()
    with running_server(directory, mode, extra) as (proc, url):
        loaded = memory(proc.pid)
        print(f"server quantize={mode} {' '.join(extra)}: ready in {time.perf_counter() - t0:.0f} s; "
              f"peak RSS while loading {loaded['VmHWM']:.0f} MiB, RSS after loading {loaded['VmRSS']:.0f} MiB "
              f"(anonymous {loaded['RssAnon']:.0f}, file-backed {loaded['RssFile']:.0f})", flush=True)
        _, total, audio = tts_stream(url, "Hello there.", frames)
        after = memory(proc.pid)
        print(f"  after one streamed /v1/tts of {frames} frames ({audio:.2f} s of audio in "
              f"{total:.0f} s): RSS {after['VmRSS']:.0f} MiB (anonymous {after['RssAnon']:.0f}, "
              f"file-backed {after['RssFile']:.0f}), peak {after['VmHWM']:.0f} MiB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/s1-mini-random"))
    ap.add_argument("--modes", nargs="*", default=None, help="default: none int8 int4 (--server: auto)")
    ap.add_argument("--server", action="store_true", help="measure the server process (TTS only) instead")
    ap.add_argument("--frames", type=int, default=8, help="--server: frames of the one /v1/tts request")
    ap.add_argument("--server-args", nargs="*", default=[], help="--server: more `serve` flags, e.g. --dtype")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f}")
    if not (args.dir / "model.pth").is_file():
        t0 = time.perf_counter()
        write_checkpoint(args.dir)
        print(f"wrote {args.dir / 'model.pth'} in {time.perf_counter() - t0:.0f} s")
    print(f"checkpoint file: {(args.dir / 'model.pth').stat().st_size / 2**20:.0f} MiB (bfloat16)")
    if args.server:
        if not (args.dir / "codec.pth").is_file():
            write_server_files(args.dir)
        print(f"codec file: {(args.dir / 'codec.pth').stat().st_size / 2**20:.0f} MiB (float32)")
        for mode in args.modes or ["auto"]:
            server_memory(args.dir, mode, args.frames, args.server_args)
        return
    for mode in args.modes or ["none", "int8", "int4"]:
        out = subprocess.run([sys.executable, "-c", LOAD, str(args.dir), mode], capture_output=True, text=True,
                             check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"quantize={mode:5} loaded in {r['seconds']:.1f} s, weights {r['weights_mib']:.0f} MiB, "
              f"RSS after loading {r['rss_mib']:.0f} MiB, peak RSS while loading {r['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
