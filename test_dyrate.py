"""
Tests: dyrate.py's invariants (pruned decoding against a key-mask reference, zero drops against unpruned decoding, kept
counts and cache lengths, the compiled decode path, type shares, the straight-through gradient), FLOPs against torch's
FlopCounterMode, predictor files, generate.py's pruning output and bench.py. Tiny random models (conftest.py), CPU:

    python -m pytest -q
"""
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import register_flop_formula, sdpa_flop_count

import dyrate as D
import generate as G
import model as M
import processing as P
from conftest import IMAGE_SIZE, PATCH, assert_close, prompt_inputs, random_image

@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """torch's FlopCounterMode has SDPA formulas for the CUDA kernels only: the CPU kernel gets the same one."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


N_IMAGE, K = (IMAGE_SIZE // PATCH) ** 2, 2


def random_predictor(n_heads=4, seed=0, scale=300.0, center=None):
    """Arbitrary but deterministic rate decisions (tests the mechanics only). center (H, 4): typical features, so the
    logits W (f - center) follow how rows and steps differ rather than what they share."""
    torch.manual_seed(seed)
    predictor = D.RatePredictor(n_heads, [i / 8 for i in range(9)], K)
    with torch.no_grad():
        predictor.linear.weight.normal_(0, scale)
        if center is not None:
            predictor.linear.bias.copy_(-predictor.linear.weight @ center.flatten())
    return predictor


def two_rows(ours):
    ids, lengths, px = prompt_inputs(ours, ["What is in the image?", "How many shapes are there? Answer in detail."], [12, 13])
    starts = (ids == ours[0].config.image_token_index).int().argmax(1)
    return ids, lengths, px, starts


def run_steps(model, ids, lengths, px, pruner, steps):
    """Greedy decoding over the cache: logits of every step (steps, B, V), the new tokens (B, steps), the caches."""
    B, T = ids.shape
    caches = model.new_caches(B, steps)
    with torch.no_grad():
        logits = [model.step(ids, torch.arange(T).expand(B, T), caches, lengths, px, pruner)]
        for t in range(1, steps):
            logits.append(model.step(logits[-1].argmax(-1)[:, None], (lengths + t - 1)[:, None], caches, pruner=pruner))
    return torch.stack(logits), torch.stack([x.argmax(-1) for x in logits], 1), caches


class KeyMask:
    """A pruner hook that only hands layers >= K a fixed key weight: the mask reference."""
    layer = K

    def __init__(self, weight):
        self.weight = weight

    def probe_rows(self, n_valid, T):
        return None

    def __call__(self, probs, x, positions, n_valid, caches):
        return x, positions, n_valid, self.weight


@pytest.mark.parametrize("method,kw", [("fastv", dict(ratio=0.5)), ("vtw", {}),
                                       ("dyrate", dict(schedule=[0.25, 0.25, 0.5, 0.5, 0.75, 0.875, 1.0])),
                                       ("dyrate", "predictor")])
def test_pruned_decoding_equals_mask_reference(method, kw, ours):
    """Physically dropping tokens (prefill gather, cache compaction, RoPE positions with gaps) gives the logits of a
    full forward in which layers >= K cannot see the dropped image keys: prompt rows those dropped at step 0, the
    query of step t those dropped by step t. Two ragged rows, each compared with a forward over it alone."""
    model, _ = ours
    ids, lengths, px, starts = two_rows(ours)
    steps = 8
    if kw == "predictor":  # rates that differ between rows and steps
        stats = D.Pruner("none", N_IMAGE, starts, lengths, K)
        run_steps(model, ids, lengths, px, stats, steps)
        kw = dict(predictor=random_predictor(center=torch.stack([h["shares"] for h in stats.history]).mean((0, 1))))
    pruner = D.Pruner(method, N_IMAGE, starts, lengths, K, **kw)
    logits, tokens, _ = run_steps(model, ids, lengths, px, pruner, steps)
    kept_counts = torch.stack([h["kept"] for h in pruner.history])  # (steps, B)
    if "predictor" in kw:
        assert (kept_counts[:, 0] != kept_counts[:, 1]).any()  # rows really kept different numbers
    for b in range(2):
        L, s = int(lengths[b]), int(starts[b])
        seq = torch.cat([ids[b, :L], tokens[b, :-1]])[None]  # prompt + the tokens fed back
        kept = ~torch.cumsum(torch.stack([h["dropped"][b] for h in pruner.history]), 0).bool()  # (steps, N)
        weight = torch.ones(1, seq.shape[1], seq.shape[1])
        for i in range(seq.shape[1]):
            weight[0, i, s:s + N_IMAGE] = kept[max(0, i - L + 1)].float()
        with torch.no_grad():
            ref = model(seq, px[b:b + 1], pruner=KeyMask(weight))[0, L - 1:]  # rows of steps 0 .. steps-1
        assert_close(logits[:, b], ref, 1e-5, f"{method} row {b}")


def test_zero_drops_equal_unpruned_decoding_exactly(ours):
    model, _ = ours
    ids, lengths, px, starts = two_rows(ours)
    plain, _, _ = run_steps(model, ids, lengths, px, None, 6)
    for method, kw in (("dyrate", dict(schedule=[0.0])), ("fastv", dict(ratio=0.0)), ("none", {})):
        pruned, _, _ = run_steps(model, ids, lengths, px, D.Pruner(method, N_IMAGE, starts, lengths, K, **kw), 6)
        assert torch.equal(pruned, plain), method


def test_kept_counts_monotone_and_caches_physically_shorter(ours):
    model, _ = ours
    ids, lengths, px, starts = two_rows(ours)
    requested = [0.5, 0.25, 0.75, 0.0, 1.0]  # keep 32, 48, 16, 64, 0 of 64: the kept count may only shrink
    pruner = D.Pruner("dyrate", N_IMAGE, starts, lengths, K, schedule=requested)
    _, _, caches = run_steps(model, ids, lengths, px, pruner, len(requested))
    assert [int(h["kept"][0]) for h in pruner.history] == [32, 32, 16, 16, 0]
    assert [h["dropped"][0].sum().item() for h in pruner.history] == [32, 0, 16, 0, 16]
    steps, T = len(requested), ids.shape[1]
    for layer, cache in enumerate(caches):
        if layer < K:  # untouched: every token, in order
            assert torch.equal(cache.length, lengths + steps - 1) and cache.k.shape[2] == T + steps
            for b in range(2):
                assert cache.pos[b, :int(cache.length[b])].tolist() == list(range(int(lengths[b]) + steps - 1))
        else:  # no image token left; the prefill drop made the buffer itself smaller
            assert torch.equal(cache.length, lengths - N_IMAGE + steps - 1) and cache.k.shape[2] == T - 32 + steps
            pos = cache.pos[0, :int(cache.length[0])]
            assert not ((pos >= starts[0]) & (pos < starts[0] + N_IMAGE)).any() and (pos.diff() > 0).all()
    assert int(sum(c.nbytes()[0] for c in caches)) == D.kv_cache_bytes(model.config, int(lengths[0]), steps, 0, K, torch.float32)


def test_compiled_decode_is_static_and_equals_eager(ckpt, ours):
    """Llava.compile_decode: decode steps, cache compaction between them included, reuse the graphs compiled at the
    first step (static shapes, no recompilation), a second generation too, and give eager's logits."""
    compiled, graphs = M.Llava.from_pretrained(ckpt[0]), []

    def count_graphs(gm, example_inputs):  # a torch.compile backend that runs the captured graph as is
        graphs.append(gm)
        return gm.forward
    compiled.compile_decode(backend=count_graphs)
    ids, lengths, px, starts = two_rows(ours)
    try:
        for method, kw, n_graphs in (("none", None, 1), ("dyrate", dict(schedule=[0.25, 0.5, 0.5, 0.75, 1.0]), 2)):
            def pruner():
                return kw and D.Pruner(method, N_IMAGE, starts, lengths, K, **kw)
            eager, _, _ = run_steps(ours[0], ids, lengths, px, pruner(), 8)
            before = len(graphs)
            for _ in range(2):
                got, _, caches = run_steps(compiled, ids, lengths, px, pruner(), 8)
                assert all(c.static for c in caches) and len(graphs) - before == n_graphs, method
                assert_close(got, eager, 1e-5, f"compiled {method}")
    finally:
        torch._dynamo.reset()


