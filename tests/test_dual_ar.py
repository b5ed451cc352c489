"""Dual-AR model: published layouts on meta, config parsing, KV cache equivalence, strict loading."""
from __future__ import annotations

import json

import pytest
import torch

from engine.fish.checkpoint import CheckpointError, load_llm_state_dict
from engine.fish.config import ConfigError, DualARConfig, load_config, parse_config
from engine.fish.dual_ar import DualARTransformer, rope_table
from engine.fish.generate import DualARRunner, FirstStepDump, generate_codes
from engine.fish.dual_ar_loader import build_on_meta, init_random_weights, load_dual_ar
from engine.fish.presets import S1_MINI_CONFIG, S2_PRO_CONFIG
from engine.speech.types import SamplingOptions

# (key, S2-Pro shape, S1-mini shape) straight from the spec's table §2.3.
PUBLISHED_SHAPES = [
    ("embeddings.weight", (155776, 2560), (155776, 1024)),
    ("codebook_embeddings.weight", (40960, 2560), (40960, 1024)),
    ("layers.0.attention.wqkv.weight", (6144, 2560), (4096, 1024)),
    ("layers.0.attention.wo.weight", (2560, 4096), (1024, 2048)),
    ("layers.0.attention.q_norm.weight", (128,), (128,)),
    ("layers.0.attention.k_norm.weight", (128,), (128,)),
    ("layers.0.feed_forward.w1.weight", (9728, 2560), (3072, 1024)),
    ("layers.0.feed_forward.w3.weight", (9728, 2560), (3072, 1024)),
    ("layers.0.feed_forward.w2.weight", (2560, 9728), (1024, 3072)),
    ("layers.0.attention_norm.weight", (2560,), (1024,)),
    ("layers.0.ffn_norm.weight", (2560,), (1024,)),
    ("norm.weight", (2560,), (1024,)),
    ("fast_embeddings.weight", (4096, 2560), (4096, 1024)),
    ("fast_layers.0.attention.wqkv.weight", (6144, 2560), (2048, 1024)),
    ("fast_layers.0.attention.wo.weight", (2560, 4096), (1024, 1024)),
    ("fast_layers.0.feed_forward.w1.weight", (9728, 2560), (3072, 1024)),
    ("fast_layers.0.feed_forward.w2.weight", (2560, 9728), (1024, 3072)),
    ("fast_layers.3.attention_norm.weight", (2560,), (1024,)),
    ("fast_norm.weight", (2560,), (1024,)),
    ("fast_output.weight", (4096, 2560), (4096, 1024)),
]


@pytest.mark.parametrize("family,raw,tensors,params", [
    ("s2-pro", S2_PRO_CONFIG, 358, 4_561_852_416),
    ("s1-mini", S1_MINI_CONFIG, 287, 860_169_216),
])
def test_full_size_models_have_published_keys_and_shapes(family, raw, tensors, params):
    model = build_on_meta(parse_config(raw))
    state = model.state_dict()
    column = 1 if family == "s2-pro" else 2
    for row in PUBLISHED_SHAPES:
        assert tuple(state[row[0]].shape) == row[column], row[0]
    assert len(state) == tensors
    assert sum(v.numel() for v in state.values()) == params
    assert ("output.weight" in state) == (family == "s1-mini")  # S2-Pro ties the head to the embeddings
    assert not any(k.endswith(".bias") for k in state)
    assert not any("fast_project_in" in k for k in state)
    assert not any("q_norm" in k for k in state if k.startswith("fast_layers"))


def test_s2_config_flattening_forces_family_flags():
    c = parse_config(S2_PRO_CONFIG)
    assert c.family == "s2-pro" and c.scale_codebook_embeddings and c.norm_fastlayer_input
    assert (c.fast_dim, c.fast_head_dim, c.codebook_size, c.n_fast_layer) == (2560, 128, 4096, 4)
    assert (c.semantic_begin_id, c.semantic_end_id) == (151678, 155773)
    assert c.rope_base == 1_000_000 and c.norm_eps == 1e-6
    s1 = parse_config(S1_MINI_CONFIG)
    assert s1.family == "s1-mini" and not s1.norm_fastlayer_input and s1.fast_head_dim == 64


