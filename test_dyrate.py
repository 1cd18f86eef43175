"""
Tests: dyrate.py's invariants (pruned decoding against a key-mask reference, zero drops against unpruned decoding, kept
counts and cache lengths, the compiled decode path, type shares, the straight-through gradient), FLOPs against torch's
FlopCounterMode, predictor files, generate.py's pruning output and bench.py. Tiny random models (conftest.py), CPU:

    python -m pytest -q
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula, sdpa_flop_count

import dyrate
import generate
import model
import processing
from conftest import IMAGE_SIZE, PATCH, TOLERANCE, assert_close, prompt_inputs, random_image

@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """torch's FlopCounterMode has SDPA formulas for the CUDA kernels only: the CPU kernel gets the same one."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


N_IMAGE, K = (IMAGE_SIZE // PATCH) ** 2, 2


def random_predictor(n_heads=4, seed=0, scale=300.0, center=None):
    """Arbitrary but deterministic rate decisions (tests the mechanics only). center (H, 4): typical features, so the
    logits W (f - center) follow how rows and steps differ rather than what they share."""
    torch.manual_seed(seed)
    predictor = dyrate.RatePredictor(n_heads, [i / 8 for i in range(9)], K)
    with torch.no_grad():
        predictor.linear.weight.normal_(0, scale)
        if center is not None:
            predictor.linear.bias.copy_(-predictor.linear.weight @ center.flatten())
    return predictor


def two_rows(ours, placement=("cpu", torch.float32)):
    """Two ragged prompts with their images, on the placement's device (pixels in its dtype), and image starts."""
    device, dtype = placement
    ids, lengths, px = prompt_inputs(ours, ["What is in the image?", "How many shapes are there? Answer in detail."],
                                     [12, 13])
    starts = (ids == ours[0].config.image_token_index).int().argmax(1)
    return ids.to(device), lengths.to(device), px.to(device, dtype), starts.to(device)


def atol(placement, reference):
    """The tests' CPU float32 tolerance (1e-5), elsewhere the placement dtype's share of the reference's scale."""
    return 1e-5 if placement == ("cpu", torch.float32) else TOLERANCE[placement[1]] * float(reference.abs().max())


def run_steps(llava, ids, lengths, px, pruner, steps):
    """Greedy decoding over the cache: logits of every step (steps, B, V), the new tokens (B, steps), the caches."""
    caches = llava.new_caches(len(ids), steps)
    with torch.no_grad():
        out = list(generate.decode(llava, ids, lengths, px, caches, steps, pruner))
    return torch.stack([logits for _, logits in out]), torch.stack([token for token, _ in out], 1), caches


class KeyMask:
    """A pruner hook that only hands layers >= k a fixed key weight: the mask reference."""

    def __init__(self, weight, k=K):
        self.weight, self.k = weight, k

    def probe_rows(self, n_valid, T):
        return None

    def __call__(self, probs, x, positions, n_valid, caches):
        return x, positions, n_valid, self.weight


@pytest.mark.parametrize("method,kw", [("fastv", dict(ratio=0.5)), ("vtw", {}),
                                       ("dyrate", dict(schedule=[0.25, 0.25, 0.5, 0.5, 0.75, 0.875, 1.0])),
                                       ("dyrate", "predictor")])
def test_pruned_decoding_equals_mask_reference(method, kw, ours, placement, placed):
    """Physically dropping tokens (prefill gather, cache compaction, RoPE positions with gaps) gives the logits of a
    full forward in which layers >= K cannot see the dropped image keys: prompt rows those dropped at step 0, the
    query of step t those dropped by step t. Two ragged rows, each compared with a forward over it alone."""
    llava, _ = placed(placement)
    ids, lengths, px, starts = two_rows(ours, placement)
    steps = 8
    if kw == "predictor":  # rates that differ between rows and steps
        stats = dyrate.Pruner("none", N_IMAGE, starts, lengths, K)
        run_steps(llava, ids, lengths, px, stats, steps)
        center = torch.stack([h.shares for h in stats.history]).mean((0, 1))
        kw = dict(predictor=random_predictor(center=center.cpu()).to(placement[0]))
    pruner = dyrate.Pruner(method, N_IMAGE, starts, lengths, K, **kw)
    logits, tokens, _ = run_steps(llava, ids, lengths, px, pruner, steps)
    kept_counts = torch.stack([h.kept_count for h in pruner.history])  # (steps, B)
    if "predictor" in kw:
        assert (kept_counts[:, 0] != kept_counts[:, 1]).any()  # rows really kept different numbers
    for b in range(2):
        L, s = int(lengths[b]), int(starts[b])
        seq = torch.cat([ids[b, :L], tokens[b, :-1]])[None]  # prompt + the tokens fed back
        kept = ~torch.cumsum(torch.stack([h.dropped_mask[b] for h in pruner.history]), 0).bool()  # (steps, N)
        weight = torch.ones(1, seq.shape[1], seq.shape[1], device=seq.device)
        for i in range(seq.shape[1]):
            weight[0, i, s:s + N_IMAGE] = kept[max(0, i - L + 1)].float()
        with torch.no_grad():
            ref = llava(seq, px[b:b + 1], pruner=KeyMask(weight))[0, L - 1:]  # rows of steps 0 .. steps-1
        assert_close(logits[:, b], ref, atol(placement, ref), f"{method} row {b} {placement}")


def test_zero_drops_equal_unpruned_decoding(ours):
    """Zero drops give unpruned decoding: exactly without statistics at decode steps; with them (dyrate always,
    the others with stats=True) layer K-1 computes a decode step's attention explicitly, which rounds unlike SDPA
    (conftest.TOLERANCE), and the greedy tokens are the same."""
    llava, _ = ours
    ids, lengths, px, starts = two_rows(ours)
    plain, tokens, _ = run_steps(llava, ids, lengths, px, None, 6)
    for method, kw in (("dyrate", dict(schedule=[0.0])), ("fastv", dict(ratio=0.0)), ("none", {}),
                       ("fastv", dict(ratio=0.0, stats=False)), ("none", dict(stats=False))):
        hook = dyrate.Pruner(method, N_IMAGE, starts, lengths, K, **kw)
        pruned, got, _ = run_steps(llava, ids, lengths, px, hook, 6)
        if hook.needs_probe():  # at every step
            assert_close(pruned, plain, TOLERANCE[torch.float32] * float(plain.abs().max()), method)
            assert torch.equal(got, tokens), method
        else:
            assert torch.equal(pruned, plain), (method, kw)


def test_kept_counts_monotone_and_caches_physically_shorter(ours):
    llava, _ = ours
    ids, lengths, px, starts = two_rows(ours)
    # keep 32, 48, 16, 64, 0, 0 of 64: the kept count may only shrink; a decode step's drops are compacted at the
    # next step (the last step drops nothing, so every drop is compacted by the end)
    requested = [0.5, 0.25, 0.75, 0.0, 1.0, 1.0]
    pruner = dyrate.Pruner("dyrate", N_IMAGE, starts, lengths, K, schedule=requested)
    _, _, caches = run_steps(llava, ids, lengths, px, pruner, len(requested))
    assert [int(h.kept_count[0]) for h in pruner.history] == [32, 32, 16, 16, 0, 0]
    assert [h.dropped_mask[0].sum().item() for h in pruner.history] == [32, 0, 16, 0, 16, 0]
    steps, T = len(requested), ids.shape[1]
    for layer, cache in enumerate(caches):
        if layer < K:  # untouched: every token, in order
            assert torch.equal(cache.length, lengths + steps - 1) and cache.k.shape[2] == T + steps
            for b in range(2):
                assert cache.pos[b, :int(cache.length[b])].tolist() == list(range(int(lengths[b]) + steps - 1))
        else:  # no image token left; the prefill drop made the buffer itself smaller
            assert torch.equal(cache.length, lengths - N_IMAGE + steps - 1) and cache.k.shape[2] == T - 32 + steps
            s = int(starts[0])  # every text token exactly once (compaction moves slots: their order may change)
            text = [p for p in range(int(lengths[0]) + steps - 1) if not s <= p < s + N_IMAGE]
            assert sorted(cache.pos[0, :int(cache.length[0])].tolist()) == text
    held = int(sum(c.nbytes()[0] for c in caches))
    assert held == dyrate.kv_cache_bytes(llava.config, int(lengths[0]), steps, 0, K, torch.float32)


def test_compaction_moves_equal_the_reference_gather(placement):
    """compaction_moves + KVCache.move leave every row with exactly the slots the order-keeping gather (kept_slots,
    the prefill's) keeps, each slot's keys, values and position together, moving only the holes' worth of slots.
    Ragged rows, image tokens already out of order from an earlier compaction, a row that drops nothing."""
    device, dtype = placement
    torch.manual_seed(0)
    B, S, N, start = 3, 40, 16, torch.tensor([3, 5, 2], device=device)
    cache = model.KVCache(B, 8, 2, 4, dtype, device)
    cache.reserve(S - 8)
    lengths = torch.tensor([30, 32, 25], device=device)
    pos = torch.full((B, S - 8), -1, device=device)
    for b, n in enumerate(lengths.tolist()):  # a permutation of each row's positions 0 .. n-1
        pos[b, :n] = torch.randperm(n, device=device)
    k, v = torch.randn(2, B, 2, S - 8, 4, device=device, dtype=dtype)
    cache.update(k, v, pos, lengths)
    drop = torch.rand(B, N, device=device) < 0.5
    drop[2] = False
    ref_slots, ref_length = dyrate.kept_slots(cache.pos, cache.length, drop, start, N)
    alive = ~dyrate.real_and_dropped(cache.pos, cache.length, drop, start, N)[1]  # what Pruner.mark_dead leaves
    moves, longest = (int(n) for n in dyrate.next_compaction(alive, cache.length - 1))  # counts for one token less
    src, dst, length = dyrate.compaction_moves(alive, cache.length, moves)
    assert torch.equal(length, ref_length) and longest == int(ref_length.max())
    assert moves == src.shape[1] < int((cache.length - ref_length).max()) + 1  # at most the dropped count of a row
    before = [t.clone() for t in (cache.k, cache.v, cache.pos)]
    cache.move(src, dst, length, longest)
    for b in range(B):
        n = int(length[b])
        want = ref_slots[b, :n]
        got_order = cache.pos[b, :n].argsort()
        want_order = before[2][b, want].argsort()
        assert torch.equal(cache.pos[b, :n][got_order], before[2][b, want][want_order])
        for t, old in ((cache.k, before[0]), (cache.v, before[1])):
            assert torch.equal(t[b, :, :n][:, got_order], old[b, :, want][:, want_order])
    assert torch.equal(cache.pos[2], before[2][2])  # nothing dropped: nothing moved
    all_alive = torch.ones_like(alive)
    src, dst, length = dyrate.compaction_moves(all_alive, cache.length, 0)
    state = lambda: [t.clone() for t in (cache.k, cache.v, cache.pos, cache.length)]  # noqa: E731
    kept = state()
    cache.move(src, dst, length, longest)  # no move at all (D = 0): the cache is unchanged
    assert src.shape == (B, 0) and all(torch.equal(a, b) for a, b in zip(kept, state()))


def bucketed_run(llava, ids, lengths, px, pruner, steps):
    """run_steps, also recording each decode step's cache windows (layer 0's, layer K's)."""
    caches, windows, out = llava.new_caches(len(ids), steps), [], []
    with torch.no_grad():
        for i, (token, logits) in enumerate(generate.decode(llava, ids, lengths, px, caches, steps, pruner)):
            out.append(logits)
            if i:
                windows.append((caches[0].window, caches[K].window))
    return torch.stack(out), caches, windows


def test_bucketed_compiled_decode_recompiles_per_bucket_and_equals_eager(ckpt, ours, placement, placed):
    """Llava.compile_decode: caches read in buckets of 16 slots; decode steps compile once per (segment, bucket),
    a compacted cache runs the smaller step, a second generation compiles nothing, and the logits are eager's.
    Rows that keep different numbers of tokens (a random predictor) and drops at several steps."""
    device, dtype = placement
    eager_model = placed(placement)[0]
    compiled, graphs = model.Llava.from_pretrained(ckpt[0], device, dtype), []

    def count_graphs(gm, example_inputs):  # a torch.compile backend that runs the captured graph as is
        graphs.append(gm)
        return gm.forward
    compiled.compile_decode(backend=count_graphs, bucket=16)
    ids, lengths, px, starts = two_rows(ours, placement)
    stats = dyrate.Pruner("none", N_IMAGE, starts, lengths, K)
    run_steps(eager_model, ids, lengths, px, stats, 8)
    center = torch.stack([h.shares for h in stats.history]).mean((0, 1)).cpu()
    predictor = random_predictor(center=center).to(device)
    seen = set()  # (segment, window): the graphs compiled so far
    try:
        for method, kw in (("none", None), ("dyrate", dict(schedule=[0.25, 0.5, 0.5, 0.75, 1.0])),
                           ("dyrate", dict(predictor=predictor))):
            def pruner():
                return kw and dyrate.Pruner(method, N_IMAGE, starts, lengths, K, **kw)
            eager, _, _ = run_steps(eager_model, ids, lengths, px, pruner(), 8)
            for i in range(2):
                before, hook = len(graphs), pruner()
                got, caches, windows = bucketed_run(compiled, ids, lengths, px, hook, 8)
                assert_close(got, eager, atol(placement, eager), f"compiled {method} {placement}")
                assert all(c.window % 16 == 0 or c.window == c.k.shape[2] for c in caches)
                segments = {("all", w[0]) for w in windows} if kw is None else \
                    {("0..K", w[0]) for w in windows} | {("K..L", w[1]) for w in windows}
                assert len(graphs) - before == len(segments - seen), (method, i)  # the second run: none
                seen |= segments
            if kw and "schedule" in kw:  # each step's compaction (of the step before's drops) shrank the step
                assert [w[1] for w in windows] == [88, 80, 80, 64, 48, 48, 48], windows
            if kw and "predictor" in kw:
                kept = torch.stack([h.kept_count for h in hook.history])
                assert (kept[:, 0] != kept[:, 1]).any()
    finally:
        torch._dynamo.reset()


def test_compiled_decode_with_inductor_gives_eager_tokens(ckpt, ours):
    """The real compiler (CPU inductor), buckets of 8 slots: greedy tokens equal eager's through drops at several
    steps, with a schedule whose compactions cross buckets, and with a random predictor whose rows keep different
    counts."""
    compiled = model.Llava.from_pretrained(ckpt[0]).compile_decode(bucket=8)
    ids, lengths, px, starts = two_rows(ours)
    stats = dyrate.Pruner("none", N_IMAGE, starts, lengths, K)
    run_steps(ours[0], ids, lengths, px, stats, 8)
    predictor = random_predictor(center=torch.stack([h.shares for h in stats.history]).mean((0, 1)))
    try:
        for kw in (dict(schedule=[0.25, 0.5, 0.75, 0.75, 1.0]), dict(predictor=predictor)):
            _, eager, _ = run_steps(ours[0], ids, lengths, px, dyrate.Pruner("dyrate", N_IMAGE, starts, lengths, K,
                                                                             **kw), 8)
            hook = dyrate.Pruner("dyrate", N_IMAGE, starts, lengths, K, **kw)
            _, _, windows = bucketed_run(compiled, ids, lengths, px, hook, 8)
            kept = torch.stack([h.kept_count for h in hook.history])  # (steps, B)
            assert len(set(kept[1:, 0].tolist())) >= 2  # drops at decode steps
            if "schedule" in kw:
                assert len({w[1] for w in windows}) >= 3, windows
            else:
                assert (kept[:, 0] != kept[:, 1]).any()
            _, tokens, _ = run_steps(compiled, ids, lengths, px, dyrate.Pruner("dyrate", N_IMAGE, starts, lengths, K,
                                                                               **kw), 8)
            assert torch.equal(tokens, eager), kw.keys()
    finally:
        torch._dynamo.reset()


def test_type_shares_sum_to_one_per_head(ours):
    llava, _ = ours
    ids, lengths, px, starts = two_rows(ours)
    pruner = dyrate.Pruner("fastv", N_IMAGE, starts, lengths, K, ratio=0.75)
    run_steps(llava, ids, lengths, px, pruner, 5)
    shares = torch.stack([h.shares for h in pruner.history])  # (steps, B, H, 4)
    assert_close(shares.sum(-1), torch.ones(shares.shape[:-1]), 1e-6, "shares per head")
    assert (shares[0, ..., 3] == 0).all() and (shares[1:, ..., 3] > 0).all()  # no response yet at the prefill
    assert (shares[..., :3] > 0).all()


def test_straight_through_gradient_reaches_predictor(ours):
    """Training path: the LM loss and the FLOPs term both send gradient to the predictor through the hard choice."""
    llava, tok = ours
    ids, start = tok.encode_prompt("Describe the picture.")
    answer = tok.tok.encode("A red circle and a blue square.", add_special_tokens=False).ids
    seq, L = torch.tensor([ids + answer]), len(ids)
    px = processing.preprocess(random_image(14), IMAGE_SIZE)[None]
    predictor = dyrate.RatePredictor(4, [0.0, 0.25, 0.5, 0.75, 1.0], K)
    noise = torch.rand((1, seq.shape[1], 5), generator=torch.Generator().manual_seed(0))
    pruner = dyrate.TrainMask(predictor, N_IMAGE, torch.tensor([start]), torch.tensor([L]), tau=1.0, noise=noise)
    logits = llava(seq, px, pruner=pruner)
    loss = F.cross_entropy(logits[0, L - 1:-1], seq[0, L:])
    loss.backward()
    grad = predictor.linear.weight.grad.clone()
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    kept = pruner.kept_count[0, L - 1:]  # (steps,) expected kept count of each response step
    assert set(kept.detach().tolist()) <= {64.0, 48.0, 32.0, 16.0, 0.0}
    predictor.zero_grad()
    pruner = dyrate.TrainMask(predictor, N_IMAGE, torch.tensor([start]), torch.tensor([L]))
    llava(seq, px, pruner=pruner)
    ratio = dyrate.generation_flops(llava.config, L, pruner.kept_count[0, L - 1:], K)["total"] / \
        dyrate.generation_flops(llava.config, L, [N_IMAGE] * len(answer), K)["total"]
    ratio.backward()
    assert predictor.linear.weight.grad.abs().sum() > 0
    for cost in ("kv_byte_steps", "nocache_flops"):  # the KV and no-cache budgets reach it the same way
        predictor.zero_grad()
        pruner = dyrate.TrainMask(predictor, N_IMAGE, torch.tensor([start]), torch.tensor([L]))
        llava(seq, px, pruner=pruner)
        row = dyrate.costs(llava.config, L, pruner.kept_count[0, L - 1:], K)
        dyrate.cost_ratio([row], cost).backward()
        assert torch.isfinite(predictor.linear.weight.grad).all() and predictor.linear.weight.grad.abs().sum() > 0


def test_step_feature_is_the_same_step_in_training_and_at_inference(ours, tmp_path):
    """--step-feature: the predictor sees the answer step (0: the prefill). A predictor that reads only the step
    (rate index = min(step, 4), the shares' weights zero) decides the same rate at each step in train.py's TrainMask
    (teacher-forced rows) and in generation's Pruner, and its file keeps the feature."""
    llava, tok = ours
    rates = [0.0, 0.25, 0.5, 0.75, 1.0]
    predictor = dyrate.RatePredictor(4, rates, K, step=True)
    with torch.no_grad():  # logit_c = c * step - c^2 / 2: the argmax is the integer c nearest the step
        predictor.linear.weight[:, -1] = torch.arange(5.0) * dyrate.RatePredictor.STEP_SCALE
        predictor.linear.bias.copy_(-torch.arange(5.0) ** 2 / 2)
    predictor.save(tmp_path / "p.safetensors", dyrate.fingerprint(llava.config))
    loaded = dyrate.RatePredictor.load(tmp_path / "p.safetensors", llava.config, "cpu")
    assert loaded.step and torch.equal(loaded.linear.weight, predictor.linear.weight)
    expected = [dyrate.keep_count(rates[min(t, 4)], N_IMAGE) for t in range(6)]
    ids, lengths, px, starts = two_rows(ours)
    pruner = dyrate.Pruner("dyrate", N_IMAGE, starts, lengths, K, predictor=loaded)
    _, tokens, _ = run_steps(llava, ids, lengths, px, pruner, 6)
    assert [int(h.kept_count[0]) for h in pruner.history] == expected
    L = int(lengths[0])
    seq = torch.cat([ids[:1, :L], tokens[:1, :5]], 1)  # the prompt and the answer, teacher-forced
    noise = torch.full((1, seq.shape[1], 5), math.exp(-1.0))  # zero Gumbel noise: the hard choice is the argmax
    mask = dyrate.TrainMask(loaded, N_IMAGE, starts[:1], lengths[:1], tau=1.0, noise=noise)
    with torch.no_grad():
        llava(seq, px[:1], pruner=mask)
    assert mask.kept_count[0, L - 1:].tolist() == expected


def test_mean_kv_bytes_equal_the_measured_caches(ours):
    """costs()'s mean KV-cache size is the mean, over the steps, of the bytes the caches really hold after each step
    (ragged rows, drops at several steps)."""
    llava, _ = ours
    ids, lengths, px, starts = two_rows(ours)
    pruner = dyrate.Pruner("dyrate", N_IMAGE, starts, lengths, K, schedule=[0.25, 0.25, 0.5, 0.75, 0.75, 1.0])
    caches, held = llava.new_caches(2, 6), []
    with torch.no_grad():
        for _ in generate.decode(llava, ids, lengths, px, caches, 6, pruner):
            held.append(sum(c.nbytes() for c in caches))  # (B,) after this step's forward
    for b in range(2):
        row = pruner.row_summary(b, 6, llava.config, int(lengths[b]), torch.float32)
        assert row["mean_kv_bytes"] == sum(int(h[b]) for h in held) / 6
        assert row["kv_cache_bytes"] == int(held[-1][b]) and row["mean_kv_bytes"] < row["mean_kv_bytes_none"]


class DropFixed:
    """A hook that drops a fixed set of image tokens before layer K, at any sequence length: the no-cache step."""
    k = K

    def __init__(self, drop, start):
        self.drop, self.start = drop, start

    def probe_rows(self, n_valid, T):
        return None

    def __call__(self, probs, x, positions, n_valid, caches):
        return (*dyrate.drop_tokens(x, positions, n_valid, self.drop, self.start, N_IMAGE), None)


def test_nocache_flops_match_flop_counter(ours):
    """The no-cache convention: each step recomputes the whole sequence so far, layers >= K without the image tokens
    dropped by then; the image features are computed once. Equals FlopCounterMode on those forwards."""
    from torch.utils.flop_counter import FlopCounterMode
    llava, tok = ours
    ids, lengths, px, starts = two_rows(ours)
    ids, px, starts, L = ids[:1, :int(lengths[0])], px[:1], starts[:1], int(lengths[0])
    pruner = dyrate.Pruner("dyrate", N_IMAGE, starts, lengths[:1], K, schedule=[0.25, 0.5, 0.5, 0.875, 1.0],
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
    assert dyrate.generation_flops(llava.config, L, kept, K, cache=False)["total"] == counter.get_total_flops()
    row = dyrate.costs(llava.config, L, kept, K)
    assert row["nocache_flops"] / row["nocache_flops_none"] < row["flops"] / row["flops_none"]  # late drops count


def test_masked_attention_value_exact_gradient_bounded():
    """The training path's masked softmax: the value is the attention renormalised over the kept keys; the gradient
    reaching the mask is p_j (v_j - y) (bounded), also when the kept keys hold almost none of the mass."""
    torch.manual_seed(0)
    scores = torch.randn(1, 2, 3, 6, dtype=torch.float64)
    scores[..., 4] += 40.0  # nearly all attention on key 4, which the mask drops
    probs, v = scores.softmax(-1), torch.randn(1, 2, 6, 5, dtype=torch.float64)
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64).expand(1, 1, 3, 6)
    weight = weight.clone().requires_grad_()
    y = dyrate.masked_attention(probs, weight, v)
    kept = probs * weight.detach()
    exact = (kept / kept.sum(-1, keepdim=True)) @ v
    assert torch.allclose(y, exact, rtol=0, atol=1e-12)
    y.sum().backward()
    expected = (probs * ((v[:, :, None] - exact[:, :, :, None]).sum(-1))).sum(1, keepdim=True)  # (1, 1, 3, 6)
    assert torch.allclose(weight.grad, expected, rtol=0, atol=1e-10)
    assert weight.grad.abs().max() <= 2 * (v.abs().max() * 5)  # |p_j (v_j - y)| summed over 5 channels and 2 heads
    exact_grad = torch.autograd.grad(((probs * weight) / (probs * weight).sum(-1, keepdim=True) @ v).sum(), weight)[0]
    assert exact_grad.abs().max() > 1e10  # what the exact derivative would have sent to the predictor


@pytest.mark.parametrize("method,kw", [("none", {}), ("fastv", dict(ratio=0.5)), ("vtw", {}), ("vtw", dict(k=1)),
                                       ("vtw", dict(k=3)), ("mass", dict(mass=0.2)),
                                       ("dyrate", dict(schedule=[0.25, 0.5, 0.5, 0.75])),
                                       ("dyrate", dict(predictor=random_predictor(seed=1)))])
def test_flops_match_flop_counter(method, kw, ours):
    """Our accounting of a whole generation (vision, projector, every layer's projections, MLP and attention with its
    real key count, LM head, probe, type shares, predictor) equals torch's FlopCounterMode on the real forwards."""
    from torch.utils.flop_counter import FlopCounterMode
    llava, tok = ours
    with FlopCounterMode(display=False) as counter:  # stats=False: no statistics computed only for reporting
        row = generate.generate(llava, tok, [random_image(15)], ["Describe the picture."], max_new_tokens=6,
                                method=method, stats=False, **kw).rows[0]
    assert row["flops"] == counter.get_total_flops()
    reported = generate.generate(llava, tok, [random_image(15)], ["Describe the picture."], max_new_tokens=6,
                                 method=method, **kw).rows[0]  # the --json statistics are not the method's cost
    assert reported["flops"] == row["flops"] and (method != "none" or reported["flops_ratio"] == 1.0)
    assert (row["flops_ratio"] < 1) == (method != "none") and len(row["kept_visual"]) == len(row["token_ids"])


def test_fastv_convention_matches_the_paper():
    """FastV's own formula at K=2, R=0.5 on LLaVA-1.5-7B with ~60 text tokens: ~57% of the prefill FLOPs."""
    pruned, full = dyrate.fastv_flops(model.LlavaConfig(), 576 + 60, 288, 2)
    assert 0.56 < pruned / full < 0.58


def test_predictor_file_round_trip_and_errors(ours, tmp_path):
    llava, tok = ours
    predictor = random_predictor()
    predictor.save(tmp_path / "p.safetensors", dyrate.fingerprint(llava.config))
    loaded = dyrate.RatePredictor.load(tmp_path / "p.safetensors", llava.config)
    assert torch.equal(loaded.linear.weight, predictor.linear.weight) and loaded.rates == predictor.rates
    other = model.LlavaConfig(text=model.TextConfig(num_attention_heads=8, num_key_value_heads=8))
    with pytest.raises(ValueError, match="trained for a different model"):
        dyrate.RatePredictor.load(tmp_path / "p.safetensors", other)
    (tmp_path / "junk.safetensors").write_text("nonsense")
    with pytest.raises(ValueError, match="not a predictor file"):
        dyrate.RatePredictor.load(tmp_path / "junk.safetensors", llava.config)
    image = random_image(16)
    with pytest.raises(ValueError, match="needs a trained predictor"):
        generate.generate(llava, tok, [image], ["Hi"], max_new_tokens=2, method="dyrate")
    with pytest.raises(ValueError, match="trained for K=2"):
        generate.generate(llava, tok, [image], ["Hi"], max_new_tokens=2, method="dyrate", predictor=loaded, k=3)
    with pytest.raises(ValueError, match=r"K must lie in \[1, 3\]"):
        generate.generate(llava, tok, [image], ["Hi"], max_new_tokens=2, method="fastv", k=0)
    with pytest.raises(ValueError, match="Unknown method"):
        generate.generate(llava, tok, [image], ["Hi"], max_new_tokens=2, method="random")


class HostReads:
    """Counts reads of tensor values back to the host (.item(), .tolist(), bool(), int(), float(), len() of none):
    what would make a CUDA stream wait. On CUDA also torch.cuda.set_sync_debug_mode."""
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.count, self.monkeypatch = 0, monkeypatch

    def __enter__(self):
        for name in self.names:
            real = getattr(torch.Tensor, name)

            def counted(t, *a, real=real, **kw):
                self.count += 1
                return real(t, *a, **kw)
            self.monkeypatch.setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name in self.names:
            self.monkeypatch.undo()


def test_a_decode_step_reads_nothing_back_to_the_host(ours, monkeypatch):
    """DyRate's decode steps make no host read, whether they drop or not: the rate, the ranking and the drop stay on
    the device, dropped slots die in a mask at once and are compacted at a later step from counts copied to the host
    without waiting. Checked with a schedule (drops at some steps) and a random predictor."""
    llava, _ = ours
    ids, lengths, px, starts = two_rows(ours)
    stats = dyrate.Pruner("none", N_IMAGE, starts, lengths, K)
    run_steps(llava, ids, lengths, px, stats, 6)
    center = torch.stack([h.shares for h in stats.history]).mean((0, 1))
    for kw in (dict(schedule=[0.25, 0.25, 0.5, 0.5, 0.75, 0.75]), dict(predictor=random_predictor(center=center))):
        pruner = dyrate.Pruner("dyrate", N_IMAGE, starts, lengths, K, stats=False, **kw)
        caches = llava.new_caches(2, 6)
        reads = []
        with torch.no_grad():
            logits = llava.prefill(ids, caches, lengths, px, pruner)
            for t in range(5):
                token = logits.argmax(-1)
                with HostReads(monkeypatch) as host:
                    logits = llava.decode_step(token, lengths + t, caches, pruner)
                reads.append(host.count)
        drops = [int(h.dropped_mask.sum()) for h in pruner.history[1:]]
        assert reads == [0] * 5 and (any(drops) and not all(drops)), (reads, drops)


@pytest.mark.parametrize("method,kw", [("fastv", dict(ratio=0.5)), ("dyrate", dict(schedule=[0.25, 0.5, 0.75])),
                                       ("none", {})])
def test_chunked_prefill_is_bit_identical(method, kw, ours):
    """Llava.chunk_prefill: the vision tower and every decoder layer of the prefill run one row at a time (then two),
    for a ragged batch with pruning: the same logits, caches and tokens, bit for bit."""
    llava, _ = ours
    ids, lengths, px, starts = two_rows(ours)
    ids, lengths, px, starts = (torch.cat([t, t.flip(0)]) for t in (ids, lengths, px, starts))  # 4 ragged rows
    whole = run_steps(llava, ids, lengths, px, dyrate.Pruner(method, N_IMAGE, starts, lengths, K, **kw), 4)
    try:
        for rows in (1, 3):
            llava.chunk_prefill(rows)
            chunked = run_steps(llava, ids, lengths, px, dyrate.Pruner(method, N_IMAGE, starts, lengths, K, **kw), 4)
            assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1]), rows
            for a, b in zip(chunked[2], whole[2]):
                assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v) and torch.equal(a.length, b.length)
    finally:
        llava.chunk_prefill(0)


