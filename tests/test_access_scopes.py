"""Scoped keys on a live server: every route declares its scope (the router is walked), a keys file
with named, optionally hashed keys is re-read when it changes, 401 for a missing or unknown key and
403 for a known key without the route's scope; a broken keys file keeps the last good one."""
from __future__ import annotations

import hashlib
import os
import time

import pytest
import requests

from server import scopes
from server.app import create_app
from server.keys import KeysFileError, parse_keys
from server.references import ReferenceStore
from server.services import Services
from server.settings import Settings
from server.testing import LiveServer

FULL = "full-key-0123456789"
TTS_KEY = "tts-only-key-0123456789"
ADMIN_KEY = "admin-key-0123456789"
HASHED_KEY = "hashed-jobs-key-0123456789"
LATER_KEY = "later-key-0123456789"


def keys_toml(*extra: str) -> str:
    hashed = hashlib.sha256(HASHED_KEY.encode()).hexdigest()
    return "\n".join([
        '[[key]]\nname = "tts-app"\nkey = "%s"\nscopes = ["tts"]\n' % TTS_KEY,
        '[[key]]\nname = "ops"\nkey = "%s"\nscopes = ["admin", "jobs"]\n' % ADMIN_KEY,
        '[[key]]\nname = "batch"\nsha256 = "%s"\nscopes = ["jobs"]\n' % hashed,
        *extra])


def write_keys(path, text: str) -> None:
    path.write_text(text)
    # The ring re-reads on a changed (mtime, size); make the change visible even within one tick.
    stamp = time.time() + 5 * (1 + path.stat().st_size % 7)
    os.utime(path, (stamp, stamp))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("scopes")
    keys = data / "keys.toml"
    write_keys(keys, keys_toml())
    settings = Settings(data_dir=data, mode="tts", api_key=FULL, keys_file=keys, asr_model="none", llm_enabled=False)
    with LiveServer(settings, Services(references=ReferenceStore(data / "references"))) as live:
        live.keys_path = keys
        yield live


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def test_every_route_declares_its_scope():
    app = create_app(Settings(data_dir="/tmp/fishvoice-scopes-walk", asr_model="none", llm_enabled=False), Services())
    routes = {r.resource.canonical for r in app.router.routes() if r.resource is not None}
    assert len(routes) > 30  # the job API twice, /v1, OpenAI audio, realtime, operations
    missing = sorted(r for r in routes if not scopes.listed(r))
    assert not missing, f"routes without a scope in server.scopes.ROUTES: {missing}"
    # And the table names only real scopes and limit groups.
    from server.ratelimit import DEFAULT_LIMITS
    for path, rule in scopes.ROUTES.items():
        assert rule.scope in (*scopes.SCOPES, scopes.ANY, None), path
        assert rule.limit is None or rule.limit in DEFAULT_LIMITS, path
        assert (rule.scope is None) == (rule.limit is None), path  # public routes are never limited


def test_unlisted_route_fails_closed():
    assert scopes.rule_for("/some/new/route") == scopes.UNLISTED
    assert scopes.UNLISTED.scope == "admin"
    assert scopes.rule_for("/v2/{endpoint_id}/purge-queue").scope == "admin"
    assert scopes.rule_for("/v2/{endpoint_id}/health").scope is None


@pytest.mark.parametrize("key, path, method, expected", [
    (None, "/run", "post", 401),
    ("not-a-key-at-all", "/run", "post", 401),
    (TTS_KEY, "/run", "post", 403),
    (TTS_KEY, "/purge-queue", "post", 403),
    (TTS_KEY, "/v1/references/list", "get", 403),
    (TTS_KEY, "/v1/realtime/config", "get", 403),
    (TTS_KEY, "/metrics", "get", 403),
    (TTS_KEY, "/v1/audio/voices", "get", 200),
    (TTS_KEY, "/v1/models", "get", 200),  # any valid key
    (HASHED_KEY, "/purge-queue", "post", 403),
    (HASHED_KEY, "/status/nope", "get", 404),  # admitted; the job does not exist
    (ADMIN_KEY, "/purge-queue", "post", 200),
    (ADMIN_KEY, "/v2/any-id/purge-queue", "post", 200),
    (ADMIN_KEY, "/metrics", "get", 200),
    (FULL, "/v1/references/list", "get", 200),
    (None, "/health", "get", 200),
    (None, "/openapi.json", "get", 200),
])
def test_scope_decides(server, key, path, method, expected):
    response = requests.request(method, server.url + path, headers=bearer(key), json={} if method == "post" else None)
    assert response.status_code == expected, response.text
    if expected in (401, 403):
        body = response.json()
        assert "error" in body, body  # the route's usual JSON error shape
        if expected == 403:
            assert "scope" in response.text
        else:
            assert response.headers["WWW-Authenticate"] == "Bearer"


