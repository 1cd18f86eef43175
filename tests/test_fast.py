"""
tools/fast.py against the core: dropping by moves against the core's gather (one cache, and whole decodes), the
compiled decode against eager (buckets, graph counts, the real compiler, beam search), chunked prefill against one
pass, and no host read at a decode step.
"""
import pytest
import torch

import dyrate
import generate
import model
from conftest import assert_close, random_image
from test_dyrate import K, N_IMAGE, atol, host_reads_per_step, random_predictor, run_steps, two_rows
from tools import beam, fast


def fast_model(ckpt, device="cpu", dtype=torch.float32):
    """A Llava on the tiny checkpoint whose caches are FastKVCaches: eager decoding that drops by moves."""
    llava = model.Llava.from_pretrained(ckpt[0], device, dtype)
    llava.cache_class = fast.FastKVCache
    return llava


def test_compaction_moves_equal_the_reference_gather(placement):
    """compaction_moves + FastKVCache.move leave every row with exactly the slots the order-keeping gather (kept_slots,
    the prefill's) keeps, each slot's keys, values and position together, moving only the holes' worth of slots.
    Ragged rows, image tokens already out of order from an earlier compaction, a row that drops nothing."""
    device, dtype = placement
    torch.manual_seed(0)
    B, S, N, start = 3, 40, 16, torch.tensor([3, 5, 2], device=device)
    cache = fast.FastKVCache(B, 8, 2, 4, dtype, device)
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
    alive = ~dyrate.real_and_dropped(cache.pos, cache.length, drop, start, N)[1]  # what FastKVCache.drop leaves
    moves, longest = (int(n) for n in fast.next_compaction(alive, cache.length - 1))  # counts for one token less
    src, dst, length = fast.compaction_moves(alive, cache.length, moves)
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
    src, dst, length = fast.compaction_moves(all_alive, cache.length, 0)
    state = lambda: [t.clone() for t in (cache.k, cache.v, cache.pos, cache.length)]  # noqa: E731
    kept = state()
    cache.move(src, dst, length, longest)  # no move at all (D = 0): the cache is unchanged
    assert src.shape == (B, 0) and all(torch.equal(a, b) for a, b in zip(kept, state()))


def test_dropping_by_moves_gives_the_core_drops_decode(ours, ckpt):
    """The core's KVCache.drop (a gather at once) and the fast path's FastKVCache (dead slots masked, compacted by
    moves a step later) give the same greedy tokens, logits within float32's rounding, kept counts and final caches
    (the same tokens with the same keys and values within rounding, in another order), for rates that fall during the
    answer and for a random predictor whose rows keep different counts; the fast caches really shrank."""
    llava, _ = ours
    faster = fast_model(ckpt)
    ids, lengths, px, starts = two_rows(ours)
    stats = dyrate.Pruner("none", N_IMAGE, starts, lengths, K)
    run_steps(llava, ids, lengths, px, stats, 8)
    predictor = random_predictor(center=torch.stack([h.shares for h in stats.history]).mean((0, 1)))
    staged = dyrate.Schedule([0.25, 0.25, 0.5, 0.5, 0.75, 0.875, 1.0], k=1, stages=3)  # drops at layers 1, 2, 3
    for rule in (dyrate.Schedule([0.25, 0.25, 0.5, 0.5, 0.75, 0.875, 1.0]), dyrate.Learned(predictor), staged):
        core_hook, fast_hook = (dyrate.Pruner(rule, N_IMAGE, starts, lengths, rule.k or K) for _ in range(2))
        core_logits, core_tokens, core_caches = run_steps(llava, ids, lengths, px, core_hook, 8)
        fast_logits, fast_tokens, fast_caches = run_steps(faster, ids, lengths, px, fast_hook, 8)
        assert torch.equal(fast_tokens, core_tokens), rule
        assert_close(fast_logits, core_logits, 1e-5, f"fast against core, {type(rule).__name__}")
        kept = torch.stack([h.kept_count for h in core_hook.history])  # (steps, B)
        assert torch.equal(torch.stack([h.kept_count for h in fast_hook.history]), kept)
        assert all(torch.equal(a, b) for h, g in zip(core_hook.history, fast_hook.history) for a, b in zip(h.deeper,
                                                                                                          g.deeper))
        assert len(set(kept[1:, 0].tolist())) >= 2  # drops at decode steps
        if isinstance(rule, dyrate.Learned):
            assert (kept[:, 0] != kept[:, 1]).any()
        for layer, (a, b) in enumerate(zip(core_caches, fast_caches)):
            assert torch.equal(a.length, b.length), layer
            for row in range(2):
                n = int(a.length[row])
                order_a, order_b = a.pos[row, :n].argsort(), b.pos[row, :n].argsort()
                assert torch.equal(a.pos[row, :n][order_a], b.pos[row, :n][order_b])
                for x, y in ((a.k, b.k), (a.v, b.v)):  # layers > K: from attention over keys in another order
                    assert_close(y[row, :, :n][:, order_b], x[row, :, :n][:, order_a], 1e-5, f"layer {layer}")
        assert fast_caches[K].used < core_caches[K].used  # the fast window shrank, the core's is a bound


