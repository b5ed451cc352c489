"""Malformed requests, as an attacker or a buggy client sends them, on a live server: every one is
a 4xx in the route's usual JSON error shape and changes nothing; an unexpected failure is a JSON
500 with a request id; one API-key check and one CORS policy answer every route."""
from __future__ import annotations

import base64
import gzip
import json
import logging

import msgpack
import numpy as np
import pytest
import requests
from aiohttp import web

from engine.audio import encode_audio
from server import access
from server.references import ReferenceStore
from server.services import Services
from server.settings import Settings
from server.testing import LiveServer

KEY = "hard-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "https://app.example"
SDP_OK_START = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"


def reference_wav(seconds: float = 1.0) -> bytes:
    t = np.arange(int(seconds * 44100)) / 44100
    return encode_audio((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 44100, "wav")


@pytest.fixture(scope="module")
def server(tts_engine, tmp_path_factory):
    data = tmp_path_factory.mktemp("hardening")
    settings = Settings(data_dir=data, mode="tts", api_key=KEY, asr_model="none", llm_enabled=False,
                        max_new_tokens_limit=4, max_reference_bytes=256 * 1024, cors_origins=[ORIGIN])
    with LiveServer(settings, Services(tts=tts_engine, references=ReferenceStore(data / "references"))) as live:
        live.references_dir = data / "references"
        yield live


def leftovers(server) -> list[str]:
    """Everything in the references folder: voices and any half-written temporary folder."""
    root = server.references_dir
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def assert_job_error(response: requests.Response, status: int, fragment: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["output"] == {"status": "error", "error": body["error"]} and fragment in body["error"], body


def assert_fish_error(response: requests.Response, status: int, fragment: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["statusCode"] == status and fragment in body["message"], body


def assert_ref_error(response: requests.Response, status: int, fragment: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False and fragment in body["message"], body


HUGE_INT = "1" + "0" * 5000  # past Python's 4300-digit limit for int()
DEEP = "[" * 100_000 + "]" * 100_000  # deep enough for RecursionError in json


@pytest.mark.parametrize("raw, fragment", [(f'{{"input": {{"text": "hi", "seed": {HUGE_INT}}}}}', "not valid JSON"),
                                           (DEEP, "nested too deeply")])
def test_json_python_refuses_is_400_on_every_json_route(server, raw, fragment):
    headers = {**AUTH, "Content-Type": "application/json"}
    assert_job_error(requests.post(f"{server.url}/run", data=raw, headers=headers), 400, fragment)
    assert_job_error(requests.post(f"{server.url}/runsync", data=raw, headers=headers), 400, fragment)
    assert_fish_error(requests.post(f"{server.url}/v1/tts", data=raw, headers=headers), 400, fragment)
    for route in ("add", "update"):
        response = requests.post(f"{server.url}/v1/references/{route}?format=json", data=raw, headers=headers)
        assert_ref_error(response, 400, fragment)


@pytest.mark.parametrize("session", [DEEP, '{"temperature": %s}' % HUGE_INT, '{"instructions": "\\ud800"}'])
def test_multipart_session_field_json_python_refuses_is_400(server, session):
    files = {"sdp": (None, SDP_OK_START + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n"),
             "session": (None, session)}
    response = requests.post(f"{server.url}/v1/realtime/calls", files=files, headers=AUTH)
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "invalid_session" and error["param"] == "session", error
    assert "`session` field" in error["message"]


def test_numbers_that_overflow_are_400(server):
    raw = '{"input": {"text": "hi"}, "policy": {"executionTimeout": 1%s}}' % ("0" * 400)
    response = requests.post(f"{server.url}/run", data=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert_job_error(response, 400, "policy.executionTimeout")
    big_float = requests.post(f"{server.url}/run", json={"input": {"text": "hi", "temperature": 10 ** 400}},
                              headers=AUTH)
    assert_job_error(big_float, 400, "temperature")


def test_lone_surrogates_are_400_and_leave_no_folder(server):
    before = leftovers(server)
    body = {"id": "surrogate", "audio": base64.b64encode(reference_wav()).decode(), "text": "bad \ud800 text"}
    raw = json.dumps(body)  # json.dumps writes the lone surrogate as the escape \ud800
    response = requests.post(f"{server.url}/v1/references/add?format=json", data=raw,
                             headers={**AUTH, "Content-Type": "application/json"})
    assert_ref_error(response, 400, "lone surrogate")
    assert leftovers(server) == before
    tts = requests.post(f"{server.url}/v1/tts", data=json.dumps({"text": "a \udfff b"}),
                        headers={**AUTH, "Content-Type": "application/json"})
    assert_fish_error(tts, 400, "lone surrogate")


def test_filenames_field_of_any_type_is_just_a_field(server):
    """`_filenames` was an internal key that JSON and msgpack bodies could overwrite; now uploads'
    file names travel apart from the fields, so a client's `_filenames` is ignored."""
    wav = reference_wav()
    for i, junk in enumerate(([1, 2], "x.mp3", 7, {"audio": ["nested"]})):
        body = {"id": f"fn-json-{i}", "audio": base64.b64encode(wav).decode(), "text": "hello", "_filenames": junk}
        ok = requests.post(f"{server.url}/v1/references/add?format=json", json=body, headers=AUTH)
        assert ok.status_code == 200 and ok.json()["success"] is True, ok.text
        packed = msgpack.packb({"id": f"fn-pack-{i}", "audio": wav, "text": "hello", "_filenames": junk})
        ok = requests.post(f"{server.url}/v1/references/add?format=json", data=packed,
                           headers={**AUTH, "Content-Type": "application/msgpack"})
        assert ok.status_code == 200, ok.text
    assert sorted((server.references_dir / "fn-json-1").iterdir())[1].name == "sample.wav"  # sniffed, not ".mp3"


def test_reference_ids_match_whole(server):
    wav = base64.b64encode(reference_wav()).decode()
    for bad in ("alice\n", "alice\r", "\nalice", "al/ice", "..", "alice\x00"):
        response = requests.post(f"{server.url}/v1/references/add?format=json",
                                 json={"id": bad, "audio": wav, "text": "hi"}, headers=AUTH)
        assert_ref_error(response, 400, "may only contain")
    assert not any(name.startswith("alice") for name in leftovers(server))


def multipart(boundary: str, parts: bytes, ctype_boundary: str | None = None) -> tuple[bytes, dict]:
    ctype = "multipart/form-data" + (f"; boundary={ctype_boundary or boundary}" if ctype_boundary != "" else "")
    return parts, {**AUTH, "Content-Type": ctype}


GOOD_PART = b'--B\r\nContent-Disposition: form-data; name="id"\r\n\r\nvoice\r\n'
MALFORMED_FORMS = {
    "no boundary": (GOOD_PART + b"--B--\r\n", ""),
    "wrong boundary": (GOOD_PART + b"--B--\r\n", "C"),
    "overlong boundary": (GOOD_PART.replace(b"--B", b"--" + b"B" * 5000) + b"--" + b"B" * 5000 + b"--\r\n",
                          "B" * 5000),
    "early end": (GOOD_PART[:-9], None),
    "bad part headers": (b"--B\r\nContent-Disposition form-data name=id\r\n\x00\x01\r\n\r\nx\r\n--B--\r\n", None),
    "no part headers end": (b"--B\r\nContent-Disposition: form-data; name=\"id\"", None),
    "bad charset": (b'--B\r\nContent-Disposition: form-data; name="text"\r\nContent-Type: text/plain; '
                    b'charset=nonsense-9\r\n\r\nhi\r\n--B--\r\n', None),
    "not utf-8": (b'--B\r\nContent-Disposition: form-data; name="text"\r\n\r\n\xff\xfe\xfa\r\n--B--\r\n', None),
}


@pytest.mark.parametrize("name", sorted(MALFORMED_FORMS))
def test_malformed_multipart_is_4xx_on_form_routes(server, name):
    body, ctype_boundary = MALFORMED_FORMS[name]
    data, headers = multipart("B", body, ctype_boundary)
    response = requests.post(f"{server.url}/v1/references/add?format=json", data=data, headers=headers)
    assert 400 <= response.status_code < 500 and response.json()["success"] is False, response.text
    call = requests.post(f"{server.url}/v1/realtime/calls", data=data, headers=headers)
    assert 400 <= call.status_code < 500 and "message" in call.json()["error"], call.text
    assert not any(n.startswith(".") for n in leftovers(server))


def test_bodies_whose_content_encoding_does_not_decode_are_400(server):
    for encoding in ("gzip", "deflate", "br"):
        headers = {**AUTH, "Content-Type": "application/json", "Content-Encoding": encoding}
        response = requests.post(f"{server.url}/run", data=b"\x00garbage, not compressed" * 10, headers=headers)
        assert_job_error(response, 400, "could not be read")
    good = requests.post(f"{server.url}/run", data=gzip.compress(b'{"input": {"text": "hi"}}'),
                         headers={**AUTH, "Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert good.status_code == 200 and good.json()["status"] == "IN_QUEUE"


def test_sdp_bodies_that_are_bad_are_400(server):
    headers = {**AUTH, "Content-Type": "application/sdp"}
    not_utf8 = requests.post(f"{server.url}/v1/realtime/calls", data=b"v=0\r\n\xff\xfe\r\nm=audio 9 x opus/48000\r\n",
                             headers=headers)
    assert not_utf8.status_code == 400 and "not UTF-8" in not_utf8.json()["error"]["message"]
    # Passes our precheck (v=0, an audio m-line, Opus) but aiortc's parser cannot read it.
    broken = SDP_OK_START + "m=audio x UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n"
    response = requests.post(f"{server.url}/v1/realtime/calls", data=broken, headers=headers)
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "invalid_offer", response.text
    assert error["message"].startswith("the SDP offer could not be parsed: ")  # aiortc raised AssertionError


def test_unknown_routes_and_methods_answer_json(server):
    missing = requests.get(f"{server.url}/nope", headers=AUTH)
    assert_job_error(missing, 404, "no route for GET /nope")
    wrong = requests.put(f"{server.url}/run", headers=AUTH)
    assert_job_error(wrong, 405, "PUT is not allowed")
    assert "POST" in wrong.headers["Allow"]
    fish = requests.get(f"{server.url}/v1/nope", headers=AUTH)
    assert_fish_error(fish, 404, "no route")
    realtime = requests.get(f"{server.url}/v1/realtime/nope", headers=AUTH)
    assert realtime.status_code == 404 and realtime.json()["error"]["code"] == "not_found"


# --------------------------------------------------------------------------- one auth, one CORS
def test_one_key_check_for_every_route(server):
    routes = [("post", "/run", "job"), ("get", "/status/x", "job"), ("post", "/v1/tts", "fish"),
              ("get", "/v1/realtime/config", "realtime"), ("get", "/metrics", "job"),
              ("get", "/v1/references/list", "fish")]
    for method, path, style in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "wrong"},
                        {"Authorization": "Bearer \udcff".encode("utf-8", "surrogateescape").decode("latin-1")}):
            response = getattr(requests, method)(server.url + path, headers=headers)
            assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer", (path, headers)
            body = response.json()
            message = {"job": lambda: body["error"], "fish": lambda: body["message"],
                       "realtime": lambda: body["error"]["message"]}[style]()
            assert "API key" in message
        for good in (AUTH, {"Authorization": KEY}, {"Authorization": f"bearer  {KEY} "}):
            response = getattr(requests, method)(server.url + path, headers=good)
            assert response.status_code != 401, (path, good)
    for public in ("/health", "/ping", "/v1/health", "/openapi.json", "/docs", "/"):
        assert requests.get(server.url + public).status_code == 200, public


def test_one_cors_policy_for_every_route(server):
    for path in ("/run", "/v1/tts", "/v1/realtime/calls", "/metrics"):
        preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}
        ok = requests.options(server.url + path, headers=preflight)
        assert ok.status_code == 204 and ok.headers["Access-Control-Allow-Origin"] == ORIGIN, path
        denied = requests.options(server.url + path, headers={**preflight, "Origin": "https://evil.example"})
        assert denied.status_code == 403 and "Access-Control-Allow-Origin" not in denied.headers
    refused = requests.post(f"{server.url}/run", json={}, headers={"Origin": ORIGIN})  # 401, still readable by JS
    assert refused.status_code == 401 and refused.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Location" in refused.headers["Access-Control-Expose-Headers"]
    assert len(refused.headers["X-Request-Id"]) == 32


# --------------------------------------------------------------------------- the last resort
async def test_an_unexpected_exception_is_a_json_500_with_a_request_id(aiohttp_client_free, caplog):
    async def broken(request: web.Request) -> web.Response:
        raise KeyError("secret internal detail")

    app = web.Application()
    access.install(app, api_key=None, cors_origins=None)
    app.router.add_get("/broken", broken)
    async with aiohttp_client_free(app) as (http, base):
        with caplog.at_level(logging.ERROR, logger="server.access"):
            async with http.get(base + "/broken") as response:
                assert response.status == 500 and response.content_type == "application/json"
                body = await response.json()
                rid = response.headers["X-Request-Id"]
    assert body["request_id"] == rid and rid in body["error"]["message"]
    assert "secret internal detail" not in json.dumps(body) and "Traceback" not in json.dumps(body)
    logged = [r for r in caplog.records if rid in r.getMessage()]
    assert logged and logged[0].exc_info is not None and "secret internal detail" in str(logged[0].exc_info[1])


@pytest.fixture
def aiohttp_client_free():
    """An app served on 127.0.0.1 (ephemeral port) with a client session, as an async context."""
    import contextlib

    import aiohttp

    @contextlib.asynccontextmanager
    async def serve(app: web.Application):
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with aiohttp.ClientSession() as http:
                yield http, f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()

    return serve
