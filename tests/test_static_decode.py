"""The static decode path (fixed slots, on-device sampling; CUDA graphs on a GPU) must generate
what the dynamic path generates. On the CPU it runs the same functions eagerly."""
from __future__ import annotations

import gc

import pytest
import torch

from engine.fish.generate import DualARRunner, PrefixCache, generate_codes
from engine.speech.types import SamplingOptions
from test_dual_ar import _prompt, _small_model


def _run_together(runner, prompts, options, budgets, skip_every=0):
    """Step all generators together; with skip_every, generator 0 sits out every n-th step
    (as a request does while its codec pushes audio)."""
    gens = [runner.start(p, o, n) for p, o, n in zip(prompts, options, budgets)]
    frames: list[list[torch.Tensor]] = [[] for _ in gens]
    step = 0
    while not all(g.finished for g in gens):
        step += 1
        chosen = [g for i, g in enumerate(gens) if not (i == 0 and skip_every and step % skip_every == 0)]
        codes = runner.step_many(chosen)
        for g, c in zip(chosen, codes):
            if c is not None:
                frames[gens.index(g)].append(c)
    return gens, [torch.stack(f, dim=1) if f else torch.zeros(4, 0, dtype=torch.long) for f in frames]


@pytest.mark.parametrize("family", ["s1-mini", "s2-pro"])
def test_static_slots_generate_what_the_dynamic_path_generates(family):
    model = _small_model(family, seed=2)
    prompts = [_prompt(12, seed=1), _prompt(20, seed=2), _prompt(9, seed=3)]
    options = [SamplingOptions(greedy=True), SamplingOptions(seed=5, temperature=0.8, top_p=0.9),
               SamplingOptions(greedy=True, repetition_penalty=1.0)]
    budgets = [10, 7, 4]
    alone = [generate_codes(DualARRunner(model, 299, prefix_cache=PrefixCache(0)), p, o, n)
             for p, o, n in zip(prompts, options, budgets)]
    runner = DualARRunner(model, 299, prefix_cache=PrefixCache(0))
    static = runner.enable_static_decode(slots=3, use_cuda_graphs=False)
    gens, got = _run_together(runner, prompts, options, budgets, skip_every=3)
    assert [g.emitted for g in gens] == [f.size(1) for f in got]
    assert sum(g.emitted for g in gens) >= 8  # most sequences really generated
    # Sampled rows too: on the CPU one exponential_ call over the slot's noise consumes the
    # seeded generator exactly as the dynamic path's per-draw calls do.
    for i in range(3):
        assert torch.equal(got[i], alone[i]), i
    # Seeded sampling: the same codes alone as in company, and repeatable.
    alone_static = DualARRunner(model, 299, prefix_cache=PrefixCache(0))
    alone_static.enable_static_decode(slots=1, use_cuda_graphs=False)
    again = generate_codes(alone_static, prompts[1], options[1], budgets[1])
    assert torch.equal(got[1], again)
    other_seed = generate_codes(alone_static, prompts[1], SamplingOptions(seed=6, temperature=0.8, top_p=0.9), 7)
    assert not torch.equal(again, other_seed)
    assert static.free_slots() == 3  # finished sequences gave their slots back


@pytest.mark.parametrize("family", ["s1-mini", "s2-pro"])
def test_long_sampled_runs_match_the_dynamic_path(family):
    """Strong penalty, wide top-p, 30 frames: the repetition window and RAS really act here."""
    model = _small_model(family, seed=2)
    static_runner = DualARRunner(model, 299, prefix_cache=PrefixCache(0))
    static_runner.enable_static_decode(slots=1, use_cuda_graphs=False)
    for seed in range(3):
        options = SamplingOptions(seed=seed, temperature=1.0, top_p=0.95, repetition_penalty=2.0)
        want = generate_codes(DualARRunner(model, 299, prefix_cache=PrefixCache(0)), _prompt(20, seed=2), options, 30)
        assert torch.equal(generate_codes(static_runner, _prompt(20, seed=2), options, 30), want), seed


