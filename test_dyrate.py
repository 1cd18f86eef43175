"""
Tests: dyrate.py's invariants (pruned decoding against a key-mask reference, zero drops against unpruned decoding, kept
counts and cache lengths, type shares, the straight-through gradient), FLOPs against torch's
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
    """A pruner hook that only hands layers >= k a fixed key weight: the mask reference. With several stages (layers),
    one weight per stage, for the layers from its layer on."""

    def __init__(self, weight, k=K, layers=None):
        self.weights, self.layers = weight if layers else [weight], layers or [k]

    def stages(self, n_layers):
        return self.layers

    def probe_rows(self, n_valid, T, stage=0):
        return None

    def __call__(self, probs, x, positions, n_valid, caches, stage=0):
        return x, positions, n_valid, self.weights[stage]


@pytest.mark.parametrize("method,kw", [(dyrate.FastV(0.5), {}), ("vtw", {}),
                                       (dyrate.Schedule([0.25, 0.25, 0.5, 0.5, 0.75, 0.875, 1.0]), {}),
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
        method, kw = dyrate.Learned(random_predictor(center=center.cpu()).to(placement[0])), {}
    pruner = dyrate.Pruner(method, N_IMAGE, starts, lengths, K, **kw)
    logits, tokens, _ = run_steps(llava, ids, lengths, px, pruner, steps)
    kept_counts = torch.stack([h.kept_count for h in pruner.history])  # (steps, B)
    if isinstance(method, dyrate.Learned):
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
    for method, kw in ((dyrate.Schedule([0.0]), {}), (dyrate.FastV(0.0), {}), ("none", {}),
                       (dyrate.FastV(0.0), dict(stats=False)), ("none", dict(stats=False))):
        hook = dyrate.Pruner(method, N_IMAGE, starts, lengths, K, **kw)
        pruned, got, _ = run_steps(llava, ids, lengths, px, hook, 6)
        if hook.stats or hook.rule.ranks(1):  # at every step
            assert_close(pruned, plain, TOLERANCE[torch.float32] * float(plain.abs().max()), method)
            assert torch.equal(got, tokens), method
        else:
            assert torch.equal(pruned, plain), (method, kw)


def held_bytes(cache):
    """(B,) bytes of the keys and values each row of a (core) KV cache holds."""
    _, nkv, hs = cache.shape
    return cache.length * (2 * nkv * hs * torch.finfo(cache.dtype).bits // 8)


def test_kept_counts_monotone_and_caches_physically_shorter(ours):
    llava, _ = ours
    ids, lengths, px, starts = two_rows(ours)
    # keep 32, 48, 16, 64, 0, 0 of 64: the kept count may only shrink; a decode step's drops leave the caches at once
    requested = [0.5, 0.25, 0.75, 0.0, 1.0, 1.0]
    pruner = dyrate.Pruner(dyrate.Schedule(requested), N_IMAGE, starts, lengths, K)
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
            s = int(starts[0])  # every text token exactly once, in order
            text = [p for p in range(int(lengths[0]) + steps - 1) if not s <= p < s + N_IMAGE]
            assert cache.pos[0, :int(cache.length[0])].tolist() == text
    held = int(sum(held_bytes(c)[0] for c in caches))
    assert held == dyrate.kv_cache_bytes(llava.config, int(lengths[0]), steps, 0, K, torch.float32)


def test_type_shares_sum_to_one_per_head(ours):
    llava, _ = ours
    ids, lengths, px, starts = two_rows(ours)
    pruner = dyrate.Pruner(dyrate.FastV(0.75), N_IMAGE, starts, lengths, K)
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
    ratio = dyrate.generation_flops(llava.config, L, pruner.kept_count[0, L - 1:], K) / \
        dyrate.generation_flops(llava.config, L, [N_IMAGE] * len(answer), K)
    ratio.backward()
    assert predictor.linear.weight.grad.abs().sum() > 0
    for budget in ("kv", "nocache"):  # the KV and no-cache budgets reach it the same way
        predictor.zero_grad()
        pruner = dyrate.TrainMask(predictor, N_IMAGE, torch.tensor([start]), torch.tensor([L]))
        llava(seq, px, pruner=pruner)
        cost, none = dyrate.budget_cost(llava.config, L, pruner.kept_count[0, L - 1:], K, budget)
        (cost / none).backward()
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
    pruner = dyrate.Pruner(dyrate.Learned(loaded), N_IMAGE, starts, lengths, K)
    _, tokens, _ = run_steps(llava, ids, lengths, px, pruner, 6)
    assert [int(h.kept_count[0]) for h in pruner.history] == expected
    L = int(lengths[0])
    seq = torch.cat([ids[:1, :L], tokens[:1, :5]], 1)  # the prompt and the answer, teacher-forced
    noise = torch.full((1, seq.shape[1], 5), math.exp(-1.0))  # zero Gumbel noise: the hard choice is the argmax
    mask = dyrate.TrainMask(loaded, N_IMAGE, starts[:1], lengths[:1], tau=1.0, noise=noise)
    with torch.no_grad():
        llava(seq, px[:1], pruner=mask)
    assert mask.kept_count[0, L - 1:].tolist() == expected


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
    with pytest.raises(ValueError, match="needs --predictor"):
        generate.generate(llava, tok, [image], ["Hi"], max_new_tokens=2, rule="dyrate")
    with pytest.raises(ValueError, match="trained for K=2"):
        generate.generate(llava, tok, [image], ["Hi"], max_new_tokens=2, rule=dyrate.Learned(loaded), k=3)
    with pytest.raises(ValueError, match=r"K must lie in \[1, 3\]"):
        generate.generate(llava, tok, [image], ["Hi"], max_new_tokens=2, rule="fastv", k=0)
    with pytest.raises(ValueError, match="Unknown rule 'nonsense'"):
        generate.generate(llava, tok, [image], ["Hi"], max_new_tokens=2, rule="nonsense")
    with pytest.raises(ValueError, match="fastv takes ratio=..., k=..., stages=..., lam=..., not 'mass=0.1'"):
        generate.generate(llava, tok, [image], ["Hi"], max_new_tokens=2, rule="fastv:mass=0.1")
    with pytest.raises(ValueError, match=r"drop ratio must lie in \[0, 1\], got 1.5"):
        generate.generate(llava, tok, [image], ["Hi"], max_new_tokens=2, rule="fastv:ratio=1.5")


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


def host_reads_per_step(llava, ids, lengths, px, pruner, monkeypatch, steps=5):
    """Each decode step's host reads (HostReads) in a greedy generation of `steps` steps after the prefill, and its
    caches."""
    caches, reads = llava.new_caches(len(ids), steps + 1), []
    with torch.no_grad():
        logits = llava.prefill(ids, caches, lengths, px, pruner)
        for t in range(steps):
            token = logits.argmax(-1)
            with HostReads(monkeypatch) as host:
                logits = llava.decode_step(token, lengths + t, caches, pruner)
            reads.append(host.count)
    return reads, caches


def test_a_decode_step_reads_nothing_back_to_the_host(ours, monkeypatch):
    """DyRate's decode steps make no host read, whether they drop or not: the rate, the ranking and the drop stay on
    the device, and KVCache.drop compacts the caches there at once. Checked with a schedule (drops at some steps) and
    a random predictor. (tests/test_fast.py checks the fast path's caches too.)"""
    llava, _ = ours
    ids, lengths, px, starts = two_rows(ours)
    stats = dyrate.Pruner("none", N_IMAGE, starts, lengths, K)
    run_steps(llava, ids, lengths, px, stats, 6)
    center = torch.stack([h.shares for h in stats.history]).mean((0, 1))
    for rule in (dyrate.Schedule([0.25, 0.25, 0.5, 0.5, 0.75, 0.75]), dyrate.Learned(random_predictor(center=center))):
        pruner = dyrate.Pruner(rule, N_IMAGE, starts, lengths, K, stats=False)
        reads, _ = host_reads_per_step(llava, ids, lengths, px, pruner, monkeypatch)
        drops = [int(h.dropped_mask.sum()) for h in pruner.history[1:]]
        assert reads == [0] * 5 and (any(drops) and not all(drops)), (reads, drops)


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
    zero = dyrate.Pruner(dyrate.Mass(0.0), N_IMAGE, starts, lengths, K)
    assert torch.equal(run_steps(llava, ids, lengths, px, zero, 8)[1], plain)
    assert all(int(h.kept_count.min()) == N_IMAGE for h in zero.history)
    for eps in (0.05, 0.2, 0.5):
        rec = Recording(dyrate.Mass(eps), N_IMAGE, starts, lengths, K)
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
            alone = dyrate.Pruner(dyrate.Mass(eps), N_IMAGE, starts[b:b + 1], lengths[b:b + 1], K)
            L = int(lengths[b])
            run_steps(llava, ids[b:b + 1, :L], lengths[b:b + 1], px[b:b + 1], alone, 8)
            assert [int(h.kept_count[0]) for h in alone.history] == kept[:, b].tolist(), (eps, b)


def test_random_rule_drops_fastvs_count_uniformly_at_random(ours):
    """random: FastV's step and count, the tokens drawn at random (each row by its own seed, so a row alone drops what
    it drops in a batch), the same set for the same seed; over many seeds every image token goes about as often."""
    llava, _ = ours
    ids, lengths, px, starts = two_rows(ours)
    fastv = dyrate.Pruner(dyrate.FastV(0.75), N_IMAGE, starts, lengths, K)
    run_steps(llava, ids, lengths, px, fastv, 4)
    dropped = []
    for seed in range(40):
        rule = dyrate.parse_rule(f"random:ratio=0.75:seed={seed}")
        pruner = dyrate.Pruner(rule, N_IMAGE, starts, lengths, K)
        run_steps(llava, ids, lengths, px, pruner, 4)
        assert [h.kept_count.tolist() for h in pruner.history] == [h.kept_count.tolist() for h in fastv.history]
        assert not any(h.dropped_mask.any() for h in pruner.history[1:])  # at the prefill only, as FastV
        dropped.append(pruner.history[0].dropped_mask)  # (B, N)
        if seed < 2:
            again = dyrate.Pruner(rule, N_IMAGE, starts, lengths, K)
            run_steps(llava, ids, lengths, px, again, 1)
            assert torch.equal(again.history[0].dropped_mask, dropped[-1])
            alone = dyrate.Pruner(rule, N_IMAGE, starts[:1], lengths[:1], K)
            L = int(lengths[0])
            run_steps(llava, ids[:1, :L], lengths[:1], px[:1], alone, 1)
            assert torch.equal(alone.history[0].dropped_mask[0], dropped[-1][0])
    dropped = torch.stack(dropped).float()  # (seeds, B, N)
    assert not torch.equal(dropped[0], dropped[1]) and not torch.equal(dropped[0, 0], dropped[0, 1])
    assert not torch.equal(dropped[0], fastv.history[0].dropped_mask.float())
    share = dropped.mean((0, 1))  # (N,) how often each token went: 0.75 on average, none always kept or always gone
    assert abs(float(share.mean()) - 0.75) < 1e-6 and 0.4 < float(share.min()) and float(share.max()) < 1.0


def test_each_rule_has_its_own_layer_and_names_its_settings():
    """K is a rule's parameter: 'vtw:k=5'; VTW's default is its paper's layer (15 of 32), FastV's DEFAULT_K; a
    rule's own K wins over the caller's; rule_spec writes every setting back in parse_rule's syntax."""
    assert dyrate.pruning_layer(32, None, dyrate.VTW()) == 15 and dyrate.pruning_layer(40, None, dyrate.VTW()) == 19
    assert dyrate.pruning_layer(12, None, dyrate.VTW()) == 6 and dyrate.pruning_layer(2, None, dyrate.VTW()) == 1
    assert dyrate.pruning_layer(32, None, dyrate.FastV()) == dyrate.DEFAULT_K
    assert dyrate.pruning_layer(32, 3, dyrate.VTW()) == 3  # the caller's K where the rule sets none
    assert dyrate.pruning_layer(32, 3, dyrate.parse_rule("vtw:k=20")) == 20
    for spec, k in (("fastv:ratio=0.75:k=4", 4), ("vtw:k=15", 15), ("ramp:start=0.25:steps=8:k=2", 2),
                    ("schedule:rates=0.5/0.75/1.0:k=3", 3), ("random:ratio=0.5:seed=3:k=2", 2),
                    ("mass:eps=1e-05:k=2", 2)):
        rule = dyrate.parse_rule(spec)
        assert dyrate.rule_spec(rule, dyrate.pruning_layer(32, None, rule)) == spec
        assert dyrate.parse_rule(dyrate.rule_spec(rule, k)) == rule
    assert dyrate.rule_spec(dyrate.Rule(), 2) == "none"
    with pytest.raises(ValueError, match=r"K must lie in \[1, 31\].*got 32"):
        dyrate.pruning_layer(32, None, dyrate.parse_rule("vtw:k=32"))
    with pytest.raises(ValueError, match="k=1.5.*not valid"):
        dyrate.parse_rule("vtw:k=1.5")


# ----------------------------------------------------------------------------------------------------------------------
# rules that drop at several layers (stages): PyramidDrop, the depth-based rule, any rule with stages=S


def stage_kept(pruner, b):
    """Row b's kept image tokens at every step, per stage: a list over the stages of (steps, N) bool."""
    first = ~torch.cumsum(torch.stack([h.dropped_mask[b] for h in pruner.history]), 0).bool()
    return [first] + [torch.stack([h.deeper[s][b] for h in pruner.history]) for s in range(len(pruner.plan) - 1)]


def hf_replay(hf, x, positions, L, s, layers, kept, steps):
    """transformers' own decoder layers and DynamicCache, run layer by layer on our embeddings x (1, L + steps - 1, C):
    the prompt (the image tokens a stage dropped at the prefill hidden from that stage's layers as keys, by an additive
    mask), then one token per step, each layer's cache first emptied of the image tokens its stage no longer keeps at
    that step. Returns the logits of every step (steps, V) and {(step, layer): (the last query's attention over the
    keys, averaged over heads (S,), the keys' token positions (S,))} of the layers before the stages."""
    from transformers import DynamicCache
    lm, cache, seen = hf.model.language_model, DynamicCache(), {}
    held = [positions[0, :L].clone() for _ in lm.layers]  # the token positions each layer's cache holds
    stage_of = [max([i for i, k in enumerate(layers) if k <= n] or [-1]) for n in range(len(lm.layers))]
    out = []
    for t in range(steps):
        lo, hi = (0, L) if t == 0 else (L + t - 1, L + t)
        h, pos = x[:, lo:hi], positions[:, lo:hi]
        rope = lm.rotary_emb(h, pos)
        for n, layer in enumerate(lm.layers):
            st = stage_of[n]
            gone = torch.zeros(L + steps, dtype=torch.bool)
            if st >= 0:
                gone[s:s + N_IMAGE] = ~kept[st][t]
            mask = None
            if t == 0:  # causal, and the stage's dropped image tokens hidden as keys
                allowed = torch.ones(L, L).tril().bool() & ~gone[:L][None]
                mask = torch.zeros(1, 1, L, L).masked_fill(~allowed, float("-inf"))
            elif len(cache.layers) > n:  # the stage's drops leave this layer's cache before the step's query
                keep = ~gone[held[n]]
                cache.layers[n].keys = cache.layers[n].keys[:, :, keep]
                cache.layers[n].values = cache.layers[n].values[:, :, keep]
                held[n] = held[n][keep]
            if t > 0:
                held[n] = torch.cat([held[n], pos[0]])
            grab = layer.self_attn.register_forward_hook(  # eager attention returns its probabilities
                lambda mod, args, output, n=n: seen.__setitem__((t, n), (output[1][0, :, -1].mean(0), held[n])))
            h = layer(h, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                      position_embeddings=rope)
            grab.remove()
        out.append(hf.lm_head(lm.norm(h))[0, -1])
    return torch.stack(out), seen


@pytest.mark.parametrize("rule", ["pdrop", "depth:ratio=0.25", "random:k=1:stages=2:lam=0.25",
                                  "schedule:rates=0.25/0.5/0.5/0.75/0.875/1.0:k=1:stages=3"])
def test_stages_replayed_in_transformers_cache(rule, ours, ckpt):
    """A rule that drops at several layers (PyramidDrop; the depth-based rule at every layer from K; a schedule's
    decode-time drops with deeper stages): two ragged rows, each row's logits and greedy tokens are what transformers'
    own layers and DynamicCache give when the same image tokens leave each layer's cache at the same step; each stage
    keeps its plan's share of stage 0's count, a subset of the stage before it."""
    llava, _ = ours
    ids, lengths, px, starts = two_rows(ours)
    steps = 6
    pruner = dyrate.Pruner(rule, N_IMAGE, starts, lengths, dyrate.pruning_layer(4, None, dyrate.parse_rule(rule)))
    logits, tokens, _ = run_steps(llava, ids, lengths, px, pruner, steps)
    layers = [layer for layer, _ in pruner.plan]
    assert len(layers) > 1
    for b in range(2):
        L, s = int(lengths[b]), int(starts[b])
        kept = stage_kept(pruner, b)
        for before, after in zip(kept, kept[1:]):
            assert not (after & ~before).any()  # each stage keeps a subset of the stage before
        for (_, share), stage in zip(pruner.plan, kept):
            assert stage.sum(1).tolist() == [min(c, math.floor(share * k + 0.5)) for c, k in
                                             zip(stage.sum(1).tolist(), kept[0].sum(1).tolist())]
        seq = torch.cat([ids[b, :L], tokens[b, :-1]])[None]
        with torch.no_grad():
            x = llava.embed(seq, px[b:b + 1])
            ref, seen = hf_replay(ckpt[1], x, torch.arange(seq.shape[1])[None], L, s, layers, kept, steps)
        assert_close(logits[:, b], ref, 1e-4, f"{rule} row {b}")
        assert torch.equal(ref.argmax(-1), tokens[b])
        for st in range(1, len(layers)) if not rule.startswith("random") else ():  # FastV's ranking at every stage
            for t in range(steps if pruner.rule.ranks(1) else 1):
                probs, keys = seen[t, layers[st] - 1]
                image = (keys >= s) & (keys < s + N_IMAGE)
                scores = torch.zeros(N_IMAGE).index_put_((keys[image] - s,), probs[image])
                candidates = kept[st - 1][t] & (kept[st][t - 1] if t else True)
                n_keep = int(kept[st][t].sum())
                best = scores.masked_fill(~candidates, -1.0).topk(n_keep).indices
                assert kept[st][t].nonzero()[:, 0].tolist() == sorted(best.tolist()), (rule, b, st, t)
    assert kept[0][0].sum() > kept[-1][-1].sum()  # later stages keep fewer


def test_stages_equal_their_mask_reference_and_their_costs(ours):
    """Our own reference for a staged rule: a forward over the whole sequence in which each stage's layers cannot see
    the image keys the stage dropped by each row's step; and the KV cache its costs count is the bytes the caches
    hold after each step."""
    llava, _ = ours
    ids, lengths, px, starts = two_rows(ours)
    rule = dyrate.parse_rule("ramp:start=0.25:steps=5:k=1:stages=3")
    pruner = dyrate.Pruner(rule, N_IMAGE, starts, lengths, 1)
    caches, held = llava.new_caches(2, 6), []
    with torch.no_grad():
        out = []
        for token, logit in generate.decode(llava, ids, lengths, px, caches, 6, pruner):
            out.append((token, logit))
            held.append(sum(held_bytes(c) for c in caches))
    logits, tokens = torch.stack([lg for _, lg in out]), torch.stack([t for t, _ in out], 1)
    from tools import costs
    for b in range(2):
        L, s = int(lengths[b]), int(starts[b])
        seq = torch.cat([ids[b, :L], tokens[b, :-1]])[None]
        weights = []
        for stage in stage_kept(pruner, b):
            weight = torch.ones(1, seq.shape[1], seq.shape[1])
            for i in range(seq.shape[1]):
                weight[0, i, s:s + N_IMAGE] = stage[max(0, i - L + 1)].float()
            weights.append(weight)
        with torch.no_grad():
            ref = llava(seq, px[b:b + 1], pruner=KeyMask(weights, layers=[1, 2, 3]))[0, L - 1:]
        assert_close(logits[:, b], ref, 1e-5, f"row {b}")
        row = costs.row_costs(llava.config, dict(pruner.summary(b, 6), prompt_tokens=L), torch.float32)
        assert row["mean_kv_bytes"] == sum(int(h[b]) for h in held) / 6 and row["kv_cache_bytes"] == int(held[-1][b])


def test_staged_rules_settings_and_errors():
    """pdrop's default layers are PyramidDrop's 8, 16, 24 of 32 with lam 0.5; the depth rule's kept share falls
    linearly to the last layer; stages past the model's last layer, or a bad lam, are named errors."""
    pdrop = dyrate.parse_rule("pdrop")
    assert dyrate.pruning_layer(32, None, pdrop) == 8 and pdrop.layers(8, 32) == [(8, 1.0), (16, 0.5), (24, 0.25)]
    assert dyrate.rule_spec(pdrop, 8) == "pdrop:stages=3:lam=0.5:k=8"
    assert dyrate.parse_rule(dyrate.rule_spec(pdrop, 8)) == dyrate.Pyramid(k=8)
    depth = dyrate.parse_rule("depth:ratio=0.5")
    assert depth.layers(2, 32)[:2] == [(2, 1.0), (3, 29 / 30)] and depth.layers(2, 32)[-1] == (31, 1 / 30)
    with pytest.raises(ValueError, match="3 stages from K=2 reach layer 6.*lower stages= or k="):
        dyrate.pruning_layer(4, 2, dyrate.parse_rule("fastv:stages=3"))
    with pytest.raises(ValueError, match="lam"):
        dyrate.parse_rule("pdrop:lam=2")
    with pytest.raises(ValueError, match="stages must be a whole number"):
        dyrate.parse_rule("fastv:stages=0")
    with pytest.raises(ValueError, match="depth has a stage at every layer"):
        dyrate.parse_rule("depth:stages=2")


# ----------------------------------------------------------------------------------------------------------------------
# VisionZip: fewer image tokens before the language model


def visionzip_reference(hidden, attentions, keys, dominant, contextual):
    """VisionZip's selection and merge as its released code computes them (dvlab-research/VisionZip, clip_encoder.py),
    step by step: hidden (n, T, C) the feature layer's output, attentions (n, H, T, T) its attention, keys (n, T, hs)
    its keys averaged over heads."""
    n, T, C = hidden.shape
    top = attentions[:, :, 0, 1:].sum(1).topk(dominant - 1, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros(n, 1, dtype=top.dtype), top], 1)
    mask = torch.ones(n, T, dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden.masked_select(~mask[..., None]).view(n, dominant, C)
    metric = keys[mask].view(n, T - dominant, -1)
    filtered = hidden.masked_select(mask[..., None]).view(n, T - dominant, C)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    step = max(1, metric.shape[1] // contextual)
    target = torch.arange(0, metric.shape[1], step)[:contextual]
    others = ~torch.isin(torch.arange(metric.shape[1]), target)
    similarity = torch.bmm(metric[:, others], metric[:, target].transpose(1, 2))
    assign = torch.zeros(n, int(others.sum()), contextual).scatter_(2, similarity.argmax(2)[..., None], 1)
    counts = assign.sum(1).clamp(min=1)[..., None]
    contextual_tokens = filtered[:, target] + torch.bmm(assign.transpose(1, 2), filtered[:, others]) / counts
    return torch.cat([dominant_tokens, contextual_tokens], 1)


def test_visionzip_keeps_and_merges_as_its_released_code_on_transformers_clip(ours, ckpt):
    """Our VisionZip (the probe in our CLIP's feature layer, dyrate.VisionZip.compress) equals its released code's
    steps run on transformers' CLIP (its eager attentions, hidden states and the feature layer's keys): 12 dominant
    tokens (CLS among them) and 4 contextual ones of 64."""
    llava, _ = ours
    _, _, px, _ = two_rows(ours)
    tower = ckpt[1].model.vision_tower
    with torch.no_grad():
        out = tower(px, output_hidden_states=True, output_attentions=True)
        layer = tower.encoder.layers[-2]
        n, T, C = out.hidden_states[-3].shape
        keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[-3])).view(n, T, 4, C // 4).mean(2)
        ref = visionzip_reference(out.hidden_states[-2], out.attentions[-2], keys, 12, 4)
        rule = dyrate.VisionZip(dominant=12, contextual=4)
        got = llava.vision_features(px, rule.compress)
    assert got.shape == (2, 16, C) and rule.image_tokens(N_IMAGE) == 16
    assert_close(got, ref, 1e-5, "VisionZip")
    with pytest.raises(ValueError, match="must not exceed the image's 64 tokens"):
        dyrate.VisionZip(dominant=60, contextual=10).image_tokens(N_IMAGE)


def test_a_batch_mixing_rows_with_and_without_visionzip_gives_each_row_what_it_gets_alone(ours):
    """Rows with 16 image tokens (VisionZip) and with 64 share a ragged batch: each row's greedy tokens and logits are
    those of generate() on it alone, with VisionZip or without."""
    llava, tok = ours
    images, prompts = [random_image(3), random_image(4)], ["What is in the image?", "Describe it in detail."]
    zip_rule = dyrate.VisionZip(dominant=12, contextual=4)
    alone = [generate.generate(llava, tok, [images[0]], [prompts[0]], 6, rule=zip_rule).rows[0],
             generate.generate(llava, tok, [images[1]], [prompts[1]], 6).rows[0]]
    encoded = [tok.encode_prompt(prompts[0], n_image=16)[0], tok.encode_prompt(prompts[1])[0]]
    lengths = torch.tensor([len(e) for e in encoded])
    ids = torch.full((2, int(lengths.max())), llava.config.pad_token_id)
    for b, e in enumerate(encoded):
        ids[b, :len(e)] = torch.tensor(e)
    px = torch.stack([processing.preprocess(im, IMAGE_SIZE) for im in images])
    with torch.no_grad():
        vision = [llava.vision_features(px[:1], zip_rule.compress)[0], llava.vision_features(px[1:])[0]]
        x = llava.embed(ids, vision=vision)  # 16 + 64 features for 16 + 64 image ids
        caches, tokens = llava.new_caches(2, 6), []
        logits = llava.last_logits(x, None, lengths, caches, None)
        for t in range(6):
            tokens.append(logits.argmax(-1))
            logits = llava.decode_step(tokens[-1], lengths + t, caches)
    tokens = torch.stack(tokens, 1)
    for b in range(2):
        n = len(alone[b]["token_ids"])
        assert tokens[b, :n].tolist() == alone[b]["token_ids"], b
    assert alone[0]["kept_visual"] == [16] * len(alone[0]["token_ids"]) and int(lengths[0]) + 40 < int(lengths[1])
