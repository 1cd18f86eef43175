"""
tools/costs.py: the cost report of a generation (FLOPs with and without a KV cache, KV-cache bytes held and read,
FastV's prefill count) against what torch's FlopCounterMode counts and what the caches really hold, and the baselines
matched on cost.
"""
import pytest
import torch

import dyrate
import generate
import model
from conftest import random_image
from test_dyrate import K, N_IMAGE, held_bytes, random_predictor, two_rows
from tools import costs, fast


def test_mean_kv_bytes_equal_the_measured_caches(ours):
    """costs()'s mean KV-cache size is the mean, over the steps, of the bytes the caches really hold after each step
    (ragged rows, drops at several steps)."""
    llava, _ = ours
    ids, lengths, px, starts = two_rows(ours)
    pruner = dyrate.Pruner(dyrate.Schedule([0.25, 0.25, 0.5, 0.75, 0.75, 1.0]), N_IMAGE, starts, lengths, K)
    caches, held = llava.new_caches(2, 6), []
    with torch.no_grad():
        for _ in generate.decode(llava, ids, lengths, px, caches, 6, pruner):
            held.append(sum(held_bytes(c) for c in caches))  # (B,) after this step's forward
    for b in range(2):
        row = costs.row_costs(llava.config, dict(pruner.summary(b, 6), prompt_tokens=int(lengths[b])), torch.float32)
        assert row["mean_kv_bytes"] == sum(int(h[b]) for h in held) / 6
        assert row["kv_cache_bytes"] == int(held[-1][b]) and row["mean_kv_bytes"] < row["mean_kv_bytes_none"]


class DropFixed:
    """A hook that drops a fixed set of image tokens before layer K, at any sequence length: the no-cache step."""
    k = K

    def __init__(self, drop, start):
        self.drop, self.start = drop, start

    def stages(self, n_layers):
        return [self.k]

    def probe_rows(self, n_valid, T, stage=0):
        return None

    def __call__(self, probs, x, positions, n_valid, caches, stage=0):
        return (*dyrate.drop_tokens(x, positions, n_valid, self.drop, self.start, N_IMAGE), None)


def test_nocache_flops_match_flop_counter(ours):
    """The no-cache convention: each step recomputes the whole sequence so far, layers >= K without the image tokens
    dropped by then; the image features are computed once. Equals FlopCounterMode on those forwards."""
    from torch.utils.flop_counter import FlopCounterMode
    llava, tok = ours
    ids, lengths, px, starts = two_rows(ours)
    ids, px, starts, L = ids[:1, :int(lengths[0])], px[:1], starts[:1], int(lengths[0])
    pruner = dyrate.Pruner(dyrate.Schedule([0.25, 0.5, 0.5, 0.875, 1.0]), N_IMAGE, starts, lengths[:1], K,
                           stats=False)
    with torch.no_grad():
        steps = generate.decode(llava, ids, lengths[:1], px, llava.new_caches(1, 5), 5, pruner)
        tokens = torch.stack([t for t, _ in steps], 1)  # (1, 5)
        seq = torch.cat([ids, tokens[:, :-1]], 1)  # the prompt and every token fed back
        dropped = torch.cumsum(torch.stack([h.dropped_mask for h in pruner.history]), 0).bool()  # (steps, 1, N)
        with FlopCounterMode(display=False) as counter:
            x = llava.embed(seq, px)  # vision tower and projector, once
            for t in range(5):
                T = L + t
                llava.last_logits(x[:, :T], torch.arange(T)[None], None, None, DropFixed(dropped[t], starts))
    kept = [int(h.kept_count[0]) for h in pruner.history]
    assert dyrate.generation_flops(llava.config, L, kept, K, cache=False) == counter.get_total_flops()
    row = costs.costs(llava.config, L, kept, K)
    assert row["nocache_flops"] / row["nocache_flops_none"] < row["flops"] / row["flops_none"]  # late drops count


@pytest.mark.parametrize("method,kw", [("none", {}), (dyrate.FastV(0.5), {}), ("vtw", {}), ("vtw", dict(k=1)),
                                       ("vtw", dict(k=3)), (dyrate.Mass(0.2), {}),
                                       (dyrate.Schedule([0.25, 0.5, 0.5, 0.75]), {}),
                                       (dyrate.Learned(random_predictor(seed=1)), {}), ("pdrop", {}),
                                       ("depth", {}), ("schedule:rates=0.25/0.5/0.5/0.75:k=1:stages=3", {}),
                                       ("visionzip:dominant=12:contextual=4", {})])
