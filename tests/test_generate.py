"""
Tests of generate.py: greedy generation token for token against transformers' generate, batched rows against each row
alone, sampling, streaming, the CLI (plain, --json, pruning output and --viz).
"""
import json

import pytest
import torch
from PIL import Image

import dyrate
import generate
import model
import processing
from conftest import assert_close, greedy_agrees, prompt_inputs, random_image
from test_dyrate import random_predictor
from tools import beam

N_FASTV = 32  # FastV R=0.5 keeps half of the tiny checkpoints' 64 image tokens


def test_greedy_generation_matches_transformers_generate(ours, placement, placed):
    """Token for token on the CPU in float32. Elsewhere kernels round differently, so our logits, fed transformers'
    tokens, must choose each of them wherever transformers' choice is decisive (conftest.greedy_agrees)."""
    (device, dtype), tok = placement, ours[1]
    llava, hf = placed(placement)
    image = random_image(5)
    out = generate.generate(llava, tok, [image], ["Describe the picture."], max_new_tokens=24)
    ids, lengths, px = prompt_inputs(ours, ["Describe the picture."], [5])
    ids, lengths, px = ids.to(device), lengths.to(device), px.to(device, dtype)
    with torch.no_grad():
        hf_out = hf.generate(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                             do_sample=False, output_scores=True, return_dict_in_generate=True)
    ref = hf_out.sequences[0, ids.shape[1]:].tolist()
    assert len(ref) >= 20
    if placement == ("cpu", torch.float32):
        assert out.rows[0]["token_ids"] == ref
        assert out.rows[0]["text"] == tok.decode(ref)
        return
    with torch.no_grad():
        steps = list(generate.decode(llava, ids, lengths, px, llava.new_caches(1, len(ref)), len(ref),
                                     choose=lambda t, logits: torch.tensor([ref[t]], device=device)))
    ours_logits = torch.stack([logits[0] for _, logits in steps])
    assert greedy_agrees(ours_logits, torch.tensor(ref, device=device), torch.stack(hf_out.scores)[:, 0], dtype)


def test_batch_rows_equal_each_row_alone(ours):
    llava, tok = ours
    images, prompts = [random_image(8), random_image(9, (90, 200))], ["Describe the picture.",
                                                                      "How many shapes are there? Answer in detail."]
    batch = generate.generate(llava, tok, images, prompts, max_new_tokens=20)
    for b in range(2):
        alone = generate.generate(llava, tok, [images[b]], [prompts[b]], max_new_tokens=20).rows[0]
        assert_close(torch.tensor(batch.rows[b].pop("type_shares")), torch.tensor(alone.pop("type_shares")), 1e-5)
        assert batch.rows[b] == alone
    assert batch.rows[0]["prompt_tokens"] != batch.rows[1]["prompt_tokens"]  # the rows really were ragged


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.randn(3, 50)
    a = generate.sample_next_token(logits, 1.0, 5, 0.9, torch.Generator().manual_seed(0))
    assert torch.equal(a, generate.sample_next_token(logits, 1.0, 5, 0.9, torch.Generator().manual_seed(0)))
    top5 = logits.topk(5).indices
    for _ in range(20):
        tok = generate.sample_next_token(logits, 2.0, 5, 1.0, torch.Generator().manual_seed(_))
        assert all(tok[b] in top5[b] for b in range(3))
    peaked = torch.full((1, 50), -10.0)
    peaked[0, 7] = 10.0
    assert int(generate.sample_next_token(peaked, 1.0, 0, 0.5,
                                          torch.Generator().manual_seed(0))) == 7  # top-p keeps only the peak
    assert torch.equal(generate.sample_next_token(logits), logits.argmax(-1))


def test_stream_decoder_multibyte(ours):
    _, tok = ours
    text = "A café, 日本語 and 🙂 emoji."
    ids = tok.tok.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text) // 2  # byte-fallback pieces: a character spans several ids
    stream = generate.StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert stream.push(tok.tok.token_to_id("<0xF0>")) == ""  # the first of 🙂's four bytes: held back
    assert stream.flush() == "\ufffd"


