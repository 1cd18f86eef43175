"""
Tests of model.py against HF transformers' LLaVA (the reference): config, logits, features, attention probe, cached
decoding, loading in every checkpoint key layout and its errors. Tiny random LLaVA models are built with
transformers, saved in the real layouts and loaded through the real Llava.from_pretrained path; CPU, seconds.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import generate
import cli
import model
from conftest import EXPLICIT_ATTENTION, TOLERANCE, assert_close, make_hf, prompt_inputs, random_image, save_checkpoint


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
    cfg = model.LlavaConfig.from_json(tmp_path / "config.json")
    t, v = cfg.text, cfg.vision
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads) == (4096, 11008, 32, 32)
    assert (t.num_key_value_heads, t.head_dim, t.rms_norm_eps, t.rope_theta, t.vocab_size) == \
        (32, 128, 1e-5, 1e4, 32064)
    assert (v.hidden_act, v.layer_norm_eps, cfg.n_image_tokens, cfg.n_vision_layers_used) == \
        ("quick_gelu", 1e-5, 576, 23)
    assert (cfg.image_token_index, cfg.pad_token_id, cfg.eos_token_id) == (32000, 32001, 2)
    # 13B sizes, and theta in the newer rope_parameters form
    hub = json.loads(json.dumps(HUB_7B))
    hub["text_config"].update(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                              rope_parameters={"rope_theta": 5e5, "rope_type": "default"})
    (tmp_path / "config.json").write_text(json.dumps(hub))
    t = model.LlavaConfig.from_json(tmp_path / "config.json").text
    assert (t.num_key_value_heads, t.head_dim, t.rope_theta) == (40, 128, 5e5)
    hub["text_config"]["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    hub["text_config"].pop("rope_parameters")
    (tmp_path / "config.json").write_text(json.dumps(hub))
    with pytest.raises(ValueError, match="RoPE scaling"):
        model.LlavaConfig.from_json(tmp_path / "config.json")


# ----------------------------------------------------------------------------------------------------------------------
# parity with transformers


@pytest.mark.parametrize("layout", ["hub", "transformers5", "memory457"])
def test_logits_and_features_match_transformers(layout, ckpt, ours, tmp_path):
    folder, hf = ckpt
    llava = ours[0] if layout == "hub" else model.Llava.from_pretrained(save_checkpoint(hf, str(tmp_path), layout))
    ids, _, px = prompt_inputs(ours, ["What is in the image?"], [0])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px)
        assert_close(llava(ids, px), ref.logits, 1e-5, f"fp32 logits ({layout})")
        hf.set_attn_implementation("sdpa")  # same attention kernel in the vision tower: bit-identical features
        ref_features = hf.model.get_image_features(pixel_values=px).pooler_output[0]
        hf.set_attn_implementation("eager")
        assert torch.equal(llava.multi_modal_projector(llava.vision_features(px))[0], ref_features)


def test_logits_match_transformers_on_every_device(ours, placement, placed):
    """Our forward against transformers' (eager) on the same weights, device and dtype, within the dtype's
    tolerance (conftest.TOLERANCE)."""
    device, dtype = placement
    llava, hf = placed(placement)
    ids, _, px = prompt_inputs(ours, ["What is in the image?"], [0])
    ids, px = ids.to(device), px.to(device, dtype)
    with torch.no_grad():
        ref, got = hf(input_ids=ids, pixel_values=px).logits, llava(ids, px)
    assert got.dtype == ref.dtype == dtype and got.device.type == device
    assert_close(got, ref, TOLERANCE[dtype] * float(ref.abs().max()), f"logits {placement}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_probe_attention_is_sdpas_within_the_stated_tolerance_at_7b_width(dtype):
    """At a decode step the probed layer computes its attention explicitly, once, and returns both its output and its
    probabilities (no second read of the keys): at LLaVA-1.5-7B's width (32 heads of 128, a 680-token cache, a ragged
    row) the output is SDPA's within conftest.EXPLICIT_ATTENTION."""
    torch.manual_seed(0)
    B, H, S, hs = 2, 32, 680, 128
    q, k, v = (torch.randn(B, H, n, hs).to(dtype) for n in (1, S, S))
    q = 3 * q  # peaked attention, as a trained model's
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[1, ..., 600:] = False
    attn = model.LlamaAttention(model.TextConfig()).to(dtype)
    cache = model.KVCache(B, 1, H, hs, dtype, "cpu")
    cache.reserve(S)
    cache.update(k, v, torch.arange(S).expand(B, S), torch.tensor([S, 600]))
    cache.reserve(1)
    rope = (torch.ones(B, 1, 1, hs, dtype=dtype), torch.zeros(B, 1, 1, hs, dtype=dtype), torch.full((B, 1), S))
    with torch.no_grad():  # identity projections: what attention sees is q, k, v themselves
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            proj.weight.copy_(torch.eye(H * hs, dtype=dtype))
        out, probs = attn(q.transpose(1, 2).reshape(B, 1, H * hs), rope, cache, torch.ones(B, dtype=torch.long),
                          probe_rows=torch.zeros(B, 1, dtype=torch.long))
    # the new token (key = value = q, as the identity projections make them) joins the cache: SDPA over all S + 1
    keys, values = torch.cat([k, q], 2), torch.cat([v, q], 2)
    full = torch.cat([mask, torch.ones(B, 1, 1, 1, dtype=torch.bool)], -1)
    full[1, ..., 600] = True  # row 1 wrote its token at its own length, slot 600
    full[1, ..., S] = False
    keys[1, :, 600], values[1, :, 600] = q[1, :, 0], q[1, :, 0]
    ref = F.scaled_dot_product_attention(q, keys, values, attn_mask=full, scale=hs ** -0.5)
    got = out.view(B, 1, H, hs).transpose(1, 2)
    assert probs.dtype == torch.float32 and probs.shape == (B, H, 1, S + 1)
    assert_close(got.float(), ref.float(), EXPLICIT_ATTENTION[dtype] * float(ref.float().abs().max()),
                 f"explicit against SDPA, {dtype}")


