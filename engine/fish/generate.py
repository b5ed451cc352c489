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
from engine.fish.sampling import (RAS_TEMPERATURE, RAS_TOP_P, RAS_WINDOW, REPETITION_WINDOW, apply_repetition_penalty,
                       draw, filtered_probs)
from engine.fish.static_decode import StaticDecoder
from engine.speech.types import SamplingOptions


@dataclasses.dataclass
class FirstStepDump:
    """Debug tensors for localising a mismatch against upstream."""

    slow_logits: Tensor | None = None  # full vocabulary, before the constraint bias
    fast_logits: Tensor | None = None  # codebook 1, full codebook_size, given the chosen c0


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
        self.slow_candidates = torch.tensor(ids, device=model.norm.weight.device)
        with torch.no_grad():
            self.slow_head = model.head_rows(self.slow_candidates).contiguous()
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
        self.position = 0  # next slow position to fill
        self.emitted = 0
        self.finished = False
        self.stop_reason: str | None = None
        # Recent frames [token, c0..c_{K-1}] for RAS and the repetition penalty, newest last.
        self.recent = torch.zeros(c.num_codebooks + 1, 0, dtype=torch.long, device=runner.device)
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

    def sample_slow(self, logits: Tensor) -> int:
        """Index into the runner's slow candidates."""
        s, r = self.sampling, self.runner
        if s.greedy:
            return int(torch.argmax(logits))
        previous = self.recent[0]
        if s.repetition_penalty != 1.0 and previous.numel():
            # Previous tokens are all semantic: map ids to candidate indices (0 is <|im_end|>).
            idx = previous - r.config.semantic_begin_id + 1
            logits = apply_repetition_penalty(logits, idx, s.repetition_penalty)
        normal = int(draw(filtered_probs(logits, s.temperature, s.top_p, s.top_k), self.generator))
        # RAS: a semantic token repeated within the window is replaced by a high-temperature draw.
        high = int(draw(filtered_probs(logits, RAS_TEMPERATURE, RAS_TOP_P, s.top_k), self.generator))
        token = int(r.slow_candidates[normal])
        if token != r.im_end_id and bool((previous[-RAS_WINDOW:] == token).any()):
            return high
        return normal

    def sample_fast(self, logits: Tensor, codebook: int) -> int:
        s = self.sampling
        if s.greedy:
            return int(torch.argmax(logits))
        if s.repetition_penalty != 1.0 and self.recent.size(1):
            logits = apply_repetition_penalty(logits, self.recent[codebook + 1], s.repetition_penalty)
        return int(draw(filtered_probs(logits, s.temperature, s.top_p, s.top_k), self.generator))

    def accept(self, frame: Tensor) -> None:
        self.recent = torch.cat([self.recent, frame[:, None]], dim=1)[:, -REPETITION_WINDOW:]
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
    tokens, keep = [], []
    for row, i in enumerate(order):
        g = gens[i]
        if g.dump is not None and g.dump.slow_logits is None:
            g.dump.slow_logits = (normed[row, -1] @ model.head_weight().T).float().cpu()
        token = int(runner.slow_candidates[g.sample_slow(slow_logits[row])])
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
    fast_caches = model.new_fast_caches(len(keep))
    model.forward_fast(x, fast_caches, 0)  # position 0 only fills the caches
    codes = [[min(max(t - c.semantic_begin_id, 0), c.codebook_size - 1)] for t in tokens]
    for k in range(1, c.num_codebooks):
        prev = torch.tensor([cs[-1] for cs in codes], device=runner.device)
        out = model.forward_fast(model.fast_embeddings(prev).unsqueeze(1), fast_caches, k)
        logits = (out[:, -1] @ runner.fast_head.T).float()
        for j, row in enumerate(keep):
            g = gens[order[row]]
            if k == 1 and g.dump is not None and g.dump.fast_logits is None:
                g.dump.fast_logits = (out[j, -1] @ model.fast_output.weight.T).float().cpu()
            codes[j].append(g.sample_fast(logits[j], k))
    for j, row in enumerate(keep):
        i = order[row]
        frame = torch.tensor([tokens[j]] + codes[j], device=runner.device)
        gens[i].accept(frame)
        results[i] = frame[1:]
    return results


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
