"""Frame-by-frame Dual-AR generation with KV caches (spec §2.5, §4).

`FrameGenerator` owns one request's caches and produces one code frame per `step()`, so a
scheduler can interleave many requests on one model. The slow head is restricted to the
semantic tokens plus <|im_end|> and the fast head to the codec's residual codebook size: both
are exact shortcuts for upstream's -inf bias and 1024-entry restriction, and they skip most of
the head's memory traffic.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from engine.fish.dual_ar import DualARTransformer
from engine.fish.sampling import REPETITION_WINDOW, RowSampling, exponential_noise, sample_rows
from engine.fish.static_decode import StaticDecoder
from engine.speech.types import SamplingOptions


@dataclasses.dataclass
class FirstStepDump:
    """Debug tensors for localising a mismatch against upstream."""

    slow_logits: Tensor | None = None  # full vocabulary, before the constraint bias
    # (num_codebooks - 1, codebook_size): codebooks 1..K-1 of the first frame, given the chosen
    # c0, each step fed the greedy pick of the one before (whatever the sampling settings)
    fast_logits: Tensor | None = None


class PrefixCache:
    """KV caches of recent prompts, reused for the longest common prefix of a new prompt.

    Requests in one voice share their whole reference section (and, in a conversation, earlier
    turns), so a new sentence only prefills its own text. Generic on purpose: it compares prompt
    ids, so it needs no knowledge of the prompt format.
    """

    def __init__(self, max_entries: int = 8, min_reuse: int = 16, max_bytes: int = 1 << 30) -> None:
        self.max_entries = max_entries
        self.min_reuse = min_reuse
        self.max_bytes = max_bytes  # long conversations make big entries: bound the memory, not just the count
        self._entries: list[tuple[Tensor, list[tuple[Tensor, Tensor]]]] = []  # newest last
        self.hits = 0

    def longest(self, prompt: Tensor) -> tuple[int, list[tuple[Tensor, Tensor]] | None]:
        best, best_kv = 0, None
        for ids, kv in self._entries:
            n = min(ids.size(1), prompt.size(1))
            same = (ids[:, :n] == prompt[:, :n]).all(dim=0)
            lcp = n if bool(same.all()) else int(torch.argmin(same.to(torch.int8)))
            if lcp > best:
                best, best_kv = lcp, kv
        if best < self.min_reuse:
            return 0, None
        self.hits += 1
        return best, best_kv

    @staticmethod
    def _nbytes(kv: list[tuple[Tensor, Tensor]]) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in kv)

    def store(self, prompt: Tensor, caches: list) -> None:
        t = prompt.size(1)
        if caches and self._nbytes([(caches[0].k[:, :, :t], None)]) * len(caches) > self.max_bytes:
            return  # larger than the whole budget: not worth evicting everything else for
        kv = [(c.k[:, :, :t].clone(), c.v[:, :, :t].clone()) for c in caches]
        self._entries = [e for e in self._entries if not torch.equal(e[0], prompt)] + [(prompt.clone(), kv)]
        excess = len(self._entries) - self.max_entries
        if excess > 0:
            del self._entries[:excess]
        while len(self._entries) > 1 and sum(self._nbytes(e[1]) for e in self._entries) > self.max_bytes:
            del self._entries[0]


class DualARRunner:
    """A loaded model plus the derived, restricted heads used for generation."""

    def __init__(self, model: DualARTransformer, im_end_id: int, fast_vocab: int | None = None,
                 prefix_cache: PrefixCache | None = None) -> None:
        c = model.config
        self.model = model
        self.config = c
        self.im_end_id = im_end_id
        # Candidate order mirrors the full vocabulary (<|im_end|> sorts before the semantic range in
        # both published tokenizers), so argmax ties break the same way.
        ids = [im_end_id] + list(range(c.semantic_begin_id, c.semantic_end_id + 1))
        self.slow_candidates = torch.tensor(ids, device=model.embeddings.weight.device)
        with torch.no_grad():
            self.slow_head = model.head_weight()[self.slow_candidates].contiguous()
        self.fast_vocab = min(fast_vocab or c.codebook_size, c.codebook_size)
        self.fast_head = model.fast_output.weight[: self.fast_vocab]
        self.prefix_cache = prefix_cache if prefix_cache is not None else PrefixCache()
        self.static: StaticDecoder | None = None

    def enable_static_decode(self, slots: int = 4, capacity: int | None = None,
                             use_cuda_graphs: bool | None = None) -> StaticDecoder:
        """Decode up to `slots` sequences through fixed buffers and on-device sampling (CUDA
        graphs on a GPU); sequences beyond that, or longer than `capacity`, use the dynamic path."""
        self.static = StaticDecoder(self, slots, capacity, use_cuda_graphs)
        return self.static

    @property
    def device(self) -> torch.device:
        return self.slow_head.device

    def start(self, prompt: Tensor, sampling: SamplingOptions, max_new_tokens: int = 0,
              dump: FirstStepDump | None = None) -> FrameGenerator:
        return FrameGenerator(self, prompt, sampling, max_new_tokens, dump)

    @torch.inference_mode()
    def step_many(self, gens: list[FrameGenerator]) -> list[Tensor | None]:
        """Advance each generator by one frame; decoding sequences share one batched pass, so the
        weights are read once for all of them. Returns each one's codes (K,) or None if done."""
        return _step_many(self, gens)


