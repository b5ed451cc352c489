"""The HTTP side of realtime calls: the OpenAI-shaped offer/answer, hang-up, bad offers, auth,
CORS, the session limit, and the web page. Real aiortc peers, real VAD/ASR/LLM behind them."""
from __future__ import annotations

import json
import types

import aiohttp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from rtc_client import RealtimeClient, SpeechSource, LocalServer, force_loopback_ice


@pytest.fixture(scope="module")
def services():
    from engine.agent.asr import Transcriber
    from engine.agent.llm.embedded import EmbeddedLLM
    from engine.agent.vad import SileroVAD

    llm = EmbeddedLLM.load()
    yield types.SimpleNamespace(asr=Transcriber.load(), vad=SileroVAD.load(), smart_turn=None, llm=llm, tts=None,
                                references=None, loading=False)
    llm.close()


@pytest.fixture(scope="module", autouse=True)
def loopback_ice():
    undo = force_loopback_ice()
    yield
    undo()


@pytest.fixture
async def server(services):
    srv = await LocalServer(services, max_sessions=2, cors_origins=["https://app.example"]).start()
    yield srv
    await srv.stop()


async def make_offer(*, audio: bool = True) -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    if audio:
        pc.addTrack(SpeechSource())
    pc.createDataChannel("oai-events")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def post(url: str, body, headers=None) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=body, headers=headers or {}) as resp:
            text = await resp.text()
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                parsed = {"_text": text}
            return resp.status, parsed, dict(resp.headers)


async def test_offer_answer_location_and_hang_up(server):
    client = RealtimeClient(server.base_url)
    await client.connect()
    try:
        assert client.location.startswith("/v1/realtime/calls/rtc_")
        assert client.call_id in server.calls
        rtpmaps = [line for line in client.answer_sdp.splitlines() if line.startswith("a=rtpmap:")]
        assert len(rtpmaps) == 1 and "opus/48000/2" in rtpmaps[0], rtpmaps  # Opus only
        assert "127.0.0.1" in client.answer_sdp and "stun" not in client.answer_sdp.lower()
        created = await client.wait_for("session.created")
        assert created["call_id"] == client.call_id and created["session"]["mode"] == "agent"
        async with aiohttp.ClientSession() as http:
            async with http.get(server.base_url + client.location) as resp:
                info = await resp.json()
        assert resp.status == 200 and info["call_id"] == client.call_id
    finally:
        status = await client.hang_up()
    assert status == 200
    assert client.call_id not in server.calls
    async with aiohttp.ClientSession() as http:
        async with http.delete(server.base_url + client.location) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "call_not_found"


