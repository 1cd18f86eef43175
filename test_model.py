"""
Tests: model.py against HF transformers' LLaVA (the reference), generation, preprocessing and the tokenizer
(processing.py), and bad input. Tiny random LLaVA models are built with transformers, saved in the real checkpoint key layouts and loaded
through the real Llava.from_pretrained path. All on CPU in seconds:

    python -m pytest -q
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import generate as G
import model as M
import processing as P
from conftest import IMAGE_SIZE, PATCH, assert_close, make_hf, prompt_inputs, random_image, save_checkpoint


# ----------------------------------------------------------------------------------------------------------------------
# config

HUB_7B = {"architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
          "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
          "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                          "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                          "torch_dtype": "float16", "vocab_size": 32064},
          "tie_word_embeddings": False, "torch_dtype": "float16", "vision_config": {
              "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
              "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
              "vocab_size": 32000}, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
          "vocab_size": 32064}


def test_hub_config_fills_llava_defaults(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HUB_7B))
    cfg = M.LlavaConfig.from_json(tmp_path / "config.json")
    t, v = cfg.text, cfg.vision
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads) == (4096, 11008, 32, 32)
    assert (t.num_key_value_heads, t.head_dim, t.rms_norm_eps, t.rope_theta, t.vocab_size) == (32, 128, 1e-5, 1e4, 32064)
    assert (v.hidden_act, v.layer_norm_eps, cfg.n_image_tokens, cfg.n_vision_layers_used) == ("quick_gelu", 1e-5, 576, 23)
    assert (cfg.image_token_index, cfg.pad_token_id, cfg.eos_token_id) == (32000, 32001, 2)
    # 13B sizes, and theta in the newer rope_parameters form
    hub = json.loads(json.dumps(HUB_7B))
    hub["text_config"].update(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                              rope_parameters={"rope_theta": 5e5, "rope_type": "default"})
    (tmp_path / "config.json").write_text(json.dumps(hub))
    t = M.LlavaConfig.from_json(tmp_path / "config.json").text
    assert (t.num_key_value_heads, t.head_dim, t.rope_theta) == (40, 128, 5e5)
    hub["text_config"]["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    hub["text_config"].pop("rope_parameters")
    (tmp_path / "config.json").write_text(json.dumps(hub))
    with pytest.raises(ValueError, match="RoPE scaling"):
        M.LlavaConfig.from_json(tmp_path / "config.json")


# ----------------------------------------------------------------------------------------------------------------------
# parity with transformers


@pytest.mark.parametrize("layout", ["hub", "transformers5", "memory457"])
def test_logits_and_features_match_transformers(layout, ckpt, ours, tmp_path):
    folder, hf = ckpt
    model = ours[0] if layout == "hub" else M.Llava.from_pretrained(save_checkpoint(hf, str(tmp_path), layout))
    ids, _, px = prompt_inputs(ours, ["What is in the image?"], [0])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px)
        assert_close(model(ids, px), ref.logits, 1e-5, f"fp32 logits ({layout})")
        hf.set_attn_implementation("sdpa")  # same attention kernel in the vision tower: bit-identical features
        ref_features = hf.model.get_image_features(pixel_values=px).pooler_output[0]
        hf.set_attn_implementation("eager")
        assert torch.equal(model.image_features(px)[0], ref_features)


def test_bf16_logits_within_transformers_own_error(ckpt, ours):
    """bf16: our logits are as close to HF eager bf16 as HF's own sdpa is, and no further from the fp32 truth."""
    from transformers import LlavaForConditionalGeneration
    folder, hf32 = ckpt
    ids, _, px = prompt_inputs(ours, ["Describe the picture in detail."], [1])
    model = M.Llava.from_pretrained(folder, dtype=torch.bfloat16)
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="eager").eval()
    with torch.no_grad():
        truth, ref, got = hf32(input_ids=ids, pixel_values=px).logits, hf(input_ids=ids, pixel_values=px.bfloat16()).logits, model(ids, px.bfloat16())
    assert_close(got, ref, 0.02, "bf16 logits vs HF eager bf16")
    assert (got.float() - truth).abs().max() <= 1.5 * (ref.float() - truth).abs().max()


