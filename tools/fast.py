"""
The fast path, beside the core: a compiled decode over KV caches read in buckets of slots, decode-time dropping by
moves with counts copied to the host without waiting, chunked prefill, and beam search's row copies. It plugs into
model.py through two seams: `Llava.cache_class` (FastKVCache here) and `LlamaModel.layers_forward`, replaced on the
instance. Every piece computes what the core computes (tests/test_fast.py).

    fast.compile_decode(model)        # generate.py --compile, tools.bench +compile
    fast.chunk_prefill(model, rows)   # tools.bench --prefill-rows
    model.cache_class = fast.FastKVCache  # eager decoding, dropping by moves (tools.bench)
"""
import copy
import functools

import torch

import model


def compaction_moves(alive, length, moves):
    """Physical dropping from a KV cache after a decode step, moving as few slots as possible: alive (B, S) marks the
    slots that hold a token (slots dropped at decode steps are dead), length (B,) how many slots each row has
    written. A row's dead slots below its new length are holes, and its alive slots at or past the new length move
    into them (the order of past keys does not matter to attention). moves: the most holes of any row (the host
    knows it from next_compaction). Returns src, dst (B, moves) slot indices (a row with fewer holes repeats its last
    move, or moves slot 0 onto itself) and the new lengths (B,)."""
    j = torch.arange(alive.shape[1], device=alive.device)
    real = j < length[:, None]  # (B, S)
    keep = alive & real
    new_length = keep.sum(1)
    hole = real & ~alive & (j < new_length[:, None])
    mover = keep & (j >= new_length[:, None])  # as many as holes in every row
    n_moves = hole.sum(1)
    take = torch.minimum(torch.arange(moves, device=j.device), (n_moves - 1).clamp(min=0)[:, None])  # (B, moves)

    def slots(m):  # (B, S) bool -> (B, moves): the first `moves` slots where m holds, in order, by `take`
        return (~m).to(torch.int8).argsort(dim=1, stable=True).gather(1, take)
    return slots(mover), slots(hole), new_length


def next_compaction(alive, length):
    """What the compaction at the next decode step will need on the host, once every row holds one more token: a
    (2,) device tensor of the most holes of any row and the longest row after it."""
    j = torch.arange(alive.shape[1], device=alive.device)
    real = j < length[:, None]
    new_length = (alive & real).sum(1) + 1
    holes = (real & ~alive & (j < new_length[:, None])).sum(1)
    return torch.stack([holes.max(), new_length.max()])


class DeadSlots:
    """The slots dropped at decode steps in the caches of layers >= K, which hold the same slots and so share one
    `alive` mask and one transfer of next_compaction's counts to the host (pinned on CUDA, with an event, so nothing
    waits). The counts hold one step later (a drop's marks are then compacted before the next drop's are made): the
    first of those caches to drop or reserve at that step with the counts on the host decides the compaction
    (compaction_moves) and each cache applies it once (`epoch`); counts that arrive later wait for the next drop's."""

    def __init__(self, like):
        cuda = like.pos.device.type == "cuda"
        self.alive = torch.ones(like.pos.shape, dtype=torch.bool, device=like.pos.device)  # (B, S)
        torch._dynamo.mark_static_address(self.alive)
        self.counts = torch.zeros(2, dtype=torch.long, device="cpu", pin_memory=cuda)
        self.counted = torch.cuda.Event() if cuda else None
        self.pending = False  # counts on their way that no compaction has used yet
        self.stamp = -1  # the caches' `used` when the counts were taken: they hold for used == stamp + 1
        self.epoch, self.moves = 0, None  # how many compactions so far, the last one's (src, dst, length, used)

    def compact(self, cache):
        """At a cache's drop or reserve, before it writes: decide a compaction if the counts have arrived and hold
        now, and bring this cache up to the last one. Returns whether this call decided one."""
        decided = False
        if cache.epoch == self.epoch and self.pending and cache.used == self.stamp + 1 and \
                (self.counted is None or self.counted.query()):
            moves, longest = (int(n) for n in self.counts.numpy())  # NOTE: a host buffer, not a read from the device
            self.pending = False
            if moves or longest != cache.used:
                src, dst, length = compaction_moves(self.alive, cache.length, moves)
                self.moves, self.epoch, decided = (src, dst, length, longest), self.epoch + 1, True
                self.alive.fill_(True)
        if cache.epoch != self.epoch:
            assert cache.epoch == self.epoch - 1, "a cache of layers >= K missed a compaction"
            cache.move(*self.moves)
            cache.epoch = self.epoch
        return decided

    def drop(self, cache, gone):
        """A decode step's drops (B, S), in the slots the caches held before this step's compaction (if any)."""
        if self.compact(cache):  # the slots moved: so do the marks
            src, dst, length, _ = self.moves
            gone = gone.scatter(1, dst, gone.gather(1, src)) & (torch.arange(gone.shape[1], device=gone.device)
                                                               < length[:, None])
        self.alive &= ~gone
        cuda = self.counted is not None
        self.counts.copy_(next_compaction(self.alive, cache.length), non_blocking=cuda)
        if cuda:
            self.counted.record()
        self.pending, self.stamp = True, cache.used