def test_cli_json(ckpt, ours, tmp_path, capsys):
    path = tmp_path / "x.png"
    random_image(10).save(path)
    out = generate.main(["--image", str(path), "--model", ckpt[0], "--json", "--max-new-tokens", "6", "--device",
                         "cpu"])
    got = json.loads(capsys.readouterr().out)
    assert got["token_ids"] == out.rows[0]["token_ids"] and len(got["token_ids"]) <= 6
    for key in ("text", "prompt_tokens", "image_token_start", "prefill_ms", "decode_ms_per_token"):
        assert key in got
    assert got["image_token_start"] == len(ours[1].tok.encode("USER: ").ids)  # BOS + the text before <image>
    generate.main(["--image", str(path), "--model", ckpt[0], "--max-new-tokens", "6", "--device", "cpu"])
    assert capsys.readouterr().out == out.rows[0]["text"] + "\n"  # streamed text, then the summary on stderr
    with pytest.raises(SystemExit, match="error: No LLaVA checkpoint"):
        generate.main(["--image", str(path), "--model", str(tmp_path / "none")])
    generate.main(["--image", str(path), "--model", ckpt[0], "--max-new-tokens", "2", "--method", "pdrop"])
    assert "pdrop: image tokens kept 32 -> 32 (at layers 1/2/3: 32/16/8) of 64, FLOPs" in capsys.readouterr().err


def test_cli_pruning_json_and_viz(ckpt, ours, tmp_path, capsys):
    path = tmp_path / "x.png"
    random_image(17).save(path)
    generate.main(["--image", str(path), "--model", ckpt[0], "--json", "--max-new-tokens", "5", "--method",
                   "fastv:ratio=0.75", "--viz", str(tmp_path / "new" / "v")])  # the folder is made
    got = json.loads(capsys.readouterr().out)
    assert got["kept_visual"] == [16] * len(got["token_ids"]) and len(got["dropped_at_step"][0]) == 48
    assert got["rates"][0] == 0.75 and len(got["type_shares"][0]) == 4 and abs(sum(got["type_shares"][0]) - 1) < 1e-5
    assert 0 < got["flops"] and 0 < got["flops_ratio"] < 1 and got["kv_cache_bytes"] < got["kv_cache_bytes_none"]
    for name in ("v.gif", "v_strip.png", "v_shares.png"):
        assert Image.open(tmp_path / "new" / name).size[0] > 300
    assert Image.open(tmp_path / "new" / "v.gif").n_frames == len(got["token_ids"])
    predictor = random_predictor()
    other = model.LlavaConfig(text=model.TextConfig(num_attention_heads=8, num_key_value_heads=8))
    predictor.save(tmp_path / "wrong.safetensors", dyrate.fingerprint(other))
    with pytest.raises(SystemExit, match="error: .*trained for a different model"):
        generate.main(["--image", str(path), "--model", ckpt[0], "--method", "dyrate", "--predictor",
                       str(tmp_path / "wrong.safetensors")])
    with pytest.raises(SystemExit, match="error: .*needs --predictor"):
        generate.main(["--image", str(path), "--model", ckpt[0], "--method", "dyrate"])


def test_bad_options_fail_before_the_model_loads(ckpt, ours, tmp_path, monkeypatch, capsys):
    """Each bad option or input of the CLI: one line naming it, exit non-zero, and the weights never loaded."""
    path = tmp_path / "x.png"
    random_image(18).save(path)
    predictor = random_predictor()
    predictor.save(tmp_path / "p", dyrate.fingerprint(ours[0].config))

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before the options were checked")
    monkeypatch.setattr(model.Llava, "from_pretrained", no_load)
    base = ["--image", str(path), "--model", ckpt[0]]
    for extra, message in ((["--temperature", "-1"], "temperature must be a finite number >= 0"),
                           (["--temperature", "nan"], "temperature"),
                           (["--top-p", "0"], r"top_p must lie in \(0, 1\]"),
                           (["--top-p", "1.5"], "top_p"), (["--top-k", "-2"], "top_k must be a whole number >= 0"),
                           (["--max-new-tokens", "0"], "max_new_tokens must be"),
                           (["--max-new-tokens", "600"], "exceed the model's context of 512"),
                           (["--method", "none", "--predictor", str(tmp_path / "p")], "used by --method dyrate only"),
                           (["--method", "fastv:ratio=1.5"], r"drop ratio must lie in \[0, 1\]"),
                           (["--method", "fastv:eps=1"], "fastv takes ratio=..., k=..., stages=.*, not 'eps=1'"),
                           (["--method", "nonsense"], "Unknown rule 'nonsense'"),
                           (["--num-beams", "2", "--temperature", "1"], "use temperature 0"),
                           (["--k", "9"], r"K must lie in \[1, 3\]"), (["--device", "cuda:3"], "--device cuda:3"),
                           (["--device", "tpu"], "--device tpu: 'tpu' is not a device torch knows"),
                           (["--image", str(tmp_path)], "is a folder"),
                           (["--image", str(tmp_path / "none.png")], "does not exist"),
                           (["--viz", "/proc/nope/v"], "--viz")):
        with pytest.raises(SystemExit, match=f"error: .*{message}"):
            generate.main(base + extra)