def test_keys_file_reloads_and_a_broken_one_keeps_the_last_good(server):
    assert requests.get(server.url + "/v1/models", headers=bearer(LATER_KEY)).status_code == 401
    write_keys(server.keys_path, keys_toml('[[key]]\nname = "later"\nkey = "%s"\nscopes = ["asr"]\n' % LATER_KEY))
    deadline = time.monotonic() + 5
    while requests.get(server.url + "/v1/models", headers=bearer(LATER_KEY)).status_code != 200:
        assert time.monotonic() < deadline, "the keys file was not re-read"
        time.sleep(0.2)
    health = requests.get(server.url + "/health").json()["access"]
    assert health["keys_file"]["error"] is None and health["keys_file"]["keys"] == 4
    # Broken: the last good keys stay in force and /health says why.
    write_keys(server.keys_path, "[[key]]\nname = ")
    deadline = time.monotonic() + 5
    while (error := requests.get(server.url + "/health").json()["access"]["keys_file"]["error"]) is None:
        assert time.monotonic() < deadline, "the broken keys file went unnoticed"
        time.sleep(0.2)
    assert "TOML" in error
    assert requests.get(server.url + "/v1/models", headers=bearer(LATER_KEY)).status_code == 200
    assert requests.post(server.url + "/run", headers=bearer(TTS_KEY), json={}).status_code == 403
    write_keys(server.keys_path, keys_toml())  # restore for other tests


@pytest.mark.parametrize("text, fragment", [
    ('[[key]]\nname = "a"\nkey = "0123456789abcdef"\nscopes = ["root"]\n', "unknown scopes"),
    ('[[key]]\nname = "a"\nkey = "short"\nscopes = ["tts"]\n', "at least 16"),
    ('[[key]]\nname = "a"\nsha256 = "abc"\nscopes = ["tts"]\n', "64 hex"),
    ('[[key]]\nname = "a"\nscopes = ["tts"]\n', "exactly one"),
    ('[[key]]\nname = "a"\nkey = "ek_0123456789abcdef"\nscopes = ["tts"]\n', "ek_"),
    ('[[key]]\nname = "a"\nkey = "0123456789abcdef"\nscopes = ["tts"]\n'
     '[[key]]\nname = "a"\nkey = "0123456789abcdeg"\nscopes = ["tts"]\n', "twice"),
    ("key = 3\n", "array of tables"),
])
def test_keys_file_errors_say_what(text, fragment):
    with pytest.raises(KeysFileError, match=fragment):
        parse_keys(text)


def test_openapi_shows_the_scopes_and_limits(server):
    doc = requests.get(server.url + "/openapi.json").json()
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "clientSecret"}
    purge = doc["paths"]["/purge-queue"]["post"]
    assert purge["security"] == [{"bearer": ["admin"]}] and purge["x-rate-limit"]["requests"] == 2
    assert doc["paths"]["/v1/realtime/calls"]["post"]["security"] == [{"bearer": ["realtime"]}, {"clientSecret": []}]
    assert doc["paths"]["/health"]["get"]["security"] == []
    for path, item in doc["paths"].items():
        for op in item.values():
            assert "security" in op, path
            rule = scopes.rule_for(path)
            if rule.scope not in (None, scopes.ANY):
                assert op["security"][0]["bearer"] == [rule.scope], path


def test_a_references_key_changes_only_its_own_voices(tmp_path):
    """Deleting, renaming or replacing another key's voice needs the admin scope."""
    import numpy as np

    from engine.audio import encode_audio

    keys = tmp_path / "keys.toml"
    keys.write_text('[[key]]\nname = "alice"\nkey = "alice-key-0123456789"\nscopes = ["references"]\n'
                    '[[key]]\nname = "bob"\nkey = "bob-key-0123456789ab"\nscopes = ["references"]\n'
                    '[[key]]\nname = "ops"\nkey = "%s"\nscopes = ["references", "admin"]\n' % ADMIN_KEY)
    settings = Settings(data_dir=tmp_path, mode="tts", keys_file=keys, asr_model="none", llm_enabled=False)
    t = np.arange(44100) / 44100
    wav = encode_audio((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 44100, "wav")
    alice, bob, ops = (bearer(k) for k in ("alice-key-0123456789", "bob-key-0123456789ab", ADMIN_KEY))
    with LiveServer(settings, Services(references=ReferenceStore(tmp_path / "references"))) as live:
        def add(who, voice_id):
            return requests.post(live.url + "/v1/references/add?format=json", headers=who,
                                 files={"audio": ("a.wav", wav)}, data={"id": voice_id, "text": "hi"})

        def delete(who, voice_id):
            return requests.delete(live.url + "/v1/references/delete?format=json", headers=who,
                                   json={"reference_id": voice_id})

        assert add(alice, "alices").status_code == 200
        assert add(bob, "alices").status_code == 403  # no replacing another key's voice
        assert delete(bob, "alices").status_code == 403
        rename = requests.post(live.url + "/v1/references/update?format=json", headers=bob,
                               json={"old_reference_id": "alices", "new_reference_id": "bobs"})
        assert rename.status_code == 403 and "admin" in rename.json()["message"]
        renamed = requests.post(live.url + "/v1/references/update?format=json", headers=alice,
                                json={"old_reference_id": "alices", "new_reference_id": "alices2"})
        assert renamed.status_code == 200, renamed.text
        assert delete(bob, "alices2").status_code == 403  # ownership moved with the rename
        assert add(bob, "bobs").status_code == 200 and delete(bob, "bobs").status_code == 200
        assert delete(ops, "alices2").status_code == 200  # admin may