def test_type_shares_sum_to_one_per_head(ours):
    model, _ = ours
    ids, lengths, px, starts = two_rows(ours)
    pruner = D.Pruner("fastv", N_IMAGE, starts, lengths, K, ratio=0.75)
    run_steps(model, ids, lengths, px, pruner, 5)
    shares = torch.stack([h["shares"] for h in pruner.history])  # (steps, B, H, 4)
    assert_close(shares.sum(-1), torch.ones(shares.shape[:-1]), 1e-6, "shares per head")
    assert (shares[0, ..., 3] == 0).all() and (shares[1:, ..., 3] > 0).all()  # no response yet at the prefill
    assert (shares[..., :3] > 0).all()


def test_straight_through_gradient_reaches_predictor(ours):
    """Training path: the LM loss and the FLOPs term both send gradient to the predictor through the hard choice."""
    model, tok = ours
    ids, start = tok.encode_prompt("Describe the picture.")
    answer = tok.tok.encode("A red circle and a blue square.", add_special_tokens=False).ids
    seq, L = torch.tensor([ids + answer]), len(ids)
    px = P.preprocess(random_image(14), IMAGE_SIZE)[None]
    predictor = D.RatePredictor(4, [0.0, 0.25, 0.5, 0.75, 1.0], K)
    pruner = D.Pruner("dyrate", N_IMAGE, torch.tensor([start]), torch.tensor([L]), K, predictor=predictor, train=True,
                      tau=1.0, generator=torch.Generator().manual_seed(0))
    logits = model(seq, px, pruner=pruner)
    loss = F.cross_entropy(logits[0, L - 1:-1], seq[0, L:])
    loss.backward()
    grad = predictor.linear.weight.grad.clone()
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    kept = pruner.record["kept"][0, L - 1:]  # (steps,) expected kept count of each response step
    assert set(kept.detach().tolist()) <= {64.0, 48.0, 32.0, 16.0, 0.0}
    predictor.zero_grad()
    pruner = D.Pruner("dyrate", N_IMAGE, torch.tensor([start]), torch.tensor([L]), K, predictor=predictor, train=True)
    model(seq, px, pruner=pruner)
    ratio = D.generation_flops(model.config, L, pruner.record["kept"][0, L - 1:], K)["total"] / \
        D.generation_flops(model.config, L, [N_IMAGE] * len(answer), K)["total"]
    ratio.backward()
    assert predictor.linear.weight.grad.abs().sum() > 0