def test_bf16_logits_within_transformers_own_error(ckpt, ours):
    """bf16: our logits are as close to HF eager bf16 as HF's own sdpa is, and no further from the fp32 truth."""
    from transformers import LlavaForConditionalGeneration
    folder, hf32 = ckpt
    ids, _, px = prompt_inputs(ours, ["Describe the picture in detail."], [1])
    llava = model.Llava.from_pretrained(folder, dtype=torch.bfloat16)
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="eager").eval()
    with torch.no_grad():
        truth = hf32(input_ids=ids, pixel_values=px).logits
        ref, got = hf(input_ids=ids, pixel_values=px.bfloat16()).logits, llava(ids, px.bfloat16())
    assert_close(got, ref, 0.02, "bf16 logits vs HF eager bf16")
    assert (got.float() - truth).abs().max() <= 1.5 * (ref.float() - truth).abs().max()


def test_gqa_and_explicit_head_dim_match_transformers(ckpt, ours, tmp_path):
    folder, _ = ckpt
    hf = make_hf(ours[0].config.image_token_index, ours[0].config.pad_token_id, kv_heads=2, head_dim=24, seed=1)
    llava = model.Llava.from_pretrained(save_checkpoint(hf, str(tmp_path), "transformers5"))
    assert (llava.config.text.num_key_value_heads, llava.config.text.head_dim) == (2, 24)
    hf.set_attn_implementation("eager")
    ids, lengths, px = prompt_inputs(ours, ["What is in the image?", "How many shapes are there?"], [2, 3])
    with torch.no_grad():
        assert_close(llava(ids, px), hf(input_ids=ids, pixel_values=px).logits, 1e-5, "GQA logits")
        caches = llava.new_caches(2, 1)  # the cached path with GQA and ragged rows too
        last = llava.prefill(ids, caches, lengths, px)
        full = hf(input_ids=ids, pixel_values=px).logits
    assert_close(last, full[torch.arange(2), lengths - 1], 1e-5, "GQA cached prefill")


