"""Property-based fuzzing of the live server, bounded for CI.

1. The OpenAPI document (`/openapi.json`) drives schemathesis: valid and invalid requests for every
   operation, sent to a real server with the tiny model; any 5xx other than a deliberate 503
   fails. The status counts are printed at the end (run with -s to see them).
2. Hypothesis writes the bodies schemathesis cannot: msgpack values and raw bytes, multipart
   bodies built and broken part by part, and SDP offers made by a real aiortc peer and then
   mutated, so aiortc's parser and negotiation see malformed input after our precheck.
"""
from __future__ import annotations

import asyncio
import collections
import os
import re
import string
import time

import msgpack
import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.audio import encode_audio
from server.openapi import build_document
from server.references import ReferenceStore
from server.services import Services
from server.settings import Settings
from server.testing import LiveServer

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# CI's bounds; FUZZ_EXAMPLES / FUZZ_PHASES (e.g. "coverage,examples,fuzzing") widen a local hunt.
EXAMPLES_PER_OPERATION = int(os.environ.get("FUZZ_EXAMPLES", "25"))
PROPERTY_EXAMPLES = int(os.environ.get("FUZZ_PROPERTY_EXAMPLES", "40"))
FUZZ_PHASES = os.environ.get("FUZZ_PHASES", "examples,fuzzing").split(",")
STATUSES: collections.Counter[int] = collections.Counter()
T0 = time.monotonic()


def acceptable(status: int) -> bool:
    return status < 500 or status == 503


def fuzz_settings(data_dir) -> Settings:
    return Settings(data_dir=data_dir, mode="tts", api_key=KEY, asr_model="none", llm_enabled=False,
                    max_new_tokens_limit=2, max_text_length=300, max_reference_bytes=64 * 1024, queue_size=16,
                    concurrent_jobs=2, runsync_wait=5.0, execution_timeout=30.0, cors_origins=[],
                    rate_limits_enabled=False)  # thousands of requests from one key: input handling, not limits


@pytest.fixture(scope="module")
def fuzz_server(tts_engine, tmp_path_factory):
    data = tmp_path_factory.mktemp("fuzz")
    services = Services(tts=tts_engine, references=ReferenceStore(data / "references"))
    with LiveServer(fuzz_settings(data), services) as live:
        yield live


# --------------------------------------------------------------------------- 1. the OpenAPI document
@schemathesis.serializer("application/sdp")
def _sdp_text(ctx, value) -> bytes:
    """SDP offers are text; negative generation may produce other JSON values, sent as their JSON text."""
    import json

    return value.encode("utf-8", "surrogatepass") if isinstance(value, str) else json.dumps(value).encode()


schema = schemathesis.openapi.from_dict(build_document())
schema.config.generation.update(modes=list(schemathesis.GenerationMode), max_examples=EXAMPLES_PER_OPERATION,
                                deterministic="FUZZ_EXAMPLES" not in os.environ, with_security_parameters=False,
                                database="none")
schema.config.phases.update(phases=FUZZ_PHASES)  # the coverage phase alone sends ~900 requests


def test_document_is_valid_openapi_3_1():
    from openapi_spec_validator import OpenAPIV31SpecValidator

    doc = build_document()
    OpenAPIV31SpecValidator(doc).validate()  # raises with the first violation
    operations = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    for needed in (("POST", "/run"), ("POST", "/runsync"), ("GET", "/status/{job_id}"), ("POST", "/v1/tts"),
                   ("POST", "/v1/references/add"), ("POST", "/v1/realtime/calls"), ("GET", "/metrics")):
        assert needed in operations
    job_input = doc["components"]["schemas"]["JobInput"]["properties"]
    assert job_input["temperature"]["exclusiveMinimum"] == 0.0 and "text" in job_input  # from the pydantic model


def test_served_document_is_the_generated_one(fuzz_server):
    served = requests.get(f"{fuzz_server.url}/openapi.json")
    assert served.status_code == 200 and served.json() == build_document()
    assert served.json()["openapi"] == "3.1.0"
    page = requests.get(f"{fuzz_server.url}/docs")
    assert page.status_code == 200 and "POST /v1/tts" in page.text and "ServeTTSRequest" in page.text


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=EXAMPLES_PER_OPERATION,
          derandomize="FUZZ_EXAMPLES" not in os.environ, database=None)
def test_no_generated_request_makes_a_server_error(case, fuzz_server):
    if isinstance(case.body, dict):
        case.body.pop("webhook", None)  # the server would call whatever URL a body names
    response = case.call(base_url=fuzz_server.url, headers=AUTH, timeout=60)
    STATUSES[response.status_code] += 1
    assert acceptable(response.status_code), \
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}"