async def test_multipart_offer_with_session_and_query_options(server):
    client = RealtimeClient(server.base_url)
    session = {"type": "realtime", "instructions": "Answer like a pirate.",
               "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 700}}}}
    await client.connect(query={"threshold": "0.6", "max_new_tokens": "40"}, session=session)
    try:
        got = (await client.wait_for("session.created"))["session"]
        assert got["instructions"] == "Answer like a pirate."
        assert got["turn_detection"]["silence_duration_ms"] == 700  # from the multipart session
        assert got["turn_detection"]["threshold"] == 0.6  # from the query string
        assert got["sampling"]["max_new_tokens"] == 40
    finally:
        await client.hang_up()


async def test_beta_path_answers_too(server):
    pc, sdp = await make_offer()
    try:
        status, body, headers = await post(server.base_url + "/v1/realtime", sdp, {"Content-Type": "application/sdp"})
        assert status == 201 and body["_text"].startswith("v=0")
        location = headers["Location"]
    finally:
        await pc.close()
    async with aiohttp.ClientSession() as http:
        async with http.delete(server.base_url + location) as resp:
            assert resp.status == 200


@pytest.mark.parametrize("case", ["empty", "garbage", "no_audio", "no_opus", "bad_mode", "bad_vad", "bad_type",
                                  "bad_session_json"])
async def test_bad_offers_get_clear_errors(server, case):
    pc, sdp = await make_offer(audio=case != "no_audio")
    await pc.close()
    url = server.base_url + "/v1/realtime/calls"
    headers = {"Content-Type": "application/sdp"}
    expected = {"empty": (400, "invalid_offer"), "garbage": (400, "invalid_offer"), "no_audio": (400, "no_audio"),
                "no_opus": (400, "no_opus"), "bad_mode": (400, "invalid_value"), "bad_vad": (400, "invalid_value"),
                "bad_type": (415, "unsupported_media_type"), "bad_session_json": (400, "invalid_session")}[case]
    if case == "empty":
        sdp = ""
    elif case == "garbage":
        sdp = "this is not sdp"
    elif case == "no_opus":
        sdp = "\r\n".join(line for line in sdp.split("\r\n") if "opus" not in line.lower())
    elif case == "bad_mode":
        url += "?mode=karaoke"
    elif case == "bad_vad":
        url += "?threshold=3"
    elif case == "bad_type":
        headers = {"Content-Type": "application/json"}
    if case == "bad_session_json":
        form = aiohttp.FormData(default_to_multipart=True)
        form.add_field("sdp", sdp)
        form.add_field("session", "{not json")
        status, body, _ = await post(url, form)
    else:
        status, body, _ = await post(url, sdp, headers)
    assert (status, body["error"]["code"]) == expected, body
    assert body["error"]["message"]
    assert not server.calls


async def test_session_limit_answers_503_then_frees(server):
    clients = [RealtimeClient(server.base_url) for _ in range(2)]
    for client in clients:
        await client.connect()
    pc, sdp = await make_offer()
    try:
        status, body, _ = await post(server.base_url + "/v1/realtime/calls", sdp, {"Content-Type": "application/sdp"})
        assert status == 503 and body["error"]["code"] == "too_many_sessions"
        assert "2 concurrent calls" in body["error"]["message"]
        await clients[0].hang_up()
        extra = RealtimeClient(server.base_url)
        await extra.connect()
        await extra.hang_up()
    finally:
        await pc.close()
        await clients[1].hang_up()


async def test_api_key_is_required_when_configured(services):
    srv = await LocalServer(services, api_key="sekrit").start()
    try:
        pc, sdp = await make_offer()
        await pc.close()
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, body, hdrs = await post(srv.base_url + "/v1/realtime/calls", sdp,
                                            {"Content-Type": "application/sdp", **headers})
            assert status == 401 and body["error"]["code"] == "invalid_api_key"
            assert hdrs.get("WWW-Authenticate") == "Bearer"
        client = RealtimeClient(srv.base_url, api_key="sekrit")
        await client.connect()
        assert await client.hang_up() == 200
    finally:
        await srv.stop()


async def test_cors_preflight_and_headers(server):
    async with aiohttp.ClientSession() as http:
        preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}
        async with http.options(server.base_url + "/v1/realtime/calls", headers=preflight) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "POST" in resp.headers["Access-Control-Allow-Methods"]
            assert "authorization" in resp.headers["Access-Control-Allow-Headers"].lower()
        async with http.options(server.base_url + "/v1/realtime/calls",
                                headers={**preflight, "Origin": "https://evil.example"}) as resp:
            assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
    pc, sdp = await make_offer()
    try:
        status, _, headers = await post(server.base_url + "/v1/realtime/calls", sdp,
                                        {"Content-Type": "application/sdp", "Origin": "https://app.example"})
        assert status == 201
        assert headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "Location" in headers["Access-Control-Expose-Headers"]  # cross-origin JS must read it
    finally:
        await pc.close()
        async with aiohttp.ClientSession() as http:
            await http.delete(server.base_url + headers["Location"])
    # Errors carry CORS headers too, so the page can show them.
    status, _, headers = await post(server.base_url + "/v1/realtime/calls", "", {"Origin": "https://app.example"})
    assert status == 400 and headers["Access-Control-Allow-Origin"] == "https://app.example"


async def test_config_and_web_page_are_served(server):
    async with aiohttp.ClientSession() as http:
        async with http.get(server.base_url + "/v1/realtime/config") as resp:
            config = await resp.json()
        assert config["ice_servers"] == [] and config["modes"] == ["agent"] and config["data_channel"] == "oai-events"
        async with http.get(server.base_url + "/") as resp:
            page = await resp.text()
            assert resp.status == 200 and "text/html" in resp.headers["Content-Type"]
        assert 'id="call"' in page and "/web/app.js" in page
        for asset in ("/web/app.js", "/web/style.css"):
            async with http.get(server.base_url + asset) as resp:
                assert resp.status == 200 and len(await resp.read()) > 1000


def test_ice_servers_come_from_settings_only():
    from signaling.ice import ice_configuration, ice_servers_for_browser

    assert ice_configuration(None).iceServers == []  # never aiortc's default public STUN server
    config = ice_configuration(["stun:stun.example:3478",
                                {"urls": "turn:turn.example:3478", "username": "u", "credential": "p"}])
    assert [s.urls for s in config.iceServers] == ["stun:stun.example:3478", "turn:turn.example:3478"]
    assert ice_servers_for_browser([{"urls": ["turn:t:3478"], "username": "u", "credential": "p"}]) == [
        {"urls": ["turn:t:3478"], "username": "u", "credential": "p"}]
    with pytest.raises(ValueError):
        ice_configuration([42])