def test_the_fast_path_reads_nothing_back_to_the_host(ours, ckpt, monkeypatch):
    """FastKVCache's decode steps make no host read, whether they drop or not: dead slots are masked on the device,
    and the compaction's counts reach the host through a copy nobody waits for."""
    faster = fast_model(ckpt)
    ids, lengths, px, starts = two_rows(ours)
    pruner = dyrate.Pruner(dyrate.Schedule([0.25, 0.25, 0.5, 0.5, 0.75, 0.75]), N_IMAGE, starts, lengths, K,
                           stats=False)
    reads, caches = host_reads_per_step(faster, ids, lengths, px, pruner, monkeypatch)
    drops = [int(h.dropped_mask.sum()) for h in pruner.history[1:]]
    assert reads == [0] * 5 and (any(drops) and not all(drops)), (reads, drops)
    assert caches[K].used < caches[K].k.shape[2] - 1  # and the drops were compacted: `used` fell


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
    """fast.compile_decode: caches read in buckets of 16 slots; decode steps compile once per (segment, bucket),
    a compacted cache runs the smaller step, a second generation compiles nothing, and the logits are eager's.
    Rows that keep different numbers of tokens (a random predictor) and drops at several steps."""
    device, dtype = placement
    eager_model = placed(placement)[0]
    compiled, graphs = model.Llava.from_pretrained(ckpt[0], device, dtype), []

    def count_graphs(gm, example_inputs):  # a torch.compile backend that runs the captured graph as is
        graphs.append(gm)
        return gm.forward
    fast.compile_decode(compiled, backend=count_graphs, bucket=16)
    ids, lengths, px, starts = two_rows(ours, placement)
    stats = dyrate.Pruner("none", N_IMAGE, starts, lengths, K)
    run_steps(eager_model, ids, lengths, px, stats, 8)
    center = torch.stack([h.shares for h in stats.history]).mean((0, 1)).cpu()
    predictor = random_predictor(center=center).to(device)
    seen = set()  # (segment, window): the graphs compiled so far
    try:
        for rule in (None, dyrate.Schedule([0.25, 0.5, 0.5, 0.75, 1.0]), dyrate.Learned(predictor)):
            def pruner():
                return rule and dyrate.Pruner(rule, N_IMAGE, starts, lengths, K)
            eager, _, _ = run_steps(eager_model, ids, lengths, px, pruner(), 8)
            for i in range(2):
                before, hook = len(graphs), pruner()
                got, caches, windows = bucketed_run(compiled, ids, lengths, px, hook, 8)
                assert_close(got, eager, atol(placement, eager), f"compiled {rule} {placement}")
                assert all(c.window % 16 == 0 or c.window == c.k.shape[2] for c in caches)
                segments = {("all", w[0]) for w in windows} if rule is None else \
                    {("0..K", w[0]) for w in windows} | {("K..L", w[1]) for w in windows}
                assert len(graphs) - before == len(segments - seen), (rule, i)  # the second run: none
                seen |= segments
            if isinstance(rule, dyrate.Schedule):  # each step's compaction (of the step before's drops) shrank it
                assert [w[1] for w in windows] == [88, 80, 80, 64, 48, 48, 48], windows
            if isinstance(rule, dyrate.Learned):
                kept = torch.stack([h.kept_count for h in hook.history])
                assert (kept[:, 0] != kept[:, 1]).any()
    finally:
        torch._dynamo.reset()


def test_compiled_decode_with_inductor_gives_eager_tokens(ckpt, ours):
    """The real compiler (CPU inductor), buckets of 8 slots: greedy tokens equal eager's through drops at several
    steps, with a schedule whose compactions cross buckets, and with a random predictor whose rows keep different
    counts."""
    compiled = fast.compile_decode(model.Llava.from_pretrained(ckpt[0]), bucket=8)
    ids, lengths, px, starts = two_rows(ours)
    stats = dyrate.Pruner("none", N_IMAGE, starts, lengths, K)
    run_steps(ours[0], ids, lengths, px, stats, 8)
    predictor = random_predictor(center=torch.stack([h.shares for h in stats.history]).mean((0, 1)))
    try:
        for rule in (dyrate.Schedule([0.25, 0.5, 0.75, 0.75, 1.0]), dyrate.Learned(predictor)):
            _, eager, _ = run_steps(ours[0], ids, lengths, px, dyrate.Pruner(rule, N_IMAGE, starts, lengths, K), 8)
            hook = dyrate.Pruner(rule, N_IMAGE, starts, lengths, K)
            _, _, windows = bucketed_run(compiled, ids, lengths, px, hook, 8)
            kept = torch.stack([h.kept_count for h in hook.history])  # (steps, B)
            assert len(set(kept[1:, 0].tolist())) >= 2  # drops at decode steps
            if isinstance(rule, dyrate.Schedule):
                assert len({w[1] for w in windows}) >= 3, windows
            else:
                assert (kept[:, 0] != kept[:, 1]).any()
            _, tokens, _ = run_steps(compiled, ids, lengths, px, dyrate.Pruner(rule, N_IMAGE, starts, lengths, K), 8)
            assert torch.equal(tokens, eager), type(rule).__name__
    finally:
        torch._dynamo.reset()