def test_probe_gives_hf_attention_probabilities(ckpt, ours):
    """The probe (explicit softmax for chosen query rows, inside the normal forward) equals HF eager's attentions."""
    llava, _ = ours
    ids, lengths, px = prompt_inputs(ours, ["What is in the image?"], [4])

    class Probe:  # the pruner hook, used only to read one layer's attention
        k = 2

        def stages(self, n_layers):
            return [self.k]

        def probe_rows(self, n_valid, T, stage=0):
            return torch.stack([n_valid - 1, n_valid - 5], dim=1)  # (B, 2): the last token and another row

        def __call__(self, probs, x, positions, n_valid, caches, stage=0):
            self.probs = probs
            return x, positions, n_valid, None

    probe = Probe()
    with torch.no_grad():
        llava.prefill(ids, llava.new_caches(1, 0), lengths, px, probe)
        ref = ckpt[1](input_ids=ids, pixel_values=px, output_attentions=True).attentions[1][0]  # layer 1: (nh, T, T)
    T = ids.shape[1]
    assert probe.probs.shape == (1, 4, 2, T)
    assert_close(probe.probs[0], ref[:, [T - 1, T - 5]], 1e-6, "probe vs HF attentions")


def test_cached_decode_equals_no_cache_forward_at_every_step(ours):
    """Two ragged rows: each step's cached logits equal a fresh full forward over that row's sequence so far."""
    llava, _ = ours
    ids, lengths, px = prompt_inputs(ours, ["What is in the image?", "Provide a one-sentence caption."], [6, 7])
    B, steps = 2, 8
    seqs = [ids[b, :lengths[b]].tolist() for b in range(B)]
    caches = llava.new_caches(B, steps)
    with torch.no_grad():
        logits = llava.prefill(ids, caches, lengths, px)
        for t in range(steps):
            for b in range(B):
                full = llava(torch.tensor([seqs[b]]), px[b:b + 1])[0, -1]
                assert_close(logits[b], full, 1e-5, f"row {b} step {t}")
            token = logits.argmax(-1)
            for b in range(B):
                seqs[b].append(int(token[b]))
            logits = llava.decode_step(token, lengths + t, caches)


# ----------------------------------------------------------------------------------------------------------------------
# loading, and bad input


def test_loading_holds_one_copy_in_memory(tmp_path):
    """An fp16 checkpoint loaded as fp32 in a fresh process: anonymous memory grows by the fp32 model, not more (the
    fp16 source stays in the reclaimable page cache, memory-mapped); loaded as fp16 it is not even copied."""
    import subprocess
    import sys
    from safetensors.torch import save_file
    cfg = model.LlavaConfig(vision=model.VisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                      intermediate_size=128),
                            text=model.TextConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                                                  num_key_value_heads=8, head_dim=64, intermediate_size=1376))
    save_file({k: v.half().contiguous() for k, v in model.Llava(cfg).state_dict().items()},
              tmp_path / "model.safetensors")
    sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {k: getattr(cfg.text, k) for k in sizes},
                                                      "vision_config": {k: getattr(cfg.vision, k) for k in sizes}}))
    script = ("import sys, torch, model\n"  # warm-up first: torch's one-time buffers and meta-device registrations
              "anon = lambda: int([line for line in open('/proc/self/status')\n"
              "                    if line.startswith('RssAnon')][0].split()[1]) * 1024\n"
              "with torch.device('meta'):\n"
              "    model.Llava(model.LlavaConfig.from_json(sys.argv[1] + '/config.json'))\n"
              "torch.ones(8, dtype=torch.float16).float() @ torch.ones(8, 8)\n"
              "before = anon()\n"
              "m = model.Llava.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))\n"
              "print(anon() - before, sum(p.numel() * p.element_size() for p in m.parameters()))\n")
    for dtype, bound in (("float32", 1.1), ("float16", 0.1)):
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path), dtype], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=True).stdout
        grown, size = map(int, out.split())
        assert size > 100e6 and grown <= bound * size + 16e6, \
            f"{dtype}: anonymous memory grew {grown / 1e6:.0f} MB for a {size / 1e6:.0f} MB model"