class FrameGenerator:
    """Generates code frames for one prompt. `step()` returns the next frame's codes (K,) or None
    once the model emitted <|im_end|> or the token budget / context is exhausted. Several
    generators of one runner can also advance together with `DualARRunner.step_many`."""

    def __init__(self, runner: DualARRunner, prompt: Tensor, sampling: SamplingOptions, max_new_tokens: int,
                 dump: FirstStepDump | None) -> None:
        c = runner.config
        if prompt.dim() != 2 or prompt.size(0) != c.num_codebooks + 1:
            raise ValueError(f"prompt must be ({c.num_codebooks + 1}, T), got {tuple(prompt.shape)}")
        self.runner = runner
        self.prompt = prompt.to(runner.device, torch.long)
        self.prompt_len = prompt.size(1)
        room = c.max_seq_len - self.prompt_len
        if room <= 0:
            raise ValueError(f"prompt of {self.prompt_len} positions leaves no room in the context of {c.max_seq_len}")
        self.max_new_tokens = min(max_new_tokens, room) if max_new_tokens > 0 else room
        self.sampling = sampling
        self.dump = dump
        self.generator: torch.Generator | None = None
        if sampling.seed is not None:
            self.generator = torch.Generator(device=runner.device)
            self.generator.manual_seed(abs(int(sampling.seed)) % (2**31))
        self.slot: int | None = None
        self._take_static_slot(max_new_tokens)
        if self.slot is None:
            self.slow_caches = runner.model.new_slow_caches(1, self.prompt_len + min(self.max_new_tokens, 512))
            self.rows = RowSampling.of(sampling, runner.device)  # (a static slot keeps its own)
        self.position = 0  # next slow position to fill
        self.emitted = 0
        self.finished = False
        self.stop_reason: str | None = None
        # Recent frames [token, c0..c_{K-1}] for RAS and the repetition penalty, newest last;
        # -1 marks the places no frame has filled yet.
        self.recent = torch.full((c.num_codebooks + 1, REPETITION_WINDOW), -1, dtype=torch.long,
                                 device=runner.device)
        self.next_input = self.prompt.unsqueeze(0)

    def _take_static_slot(self, requested_new_tokens: int) -> None:
        static = self.runner.static
        if static is None or self.dump is not None:
            return
        if requested_new_tokens > 0 and not static.fits(self.prompt_len + self.max_new_tokens):
            return  # an explicit length the slots can't hold: the dynamic path can
        if self.prompt_len >= static.capacity:
            return
        slot = static.acquire(self)
        if slot is None:
            return
        self.slot = slot
        # "Until the end token" is bounded by the slot's capacity (the context, by default).
        self.max_new_tokens = min(self.max_new_tokens, static.capacity - self.prompt_len)
        self.slow_caches = static.slot_caches(slot)

    def close(self) -> None:
        """Stop early and give back the resources (a static slot) now rather than at collection."""
        if not self.finished:
            self.finish("closed")

    @property
    def prefilled(self) -> bool:
        return self.position > 0

    def step(self) -> Tensor | None:
        return self.runner.step_many([self])[0]

    def reuse_prefix(self) -> None:
        """Copy cached keys/values of the longest known prompt prefix; prefill only the rest."""
        reuse, kv = self.runner.prefix_cache.longest(self.prompt)
        reuse = min(reuse, self.prompt_len - 1)  # the last position must run to give logits
        if kv is None or reuse <= 0:
            return
        for cache, (k, v) in zip(self.slow_caches, kv):
            cache.write(0, k[:, :, :reuse], v[:, :, :reuse])
        self.position = reuse
        self.next_input = self.prompt[:, reuse:].unsqueeze(0)

    def finish(self, reason: str) -> None:
        self.finished, self.stop_reason = True, reason
        self.slow_caches = []  # free memory as soon as possible
        if self.slot is not None:
            self.runner.static.release(self.slot)
            self.slot = None

    def accept(self, frame: Tensor) -> None:
        self.recent = torch.cat([self.recent[:, 1:], frame[:, None]], dim=1)
        self.next_input = frame.view(1, -1, 1)
        self.emitted += 1