def test_flops_match_flop_counter(method, kw, ours, ckpt):
    """Our accounting of a whole generation (vision, projector, every layer's projections, MLP and attention with its
    real key count, LM head, probe, type shares, predictor) equals torch's FlopCounterMode on the real forwards of the
    fast path (tools/fast.py), whose attention reads only the compacted slots (the core's KVCache.drop leaves its
    host-side bound `used` as it was, so there a decode step's attention also multiplies the slots it masks)."""
    from torch.utils.flop_counter import FlopCounterMode
    _, tok = ours
    llava = model.Llava.from_pretrained(ckpt[0])
    llava.cache_class = fast.FastKVCache
    with FlopCounterMode(display=False) as counter:  # stats=False: no statistics computed only for reporting
        rows = generate.generate(llava, tok, [random_image(15)], ["Describe the picture."], max_new_tokens=6,
                                 rule=method, stats=False, **kw).rows
    row = costs.add(rows, llava.config)[0]
    assert row["flops"] == counter.get_total_flops()
    reported = costs.add(generate.generate(llava, tok, [random_image(15)], ["Describe the picture."], max_new_tokens=6,
                                           rule=method, **kw).rows, llava.config)[0]  # --json's statistics cost nothing
    assert reported["flops"] == row["flops"] and (method != "none" or reported["flops_ratio"] == 1.0)
    assert (row["flops_ratio"] < 1) == (method != "none") and len(row["kept_visual"]) == len(row["token_ids"])


def test_fastv_convention_matches_the_paper():
    """FastV's own formula at K=2, R=0.5 on LLaVA-1.5-7B with ~60 text tokens: ~57% of the prefill FLOPs."""
    pruned, full = costs.fastv_flops(model.LlavaConfig(), 576 + 60, 288, 2)
    assert 0.56 < pruned / full < 0.58


def test_vtw_layer_is_matched_on_cost():
    """matched_layer: the withdrawal layer whose cost is nearest the target, on each cost."""
    cfg = model.LlavaConfig()
    lengths = [(617, 40), (630, 20)]
    for cost in ("flops", "kv_byte_steps", "nocache_flops"):
        ratios = {k: costs.cost_ratio([costs.costs(cfg, p, [0] * n, k) for p, n in lengths], cost)
                  for k in range(1, 32)}
        for target in (0.3, 0.55, 0.8):
            k = costs.matched_layer(cfg, lengths, target, cost)
            assert abs(ratios[k] - target) == min(abs(r - target) for r in ratios.values()), (cost, target)
    assert costs.matched_layer(cfg, lengths, ratios[16], "nocache_flops") == 16


def test_fastv_matching_is_within_a_hundredth_of_the_target():
    """The sweep's and --compare's matching (matched_keep) picks a FastV R whose cost is within 0.01 of the target,
    on every cost, wherever FastV's range reaches the target."""
    cfg = model.LlavaConfig()
    lengths = [(617, 40), (630, 20), (650, 57)]
    N = cfg.n_image_tokens
    for cost in ("flops", "kv_byte_steps", "nocache_flops"):
        low = costs.cost_ratio([costs.costs(cfg, p, [0] * n, K) for p, n in lengths], cost)
        for target in (0.35, 0.5, 0.62, 0.8, 0.95):
            if target <= low:
                continue
            keep = costs.matched_keep(cfg, lengths, target, K, cost=cost)
            got = costs.cost_ratio([costs.costs(cfg, p, [keep] * n, K) for p, n in lengths], cost)
            assert abs(got - target) <= 0.01 and 0 <= keep <= N, (cost, target, got)


def test_visionzip_costs_count_the_shorter_prompt(ours):
    """VisionZip's KV cache is the bytes its caches hold after each step, with the prompt's 16 image tokens; none's is
    the same prompt with all 64."""
    llava, tok = ours
    cfg = llava.config
    batch = generate.make_batch(cfg, tok, [random_image(3)], ["What is in the image?"], 4,
                                rule="visionzip:dominant=12:contextual=4")
    caches, held = llava.new_caches(1, 4), []
    with torch.no_grad():
        for _ in generate.decode(llava, batch.input_ids, batch.lengths, batch.pixel_values, caches, 4, batch.pruner):
            held.append(sum(held_bytes(c) for c in caches))
    L = int(batch.lengths[0])
    row = costs.row_costs(cfg, dict(batch.pruner.summary(0, 4), prompt_tokens=L), torch.float32)
    assert row["mean_kv_bytes"] == sum(int(h[0]) for h in held) / 4 and row["kv_cache_bytes"] == int(held[-1][0])
    per_token = int(held[-1][0]) // (cfg.text.num_hidden_layers * (L + 3))
    assert row["kv_cache_bytes_none"] == per_token * cfg.text.num_hidden_layers * (L + 48 + 3)