def test_checkpoint_errors(ckpt, tmp_path):
    import shutil
    from safetensors.torch import load_file, save_file
    folder, hf = ckpt
    with pytest.raises(FileNotFoundError, match="No LLaVA checkpoint"):
        model.Llava.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="llava-hf/llava-1.5-7b-hf"):  # the command lines add how to get one
        cli.checkpoint(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="is a file: pass the checkpoint folder"):
        model.Llava.from_pretrained(os.path.join(folder, "config.json"))
    with pytest.raises(ValueError, match="dtype must be a torch dtype"):
        model.Llava.from_pretrained(folder, "cpu", "float16")
    with pytest.raises(ValueError, match="not a device torch knows"):
        model.Llava.from_pretrained(folder, "gpu")
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    os.remove(partial / "model-00002-of-00003.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        model.Llava.from_pretrained(partial)
    single = save_checkpoint(hf, str(tmp_path / "single"), "transformers5")
    sd = load_file(os.path.join(single, "model.safetensors"))
    save_file({k: v for k, v in sd.items() if k != "language_model.model.norm.weight"},
              os.path.join(single, "model.safetensors"))
    with pytest.raises(ValueError, match="missing.*language_model.model.norm.weight"):
        model.Llava.from_pretrained(single)
    save_file(dict(sd, **{"language_model.model.extra.weight": torch.zeros(2)}),
              os.path.join(single, "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected tensor 'language_model.model.extra.weight'"):
        model.Llava.from_pretrained(single)
    save_file(sd, os.path.join(single, "model.safetensors"))
    config = json.loads(open(os.path.join(single, "config.json")).read())
    config["text_config"]["intermediate_size"] = 100
    with open(os.path.join(single, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"mlp.*shape \(64, 128\) but config.json implies \(64, 100\)"):
        model.Llava.from_pretrained(single)
    os.rename(os.path.join(single, "model.safetensors"), os.path.join(single, "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match="pickled"):
        model.Llava.from_pretrained(single)


def test_input_errors(ckpt, ours, tmp_path):
    llava, tok = ours
    ids, lengths, px = prompt_inputs(ours, ["What is in the image?"], [0])
    with pytest.raises(ValueError, match="64 image ids"):
        llava(ids[:, :-70], px)  # lost some image ids
    with pytest.raises(ValueError, match="features"):
        llava(ids, torch.cat([px, px]))  # two images, one image's ids
    with pytest.raises(ValueError, match=r"pixel_values must be \(n_images, 3, 112, 112\)"):
        llava(ids, px[:, :, :56])
    with pytest.raises(ValueError, match="context of 512"):
        generate.generate(llava, tok, [random_image(0)], ["What is in the image?"], max_new_tokens=500)


def test_corrupt_files_are_clear_errors(ckpt, tmp_path):
    import shutil
    folder = tmp_path / "c"
    shutil.copytree(ckpt[0], folder)
    shard = folder / "model-00001-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # a truncated download
    with pytest.raises(ValueError, match="model-00001-of-00003.safetensors is not a readable safetensors file"):
        model.Llava.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    for text, message in (("{broken", "config.json is not valid JSON"), ("[1, 2]", "the file must be a JSON object"),
                          (json.dumps(dict(config, text_config=[1])), "text_config must be a JSON object"),
                          (json.dumps(dict(config, text_config=dict(config["text_config"], hidden_size="big"))),
                           "hidden_size = 'big' is not of type int"),
                          (json.dumps(dict(config, text_config=dict(config["text_config"], eos_token_id=[2, 3]))),
                           r"eos_token_id = \[2, 3\] is not of type int \(LLaVA-1.5-7B has 2\)"),
                          (json.dumps(dict(config, vision_feature_layer=[-2, -5])), "vision_feature_layer = .* int"),
                          (json.dumps(dict(config, projector_hidden_act="relu")), "unsupported projector_hidden_act"),
                          (json.dumps(dict(config, text_config=dict(config["text_config"], num_key_value_heads=3))),
                           "unsupported key/value head count")):
        (folder / "config.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            model.read_config(folder)