def test_beams_through_the_compiled_decode_keep_its_buckets(ckpt, ours):
    """Beam search over a compiled decode (a graph-counting backend, buckets of 16 slots), with decode-time drops: the
    eager search's sequences and scores, and a second search compiles nothing (a reorder copies rows in place; the
    caches' buckets and host-side counts stay as they were)."""
    llava, tok = ours
    compiled, graphs = model.Llava.from_pretrained(ckpt[0]), []

    def count_graphs(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    fast.compile_decode(compiled, backend=count_graphs, bucket=16)
    images, prompts = [random_image(8), random_image(9, (90, 200))], ["Describe the picture.", "How many shapes?"]
    kw = dict(max_new_tokens=8, rule=dyrate.Schedule([0.25, 0.5, 0.75, 0.75, 1.0]), num_beams=3,
              num_return_sequences=2)
    try:
        eager = beam.generate(llava, tok, images, prompts, **kw).rows
        for i in range(2):
            before = len(graphs)
            got = beam.generate(compiled, tok, images, prompts, **kw).rows
            assert [r["token_ids"] for r in got] == [r["token_ids"] for r in eager]
            assert_close(torch.tensor([r["score"] for r in got]), torch.tensor([r["score"] for r in eager]), 1e-5,
                         "beam scores")
            assert i == 0 and len(graphs) > before or i == 1 and len(graphs) == before
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("rule", [dyrate.FastV(0.5), dyrate.Schedule([0.25, 0.5, 0.75]), "none",
                                  dyrate.Pyramid(k=1)])
def test_chunked_prefill_is_bit_identical(rule, ours):
    """fast.chunk_prefill: the vision tower and every decoder layer of the prefill run one row at a time (then three),
    for a ragged batch with pruning: the same logits, caches and tokens, bit for bit."""
    llava, _ = ours
    ids, lengths, px, starts = two_rows(ours)
    ids, lengths, px, starts = (torch.cat([t, t.flip(0)]) for t in (ids, lengths, px, starts))  # 4 ragged rows
    k = getattr(rule, "k", None) or K
    whole = run_steps(llava, ids, lengths, px, dyrate.Pruner(rule, N_IMAGE, starts, lengths, k), 4)
    try:
        for rows in (1, 3):
            fast.chunk_prefill(llava, rows)
            chunked = run_steps(llava, ids, lengths, px, dyrate.Pruner(rule, N_IMAGE, starts, lengths, k), 4)
            assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1]), rows
            for a, b in zip(chunked[2], whole[2]):
                assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v) and torch.equal(a.length, b.length)
    finally:
        fast.chunk_prefill(llava, 0)
    assert not hasattr(llava.language_model.model.layers_forward, "one_pass")  # rows = 0: one pass again


def test_chunked_prefill_gives_visionzip_its_tokens(ours):
    """VisionZip's probe of the vision tower goes through the chunked tower too: the same tokens for every row."""
    llava, tok = ours
    images, prompts = [random_image(s) for s in (1, 2, 3)], ["What is it?", "Describe it.", "What color is it?"]
    run = lambda: generate.generate(llava, tok, images, prompts, 4, rule="visionzip:dominant=12:contextual=4").rows  # noqa: E731
    whole = run()
    try:
        fast.chunk_prefill(llava, 2)
        assert [r["token_ids"] for r in run()] == [r["token_ids"] for r in whole]
    finally:
        fast.chunk_prefill(llava, 0)


def test_generate_compile_flag_runs_the_compiled_decode(ckpt, tmp_path, capsys, monkeypatch):
    """generate.py --compile decodes through fast.compile_decode (here with the eager backend: the wiring, not the
    compiler) and writes the eager run's tokens."""
    calls, compile_decode = [], fast.compile_decode

    def compile_eagerly(llava):
        calls.append(llava)
        return compile_decode(llava, backend="eager")
    monkeypatch.setattr(fast, "compile_decode", compile_eagerly)
    path = tmp_path / "x.png"
    random_image(10).save(path)
    args = ["--image", str(path), "--model", ckpt[0], "--json", "--max-new-tokens", "6", "--method", "ramp"]
    try:
        compiled = generate.main(args + ["--compile"])
    finally:
        torch._dynamo.reset()
    assert len(calls) == 1 and isinstance(calls[0].new_caches(1, 1)[0], fast.FastKVCache)
    assert compiled.rows[0]["token_ids"] == generate.main(args).rows[0]["token_ids"]
    capsys.readouterr()