def _step_many(runner: DualARRunner, gens: list[FrameGenerator]) -> list[Tensor | None]:
    model, c = runner.model, runner.config
    results: list[Tensor | None] = [None] * len(gens)
    live = []
    for i, g in enumerate(gens):
        if g.finished:
            continue
        if g.emitted >= g.max_new_tokens:
            g.finish("length")
            continue
        live.append(i)
    if not live:
        return results
    slotted = [i for i in live if gens[i].slot is not None]
    if slotted:
        live = [i for i in live if gens[i].slot is None]
        _step_static(runner, gens, slotted, results)
        if not live:
            return results
    # Slow transformer: prompts prefill one by one; decodes run as one batch.
    fresh = [i for i in live if not gens[i].prefilled]
    decoding = [i for i in live if gens[i].prefilled]
    order, hidden_parts, normed_parts = [], [], []
    for i in fresh:
        h, n = _prefill(runner, gens[i])
        order.append(i)
        hidden_parts.append(h)
        normed_parts.append(n)
    if decoding:
        inp = torch.cat([gens[i].next_input for i in decoding], dim=0)
        h, n = model.forward_slow_rows(inp, [gens[i].slow_caches for i in decoding],
                                       [gens[i].position for i in decoding])
        for i in decoding:
            gens[i].position += 1
        order += decoding
        hidden_parts.append(h)
        normed_parts.append(n)
    hidden, normed = torch.cat(hidden_parts, dim=0), torch.cat(normed_parts, dim=0)  # (B, 1, dim)

    slow_logits = (normed[:, -1] @ runner.slow_head.T).float()
    stepping = [gens[i] for i in order]
    for row, g in enumerate(stepping):
        if g.dump is not None and g.dump.slow_logits is None:
            g.dump.slow_logits = (normed[row, -1] @ model.head_weight().T).float().cpu()
    # Previous tokens are all semantic: as candidate indices they are id - begin + 1 (0 is <|im_end|>).
    picked = _sample(stepping, slow_logits, 0, offset=1 - c.semantic_begin_id, ras=True)
    tokens, keep = [], []
    for row, (g, token) in enumerate(zip(stepping, runner.slow_candidates[picked].tolist())):
        if token == runner.im_end_id:
            g.finish("end")
        else:
            tokens.append(token)
            keep.append(row)
    if not keep:
        return results

    # Fast transformer along the codebooks, batched over the sequences that go on.
    rows = torch.tensor(keep, device=runner.device)
    x = model.to_fast_input(hidden[rows], normed[rows])
    for j, row in enumerate(keep):
        g = gens[order[row]]
        if g.dump is not None and g.dump.fast_logits is None:
            g.dump.fast_logits = _greedy_fast_logits(model, x[j:j + 1], tokens[j] - c.semantic_begin_id)
    fast_caches = model.new_fast_caches(len(keep))
    model.forward_fast(x, fast_caches, 0)  # position 0 only fills the caches
    going = [stepping[row] for row in keep]
    token_ids = torch.tensor(tokens, device=runner.device)
    codes = [(token_ids - c.semantic_begin_id).clamp(0, c.codebook_size - 1)]
    for k in range(1, c.num_codebooks):
        out = model.forward_fast(model.fast_embeddings(codes[-1]).unsqueeze(1), fast_caches, k)
        logits = (out[:, -1] @ runner.fast_head.T).float()
        codes.append(_sample(going, logits, k + 1))
    frames = torch.stack([token_ids] + codes, dim=1)  # (B, K + 1): [token, c0..c_{K-1}] per row
    for j, row in enumerate(keep):
        going[j].accept(frames[j])
        results[order[row]] = frames[j, 1:]
    return results


