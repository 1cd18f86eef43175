"""
Shared test fixtures: tiny random LLaVA checkpoints built with transformers (the reference) in llava-hf's formats,
with a tokenizer.json built by the `tokenizers` library in llava-hf's structure; and the placements (device, dtype)
the device-parametrised tests run in, with the tolerance of each dtype.

    python -m pytest -q                      # CPU float32, and CUDA float32/float16/bfloat16 where a GPU is
    python -m pytest -q --half-on-cpu        # also CPU bfloat16 and float16
"""
import copy
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import model
import processing
from tools import tokenizer

IMAGE_SIZE, PATCH = 112, 14  # 8 x 8 = 64 image tokens


def assert_close(actual, expected, atol, what=""):
    diff = (actual.double() - expected.double()).abs()
    assert diff.max() <= atol, f"{what}: max|diff| {diff.max():.3g} (mean {diff.mean():.3g}) > {atol}"


# ----------------------------------------------------------------------------------------------------------------------
# placements: where the device-parametrised tests run (a `placement` argument), and what each dtype may differ by

CUDA = torch.cuda.is_available()
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# How far two computations of the same logits (or gradients) may be apart, as a fraction of their largest magnitude:
# the one place tolerances are stated. float32: measured 2e-7 against transformers on the CPU; GPU kernels round
# differently (cuDNN's TF32 convolution in CLIP's patch embedding, other attention kernels), hence 1e-4. Half
# precision: one rounding of a logit near 1 is 2^-8 (bfloat16) or 2^-11 (float16); a forward through a few layers
# compounds several, and transformers' own eager and sdpa paths differ by ~10 roundings (~1e-3 fp16, ~6e-3 bf16 on
# LLaVA-1.5 logits, with the same argmax: transformers' LlavaForConditionalGeneration, eager against sdpa).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}
# A decode step's probed attention (model.py: explicit fp32 softmax and PV, then the dtype) against SDPA's, as a
# fraction of the output's largest magnitude: measured at 7B width 1.1e-6 in float32 and one bfloat16 rounding
# (2^-8, the output's own) in bfloat16, where both lie 4.9e-3 from float64; allowed: 1e-5 and two roundings.
EXPLICIT_ATTENTION = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7}


def pytest_addoption(parser):
    parser.addoption("--half-on-cpu", action="store_true", default=False,
                     help="also run the device-parametrised tests in bfloat16 and float16 on the CPU")


def pytest_generate_tests(metafunc):
    """A test with a `placement` argument runs on the CPU in float32, with --half-on-cpu in half precision too, and
    on CUDA in every dtype (skipped, with the reason, where there is no GPU)."""
    if "placement" not in metafunc.fixturenames:
        return
    params = [pytest.param(("cpu", torch.float32), id="cpu-float32")]
    if metafunc.config.getoption("half_on_cpu"):
        params += [pytest.param(("cpu", DTYPES[n]), id=f"cpu-{n}") for n in ("bfloat16", "float16")]
    params += [pytest.param(("cuda", dt), id=f"cuda-{n}", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"))
               for n, dt in DTYPES.items()]
    metafunc.parametrize("placement", params)


def greedy_agrees(logits, tokens, reference_logits, dtype):
    """Our logits (n, V) of n greedy steps choose the reference's tokens (n,) wherever the reference decides: a step
    whose two best reference logits lie within the dtype's tolerance of each other is a tie either may break."""
    top2 = reference_logits.float().topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 2 * TOLERANCE[dtype] * reference_logits.float().abs().max()
    return bool(((logits.argmax(-1) == tokens) | ~decisive).all())


# ----------------------------------------------------------------------------------------------------------------------
# tiny checkpoints in llava-hf's formats

CORPUS = ["USER: What is in the image? ASSISTANT: A red circle and a blue square on a white background.",
          "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.", "Provide a one-sentence caption for the provided "
          "image. Describe the picture. How many shapes are there? There are two shapes: a green triangle."] * 20


def build_tokenizer(folder, legacy=True):
    """The shapes model's tokenizer builder (llava-hf's structure) on a small corpus."""
    return tokenizer.build_tokenizer(folder, CORPUS, 160, legacy)


def make_hf(image_id, pad_id, kv_heads=4, head_dim=16, seed=0, layers=4):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=16, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=pad_id + 15, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=head_dim, rms_norm_eps=1e-5,
                       max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id, pad_token_id=pad_id,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    hf = LlavaForConditionalGeneration(cfg)
    with torch.no_grad():  # default norm init is exactly 1 / 0, which would hide a swapped or missing norm
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    hf.generation_config.pad_token_id = pad_id
    return hf.eval()


def save_checkpoint(hf, folder, layout):
    """layout: 'hub' (sharded, vision_tower.vision_model.*), 'transformers5' (save_pretrained as is) or
    'memory457' (transformers 4.52-4.57's in-memory names: model.language_model.*, lm_head.*, ...)."""
    from safetensors.torch import load_file, save_file
    hf.save_pretrained(folder)
    if layout == "transformers5":
        return folder
    path = os.path.join(folder, "model.safetensors")
    if layout == "memory457":
        sd = {k.replace("model.vision_tower.", "model.vision_tower.vision_model."): v.contiguous()
              for k, v in hf.state_dict().items()}
        save_file(sd, path)
        return folder
    sd = {k.replace("vision_tower.", "vision_tower.vision_model."): v for k, v in load_file(path).items()}
    os.remove(path)
    keys, weight_map = sorted(sd), {}
    for i, part in enumerate(np.array_split(np.array(keys), 3)):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: sd[k] for k in part}, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return folder


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """A hub-layout (sharded) tiny checkpoint with its tokenizer, and the HF reference model (eager attention)."""
    folder = str(tmp_path_factory.mktemp("tiny"))
    image_id, pad_id = build_tokenizer(folder)
    hf = make_hf(image_id, pad_id)
    save_checkpoint(hf, folder, "hub")
    hf.set_attn_implementation("eager")
    return folder, hf


@pytest.fixture(scope="session")
def ours(ckpt):
    llava = model.Llava.from_pretrained(ckpt[0])
    return llava, processing.Tokenizer(ckpt[0], llava.config)


@pytest.fixture(scope="session")
def placed(ckpt):
    """placed((device, dtype)) -> our Llava loaded from the tiny checkpoint and transformers' reference, both there
    (each made once)."""
    made = {}

    def get(placement):
        if placement not in made:
            device, dtype = placement
            made[placement] = (model.Llava.from_pretrained(ckpt[0], device, dtype),
                               copy.deepcopy(ckpt[1]).to(device, dtype))
        return made[placement]
    return get


def random_image(seed, size=(160, 120)):
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    noise = rng.integers(0, 255, (h, w, 3))
    return Image.fromarray(((ramp + noise) / 2).astype(np.uint8))


def prompt_inputs(ours, prompts, seeds):
    """input_ids (B, T) padded at the end, lengths (B,), pixel values (B, 3, S, S) for image/prompt pairs."""
    llava, tok = ours
    encoded = [tok.encode_prompt(p)[0] for p in prompts]
    T = max(map(len, encoded))
    ids = torch.tensor([e + [llava.config.pad_token_id] * (T - len(e)) for e in encoded])
    px = torch.stack([processing.preprocess(random_image(s), IMAGE_SIZE) for s in seeds])
    return ids, torch.tensor(list(map(len, encoded))), px
