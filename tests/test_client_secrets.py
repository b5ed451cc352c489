"""Ephemeral client secrets: the `openai` SDK mints one (client.realtime.client_secrets.create) and
opens realtime sessions with it, over the WebSocket (the SDK again) and WebRTC (aiortc), each with
the session configuration the secret carries; everything else refuses it, and a malformed, forged or
expired one, or a bad mint request, is a clear 4xx."""
from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
import types

import pytest
import requests

from rtc_client import LocalServer, RealtimeClient
from server.client_secrets import ClientSecrets, signing_secret
from server.services import Services
from server.settings import Settings
from server.testing import LiveServer

openai = pytest.importorskip("openai")
pytest.importorskip("websockets")

KEY = "secret-test-key"
INSTRUCTIONS = "You are a terse assistant. Answer in one word."


# --------------------------------------------------------------------------- minting and refusing
@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    data = tmp_path_factory.mktemp("secrets")
    settings = Settings(data_dir=data, mode="tts", api_key=KEY, asr_model="none", llm_enabled=False)
    with LiveServer(settings, Services()) as live:
        yield live


def mint(server, body=None, key=KEY) -> requests.Response:
    return requests.post(server.url + "/v1/realtime/client_secrets", json=body,
                         headers={"Authorization": f"Bearer {key}"})