def test_gqa_and_explicit_head_dim_match_transformers(ckpt, ours, tmp_path):
    folder, _ = ckpt
    hf = make_hf(ours[0].config.image_token_index, ours[0].config.pad_token_id, kv_heads=2, head_dim=24, seed=1)
    model = M.Llava.from_pretrained(save_checkpoint(hf, str(tmp_path), "transformers5"))
    assert (model.config.text.num_key_value_heads, model.config.text.head_dim) == (2, 24)
    hf.set_attn_implementation("eager")
    ids, lengths, px = prompt_inputs(ours, ["What is in the image?", "How many shapes are there?"], [2, 3])
    with torch.no_grad():
        assert_close(model(ids, px), hf(input_ids=ids, pixel_values=px).logits, 1e-5, "GQA logits")
        caches = model.new_caches(2, 1)  # the cached path with GQA and ragged rows too
        last = model.step(ids, torch.arange(ids.shape[1]).expand(2, -1), caches, lengths, px)
        full = hf(input_ids=ids, pixel_values=px).logits
    assert_close(last, full[torch.arange(2), lengths - 1], 1e-5, "GQA cached prefill")


def test_probe_gives_hf_attention_probabilities(ckpt, ours):
    """The probe (explicit softmax for chosen query rows, inside the normal forward) equals HF eager's attentions."""
    model, _ = ours
    ids, lengths, px = prompt_inputs(ours, ["What is in the image?"], [4])

    class Probe:  # the pruner hook, used only to read one layer's attention
        layer = 2

        def probe_rows(self, n_valid, T):
            return torch.stack([n_valid - 1, n_valid - 5], dim=1)  # (B, 2): the last token and another row

        def __call__(self, probs, x, positions, n_valid, caches):
            self.probs = probs
            return x, positions, n_valid, None

    probe = Probe()
    with torch.no_grad():
        model.step(ids, torch.arange(ids.shape[1])[None], model.new_caches(1, 0), lengths, px, probe)
        ref = ckpt[1](input_ids=ids, pixel_values=px, output_attentions=True).attentions[1][0]  # layer 1: (nh, T, T)
    T = ids.shape[1]
    assert probe.probs.shape == (1, 4, 2, T)
    assert_close(probe.probs[0], ref[:, [T - 1, T - 5]], 1e-6, "probe vs HF attentions")


def test_loading_holds_one_copy_in_memory(tmp_path):
    """An fp16 checkpoint loaded as fp32 in a fresh process: anonymous memory grows by the fp32 model, not more (the
    fp16 source stays in the reclaimable page cache, memory-mapped); loaded as fp16 it is not even copied."""
    import subprocess
    import sys
    from safetensors.torch import save_file
    cfg = M.LlavaConfig(vision=M.VisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
                        text=M.TextConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                                          num_key_value_heads=8, head_dim=64, intermediate_size=1376))
    save_file({k: v.half().contiguous() for k, v in M.Llava(cfg).state_dict().items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {k: getattr(cfg.text, k) for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}, "vision_config": {
        k: getattr(cfg.vision, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}}))
    script = ("import sys, torch, model\n"  # warm-up first: torch's one-time buffers and meta-device registrations
              "anon = lambda: int([l for l in open('/proc/self/status') if l.startswith('RssAnon')][0].split()[1]) * 1024\n"
              "with torch.device('meta'):\n"
              "    model.Llava(model.LlavaConfig.from_json(sys.argv[1] + '/config.json'))\n"
              "torch.ones(8, dtype=torch.float16).float() @ torch.ones(8, 8)\n"
              "before = anon()\n"
              "m = model.Llava.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))\n"
              "print(anon() - before, sum(p.numel() * p.element_size() for p in m.parameters()))\n")
    for dtype, bound in (("float32", 1.1), ("float16", 0.1)):
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path), dtype], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout
        grown, size = map(int, out.split())
        assert size > 100e6 and grown <= bound * size + 16e6, f"{dtype}: anonymous memory grew {grown / 1e6:.0f} MB for a {size / 1e6:.0f} MB model"


# ----------------------------------------------------------------------------------------------------------------------
# generation


def test_greedy_generation_matches_transformers_generate(ckpt, ours):
    model, tok = ours
    image = random_image(5)
    out = G.generate(model, tok, [image], ["Describe the picture."], max_new_tokens=24)
    ids, _, px = prompt_inputs(ours, ["Describe the picture."], [5])
    with torch.no_grad():
        ref = ckpt[1].generate(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                               do_sample=False)[0, ids.shape[1]:].tolist()
    assert len(ref) >= 20
    assert out.rows[0]["token_ids"] == ref
    assert out.rows[0]["text"] == tok.decode(ref)


def test_cached_decode_equals_no_cache_forward_at_every_step(ours):
    """Two ragged rows: each step's cached logits equal a fresh full forward over that row's sequence so far."""
    model, _ = ours
    ids, lengths, px = prompt_inputs(ours, ["What is in the image?", "Provide a one-sentence caption."], [6, 7])
    B, T, steps = 2, ids.shape[1], 8
    seqs = [ids[b, :lengths[b]].tolist() for b in range(B)]
    caches = model.new_caches(B, steps)
    with torch.no_grad():
        logits = model.step(ids, torch.arange(T).expand(B, T), caches, lengths, px)
        for t in range(steps):
            for b in range(B):
                full = model(torch.tensor([seqs[b]]), px[b:b + 1])[0, -1]
                assert_close(logits[b], full, 1e-5, f"row {b} step {t}")
            token = logits.argmax(-1)
            for b in range(B):
                seqs[b].append(int(token[b]))
            logits = model.step(token[:, None], (lengths + t)[:, None], caches)