def test_small_models_and_odd_requests(ours, tmp_path, capsys):
    """none/fastv on a 2-layer model take K=1 by default; one new token reports no decode speed; rates outside
    [0, 1] are refused."""
    from conftest import build_tokenizer, make_hf, save_checkpoint
    folder = str(tmp_path / "two")
    image_id, pad_id = build_tokenizer(folder)
    save_checkpoint(make_hf(image_id, pad_id, layers=2), folder, "transformers5")
    small = model.Llava.from_pretrained(folder)
    tok = processing.Tokenizer(folder, small.config)
    for method in ("none", "fastv"):
        row = generate.generate(small, tok, [random_image(19)], ["Hi"], max_new_tokens=3, rule=method).rows[0]
        assert row["k"] == 1
    for images, prompts in ((["x.png"], [""]), (["x.png"], [5]), ("x.png", ["Hi"])):
        with pytest.raises(ValueError, match="non-empty text|a list of images"):
            generate.generate(*ours, images, prompts, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"scheduled rate must lie in \[0, 1\], got 2.0"):
        generate.generate(*ours, [random_image(19)], ["Hi"], max_new_tokens=2, rule="schedule:rates=0.5/2")
    path = tmp_path / "x.png"
    random_image(20).save(path)
    capsys.readouterr()
    generate.main(["--image", str(path), "--model", folder, "--max-new-tokens", "1"])
    assert "decode n/a (one new token)" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# beam search: transformers' semantics, and every beam pruning for itself


def beams(llava, ids, lengths, px, num_beams, n_new, eos, returns=1, length_penalty=1.0, pruner=None):
    """Our beam search over prompts (B, T) padded at their end: BeamSearch as the decode loop's chooser."""
    B = len(ids)
    ids, lengths, px = (t.repeat_interleave(num_beams, 0) for t in (ids, lengths, px))
    caches = llava.new_caches(B * num_beams, n_new)
    search = beam.BeamSearch(B, num_beams, n_new, eos, caches, pruner, length_penalty)
    with torch.no_grad():
        for _ in generate.decode(llava, ids, lengths, px, caches, n_new, pruner, search.choose):
            if search.over:
                break
    return search.results(returns)


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_matches_transformers(ckpt, ours, num_beams):
    """--method none with beams: transformers' generate(num_beams=N, do_sample=False) hypotheses and scores, with
    an EOS the beams reach and one they never emit, one prompt and a ragged batch of two (each row against
    transformers on that prompt alone), all N hypotheses returned, length penalties 1 and 0.5."""
    llava, hf = ours[0], ckpt[1]
    prompts = ["Describe the picture.", "How many shapes are there? Answer in detail."]
    ids, lengths, px = prompt_inputs(ours, prompts, [3, 4])
    greedy = generate.generate(llava, ours[1], [random_image(3)], prompts[:1], max_new_tokens=12).rows[0]["token_ids"]
    n_new = 12
    for eos, lp in ((greedy[2], 1.0), (greedy[5], 0.5), (llava.config.text.vocab_size - 1, 1.0)):
        for rows in ([0], [0, 1]):
            ours_out = beams(llava, ids[rows], lengths[rows], px[rows], num_beams, n_new, eos, num_beams, lp)
            for b in rows:
                L = int(lengths[b])
                with torch.no_grad():
                    ref = hf.generate(input_ids=ids[b:b + 1, :L], pixel_values=px[b:b + 1],
                                      attention_mask=torch.ones(1, L, dtype=torch.long), num_beams=num_beams,
                                      do_sample=False, max_new_tokens=n_new, num_return_sequences=num_beams,
                                      length_penalty=lp, eos_token_id=eos, pad_token_id=llava.config.pad_token_id,
                                      return_dict_in_generate=True, output_scores=True)
                mine = [h for h in ours_out if h[0] == rows.index(b)]
                for (_, tokens, _, score, _), seq, ref_score in zip(mine, ref.sequences, ref.sequences_scores):
                    assert tokens == seq[L:L + len(tokens)].tolist(), (eos, lp, b)
                    assert abs(score - float(ref_score)) < 1e-5, (eos, lp, b, score, float(ref_score))
                    assert tokens[-1] == eos or len(tokens) == n_new
            if eos == greedy[2]:
                assert any(h[1][-1] == eos for h in ours_out)  # EOS was reached