def _sample(gens: list[FrameGenerator], logits: Tensor, channel: int, offset: int = 0, ras: bool = False) -> Tensor:
    """One pick per generator from its row of `logits`, given its recent ids in `channel` of its
    recent frames (plus `offset` to make them indices into the logits); `ras` for the slow head."""
    if all(g.sampling.greedy for g in gens):
        return torch.argmax(logits, dim=-1)
    recent = torch.stack([g.recent[channel] for g in gens])
    rows = RowSampling.cat([g.rows for g in gens])
    size = logits.size(-1)
    # Each generator's draws in the order the per-request chain took them: the normal draw, then RAS's.
    noise = [[_noise(g, size, logits.device) for _ in range(2 if ras else 1)] for g in gens]
    ras_noise = torch.stack([n[1] for n in noise]) if ras else None
    return sample_rows(logits, rows, torch.stack([n[0] for n in noise]), recent + offset, recent >= 0,
                       ras_noise=ras_noise, ras_exempt=0 if ras else None)


def _noise(g: FrameGenerator, size: int, device: torch.device) -> Tensor:
    if g.sampling.greedy:  # a greedy row ignores its noise: leave its generator untouched
        return torch.ones(size, device=device)
    return exponential_noise((size,), g.generator, device)


def _greedy_fast_logits(model: DualARTransformer, x: Tensor, c0: int) -> Tensor:
    """Full-width fast logits of codebooks 1..K-1 for one frame, feeding back each argmax (the
    fidelity dump: comparable with upstream's greedy run whatever this request samples)."""
    c = model.config
    caches = model.new_fast_caches(1)
    model.forward_fast(x, caches, 0)
    prev, rows = min(max(c0, 0), c.codebook_size - 1), []
    for k in range(1, c.num_codebooks):
        out = model.forward_fast(model.fast_embeddings(torch.tensor([prev], device=x.device)).unsqueeze(1), caches, k)
        logits = (out[0, -1] @ model.fast_output.weight.T).float()
        rows.append(logits.cpu())
        prev = int(torch.argmax(logits))
    return torch.stack(rows)


def _prefill(runner: DualARRunner, g: FrameGenerator) -> tuple[Tensor, Tensor]:
    """Run the rest of a fresh generator's prompt; returns the last position's (hidden, normed)."""
    g.reuse_prefix()
    h, n = runner.model.forward_slow(g.next_input, g.slow_caches, g.position)
    g.position += g.next_input.size(-1)
    if runner.prefix_cache.max_entries:
        runner.prefix_cache.store(g.prompt, g.slow_caches)
    return h, n


def _step_static(runner: DualARRunner, gens: list[FrameGenerator], idx: list[int],
                 results: list[Tensor | None]) -> None:
    """The generators holding static slots: prefills eagerly, then one static frame for all."""
    stepping = [gens[i] for i in idx]
    was_decoding = [g.prefilled for g in stepping]
    fresh = [(g, *_prefill(runner, g)) for g, decoding in zip(stepping, was_decoding) if not decoding]
    host, device = runner.static.step(stepping, fresh)
    for i, g, decoding, frame, on_device in zip(idx, stepping, was_decoding, host, device):
        if decoding:
            g.position += 1
        if int(frame[0]) == runner.im_end_id:
            g.finish("end")
            continue
        g.emitted += 1
        results[i] = on_device[1:]


def generate_codes(runner: DualARRunner, prompt: Tensor, sampling: SamplingOptions, max_new_tokens: int = 0,
                   dump: FirstStepDump | None = None) -> Tensor:
    """Whole-prompt convenience: codes (K, frames) of the semantic frames, end frame excluded."""
    gen = runner.start(prompt, sampling, max_new_tokens, dump)
    frames = []
    try:
        while (codes := gen.step()) is not None:
            frames.append(codes)
    finally:
        gen.close()
    if not frames:
        return torch.zeros(runner.config.num_codebooks, 0, dtype=torch.long)
    return torch.stack(frames, dim=1).cpu()