@pytest.mark.parametrize("k", [1, 3])
def test_vtw_withdraws_the_image_from_its_layer_on(k, ours):
    """VTW at layer K (its one parameter, matched on cost like FastV's R): the logits of a forward in which layers >= K
    see no image key at all."""
    llava, _ = ours
    ids, lengths, px, starts = two_rows(ours)
    pruner = dyrate.Pruner("vtw", N_IMAGE, starts, lengths, k)
    logits, tokens, caches = run_steps(llava, ids, lengths, px, pruner, 5)
    assert all(int(h.kept_count.max()) == 0 for h in pruner.history)
    assert [c.k.shape[2] for c in caches] == [ids.shape[1] + 5] * k + [ids.shape[1] - N_IMAGE + 5] * (4 - k)
    for b in range(2):
        L, s = int(lengths[b]), int(starts[b])
        seq = torch.cat([ids[b, :L], tokens[b, :-1]])[None]
        weight = torch.ones(1, seq.shape[1], seq.shape[1])
        weight[0, :, s:s + N_IMAGE] = 0
        with torch.no_grad():
            ref = llava(seq, px[b:b + 1], pruner=KeyMask(weight, k))[0, L - 1:]
        assert_close(logits[:, b], ref, 1e-5, f"vtw K={k} row {b}")