def test_derived_defaults():
    c = DualARConfig(family="s1-mini", vocab_size=100, n_layer=1, n_head=4, dim=64, codebook_size=8,
                     num_codebooks=2, n_fast_layer=1)
    assert c.n_local_heads == 4 and c.head_dim == 16
    assert c.intermediate_size == 256  # round-up-to-256 of int(2*4*64/3)=170
    assert c.fast_dim == 64 and c.fast_head_dim == 16 and c.fast_intermediate_size == 256


@pytest.mark.parametrize("raw,message", [
    ({"model_type": "naive"}, "unsupported model_type"),
    ({"model_type": "fish_qwen3_omni", "text_config": {}}, "audio_decoder_config"),
    ({"model_type": "fish_qwen3_omni", "text_config": {"dim": 8}, "audio_decoder_config": {}}, "lacks"),
    ({**S1_MINI_CONFIG, "n_head": 0}, "must be positive"),
])
def test_bad_configs_are_clear_errors(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_rope_table_is_bf16_rounded():
    t = rope_table(64, 16, 1e6)
    assert t.dtype == torch.float32
    assert torch.equal(t, t.to(torch.bfloat16).float())
    exact = torch.cos(torch.tensor(5.0))  # position 5, pair 0 rotates by 5 rad
    assert abs(t[5, 0, 0].item() - exact.item()) < 4e-3


def _small_model(family="s1-mini", seed=0) -> DualARTransformer:
    c = DualARConfig(family=family, vocab_size=400, n_layer=2, n_head=4, n_local_heads=2, head_dim=16, dim=64,
                     intermediate_size=128, codebook_size=64, num_codebooks=4, n_fast_layer=2, fast_head_dim=8,
                     max_seq_len=256, attention_qk_norm=True, scale_codebook_embeddings=True,
                     norm_fastlayer_input=family == "s2-pro", tie_word_embeddings=family == "s2-pro",
                     semantic_begin_id=300, semantic_end_id=363)
    return init_random_weights(DualARTransformer(c), seed, std=0.3).eval()


def _prompt(t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.zeros(5, t, dtype=torch.long)
    p[0] = torch.randint(0, 300, (t,), generator=g)
    p[0, 4:8] = torch.randint(300, 364, (4,), generator=g)
    p[1:, 4:8] = torch.randint(0, 64, (4, 4), generator=g)
    return p


@pytest.mark.parametrize("family", ["s1-mini", "s2-pro"])
def test_kv_cached_decode_equals_uncached_logits(family):
    model = _small_model(family)
    inp = _prompt(16).unsqueeze(0)
    with torch.no_grad():
        x = model.embed(inp)
        for layer in model.layers:
            x = layer(x, model.rope[:16], None, 0)
        full_logits = model.norm(x) @ model.head_weight().T
        caches = model.new_slow_caches(1, 2)  # tiny capacity: exercises cache growth too
        _, normed = model.forward_slow(inp[:, :, :7], caches, 0)
        diffs = [(normed[0, -1] @ model.head_weight().T - full_logits[0, 6]).abs().max()]
        for t in range(7, 16):
            _, normed = model.forward_slow(inp[:, :, t:t + 1], caches, t)
            diffs.append((normed[0, -1] @ model.head_weight().T - full_logits[0, t]).abs().max())
    assert max(diffs) < 1e-4
    assert full_logits.abs().max() > 1.0  # the comparison is not between near-zero numbers


def test_fast_transformer_cache_matches_teacher_forced_pass():
    model = _small_model()
    g = torch.Generator().manual_seed(1)
    h = torch.randn(1, 1, 64, generator=g)
    codes = torch.randint(0, 64, (3,), generator=g)
    with torch.no_grad():
        seq = torch.cat([h, model.fast_embeddings(codes).unsqueeze(0)], dim=1)  # (1, 4, dim)
        x = seq
        for layer in model.fast_layers:
            x = layer(x, model.fast_rope[:4], None, 0)
        reference = model.fast_norm(x)
        caches = model.new_fast_caches(1)
        stepwise = [model.forward_fast(seq[:, k:k + 1], caches, k) for k in range(4)]
    assert torch.allclose(torch.cat(stepwise, dim=1), reference, atol=1e-5)


def test_semantic_embedding_scale_applies_only_at_semantic_positions():
    model = _small_model()
    inp = _prompt(10).unsqueeze(0)
    with torch.no_grad():
        x = model.embed(inp)
        plain = model.embeddings(inp[:, 0])
    text_pos = [0, 1, 2, 3, 8, 9]
    assert torch.allclose(x[0, text_pos], plain[0, text_pos])
    vq = sum(model.codebook_embeddings(inp[0, 1 + k, 5] + k * 64) for k in range(4))
    assert torch.allclose(x[0, 5], (plain[0, 5] + vq) / (5 ** 0.5), atol=1e-6)


def test_greedy_generation_is_deterministic_and_seeded_sampling_reproduces():
    runner = DualARRunner(_small_model(), im_end_id=299)
    p = _prompt()
    a = generate_codes(runner, p, SamplingOptions(greedy=True), 12)
    b = generate_codes(runner, p, SamplingOptions(greedy=True), 12)
    assert a.shape == (4, 12) and torch.equal(a, b)
    s1 = generate_codes(runner, p, SamplingOptions(seed=7), 12)
    s2 = generate_codes(runner, p, SamplingOptions(seed=7), 12)
    s3 = generate_codes(runner, p, SamplingOptions(seed=8), 12)
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    assert int(a.max()) < 64 and int(a.min()) >= 0


def test_generation_stops_on_end_token_and_at_context_limit():
    model = _small_model()
    prompt = _prompt()
    with torch.no_grad():  # semantic logits all 0, <|im_end|> positive at the first step
        _, normed = model.forward_slow(prompt.unsqueeze(0), None, 0)
        model.output.weight[300:364] = 0
        model.output.weight[299] = normed[0, -1]
    gen = DualARRunner(model, im_end_id=299).start(prompt, SamplingOptions(greedy=True), 0)
    assert gen.step() is None and gen.stop_reason == "end"
    gen2 = DualARRunner(_small_model(), im_end_id=299).start(_prompt(250), SamplingOptions(greedy=True), 0)
    n = 0
    while gen2.step() is not None:  # 256-position context, 250-position prompt
        n += 1
    assert n == 6 and gen2.stop_reason == "length"


def test_first_step_dump_has_full_vocab_and_codebook_logits():
    runner = DualARRunner(_small_model(), im_end_id=299)
    dump = FirstStepDump()
    codes = generate_codes(runner, _prompt(), SamplingOptions(greedy=True), 2, dump)
    assert dump.slow_logits.shape == (400,) and dump.fast_logits.shape == (3, 64)  # codebooks 1..K-1
    # each row was fed the greedy pick of the one before: greedy generation made the same picks
    assert torch.equal(dump.fast_logits.argmax(-1), codes[1:, 0])
    restricted = dump.slow_logits[[299] + list(range(300, 364))]
    assert restricted.argmax().item() >= 0  # the candidates are a slice of the full logits
    assert torch.isfinite(dump.slow_logits).all()


def _write_flat(tmp_path, model: DualARTransformer, **extra):
    raw = {"model_type": "dual_ar", "vocab_size": 400, "n_layer": 2, "n_head": 4, "n_local_heads": 2,
           "head_dim": 16, "dim": 64, "intermediate_size": 128, "codebook_size": 64, "num_codebooks": 4,
           "n_fast_layer": 2, "fast_head_dim": 8, "max_seq_len": 256, "attention_qk_norm": True,
           "scale_codebook_embeddings": True, "tie_word_embeddings": False, **extra}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return load_config(tmp_path).with_semantic_ids(300, 363)


def test_model_pth_round_trip_with_prefix_and_legacy_qkv(tmp_path):
    model = _small_model()
    config = _write_flat(tmp_path, model)
    state = dict(model.state_dict())
    # Old-style file: "model." prefix, separate wq/wk/wv, plus audio projector keys to drop.
    wqkv = state.pop("layers.1.attention.wqkv.weight")
    state["layers.1.attention.wq.weight"], state["layers.1.attention.wk.weight"], \
        state["layers.1.attention.wv.weight"] = wqkv.split([64, 32, 32])
    state["audio_projector.weight"] = torch.zeros(3)
    torch.save({"state_dict": {"model." + k: v for k, v in state.items()}}, tmp_path / "model.pth")
    loaded = load_dual_ar(tmp_path, config, "cpu", torch.float32)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path):
    model = _small_model()
    config = _write_flat(tmp_path, model)
    state = dict(model.state_dict())
    del state["fast_norm.weight"]
    state["bogus.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): fast_norm.weight.*unexpected 1 key\(s\): bogus"):
        load_dual_ar(tmp_path, config, "cpu", torch.float32)
    state = dict(model.state_dict())
    state["norm.weight"] = torch.ones(65)
    torch.save(state, tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match=r"norm.weight: expected \(64,\), found \(65,\)"):
        load_dual_ar(tmp_path, config, "cpu", torch.float32)


def test_no_weights_and_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no language-model weights"):
        load_llm_state_dict(tmp_path)
    (tmp_path / "model.pth").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_llm_state_dict(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "missing.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing"):
        load_llm_state_dict(tmp_path)


def test_load_in_bfloat16(tmp_path):
    model = _small_model()
    config = _write_flat(tmp_path, model)
    torch.save(model.state_dict(), tmp_path / "model.pth")
    loaded = load_dual_ar(tmp_path, config, "cpu", torch.bfloat16)
    assert loaded.embeddings.weight.dtype == torch.bfloat16
    codes = generate_codes(DualARRunner(loaded, 299), _prompt(), SamplingOptions(greedy=True), 4)
    assert codes.shape == (4, 4)


def test_prefix_cache_reuse_matches_a_full_prefill():
    from engine.fish.generate import PrefixCache

    model = _small_model()
    base = _prompt(40, seed=3)
    variant = base.clone()
    variant[0, 30:] = torch.randint(0, 300, (10,), generator=torch.Generator().manual_seed(9))
    cold = DualARRunner(model, im_end_id=299, prefix_cache=PrefixCache(max_entries=0))
    warm = DualARRunner(model, im_end_id=299, prefix_cache=PrefixCache(max_entries=4))
    generate_codes(warm, base, SamplingOptions(greedy=True), 2)  # fills the cache
    d_cold, d_warm = FirstStepDump(), FirstStepDump()
    a = generate_codes(cold, variant, SamplingOptions(greedy=True), 8, d_cold)
    b = generate_codes(warm, variant, SamplingOptions(greedy=True), 8, d_warm)
    assert warm.prefix_cache.hits == 1 and cold.prefix_cache.hits == 0
    assert torch.allclose(d_cold.slow_logits, d_warm.slow_logits, atol=1e-4)
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["s1-mini", "s2-pro"])
def test_batched_steps_equal_separate_runs(family):
    from engine.fish.generate import PrefixCache

    model = _small_model(family, seed=2)
    prompts = [_prompt(12, seed=1), _prompt(20, seed=2), _prompt(9, seed=3)]
    options = [SamplingOptions(greedy=True), SamplingOptions(seed=5, temperature=0.8, top_p=0.9),
               SamplingOptions(greedy=True)]
    budgets = [10, 7, 4]  # one sequence leaves the batch early
    alone = [generate_codes(DualARRunner(model, 299, prefix_cache=PrefixCache(0)), p, o, n)
             for p, o, n in zip(prompts, options, budgets)]
    runner = DualARRunner(model, 299, prefix_cache=PrefixCache(0))
    gens = [runner.start(p, o, n) for p, o, n in zip(prompts, options, budgets)]
    frames: list[list[torch.Tensor]] = [[], [], []]
    while not all(g.finished for g in gens):
        for i, codes in enumerate(runner.step_many(gens)):
            if codes is not None:
                frames[i].append(codes)
    for i in range(3):
        got = torch.stack(frames[i], dim=1) if frames[i] else torch.zeros(4, 0, dtype=torch.long)
        assert torch.equal(got, alone[i]), i
    assert sum(a.size(1) for a in alone) >= 8  # most sequences really generated


def test_prefix_cache_memory_is_bounded():
    from engine.fish.generate import PrefixCache

    model = _small_model()
    # one 40-position entry: 2 layers x (k + v) x 2 heads x 40 x 16 x 4 bytes = 20480 bytes
    cache = PrefixCache(max_entries=8, max_bytes=50_000)
    runner = DualARRunner(model, im_end_id=299, prefix_cache=cache)
    for seed in range(4):
        generate_codes(runner, _prompt(40, seed=10 + seed), SamplingOptions(greedy=True), 1)
    assert len(cache._entries) == 2  # the two newest fit in the budget
    tiny_budget = PrefixCache(max_bytes=1000)
    generate_codes(DualARRunner(model, 299, prefix_cache=tiny_budget), _prompt(40), SamplingOptions(greedy=True), 1)
    assert tiny_budget._entries == []