# --------------------------------------------------------------------------- 2. msgpack bodies
leaves = (st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.floats() | st.text(max_size=40)
          | st.binary(max_size=64))
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=16)
tts_like = st.fixed_dictionaries({}, optional={
    "text": st.text(max_size=60) | values, "references": st.lists(
        st.fixed_dictionaries({}, optional={"audio": st.binary(max_size=200) | values, "text": values}), max_size=2)
    | values, "reference_id": values, "format": st.sampled_from(["wav", "mp3", "pcm", "x"]) | values,
    "streaming": values, "max_new_tokens": values, "seed": values, "use_memory_cache": values,
    "id": st.text(max_size=20) | values, "audio": st.binary(max_size=200) | values, "_filenames": values,
    "old_reference_id": values, "new_reference_id": values})
msgpack_bodies = (tts_like | values).map(msgpack.packb) | st.binary(max_size=300)


@given(body=msgpack_bodies, route=st.sampled_from(["/v1/tts", "/v1/references/add", "/v1/references/update",
                                                     "/v1/references/delete"]))
@settings(max_examples=PROPERTY_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_msgpack_bodies_never_make_a_server_error(fuzz_server, body, route):
    response = requests.post(f"{fuzz_server.url}{route}?format=json", data=body,
                             headers={**AUTH, "Content-Type": "application/msgpack"}, timeout=60)
    STATUSES[response.status_code] += 1
    assert acceptable(response.status_code), f"{route}: {response.status_code} {response.text[:300]}"


# --------------------------------------------------------------------------- 2. multipart bodies
def short_wav() -> bytes:
    t = np.arange(4410) / 44100
    return encode_audio((0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 44100, "wav")


BOUNDARY_CHARS = string.ascii_letters + string.digits + "'()+_,-./:=? "
header_lines = st.one_of(
    st.builds(lambda name, filename: f'Content-Disposition: form-data; name="{name}"'
              + (f'; filename="{filename}"' if filename is not None else ""),
              st.sampled_from(["id", "audio", "text", "sdp", "session"]) | st.text(max_size=8),
              st.none() | st.text(max_size=12)).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.builds(lambda charset: f"Content-Type: text/plain; charset={charset}".encode(),
              st.sampled_from(["utf-8", "latin-1", "bogus-7"])),
    st.sampled_from([b"Content-Transfer-Encoding: base64", b"Content-Transfer-Encoding: quoted-printable",
                     b"Content-Encoding: gzip", b"Content-Length: 99999999999999999999", b"no colon here"]),
    st.binary(max_size=30).filter(lambda b: b"\r\n" not in b),
)
contents = st.binary(max_size=120) | st.just(short_wav()) | st.text(max_size=40).map(str.encode) \
    | st.just(b"v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n")


@st.composite
def multipart_bodies(draw) -> tuple[bytes, str]:
    boundary = draw(st.text(alphabet=BOUNDARY_CHARS, min_size=0, max_size=90))
    b = boundary.encode()
    body = b""
    for _ in range(draw(st.integers(0, 4))):
        headers = draw(st.lists(header_lines, min_size=0, max_size=3))
        body += b"--" + b + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + draw(contents) + b"\r\n"
    if draw(st.booleans()):
        body += b"--" + b + b"--\r\n"
    if draw(st.booleans()):
        body = body[:draw(st.integers(0, len(body)))]  # an early end
    declared = draw(st.sampled_from(["same", "missing", "other", "quoted"]))
    ctype = {"same": f"multipart/form-data; boundary={boundary}", "missing": "multipart/form-data",
             "other": f"multipart/form-data; boundary={boundary}x",
             "quoted": f'multipart/form-data; boundary="{boundary}"'}
    return body, ctype[declared]


@given(form=multipart_bodies(), route=st.sampled_from(["/v1/references/add", "/v1/realtime/calls"]))
@settings(max_examples=PROPERTY_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_multipart_bodies_never_make_a_server_error(fuzz_server, form, route):
    body, ctype = form
    response = requests.post(f"{fuzz_server.url}{route}?format=json", data=body,
                             headers={**AUTH, "Content-Type": ctype}, timeout=60)
    STATUSES[response.status_code] += 1
    assert acceptable(response.status_code), f"{route}: {response.status_code} {response.text[:300]}"
    leftovers = [p.name for p in (fuzz_server.settings.references_dir).glob(".*")]
    assert not leftovers, leftovers  # no half-written reference folder


# --------------------------------------------------------------------------- 2. SDP offers
@pytest.fixture(scope="module")
def realtime_server(tts_engine, tmp_path_factory):
    """A server that can really answer calls (ASR and VAD loaded), so mutated offers reach aiortc."""
    from engine.agent.asr import Transcriber
    from engine.agent.vad import SileroVAD
    from rtc_client import force_loopback_ice

    undo = force_loopback_ice()
    services = Services(tts=tts_engine, asr=Transcriber.load(), vad=SileroVAD.load())
    settings = fuzz_settings(tmp_path_factory.mktemp("fuzz-rtc"))
    settings.max_sessions = 64
    try:
        with LiveServer(settings, services) as live:
            yield live
    finally:
        services.asr.close()
        undo()


def real_offer() -> list[str]:
    """The SDP lines of an offer from a real aiortc peer (audio + the oai-events data channel)."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    async def make() -> str:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("audio", direction="sendrecv")
        pc.createDataChannel("oai-events")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    from rtc_client import force_loopback_ice

    undo = force_loopback_ice()
    try:
        return asyncio.run(make()).splitlines()
    finally:
        undo()


BASE_OFFER = real_offer()
token_text = st.text(alphabet=string.printable.replace("\r", "").replace("\n", ""), max_size=12) \
    | st.integers(-(2 ** 70), 2 ** 70).map(str) | st.sampled_from(["", "-", ":", "/", "0", "65536", "opus"])


@st.composite
def mutated_offers(draw) -> str:
    lines = list(BASE_OFFER)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["drop", "duplicate", "edit", "edit", "cut", "swap"]))
        if op == "drop" and len(lines) > 1:
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "cut":
            lines[i] = lines[i][:draw(st.integers(0, len(lines[i])))]
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        else:  # replace one token of a line
            parts = re.split(r"([ :/=])", lines[i])
            k = draw(st.integers(0, len(parts) - 1))
            parts[k] = draw(token_text)
            lines[i] = "".join(parts)
    # Only loopback candidates: the server must never send connectivity checks anywhere else.
    lines = [ln for ln in lines if not (ln.startswith("a=candidate") and " 127.0.0.1 " not in ln)
             and ".local" not in ln and "a=candidate" not in ln[1:]]
    return "\r\n".join(lines) + "\r\n"


@given(offer=mutated_offers())
@settings(max_examples=PROPERTY_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_mutated_sdp_offers_are_answered_or_refused_with_a_400(realtime_server, offer):
    response = requests.post(f"{realtime_server.url}/v1/realtime/calls", data=offer.encode(),
                             headers={**AUTH, "Content-Type": "application/sdp"}, timeout=60)
    STATUSES[response.status_code] += 1
    if response.status_code == 201:  # still a usable offer: hang up at once
        assert requests.delete(realtime_server.url + response.headers["Location"], headers=AUTH).status_code == 200
        return
    assert response.status_code in (400, 413), response.text
    assert response.json()["error"]["code"] in ("invalid_offer", "no_audio", "no_opus", "negotiation_failed",
                                                "offer_too_large"), response.text


def test_offer_that_aiortc_cannot_negotiate_is_a_400_with_the_reason(realtime_server):
    """Found by the fuzz: with no DTLS fingerprint nor setup, aiortc's setRemoteDescription raises AttributeError."""
    offer = "\r\n".join(ln for ln in BASE_OFFER if not ln.startswith(("a=fingerprint", "a=setup"))) + "\r\n"
    response = requests.post(f"{realtime_server.url}/v1/realtime/calls", data=offer,
                             headers={**AUTH, "Content-Type": "application/sdp"}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "negotiation_failed" and "AttributeError" in error["message"]
    assert not realtime_server.call(_live_calls(realtime_server))  # nothing left registered


async def _live_calls(server) -> int:
    from signaling.routes import CALLS

    return len(server.app[CALLS].calls)


def test_active_calls_appear_in_metrics(realtime_server):
    offer = "\r\n".join(BASE_OFFER) + "\r\n"
    created = requests.post(f"{realtime_server.url}/v1/realtime/calls", data=offer,
                            headers={**AUTH, "Content-Type": "application/sdp"}, timeout=60)
    assert created.status_code == 201, created.text
    try:
        scraped = requests.get(f"{realtime_server.url}/metrics", headers=AUTH).text
        assert "fishvoice_realtime_calls_active 1.0" in scraped
    finally:
        requests.delete(realtime_server.url + created.headers["Location"], headers=AUTH)
    assert "fishvoice_realtime_calls_active 0.0" in requests.get(f"{realtime_server.url}/metrics", headers=AUTH).text


def test_fuzz_summary():
    """The closing figures: how many fuzzed requests were sent, how long it took, the statuses."""
    total = sum(STATUSES.values())
    print(f"\nfuzzed requests: {total} in {time.monotonic() - T0:.1f} s; statuses: {dict(sorted(STATUSES.items()))}")
    assert total >= 100
    assert not [s for s in STATUSES if not acceptable(s)]
