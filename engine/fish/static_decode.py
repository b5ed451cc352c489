"""Decode frames with no host round trips: static KV caches in fixed slots, sampling on the
device, and (on CUDA) the whole frame replayed as CUDA graphs.

The dynamic path in `generate.py` reads each frame's slow token back to the host before the
fast transformer runs and launches ~1,000 small kernels per frame; on a GPU that, not
arithmetic, sets the frame rate. Here one frame is two fixed-shape functions over static buffers:

- `_slow(n, L)`: the slow transformer's decode step for the first n slots, attending over the
  first L cache positions (one capture per length bucket, so short sequences don't read the
  whole context; n is a power of two, so one busy request doesn't pay for four);
- `_head(n)`: slow-token sampling (`sampling.sample_rows`, the chain the dynamic path uses too),
  the fast transformer along the codebooks and their sampling, all on the device.

Random draws stay exact per request: the host fills each slot's exponential noise with that
request's own generator before the replay, so a seeded request gives the same codes whatever
else shares the batch. The host reads one small tensor per frame (the codes) to stream them and
see the end token.

The same functions run eagerly on the CPU (tests exercise them there); graph capture is only
used on CUDA, and checked against the eager result once when captured.
"""
from __future__ import annotations

import logging
import weakref

import torch
from torch import Tensor

from engine.fish.decode_protocols import DecodeRunner, SlotSequence
from engine.fish.dual_ar import DualARTransformer, KVCache
from engine.fish.sampling import REPETITION_WINDOW, RowSampling, sample_rows

log = logging.getLogger(__name__)

LENGTH_BUCKET = 512  # attention lengths are captured in multiples of this


