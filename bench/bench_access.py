"""Access and admission figures, on a live server on loopback (no models needed).

    .venv/bin/python bench/bench_access.py [--rounds 200]

Printed:
  verify      what checking a client secret costs in-process (µs: signature, decode, expiry)
  refuse      the HTTP round trip of POST /v1/realtime/calls refused with 401 for a forged, an
              expired and a malformed ek_ secret, next to a plain 404 on the same server (ms, median)
  first 429   how many requests pass before the first 429 on /purge-queue and /cancel/{id}
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.client_secrets import ClientSecrets, signing_secret  # noqa: E402
from server.services import Services  # noqa: E402
from server.settings import Settings  # noqa: E402
from server.testing import LiveServer  # noqa: E402

KEY = "bench-access-key"


def verify_cost(rounds: int) -> float:
    secrets = ClientSecrets(signing_secret(None, KEY)[0])
    token = secrets.encode(secrets.mint({"type": "realtime", "instructions": "You are a helpful assistant. " * 8,
                                         "audio": {"output": {"voice": "alloy"}}}, 600, "key:API_KEY"))
    n = rounds * 50
    best = min(timeit.repeat(lambda: secrets.verify(token), number=n, repeat=5))
    return best / n * 1e6


def first_429(session: requests.Session, url: str, limit: int = 1000) -> int:
    for i in range(limit):
        if session.post(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 429:
            return i
    return -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    print(f"verify     {verify_cost(args.rounds):7.1f} µs per client secret (in-process, best of 5)")
    ours = ClientSecrets(signing_secret(None, KEY)[0])
    good = ours.encode(ours.mint({}, 600, "key:API_KEY"))
    expired = ours.encode(dataclasses.replace(ours.mint({}, 600, "key:API_KEY"), expires_at=int(time.time()) - 1))
    cases = {"forged": good[:-4] + "AAAA", "expired": expired, "malformed": "ek_nonsense", "404 (baseline)": None}
    with tempfile.TemporaryDirectory() as tmp, \
            LiveServer(Settings(data_dir=tmp, api_key=KEY, asr_model="none", llm_enabled=False,
                                rate_limits={"realtime-session": "100000 per 10 seconds"}), Services()) as live, \
            requests.Session() as http:
        for name, token in cases.items():
            times = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                if token is None:
                    status = http.get(live.url + "/no/such/route").status_code
                else:
                    status = http.post(live.url + "/v1/realtime/calls", data="v=0\r\n",
                                       headers={"Authorization": f"Bearer {token}",
                                                "Content-Type": "application/sdp"}).status_code
                times.append(time.perf_counter() - t0)
                assert status == (404 if token is None else 401), status
            print(f"refuse     {name:15s} {statistics.median(times) * 1000:6.2f} ms median "
                  f"(p90 {sorted(times)[int(len(times) * 0.9)] * 1000:.2f} ms, {args.rounds} requests)")
        for path in ("/purge-queue", "/cancel/no-such-job"):
            print(f"first 429  {path:22s} after {first_429(http, live.url + path)} requests")


if __name__ == "__main__":
    main()
