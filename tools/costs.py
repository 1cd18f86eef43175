"""
The cost report of a generation, beside the core: twelve figures from a row's kept image tokens per step (the pruner's
history), each next to none's, and the baselines matched on cost (FastV's kept count, a ramp's start, VTW's layer).
dyrate.py keeps only what a budget trains on (dyrate.budget_cost); these are what tables and plots report.

    rows = generate.generate(model, tok, images, prompts, rule="fastv").rows
    costs.add(rows, model.config)          # each row gains flops, flops_none, flops_ratio, kv_cache_bytes, ...
    costs.cost_ratio(rows, "kv_byte_steps")
"""
import torch

import dyrate


def kv_bytes_read(cfg, prompt_len, kept, k, dtype):
    """Bytes of keys and values one row's decode steps read (attention reads every key it holds once per step):
    at step t >= 1, layers < k hold prompt_len + t tokens and layers >= k the ones kept until step t-1 (a step's own
    drops leave at the next one) plus the new token. With the weights, what bounds a memory-bound decode step."""
    t, N = cfg.text, cfg.n_image_tokens
    per_token = 2 * t.num_key_value_heads * t.head_dim * torch.finfo(dtype).bits // 8
    return sum(per_token * layers * (prompt_len - (N - c) + s)
               for s in range(1, len(kept)) for layers, c in dyrate.segments(cfg, k, kept[s - 1]))


def fastv_flops(cfg, n_tokens, n_kept_image, k=dyrate.DEFAULT_K):
    """FastV's published convention: prefill only, per layer 4nd^2 + 2n^2d + 2ndm (n tokens, hidden d, FFN m; 2-matrix
    FFN, multiply-adds). Returns (pruned, unpruned) so their ratio compares with the papers' TFLOPs ratios."""
    t = cfg.text
    d, m, L = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    per_layer = lambda n: 4 * n * d * d + 2 * n * n * d + 2 * n * d * m  # noqa: E731
    pruned = sum(layers * per_layer(n_tokens - (cfg.n_image_tokens - c))
                 for layers, c in dyrate.segments(cfg, k, n_kept_image))
    return pruned, L * per_layer(n_tokens)


def costs(cfg, prompt_len, kept, k, probes=0, predictor_flops=0, dtype=torch.float16, compressed=None):
    """The one cost summary of a row's generation, from its kept image tokens per step (kept[0] at prefill), each next
    to none's (every image token kept, no statistics): `flops` (with a KV cache), `nocache_flops` (every step
    recomputes the kept sequence), `kv_byte_steps` (the KV cache held after each step, summed over the steps: what
    bounds a batch; `mean_kv_bytes` is its mean), `kv_cache_bytes` at the end, `kv_bytes_read` (what the decode
    steps' attention reads) and FastV's prefill-only count. Ints give ints; tensors (training) give differentiable
    tensors. With several stages: k their layers and kept[t] a count per stage (dyrate.segments); compressed:
    VisionZip's (dominant, contextual) (dyrate.generation_flops)."""
    N, n = cfg.n_image_tokens, len(kept)
    out = {}
    flops, nocache, held = (dyrate.budget_cost(cfg, prompt_len, kept, k, budget, probes, predictor_flops, dtype,
                                               compressed) for budget in ("flops", "nocache", "kv"))
    for name, value, none in (
            ("flops", *flops), ("nocache_flops", *nocache), ("kv_byte_steps", *held),
            ("kv_cache_bytes", dyrate.kv_cache_bytes(cfg, prompt_len, n, kept[-1], k, dtype),
             dyrate.kv_cache_bytes(cfg, prompt_len, n, N, k, dtype)),
            ("kv_bytes_read", kv_bytes_read(cfg, prompt_len, kept, k, dtype),
             kv_bytes_read(cfg, prompt_len, [N] * n, k, dtype)),
            ("fastv_prefill_flops", *fastv_flops(cfg, prompt_len, kept[0], k))):
        out.update({name: value, f"{name}_none": none})
    out.update(flops_ratio=out["flops"] / out["flops_none"], mean_kv_bytes=out["kv_byte_steps"] / n,
               mean_kv_bytes_none=out["kv_byte_steps_none"] / n)
    return out


# a budget's name (dyrate.BUDGETS) -> its costs() key. NOTE: the KV budget is on byte-steps (the cache held after each
# step, summed), so over many rows its ratio is the mean KV-cache size over every step of every row
COSTS = {"flops": "flops", "kv": "kv_byte_steps", "nocache": "nocache_flops"}


def cost_ratio(rows, cost="flops"):
    """Sum of a cost over rows (costs() dicts, or generate() rows) / the same sum for none."""
    return sum(r[cost] for r in rows) / sum(r[f"{cost}_none"] for r in rows)


# ----------------------------------------------------------------------------------------------------------------------
# the baselines the learned rate is compared with, matched on cost


MATCH = ":k=match"  # vtw:k=match in tools.eval and tools.bench: VTW at the layer matched to the method before it


def check_matches(methods):
    """A ValueError unless every k=match in `methods` (rule specs) is VTW's, after a pruned method to be matched to."""
    for i, m in enumerate(methods):
        if MATCH in m and (not m.startswith("vtw:") or i == 0 or methods[i - 1].split(":")[0] in ("none",
                                                                                                  "transformers")):
            raise ValueError(f"{m}: only vtw takes k=match, after the pruned method it is matched to (e.g. --methods "
                             f"none,fastv,vtw:k=match)")


def matched_layer(cfg, lengths, target, cost="flops"):
    """VTW's withdrawal layer K (1 .. L-1; every image token dropped before it) whose cost ratio (a costs() key)
    over generations of the given (prompt tokens, new tokens) is closest to `target`."""
    def ratio(k):
        return cost_ratio([costs(cfg, prompt_len, [0] * n, k) for prompt_len, n in lengths], cost)
    return min(range(1, max(2, cfg.text.num_hidden_layers)), key=lambda k: (abs(ratio(k) - target), k))


def matched_keep(cfg, lengths, target, k, ramp=False, cost="flops"):
    """FastV's kept count (or, ramp=True, the kept count at the start of a hand-set ramp) whose cost ratio (a costs()
    key) over generations of the given (prompt tokens, new tokens) is closest to `target`. Costs depend only on the
    kept counts: no forward needed."""
    N = cfg.n_image_tokens

    def ratio(keep):
        rows = []
        for prompt_len, n in lengths:
            start = dyrate.Ramp(start=1 - keep / N, steps=n)
            kept = [min(keep, dyrate.keep_count(start.rate(t), N)) for t in range(n)] if ramp else [keep] * n
            rows.append(costs(cfg, prompt_len, kept, k, n if ramp else 1))
        return cost_ratio(rows, cost)
    lo, hi = 0, N  # the ratio grows with the kept count: bisect for the first keep whose ratio reaches the target
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if ratio(mid) < target else (lo, mid)
    return min({max(lo - 1, 0), lo}, key=lambda keep: (abs(ratio(keep) - target), keep))


def row_costs(cfg, row, dtype=torch.float16):
    """costs() of one generate() row, from its history: each stage's kept count per step, the steps that ranked
    (probes), the stages' layers and the predictor's FLOPs per step."""
    return costs(cfg, row["prompt_tokens"] + row["prompt_cut"], row["kept_stages"], row["stages"], row["probes"],
                 row["predictor_flops"], dtype, row["compressed"])


def add(rows, cfg, dtype=torch.float16):
    """Each generate() row gains its costs (row_costs); returns the rows."""
    for row in rows:
        row.update(row_costs(cfg, row, dtype))
    return rows