def test_masked_attention_value_exact_gradient_bounded():
    """The training path's masked softmax: the value is the attention renormalised over the kept keys; the gradient
    reaching the mask is p_j (v_j - y) (bounded), also when the kept keys hold almost none of the mass."""
    torch.manual_seed(0)
    scores = torch.randn(1, 2, 3, 6, dtype=torch.float64)
    scores[..., 4] += 40.0  # nearly all attention on key 4, which the mask drops
    probs, v = scores.softmax(-1), torch.randn(1, 2, 6, 5, dtype=torch.float64)
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64).expand(1, 1, 3, 6).clone().requires_grad_()
    y = D.masked_attention(probs, weight, v)
    kept = probs * weight.detach()
    exact = (kept / kept.sum(-1, keepdim=True)) @ v
    assert torch.allclose(y, exact, rtol=0, atol=1e-12)
    y.sum().backward()
    expected = (probs * ((v[:, :, None] - exact[:, :, :, None]).sum(-1))).sum(1, keepdim=True)  # (1, 1, 3, 6)
    assert torch.allclose(weight.grad, expected, rtol=0, atol=1e-10)
    assert weight.grad.abs().max() <= 2 * (v.abs().max() * 5)  # |p_j (v_j - y)| summed over 5 channels and 2 heads
    exact_grad = torch.autograd.grad(((probs * weight) / (probs * weight).sum(-1, keepdim=True) @ v).sum(), weight)[0]
    assert exact_grad.abs().max() > 1e10  # what the exact derivative would have sent to the predictor


@pytest.mark.parametrize("method,kw", [("none", {}), ("fastv", dict(ratio=0.5)), ("vtw", {}),
                                       ("dyrate", dict(schedule=[0.25, 0.5, 0.5, 0.75])),
                                       ("dyrate", dict(predictor=random_predictor(seed=1)))])
def test_flops_match_flop_counter(method, kw, ours):
    """Our accounting of a whole generation (vision, projector, every layer's projections, MLP and attention with its
    real key count, LM head, probe, type shares, predictor) equals torch's FlopCounterMode on the real forwards."""
    from torch.utils.flop_counter import FlopCounterMode
    model, tok = ours
    with FlopCounterMode(display=False) as counter:
        row = G.generate(model, tok, [random_image(15)], ["Describe the picture."], max_new_tokens=6, method=method, **kw).rows[0]
    assert row["flops"] == counter.get_total_flops()
    assert (row["flops_ratio"] < 1) == (method != "none") and len(row["kept_visual"]) == len(row["token_ids"])


def test_fastv_convention_matches_the_paper():
    """FastV's own formula at K=2, R=0.5 on LLaVA-1.5-7B with ~60 text tokens: ~57% of the prefill FLOPs."""
    pruned, full = D.fastv_flops(M.LlavaConfig(), 576 + 60, 288, 2)
    assert 0.56 < pruned / full < 0.58