class Replay(dyrate.Pruner):
    """A pruner that drops, at every step, exactly the image tokens a recorded history dropped."""

    def __init__(self, history, n_image, start, length, k):
        super().__init__(dyrate.Schedule([0.0]), n_image, start, length, k, stats=False)
        self.recorded = history

    def decide(self, shares, scores):
        h = self.recorded[self.step]
        return h.rate, h.kept_count, self.kept_mask & ~h.dropped_mask


@pytest.mark.parametrize("method,kw", [(dyrate.FastV(0.5), {}),
                                       (dyrate.Schedule([0.25, 0.5, 0.5, 0.75, 0.75, 0.875, 1.0]), {}),
                                       ("dyrate", "predictor")])
def test_each_beam_prunes_for_itself(ours, method, kw):
    """Beam search with pruning, a ragged batch of two: each returned hypothesis's score is the one of forced-decoding
    its own tokens with its own pruning history replayed; that history is what the method decides on that hypothesis
    alone (each kept set follows the ranking rule against its own beam's attention); and beams that diverge keep
    different kept sets."""
    from test_dyrate import K, N_IMAGE, random_predictor, two_rows
    llava, tok = ours
    ids, lengths, px, starts = two_rows(ours)
    if kw == "predictor":
        stats = dyrate.Pruner("none", N_IMAGE, starts, lengths, K)
        with torch.no_grad():
            list(generate.decode(llava, ids, lengths, px, llava.new_caches(2, 6), 6, stats))
        method, kw = dyrate.Learned(random_predictor(center=torch.stack([h.shares for h in stats.history]).mean(
            (0, 1)))), {}
    N, n_new = 3, 7
    pruner = dyrate.Pruner(method, N_IMAGE, starts.repeat_interleave(N), lengths.repeat_interleave(N), K, **kw)
    out = beams(llava, ids, lengths, px, N, n_new, None, N, 1.0, pruner)
    kept_sets = {}
    for b, tokens, logprob, score, history in out:
        L, s = int(lengths[b]), starts[b:b + 1]
        steps = len(tokens)
        assert len(history) == steps and abs(score - logprob / steps) < 1e-6
        for hook in (Replay(history, N_IMAGE, s, lengths[b:b + 1], K),  # its history, replayed
                     dyrate.Pruner(method, N_IMAGE, s, lengths[b:b + 1], K, stats=False, **kw)):  # decided afresh
            with torch.no_grad():
                forced = list(generate.decode(llava, ids[b:b + 1, :L], lengths[b:b + 1], px[b:b + 1],
                                              llava.new_caches(1, steps), steps, hook,
                                              lambda t, logits: torch.tensor([tokens[t]])))
            logps = torch.stack([logits[0].float().log_softmax(-1)[t] for (_, logits), t in zip(forced, tokens)])
            assert abs(float(logps.sum()) - logprob) < 1e-4, (b, float(logps.sum()), logprob)
            assert [int(h.kept_count[0]) for h in hook.history] == [int(h.kept_count[0]) for h in history]
            assert all(torch.equal(a.dropped_mask, h.dropped_mask) for a, h in zip(hook.history, history))
        kept_sets.setdefault(b, set()).add(tuple(tuple(h.dropped_mask[0].nonzero()[:, 0].tolist()) for h in history))
    if isinstance(method, dyrate.Learned):
        assert any(len(sets) > 1 for sets in kept_sets.values())  # diverged beams kept different tokens


@pytest.mark.parametrize("method,kw", [("none", {}), (dyrate.FastV(0.5), {}), ("vtw", {}), (dyrate.Mass(0.1), {}),
                                       (dyrate.Schedule([0.25, 0.5, 0.75]), {})])