def test_vtw_layer_is_matched_on_cost():
    """matched_layer: the withdrawal layer whose cost is nearest the target, on each cost."""
    cfg = model.LlavaConfig()
    lengths = [(617, 40), (630, 20)]
    for cost in ("flops", "kv_byte_steps", "nocache_flops"):
        ratios = {k: dyrate.cost_ratio([dyrate.costs(cfg, p, [0] * n, k) for p, n in lengths], cost)
                  for k in range(1, 32)}
        for target in (0.3, 0.55, 0.8):
            k = dyrate.matched_layer(cfg, lengths, target, cost)
            assert abs(ratios[k] - target) == min(abs(r - target) for r in ratios.values()), (cost, target)
    assert dyrate.matched_layer(cfg, lengths, ratios[16], "nocache_flops") == 16


def test_fastv_matching_is_within_a_hundredth_of_the_target():
    """The sweep's and --compare's matching (matched_keep) picks a FastV R whose cost is within 0.01 of the target,
    on every cost, wherever FastV's range reaches the target."""
    cfg = model.LlavaConfig()
    lengths = [(617, 40), (630, 20), (650, 57)]
    N = cfg.n_image_tokens
    for cost in ("flops", "kv_byte_steps", "nocache_flops"):
        low = dyrate.cost_ratio([dyrate.costs(cfg, p, [0] * n, K) for p, n in lengths], cost)
        for target in (0.35, 0.5, 0.62, 0.8, 0.95):
            if target <= low:
                continue
            keep = dyrate.matched_keep(cfg, lengths, target, K, cost=cost)
            got = dyrate.cost_ratio([dyrate.costs(cfg, p, [keep] * n, K) for p, n in lengths], cost)
            assert abs(got - target) <= 0.01 and 0 <= keep <= N, (cost, target, got)