def test_batch_rows_equal_each_row_alone(ours):
    model, tok = ours
    images, prompts = [random_image(8), random_image(9, (90, 200))], ["Describe the picture.", "How many shapes are there? Answer in detail."]
    batch = G.generate(model, tok, images, prompts, max_new_tokens=20)
    for b in range(2):
        alone = G.generate(model, tok, [images[b]], [prompts[b]], max_new_tokens=20).rows[0]
        assert_close(torch.tensor(batch.rows[b].pop("type_shares")), torch.tensor(alone.pop("type_shares")), 1e-5)
        assert batch.rows[b] == alone
    assert batch.rows[0]["prompt_tokens"] != batch.rows[1]["prompt_tokens"]  # the rows really were ragged


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.randn(3, 50)
    a = G.sample(logits, 1.0, 5, 0.9, torch.Generator().manual_seed(0))
    assert torch.equal(a, G.sample(logits, 1.0, 5, 0.9, torch.Generator().manual_seed(0)))
    top5 = logits.topk(5).indices
    for _ in range(20):
        tok = G.sample(logits, 2.0, 5, 1.0, torch.Generator().manual_seed(_))
        assert all(tok[b] in top5[b] for b in range(3))
    peaked = torch.full((1, 50), -10.0)
    peaked[0, 7] = 10.0
    assert int(G.sample(peaked, 1.0, 0, 0.5, torch.Generator().manual_seed(0))) == 7  # top-p keeps only the peak
    assert torch.equal(G.sample(logits), logits.argmax(-1))


def test_cli_json(ckpt, ours, tmp_path, capsys):
    path = tmp_path / "x.png"
    random_image(10).save(path)
    out = G.main(["--image", str(path), "--model", ckpt[0], "--json", "--max-new-tokens", "6", "--device", "cpu"])
    got = json.loads(capsys.readouterr().out)
    assert got["token_ids"] == out.rows[0]["token_ids"] and len(got["token_ids"]) <= 6
    for key in ("text", "prompt_tokens", "image_token_start", "prefill_ms", "decode_ms_per_token"):
        assert key in got
    assert got["image_token_start"] == len(ours[1].tok.encode("USER: ").ids)  # BOS + the text before <image>
    G.main(["--image", str(path), "--model", ckpt[0], "--max-new-tokens", "6", "--device", "cpu"])
    assert capsys.readouterr().out == out.rows[0]["text"] + "\n"  # streamed text, then the summary on stderr
    with pytest.raises(SystemExit, match="error: No LLaVA checkpoint"):
        G.main(["--image", str(path), "--model", str(tmp_path / "none")])


# ----------------------------------------------------------------------------------------------------------------------
# preprocessing


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (336, 336), (1000, 200), (17, 33), (337, 500)])
def test_preprocess_bit_exact_with_transformers(size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    image, crop = random_image(size[0], size), {"height": 336, "width": 336}
    ref = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size=crop)(image, return_tensors="pt").pixel_values[0]
    assert torch.equal(P.preprocess(image), ref)
    ref = LlavaImageProcessorPil(size={"shortest_edge": 336}, crop_size=crop, do_pad=True)(image, return_tensors="pt")
    assert torch.equal(P.preprocess(image, pad=True), ref.pixel_values[0])


def test_image_modes_and_exif(tmp_path):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    hf = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    rgb = random_image(11, (200, 150))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 200, dtype=np.uint8), (150, 1))))
    for image in (rgba, rgb.convert("L"), rgb.convert("P"), rgb.convert("CMYK"), rgb.convert("LA")):
        assert torch.equal(P.preprocess(image), hf(image, return_tensors="pt").pixel_values[0]), image.mode
    grey = np.asarray(rgb.convert("L"))  # 16-bit greyscale is scaled, not clipped to white
    assert torch.equal(P.preprocess(Image.fromarray(grey.astype(np.uint16) * 257)), P.preprocess(Image.fromarray(grey)))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    rgb.save(tmp_path / "rot.jpg", exif=exif)
    upright = ImageOps.exif_transpose(Image.open(tmp_path / "rot.jpg"))
    assert upright.size == (150, 200)
    assert torch.equal(P.preprocess(tmp_path / "rot.jpg"), hf(upright, return_tensors="pt").pixel_values[0])