class FastKVCache(model.KVCache):
    """The core's KV cache, plus what the fast path needs:
    - buckets: with `bucket`, attention reads slots [0, window), window = used rounded up to a multiple of bucket
      slots, so a decode step's shapes change only when the longest row crosses a bucket boundary, growing or
      compacted: torch.compile (and CUDA graphs) see a bounded number of shapes, and a compacted cache still runs a
      smaller step. Without one, window == used. The buffers keep their addresses (static, for CUDA graphs).
    - dropping without a wait: drop() marks the slots dead in an `alive` mask (attention masks them) and the slots
      are compacted by moves at a later step, once the counts the compaction needs are on the host (DeadSlots)."""

    last_drop = None  # (gone, DeadSlots) of the last drop: the caches that get the same `gone` share its DeadSlots

    def __init__(self, batch, max_new, n_kv_heads, head_dim, dtype, device, bucket=0):
        super().__init__(batch, max_new, n_kv_heads, head_dim, dtype, device)
        self.bucket, self.window, self.alive, self.dead, self.epoch = bucket, 0, None, None, 0
        torch._dynamo.mark_static_address(self.length)

    def reserve(self, T):
        if self.dead is not None:  # a step that dropped nothing yet may compact
            self.dead.compact(self)
        first = self.k is None
        super().reserve(T)
        if first:
            for t in (self.k, self.v, self.pos):  # updated in place: CUDA graphs may keep their addresses
                torch._dynamo.mark_static_address(t)
        S = self.k.shape[2]
        self.window = self.used if not self.bucket else min(S, -(-self.used // self.bucket) * self.bucket)

    def read(self, base, T):
        W = self.window
        mask = model.causal_mask(base, T, W)
        if self.alive is not None:  # slots dropped at a decode step, not yet compacted
            mask = mask & self.alive[:, None, None, :W]
        return self.k[:, :, :W], self.v[:, :, :W], mask

    def drop(self, gone):
        """The core's drop, without a host read or a gather: the slots die now and move out a step later."""
        last = FastKVCache.last_drop
        if last is not None and last[0] is gone:  # another layer of the same step: the mask is marked already
            self.dead = last[1]
            self.dead.compact(self)
        else:
            self.dead = self.dead or DeadSlots(self)
            self.dead.drop(self, gone)
            FastKVCache.last_drop = (gone, self.dead)
        self.alive = self.dead.alive

    def move(self, src, dst, lengths, used):
        """Slot src[b, i] is copied to slot dst[b, i] (B, D), then row b holds lengths[b] slots, at most `used`. Only
        the moved slots are copied, none when D = 0 (compaction_moves fills the holes with the last slots: attention
        does not depend on the order of past keys, their RoPE is applied already)."""
        B, nkv, S, hs = self.k.shape
        first = torch.arange(B * nkv, device=src.device).view(B, nkv, 1) * S  # (B, nkv, 1): row of slot 0 of (b, h)
        src_rows, dst_rows = (first + src[:, None]).flatten(), (first + dst[:, None]).flatten()  # (B * nkv * D,)
        for buf in (self.k, self.v):  # whole hs-long rows copied (index_select), not element by element (gather)
            rows = buf.view(B * nkv * S, hs)
            rows.index_copy_(0, dst_rows, rows.index_select(0, src_rows))
        self.pos.scatter_(1, dst, self.pos.gather(1, src))
        self.length.copy_(lengths)
        self.used = used


def select_rows(caches, src, dst):
    """Row dst[i] of every cache becomes a copy of row src[i] (beam search: a beam takes its parent's keys, values
    and dead slots), for the rows that change only; (D,) long tensors. The slots and the host-side counts are the same
    for every row."""
    masks = {id(c.alive): c.alive for c in caches if getattr(c, "alive", None) is not None}  # shared: copied once
    for buf in [t for c in caches for t in (c.k, c.v, c.pos, c.length)] + list(masks.values()):
        if buf is not None:
            buf[dst] = buf[src]  # the right side is gathered first: a row may be both a source and a target


def cache_rows(cache, lo, hi):
    """The same cache restricted to rows lo..hi-1: views of its tensors (writes land in the cache), for a prefill
    that runs the batch in row chunks. Its host-side counts are the cache's as they stand."""
    view = copy.copy(cache)
    view.shape = (hi - lo, *cache.shape[1:])
    view.k, view.v, view.pos, view.length = cache.k[lo:hi], cache.v[lo:hi], cache.pos[lo:hi], cache.length[lo:hi]
    return view


def compile_decode(llava, backend="inductor", bucket=64):
    """torch.compile the decoder layers for the one-token decode steps (prefill stays eager: its length varies).
    Caches made after this are FastKVCaches that read their slots in buckets of `bucket`, so each segment of layers
    compiles once per batch size and bucket of cache length: layers 0..L-1 without a pruner; with one, layers
    0..K-1 and K..L-1, the pruner running eagerly between them. A cache compacted below a bucket boundary runs the
    smaller step from then on. On CUDA the segments replay as CUDA graphs, one per shape. Returns llava."""
    if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1:
        raise ValueError(f"bucket must be a whole number of cache slots >= 1, got {bucket!r}")
    lm = llava.language_model.model
    cuda = llava.language_model.lm_head.weight.device.type == "cuda"
    # every (segment, batch, bucket) is one specialisation of the same code: allow them all
    buckets = -(-llava.config.text.max_position_embeddings // bucket)
    for name in ("recompile_limit", "accumulated_recompile_limit"):
        setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 4 * buckets))
    compiled = torch.compile(model.LlamaModel.layers_forward.__get__(lm), backend=backend, fullgraph=True,
                             dynamic=False, mode="reduce-overhead" if cuda and backend == "inductor" else None)
    before = lm.layers_forward

    def layers_forward(lo, hi, x, *rest):  # one-token steps compiled, the rest as before
        return (compiled if x.shape[1] == 1 else before)(lo, hi, x, *rest)
    lm.layers_forward = layers_forward
    llava.cache_class = functools.partial(FastKVCache, bucket=bucket)
    return llava


def chunk_prefill(llava, rows):
    """Run each prefill (the vision tower and the decoder layers; the pruner still sees the whole batch) in chunks
    of `rows` rows, so that its peak memory grows with the batch only through the KV caches and the hidden states
    handed between the layers. The result is the one-pass prefill's, bit for bit where the kernels compute each
    row alike (CPU: tested). rows = 0: one pass again. Returns llava."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ValueError(f"rows must be a whole number >= 0 (0: no chunks), got {rows!r}")
    lm, tower = llava.language_model.model, llava.vision_tower.vision_model
    for module, name in ((lm, "layers_forward"), (tower, "forward")):  # undo an earlier call's chunks
        if hasattr(getattr(module, name), "one_pass"):
            setattr(module, name, getattr(module, name).one_pass)
    if rows == 0:
        return llava
    layers, vision = lm.layers_forward, tower.forward

    def chunked_layers(lo, hi, x, positions, n_valid, caches, probe_rows, key_weight, checkpoint=False):
        if x.shape[1] == 1 or key_weight is not None or len(x) <= rows:
            return layers(lo, hi, x, positions, n_valid, caches, probe_rows, key_weight, checkpoint)
        # each chunk's activations, not the whole batch's, at once
        parts = [layers(lo, hi, x[i:i + rows], positions[i:i + rows], None if n_valid is None else n_valid[i:i + rows],
                        None if caches is None else [cache_rows(c, i, i + rows) if lo <= n < hi else None
                                                     for n, c in enumerate(caches)],
                        None if probe_rows is None else probe_rows[i:i + rows], None, checkpoint)
                 for i in range(0, len(x), rows)]
        probs = None if probe_rows is None else torch.cat([p for _, p in parts])
        return torch.cat([x for x, _ in parts]), probs

    def chunked_vision(pixel_values, n_layers, probe=False):
        parts = [vision(pixel_values[i:i + rows], n_layers, probe) for i in range(0, len(pixel_values), rows)]
        return tuple(map(torch.cat, zip(*parts))) if probe else torch.cat(parts)  # probe: VisionZip's three tensors
    chunked_layers.one_pass, chunked_vision.one_pass = layers, vision
    lm.layers_forward, tower.forward = chunked_layers, chunked_vision
    return llava