class Recording(dyrate.Pruner):
    """A Pruner that keeps what it ranked by at each step: the image tokens' scores (B, N)."""

    def __call__(self, probs, *rest):
        self.scores = getattr(self, "scores", []) + [dyrate.image_scores(probs, self.image_start, self.n_image)[:, 0]]
        return super().__call__(probs, *rest)


def test_mass_rule(ours):
    """The training-free mass rule: at every step the attention mass it drops (recomputed from the step's
    probabilities) stays below eps, and one more token would have reached it; kept counts never grow; eps = 0 is
    none; each row of a batch decides as it would alone."""
    llava, _ = ours
    ids, lengths, px, starts = two_rows(ours)
    _, plain, _ = run_steps(llava, ids, lengths, px, None, 8)
    zero = dyrate.Pruner("mass", N_IMAGE, starts, lengths, K, mass=0.0)
    assert torch.equal(run_steps(llava, ids, lengths, px, zero, 8)[1], plain)
    assert all(int(h.kept_count.min()) == N_IMAGE for h in zero.history)
    for eps in (0.05, 0.2, 0.5):
        rec = Recording("mass", N_IMAGE, starts, lengths, K, mass=eps)
        run_steps(llava, ids, lengths, px, rec, 8)
        kept = torch.stack([h.kept_count for h in rec.history])  # (steps, B)
        assert (kept[1:] <= kept[:-1]).all() and kept[-1].min() < N_IMAGE, eps
        still = torch.ones(2, N_IMAGE, dtype=torch.bool)
        for h, scores in zip(rec.history, rec.scores):
            dropped = (scores * h.dropped_mask).sum(1)  # (B,)
            still &= ~h.dropped_mask
            least = scores.masked_fill(~still, float("inf")).min(1).values  # the least attended token left
            assert (dropped < eps).all() and ((dropped + least >= eps) | ~still.any(1)).all(), eps
        for b in range(2):  # a row alone keeps what it kept in the batch
            alone = dyrate.Pruner("mass", N_IMAGE, starts[b:b + 1], lengths[b:b + 1], K, mass=eps)
            L = int(lengths[b])
            run_steps(llava, ids[b:b + 1, :L], lengths[b:b + 1], px[b:b + 1], alone, 8)
            assert [int(h.kept_count[0]) for h in alone.history] == kept[:, b].tolist(), (eps, b)