# ----------------------------------------------------------------------------------------------------------------------
# tokenizer


@pytest.mark.parametrize("conv", ["llava-hf", "vicuna_v1"])
def test_prompt_ids_match_transformers(conv, ckpt, ours):
    """Same ids as transformers' LlavaProcessor (expands <image> in the text, then tokenizes) on the same files, and as
    the original LLaVA tokenizer_image_token (tokenize the text around <image> separately, drop the inner BOS)."""
    from transformers import AutoTokenizer, LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    model, tok = ours
    question = "What is unusual about this image? Answer in one sentence."
    ids, start = tok.encode_prompt(question, conv)
    text = P.TEMPLATES[conv].format(question)
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                               crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}), tokenizer=AutoTokenizer.from_pretrained(ckpt[0]),
                               patch_size=PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    assert processor(images=random_image(0), text=text, return_tensors="pt").input_ids[0].tolist() == ids
    file_as_is = PreTrainedTokenizerFast(tokenizer_file=os.path.join(ckpt[0], "tokenizer.json"))
    before, after = text.split("<image>")
    original = file_as_is(before).input_ids + [model.config.image_token_index] * 64 + file_as_is(after).input_ids[1:]
    assert original == ids
    assert ids[start:start + 64] == [model.config.image_token_index] * 64 and ids[start - 1] != ids[start]
    assert ids[start + 64] == tok.tok.token_to_id("▁")  # the '▁' before '\n' that legacy=False tokenizers lose


def test_stream_decoder_multibyte(ours):
    _, tok = ours
    text = "A café, 日本語 and 🙂 emoji."
    ids = tok.tok.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text) // 2  # byte-fallback pieces: a character spans several ids
    stream = G.StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert stream.push(tok.tok.token_to_id("<0xF0>")) == ""  # the first of 🙂's four bytes: held back
    assert stream.flush() == "\ufffd"


# ----------------------------------------------------------------------------------------------------------------------
# bad input gives a clear error


def test_checkpoint_errors(ckpt, tmp_path):
    import shutil
    from safetensors.torch import load_file, save_file
    folder, hf = ckpt
    with pytest.raises(FileNotFoundError, match="llava-hf/llava-1.5-7b-hf"):
        M.Llava.from_pretrained(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    os.remove(partial / "model-00002-of-00003.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        M.Llava.from_pretrained(partial)
    single = save_checkpoint(hf, str(tmp_path / "single"), "transformers5")
    sd = load_file(os.path.join(single, "model.safetensors"))
    save_file({k: v for k, v in sd.items() if k != "language_model.model.norm.weight"}, os.path.join(single, "model.safetensors"))
    with pytest.raises(ValueError, match="missing.*language_model.model.norm.weight"):
        M.Llava.from_pretrained(single)
    save_file(dict(sd, **{"language_model.model.extra.weight": torch.zeros(2)}), os.path.join(single, "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected tensor 'language_model.model.extra.weight'"):
        M.Llava.from_pretrained(single)
    save_file(sd, os.path.join(single, "model.safetensors"))
    config = json.loads(open(os.path.join(single, "config.json")).read())
    config["text_config"]["intermediate_size"] = 100
    with open(os.path.join(single, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"mlp.*shape \(64, 128\) but config.json implies \(64, 100\)"):
        M.Llava.from_pretrained(single)
    os.rename(os.path.join(single, "model.safetensors"), os.path.join(single, "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match="pickled"):
        M.Llava.from_pretrained(single)


def test_input_errors(ckpt, ours, tmp_path):
    model, tok = ours
    ids, lengths, px = prompt_inputs(ours, ["What is in the image?"], [0])
    with pytest.raises(ValueError, match="64 image ids"):
        model(ids[:, :-70], px)  # lost some image ids
    with pytest.raises(ValueError, match="features"):
        model(ids, torch.cat([px, px]))  # two images, one image's ids
    with pytest.raises(ValueError, match=r"pixel_values must be \(n_images, 3, 112, 112\)"):
        model(ids, px[:, :, :56])
    with pytest.raises(ValueError, match="context of 512"):
        G.generate(model, tok, [random_image(0)], ["What is in the image?"], max_new_tokens=500)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="not an image Pillow can read"):
        P.preprocess(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        P.preprocess(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="must not contain '<image>'"):
        tok.encode_prompt("look: <image>")
    with pytest.raises(ValueError, match="Unknown conversation template"):
        tok.encode_prompt("hi", conv="chatml")
    wrong = M.LlavaConfig(image_token_index=5)
    with pytest.raises(ValueError, match="do not belong together"):
        P.Tokenizer(ckpt[0], wrong)