def test_predictor_file_round_trip_and_errors(ours, tmp_path):
    model, tok = ours
    predictor = random_predictor()
    predictor.save(tmp_path / "p.safetensors", D.fingerprint(model.config))
    loaded = D.RatePredictor.load(tmp_path / "p.safetensors", model.config)
    assert torch.equal(loaded.linear.weight, predictor.linear.weight) and loaded.rates == predictor.rates
    other = M.LlavaConfig(text=M.TextConfig(num_attention_heads=8, num_key_value_heads=8))
    with pytest.raises(ValueError, match="trained for a different model"):
        D.RatePredictor.load(tmp_path / "p.safetensors", other)
    (tmp_path / "junk.safetensors").write_text("nonsense")
    with pytest.raises(ValueError, match="not a predictor file"):
        D.RatePredictor.load(tmp_path / "junk.safetensors", model.config)
    image = random_image(16)
    with pytest.raises(ValueError, match="needs a trained predictor"):
        G.generate(model, tok, [image], ["Hi"], max_new_tokens=2, method="dyrate")
    with pytest.raises(ValueError, match="trained for K=2"):
        G.generate(model, tok, [image], ["Hi"], max_new_tokens=2, method="dyrate", predictor=loaded, k=3)
    with pytest.raises(ValueError, match=r"K must lie in \[1, 3\]"):
        G.generate(model, tok, [image], ["Hi"], max_new_tokens=2, method="fastv", k=0)
    with pytest.raises(ValueError, match="Unknown method"):
        G.generate(model, tok, [image], ["Hi"], max_new_tokens=2, method="random")


def test_cli_pruning_json_and_viz(ckpt, ours, tmp_path, capsys):
    path = tmp_path / "x.png"
    random_image(17).save(path)
    G.main(["--image", str(path), "--model", ckpt[0], "--json", "--max-new-tokens", "5", "--method", "fastv",
            "--ratio", "0.75", "--viz", str(tmp_path / "new" / "v")])  # the folder is made
    got = json.loads(capsys.readouterr().out)
    assert got["kept_visual"] == [16] * len(got["token_ids"]) and len(got["dropped_at_step"][0]) == 48
    assert got["rates"][0] == 0.75 and len(got["type_shares"][0]) == 4 and abs(sum(got["type_shares"][0]) - 1) < 1e-5
    assert 0 < got["flops"] and 0 < got["flops_ratio"] < 1 and got["kv_cache_bytes"] < got["kv_cache_bytes_none"]
    for name in ("v.gif", "v_strip.png", "v_shares.png"):
        assert Image.open(tmp_path / "new" / name).size[0] > 300
    assert Image.open(tmp_path / "new" / "v.gif").n_frames == len(got["token_ids"])
    predictor = random_predictor()
    other = M.LlavaConfig(text=M.TextConfig(num_attention_heads=8, num_key_value_heads=8))
    predictor.save(tmp_path / "wrong.safetensors", D.fingerprint(other))
    with pytest.raises(SystemExit, match="error: .*trained for a different model"):
        G.main(["--image", str(path), "--model", ckpt[0], "--method", "dyrate", "--predictor", str(tmp_path / "wrong.safetensors")])
    with pytest.raises(SystemExit):
        G.main(["--image", str(path), "--model", ckpt[0], "--method", "dyrate"])
    assert "needs --predictor" in capsys.readouterr().err


def test_bench_runs_every_method_on_a_checkpoint(ckpt, tmp_path, capsys):
    """bench.py end to end on a checkpoint folder (no timing asserted: benchmarks print figures): ours and
    transformers produce the same tokens, each method keeps what it should, memory and FLOPs are reported."""
    import bench
    rows = bench.main(["--model", ckpt[0], "--methods", "none,fastv,vtw,dyrate,dyrate-ramp,transformers", "--new-tokens",
                       "5", "--repeats", "1", "--batch-sizes", "1,2", "--memory-gib", "1", "--out", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    by = {(r["method"], r["batch"]): r for r in rows}
    assert len(rows) == 12 and json.loads((tmp_path / "b.json").read_text())["results"][0]["method"] == "none"
    for B in (1, 2):
        assert by[("none", B)]["tokens"] == by[("transformers", B)]["tokens"]
        assert by[("fastv", B)]["kept_visual"] == by[("dyrate", B)]["kept_visual"] == [N_IMAGE // 2] * 5
        assert by[("vtw", B)]["kept_visual"] == [0] * 5 and by[("dyrate-ramp", B)]["kept_visual"][-1] == 0
        assert by[("vtw", B)]["tflops"] < by[("fastv", B)]["tflops"] < by[("none", B)]["tflops"]
    assert by[("none", 2)]["peak_memory_bytes"] > by[("none", 1)]["peak_memory_bytes"]
    assert by[("fastv", 2)]["kv_cache_bytes"] < by[("none", 2)]["kv_cache_bytes"] == 2 * by[("none", 1)]["kv_cache_bytes"]
    assert "same tokens True" in out and "DyRate per-step overhead" in out and "largest batch in 1 GiB" in out