def test_batched_sampling_settings_match_per_row_numbers():
    """Non-greedy: the batched form the static decoder uses (per-row (B, 1) settings, a validity
    mask over the repetition window) picks what the per-request form FrameGenerator uses picks,
    for the same logits and the same exponential noise."""
    from engine.fish.sampling import apply_repetition_penalty, filtered_probs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    previous = torch.randint(0, 50, (3, 16), generator=g)
    valid = torch.ones_like(previous, dtype=torch.bool)
    valid[2, :10] = False  # a young sequence: only 6 real entries
    settings = [(0.7, 0.7, 30, 1.2), (1.0, 0.9, 5, 1.0), (0.3, 0.5, 50, 1.5)]
    t, p, k, pen = (torch.tensor([[s[i]] for s in settings]) for i in range(4))
    noise = torch.empty(3, 50).exponential_(1.0, generator=g)
    got = torch.argmax(filtered_probs(apply_repetition_penalty(logits, previous, pen, valid),
                                      t, p, k.long()) / noise, -1)
    for row, (temp, top_p, top_k, penalty) in enumerate(settings):
        real = previous[row][valid[row]]
        want_logits = apply_repetition_penalty(logits[row], real, penalty)
        want = torch.argmax(filtered_probs(want_logits, temp, top_p, top_k) / noise[row])
        assert int(got[row]) == int(want), row


def test_slots_run_out_to_the_dynamic_path_and_dropped_requests_free_theirs():
    model = _small_model(seed=4)
    runner = DualARRunner(model, 299, prefix_cache=PrefixCache(0))
    static = runner.enable_static_decode(slots=2, capacity=64, use_cuda_graphs=False)
    a = runner.start(_prompt(12, seed=1), SamplingOptions(greedy=True), 5)
    b = runner.start(_prompt(12, seed=2), SamplingOptions(greedy=True), 5)
    c = runner.start(_prompt(12, seed=3), SamplingOptions(greedy=True), 5)  # no slot left
    too_long = runner.start(_prompt(12, seed=4), SamplingOptions(greedy=True), 100)  # beyond the capacity
    assert (a.slot, b.slot, c.slot, too_long.slot) == (0, 1, None, None)
    unbounded = DualARRunner(model, 299, prefix_cache=PrefixCache(0))
    unbounded.enable_static_decode(slots=1, capacity=64, use_cuda_graphs=False)
    u = unbounded.start(_prompt(12), SamplingOptions(greedy=True), 0)
    assert u.slot == 0 and u.max_new_tokens == 64 - 12  # "until the end" stops at the slot's capacity
    runner.step_many([a, b, c])
    del a  # a cancelled request drops its generator mid-sequence
    gc.collect()
    assert static.free_slots() == 1
    b.close()
    assert static.free_slots() == 2 and b.finished
    d = runner.start(_prompt(12, seed=1), SamplingOptions(greedy=True), 5)
    assert d.slot is not None
    alone = generate_codes(DualARRunner(model, 299, prefix_cache=PrefixCache(0)), _prompt(12, seed=1),
                           SamplingOptions(greedy=True), 5)
    frames = []
    while (codes := d.step()) is not None:
        frames.append(codes)
    assert torch.equal(torch.stack(frames, dim=1), alone)  # a reused slot starts clean


def test_static_path_through_the_tts_engine(tiny_s1_checkpoint):
    """The whole TTS pipeline on static slots gives the same audio as the dynamic path."""
    import asyncio

    from engine.speech.tts import TTSEngine
    from engine.speech.types import TTSRequest

    request = TTSRequest(text="Hello there. How are you?", chunk_length=12,
                         sampling=SamplingOptions(greedy=True, max_new_tokens=6))
    dynamic = TTSEngine.load(tiny_s1_checkpoint, device="cpu")
    static = TTSEngine.load(tiny_s1_checkpoint, device="cpu")
    static.models.runner.enable_static_decode(slots=2, use_cuda_graphs=False)
    try:
        a = asyncio.run(dynamic.synthesize(request))
        b = asyncio.run(static.synthesize(request))
    finally:
        dynamic.close()
        static.close()
    assert a.size > 0 and a.shape == b.shape
    assert abs(a - b).max() < 1e-5
    assert static.models.runner.static.free_slots() == 2