def test_one_beam_is_greedy(ours, method, kw):
    llava, tok = ours
    images, prompts = [random_image(8), random_image(9, (90, 200))], ["Describe the picture.", "How many shapes?"]
    greedy = generate.generate(llava, tok, images, prompts, max_new_tokens=10, rule=method, **kw)
    one = beam.generate(llava, tok, images, prompts, max_new_tokens=10, num_beams=1, rule=method, **kw)
    for a, b in zip(greedy.rows, one.rows):
        b.pop("score"), b.pop("logprob_sum")
        assert a.pop("type_shares") == b.pop("type_shares") and a == b


def test_generate_with_beams_returns_the_best_hypotheses(ours, capsys, ckpt, tmp_path):
    llava, tok = ours
    out = beam.generate(llava, tok, [random_image(8), random_image(9)], ["Describe the picture.", "Hi"],
                        max_new_tokens=8, num_beams=3, num_return_sequences=2, rule="fastv")
    assert len(out.rows) == 4 and all("score" in r and "kept_visual" in r for r in out.rows)
    assert out.rows[0]["score"] >= out.rows[1]["score"] and out.rows[2]["score"] >= out.rows[3]["score"]
    assert out.rows[0]["kept_visual"] == [N_FASTV] * len(out.rows[0]["token_ids"])
    for bad, message in ((dict(num_beams=0), "num_beams"), (dict(num_beams=2, num_return_sequences=3), "num_return"),
                         (dict(num_beams=2, length_penalty=float("nan")), "length_penalty")):
        with pytest.raises(ValueError, match=message):
            beam.generate(llava, tok, [random_image(8)], ["Hi"], max_new_tokens=4, **bad)
    path = tmp_path / "x.png"
    random_image(10).save(path)
    generate.main(["--image", str(path), "--model", ckpt[0], "--json", "--max-new-tokens", "5", "--num-beams", "3",
                   "--num-return-sequences", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("score" in json.loads(line) for line in lines)



def test_a_predictor_runs_under_the_protocol_it_was_trained_with(ckpt, ours, tmp_path, capsys):
    """A predictor file records its template and padding: generate uses them by default, refuses others with both
    named, and runs them with --allow-protocol-mismatch."""
    path = tmp_path / "x.png"
    random_image(11).save(path)
    predictor = random_predictor()
    predictor.save(tmp_path / "p", dyrate.fingerprint(ours[0].config), dict(conv="vicuna_v1", pad=True))
    vicuna = len(ours[1].encode_prompt("Hi", "vicuna_v1")[0])
    assert vicuna > len(ours[1].encode_prompt("Hi", "llava-hf")[0])  # the system prompt before the image
    run = ["--image", str(path), "--model", ckpt[0], "--prompt", "Hi", "--json", "--max-new-tokens", "3", "--method",
           "dyrate", "--predictor", str(tmp_path / "p")]
    assert generate.main(run).rows[0]["prompt_tokens"] == vicuna  # the predictor's protocol, unasked
    for extra in (["--conv", "llava-hf"], ["--no-pad"]):
        with pytest.raises(SystemExit, match="trained with --conv vicuna_v1 --pad, and this run asks for --conv "
                                             f"{'llava-hf --pad' if '--conv' in extra else 'vicuna_v1 --no-pad'}.*"
                                             "--allow-protocol-mismatch"):
            generate.main(run + extra)
    allowed = generate.main(run + ["--conv", "llava-hf", "--allow-protocol-mismatch"]).rows[0]
    assert allowed["prompt_tokens"] == len(ours[1].encode_prompt("Hi", "llava-hf")[0])
    assert allowed["settings"] == f"dyrate:predictor={tmp_path / 'p'}:k=2"
    assert generate.prompt_protocol([dyrate.Rule()]) == ("llava-hf", False)  # no predictor: llava-hf's, unpadded
    other = dyrate.RatePredictor.load(tmp_path / "p", ours[0].config)
    other.meta = dict(other.meta, conv="llava-hf", pad=False)
    with pytest.raises(ValueError, match="different protocols"):
        generate.prompt_protocol([dyrate.Learned(predictor=other), dyrate.parse_rule(
            f"dyrate:predictor={tmp_path / 'p'}", ours[0].config)])
    capsys.readouterr()
