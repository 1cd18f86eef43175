"""
The decoder's KV cache, one per layer, and the causal mask over it. What makes it more than a pair of tensors: rows of
a batch may hold different numbers of tokens (ragged prompts, and DyRate dropping a different number of image tokens
per row), each slot remembers the RoPE position of its token (so positions stay right after dropping), and
`keep` compacts it in place, which is how dyrate.py drops tokens physically. model.py's LlamaAttention writes to it.
"""
import torch


class KVCache:
    """One decoder layer's keys and values (gpt-fast style): preallocated at the first write (the prompt) plus
    `max_new` more tokens, so a layer that dropped tokens at prefill (dyrate.py) is physically smaller.

    Each row keeps its own valid length and each slot the RoPE position of the token in it, so rows of different
    lengths share a batch and layers can hold different numbers of positions; attention masks the slots a row does
    not own. `used` (host side) bounds the lengths, and attention reads slots [0, used). A `static` cache instead
    reads its whole buffer at every step after the first write: the shapes of a decode step never change, which is
    what torch.compile and CUDA graphs need (Llava.compile_decode). Every update is in place, for the same reason.
    """

    def __init__(self, batch, max_new, n_kv_heads, head_dim, dtype, device, static=False):
        self.shape, self.dtype, self.device, self.max_new = (batch, n_kv_heads, head_dim), dtype, device, max_new
        self.static, self.used = static, 0
        self.k = self.v = self.pos = None
        self.length = torch.zeros(batch, dtype=torch.long, device=device)

    def update(self, k, v, positions, n_valid):
        """Write a chunk k/v (B, nkv, T, hs) at each row's end; the first n_valid[b] of row b's T tokens are real.
        Returns the keys/values to attend to, (B, nkv, S, hs), and each row's length before the chunk."""
        B, _, T, _ = k.shape
        if self.k is None:  # the first write: every row starts at slot 0
            (b, nkv, hs), S = self.shape, T + self.max_new
            # zeros: a ragged batch reads (masked) slots it never wrote, which must be finite
            self.k = torch.zeros(b, nkv, S, hs, dtype=self.dtype, device=self.device)
            self.v = torch.zeros_like(self.k)
            self.pos = torch.full((b, S), -1, dtype=torch.long, device=self.device)  # -1 = empty slot
            for t in (self.k, self.v, self.pos, self.length):  # updated in place: CUDA graphs may keep their addresses
                torch._dynamo.mark_static_address(t)
            self.k[:, :, :T], self.v[:, :, :T], self.pos[:, :T] = k, v, positions
            self.length.copy_(n_valid)
            self.used = T
            return k, v, torch.zeros_like(n_valid)
        assert self.static or self.used + T <= self.k.shape[2], "KV cache overflow: more new tokens than max_new"
        base = self.length.clone()
        slots = base[:, None] + torch.arange(T, device=k.device)  # (B, T), junk tokens of short rows included
        idx = slots[:, None, :, None].expand_as(k)
        self.k.scatter_(2, idx, k)
        self.v.scatter_(2, idx, v)
        self.pos.scatter_(1, slots, positions)
        self.length.add_(n_valid)
        if self.static:  # fixed shapes, and no host-side count for torch.compile to specialise on
            return self.k, self.v, base
        self.used += T
        return self.k[:, :, :self.used], self.v[:, :, :self.used], base

    def nbytes(self):
        """(B,) bytes of the keys and values each row holds."""
        _, nkv, hs = self.shape
        return self.length * (2 * nkv * hs * torch.finfo(self.dtype).bits // 8)

    def keep(self, slots, lengths):
        """Keep only the given slots (B, S') of each row, in order (the first lengths[b] are real): physical dropping,
        compacted into the front of the same buffers."""
        S = slots.shape[1]
        for buf in (self.k, self.v):
            buf[:, :, :S] = buf.gather(2, slots[:, None, :, None].expand(-1, buf.shape[1], -1, buf.shape[3]))
        self.pos[:, :S] = self.pos.gather(1, slots)
        self.pos[:, S:] = -1
        self.length.copy_(lengths)
        self.used = S


def causal_mask(base, T, S):
    """(B, 1, T, S) bool: query i of row b sits in slot base[b] + i and may see slots up to and including its own."""
    q = base[:, None] + torch.arange(T, device=base.device)  # (B, T)
    return (torch.arange(S, device=base.device) <= q[:, :, None])[:, None]