def test_mint_shape_and_bounds(app_server):
    before = time.time()
    response = mint(app_server, {"expires_after": {"anchor": "created_at", "seconds": 120},
                                 "session": {"type": "realtime", "instructions": INSTRUCTIONS}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["value"].startswith("ek_")
    assert before + 119 <= body["expires_at"] <= time.time() + 121
    assert body["session"]["instructions"] == INSTRUCTIONS and body["session"]["type"] == "realtime"
    default = mint(app_server).json()  # no body at all: 600 s and an empty session
    assert abs(default["expires_at"] - time.time() - 600) < 5
    assert KEY not in body["value"]


@pytest.mark.parametrize("body, param", [
    ({"expires_after": {"anchor": "created_at", "seconds": 9}}, "expires_after.seconds"),
    ({"expires_after": {"anchor": "created_at", "seconds": 7201}}, "expires_after.seconds"),
    ({"expires_after": {"anchor": "created_at", "seconds": "600"}}, "expires_after.seconds"),
    ({"expires_after": {"anchor": "created_at", "seconds": 60.5}}, "expires_after.seconds"),
    ({"expires_after": {"anchor": "created_at", "seconds": True}}, "expires_after.seconds"),
    ({"expires_after": {"anchor": "now", "seconds": 60}}, "expires_after.anchor"),
    ({"expires_after": 60}, "expires_after"),
    ({"session": "realtime"}, "session"),
    ({"session": {"type": "transcription"}}, "session.type"),
    ({"session": {"temperature": "hot"}}, "session.temperature"),
    ({"session": {"instructions": secrets.token_urlsafe(5500)}}, "session"),  # too large to travel in a header
])
def test_bad_mint_requests_are_400(app_server, body, param):
    response = mint(app_server, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text


def test_mint_needs_a_full_key(app_server):
    assert mint(app_server, key="wrong").status_code == 401
    secret = mint(app_server).json()["value"]
    assert mint(app_server, key=secret).status_code == 403  # a secret cannot mint secrets


def test_a_secret_opens_realtime_sessions_only(app_server):
    secret = mint(app_server).json()["value"]
    auth = {"Authorization": f"Bearer {secret}"}
    for method, path in (("post", "/run"), ("post", "/purge-queue"), ("get", "/v1/references/list"),
                         ("post", "/v1/tts"), ("get", "/v1/models"), ("get", "/metrics"),
                         ("get", "/v1/realtime/config"), ("get", "/v1/realtime/calls/abc"),
                         ("delete", "/v1/realtime/calls/abc")):
        response = requests.request(method, app_server.url + path, headers=auth, json={})
        assert response.status_code == 403, (path, response.text)
        assert "client secrets" in response.text and secret not in response.text
    # On a session route it is admitted (then refused for want of models: not an access error).
    call = requests.post(app_server.url + "/v1/realtime/calls", headers={**auth, "Content-Type": "application/sdp"},
                         data="v=0\r\n")
    assert call.status_code not in (401, 403), call.text


def test_forged_malformed_and_expired_secrets_are_401(app_server):
    secret = mint(app_server).json()["value"]
    forged = secret[:-3] + ("AAA" if not secret.endswith("AAA") else "BBB")
    other_server = ClientSecrets(signing_secret(None, "some-other-key")[0])
    foreign = other_server.encode(other_server.mint({}, 600, "key:x"))
    # What this server's own secret (derived from its key) wrote an hour ago: expired now.
    ours = ClientSecrets(signing_secret(None, KEY)[0])
    expired = ours.encode(dataclasses.replace(ours.mint({}, 600, "key:API_KEY"), expires_at=int(time.time()) - 1))
    for token, code in ((forged, "invalid_client_secret"), (foreign, "invalid_client_secret"),
                        ("ek_", "invalid_client_secret"), ("ek_not.a.token", "invalid_client_secret"),
                        ("ek_" + "A" * 7000, "invalid_client_secret"), (expired, "expired_client_secret")):
        response = requests.post(app_server.url + "/v1/realtime/calls", data="v=0\r\n",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/sdp"})
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == code
        assert response.headers["WWW-Authenticate"] == "Bearer"
    # A replica with the same key (no shared state) accepts this server's secrets.
    replica = ClientSecrets(signing_secret(None, KEY)[0])
    assert replica.verify(secret).expires_at > time.time()


# --------------------------------------------------------------------------- real sessions with a secret
@pytest.fixture(scope="module")
def models(tts_engine, tmp_path_factory):
    from engine.agent.asr import Transcriber
    from engine.agent.llm.embedded import EmbeddedLLM
    from engine.agent.vad import SileroVAD
    from server.references import ReferenceStore

    llm = EmbeddedLLM.load()
    yield types.SimpleNamespace(asr=Transcriber.load(), vad=SileroVAD.load(), smart_turn=None, llm=llm, tts=tts_engine,
                                references=ReferenceStore(tmp_path_factory.mktemp("references")), loading=False)
    llm.close()


@pytest.fixture
async def server(models):
    srv = await LocalServer(models, max_sessions=2, api_key=KEY).start()
    yield srv
    await srv.stop()


async def first(conn, type_: str, timeout: float = 30.0):
    async def run():
        async for event in conn:
            if event.type == type_:
                return event

    return await asyncio.wait_for(run(), timeout)


async def test_sdk_mints_then_opens_a_websocket_and_a_webrtc_call_with_the_secret(server):
    backend = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=KEY)
    secret = await backend.realtime.client_secrets.create(
        expires_after={"anchor": "created_at", "seconds": 600},
        session={"type": "realtime", "instructions": INSTRUCTIONS, "output_modalities": ["text"],
                 "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 700}}}})
    assert secret.value.startswith("ek_") and secret.expires_at > time.time() + 590
    assert secret.session.instructions == INSTRUCTIONS

    browser = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=secret.value)
    async with browser.realtime.connect(model="gpt-realtime") as conn:
        created = await first(conn, "session.created")
        assert created.session.instructions == INSTRUCTIONS
        assert created.session.output_modalities == ["text"]
        assert created.session.audio.input.turn_detection.silence_duration_ms == 700
        # The client may still update its session within the secret.
        await conn.session.update(session={
            "type": "realtime", "max_output_tokens": 8, "temperature": 0.0,
            "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 900}}}})
        updated = await first(conn, "session.updated")
        assert updated.session.instructions == INSTRUCTIONS
        assert updated.session.audio.input.turn_detection.silence_duration_ms == 900
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Say hello."}]})
        await conn.response.create()
        done = await first(conn, "response.done", 90)
        assert done.response.status == "completed" and done.response.output[0].content[0].text.strip()

    # The same secret opens a second session, over WebRTC, with the same configuration.
    call = RealtimeClient(server.base_url, api_key=secret.value)
    try:
        await call.connect()
        created = await call.wait_for("session.created")
        assert created["session"]["instructions"] == INSTRUCTIONS
        assert created["session"]["output_modalities"] == ["text"]
        # Call management is not a secret's: hanging up by id needs a key (the browser closes its peer).
        assert await call.hang_up() == 403
    finally:
        await call.close()


async def test_a_browser_websocket_passes_the_secret_as_a_subprotocol(server):
    """Browsers cannot set headers on a WebSocket: the secret rides in `openai-insecure-api-key.<ek_>`."""
    import json

    import aiohttp

    backend = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=KEY)
    secret = await backend.realtime.client_secrets.create(session={"type": "realtime", "instructions": INSTRUCTIONS})
    ws_url = server.base_url.replace("http", "ws") + "/v1/realtime?model=gpt-realtime"
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(ws_url, protocols=("realtime", "openai-insecure-api-key." + secret.value)) as ws:
            created = json.loads((await ws.receive(timeout=30)).data)
            assert created["type"] == "session.created" and created["session"]["instructions"] == INSTRUCTIONS
        forged = "openai-insecure-api-key." + secret.value[:-2] + "xx"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(ws_url, protocols=("realtime", forged))
        assert refused.value.status == 401