class StaticDecoder:
    """Up to `slots` concurrent sequences of at most `capacity` positions each, decoded together."""

    def __init__(self, runner: DecodeRunner, slots: int = 4, capacity: int | None = None,
                 use_cuda_graphs: bool | None = None) -> None:
        model: DualARTransformer = runner.model
        c = model.config
        self.runner, self.model, self.config = runner, model, c
        self.slots = slots
        self.capacity = min(capacity or c.max_seq_len, c.max_seq_len)
        dev, dtype = runner.device, model.dtype
        self.device = dev
        k = c.num_codebooks
        n_cand = runner.slow_candidates.numel()
        self.n_cand, self.fast_vocab = n_cand, runner.fast_vocab
        # --- caches
        shape = (slots, c.n_local_heads, self.capacity, c.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=dev) for _ in range(c.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=dev) for _ in range(c.n_layer)]
        self.fast_caches = model.new_fast_caches(slots)
        # --- per-step inputs and outputs
        self.inp = torch.zeros(slots, k + 1, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(slots, dtype=torch.long, device=dev)
        self.active = torch.zeros(slots, dtype=torch.bool, device=dev)
        self.hidden = torch.zeros(slots, 1, c.dim, dtype=dtype, device=dev)
        self.normed = torch.zeros_like(self.hidden)
        self.noise = torch.ones(slots, 2 * n_cand + (k - 1) * self.fast_vocab, device=dev)
        self.frame = torch.zeros(slots, k + 1, dtype=torch.long, device=dev)
        self.recent = torch.full((slots, k + 1, REPETITION_WINDOW), -1, dtype=torch.long, device=dev)
        self.rows = RowSampling.ones(slots, dev)  # per-slot sampling settings, written when a slot is taken
        self.owner: list[weakref.ref | None] = [None] * slots  # weak: a dropped request frees its slot
        self.use_cuda_graphs = dev.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self.graph_error: str | None = None

    # --- slots
    def fits(self, positions: int) -> bool:
        return positions <= self.capacity

    def acquire(self, gen: SlotSequence) -> int | None:
        """Give `gen` a free slot (its caches become views of the slot) or None if all are taken."""
        slot = next((s for s in range(self.slots) if self._owner(s) is None), None)
        if slot is None:
            return None
        self.owner[slot] = weakref.ref(gen)
        self.rows.write(slot, gen.sampling)
        self.recent[slot] = -1
        return slot

    def release(self, slot: int) -> None:
        self.owner[slot] = None

    def _owner(self, slot: int) -> SlotSequence | None:
        """A slot whose generator was dropped without finishing (a cancelled request) is free."""
        ref = self.owner[slot]
        return None if ref is None else ref()

    def free_slots(self) -> int:
        return sum(self._owner(s) is None for s in range(self.slots))

    def slot_caches(self, slot: int) -> list[KVCache]:
        """Per-layer caches writing straight into the slot's rows, for the (eager) prefill."""
        return [KVCache.over(k[slot:slot + 1], v[slot:slot + 1]) for k, v in zip(self.k, self.v)]

    # --- the two fixed-shape halves of a frame, over the first n slots
    def _slow(self, n: int, length: int) -> None:
        """Decode one position for slots [0, n) at `self.pos`, attending over [0, length)."""
        m = self.model
        x = m.embed(self.inp[:n])
        pos = self.pos[:n].clamp(max=self.capacity - 1)  # an idle slot may sit at the end; never index past it
        rope = m.rope[pos].unsqueeze(1)
        mask = (torch.arange(length, device=self.device)[None, :] <= pos[:, None]).view(n, 1, 1, length)
        for layer, k, v in zip(m.layers, self.k, self.v):
            x = layer.forward_static(x, rope, k[:n], v[:n], pos, mask, length)
        self.hidden[:n].copy_(x)
        self.normed[:n].copy_(m.norm(x))

    def _head(self, n: int) -> None:
        """Sample the frame for slots [0, n) from `hidden`/`normed`; active slots record it."""
        m, r, c = self.model, self.runner, self.config
        n_cand, fv = self.n_cand, self.fast_vocab
        hidden, normed, noise, recent = self.hidden[:n], self.normed[:n], self.noise[:n], self.recent[:n]
        rows = self.rows.head(n)
        recent_valid = recent >= 0
        # Slow token. Previous tokens are all semantic: as candidate indices they are id - begin + 1.
        logits = (normed[:, -1] @ r.slow_head.T).float()
        picked = sample_rows(logits, rows, noise[:, :n_cand], recent[:, 0] - c.semantic_begin_id + 1,
                             recent_valid[:, 0], ras_noise=noise[:, n_cand:2 * n_cand], ras_exempt=0)
        token = r.slow_candidates[picked]
        # Fast transformer along the codebooks.
        codes = [(token - c.semantic_begin_id).clamp(0, c.codebook_size - 1)]
        fast_caches = [KVCache.over(fc.k[:n], fc.v[:n]) for fc in self.fast_caches]
        m.forward_fast(m.to_fast_input(hidden, normed), fast_caches, 0)
        base = 2 * n_cand
        for k in range(1, c.num_codebooks):
            out = m.forward_fast(m.fast_embeddings(codes[-1]).unsqueeze(1), fast_caches, k)
            logits = (out[:, -1] @ r.fast_head.T).float()
            codes.append(sample_rows(logits, rows, noise[:, base + (k - 1) * fv: base + k * fv], recent[:, k + 1],
                                     recent_valid[:, k + 1]))
        frame = torch.stack([token] + codes, dim=1)
        self.frame[:n].copy_(frame)
        keep = self.active[:n, None, None]
        recent.copy_(torch.where(keep, torch.cat([recent[:, :, 1:], frame[:, :, None]], -1), recent))
        self.inp[:n].copy_(torch.where(keep, frame[:, :, None], self.inp[:n]))

    # --- running a step
    def _bucket(self, needed: int) -> int:
        return min(self.capacity, -(-needed // LENGTH_BUCKET) * LENGTH_BUCKET)

    def _rows(self, gens: list[SlotSequence]) -> int:
        """Slots to compute: up to the highest one stepping, rounded up to a power of two (few
        graph shapes; slots are handed out lowest first, so busy ones sit at the front)."""
        n = 1
        while n <= max(g.slot for g in gens):
            n *= 2
        return min(n, self.slots)

    def _run(self, key: tuple) -> None:
        fn = (lambda: self._slow(*key[1:])) if key[0] == "slow" else (lambda: self._head(*key[1:]))
        if not self.use_cuda_graphs:
            fn()
            return
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(key, fn)
        if graph is None:
            fn()
        else:
            graph.replay()

    def _capture(self, key: tuple, fn) -> torch.cuda.CUDAGraph | None:
        """Capture `fn` once; any failure switches this decoder to eager for good (logged)."""
        saved = self.active.clone()
        try:
            self.active.zero_()  # warm-up and capture must not advance any sequence
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                fn()
            self._pool = graph.pool()
            # A replay must reproduce the eager result on the same state, or graphs stay off.
            outputs = (self.hidden, self.normed) if key[0] == "slow" else (self.frame,)
            fn()
            eager = [t.clone() for t in outputs]
            graph.replay()
            if not all(torch.allclose(a.float(), b.float(), atol=1e-3) for a, b in zip(eager, outputs)):
                raise RuntimeError(f"graph replay of {key!r} differs from the eager computation")
            self.active.copy_(saved)
            self._graphs[key] = graph
            return graph
        except Exception as exc:  # keep serving, just without graphs
            self.active.copy_(saved)
            self.graph_error = f"{type(exc).__name__}: {exc}"
            log.warning("CUDA graph capture failed, decoding eagerly: %s", self.graph_error)
            self.use_cuda_graphs = False
            self._graphs.clear()
            return None

    def step(self, gens: list[SlotSequence], fresh: list[tuple[SlotSequence, Tensor, Tensor]]
             ) -> tuple[list[Tensor], list[Tensor]]:
        """One frame for each of `gens` (all hold slots). `fresh` lists the ones just prefilled
        with their last-position (hidden, normed); the rest decode their next position.
        Returns each one's frame [token, c0..c_{K-1}] on the host and on the device."""
        self.active.zero_()
        fresh_ids = {id(g) for g, _, _ in fresh}
        decoding = [g for g in gens if id(g) not in fresh_ids]
        # Every slot writes at its next position; for a slot not stepping now that write is
        # harmless, as its real step overwrites it before anything reads it.
        positions = [0 if (owner := self._owner(s)) is None else owner.position for s in range(self.slots)]
        for g in gens:
            self.active[g.slot] = True
            if not g.sampling.greedy:
                self.noise[g.slot].exponential_(1.0, generator=g.generator)
        n = self._rows(gens)
        if decoding:
            self.pos.copy_(torch.tensor(positions))
            self._run(("slow", n, self._bucket(max(g.position for g in decoding) + 1)))
        for g, hidden, normed in fresh:
            self.hidden[g.slot].copy_(hidden[0])
            self.normed[g.slot].copy_(normed[0])
        self._run(("head", n))
        on_device = self.frame.clone()
        on_host = on_device.cpu()
        return [on_host[g.slot] for g in gens], [on_device[g.slot] for g in gens]
