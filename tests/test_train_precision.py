"""
The predictor's gradient in half precision against float32's at LLaVA-1.5-7B's decoder width (hidden 4096, 32 heads,
MLP 11008, vocabulary 32064; three decoder layers, a tiny CLIP): why train.py trains in bfloat16 and refuses float16.
On the CPU float32 and bfloat16 only (its float16 matmuls are not vectorised: one such step took 11 minutes on 2
cores); on CUDA, where there is a GPU, float16's cosine is printed too. 7-18 s and 2.8 GB on 2 CPU cores.

    python -m pytest -q -s tests/test_train_precision.py      # -s shows the figures
"""
import copy
import re
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dyrate
import model
import train

K = 1
FP16_SMALLEST_NORMAL = 2.0 ** -14  # 6.1e-5; float16's subnormals reach down to 2^-24 (6e-8), below half that is 0
# device: (image size, samples, answer tokens). The CPU's is small for its speed (16 image tokens, one sample); CUDA's
# is a training step's: 8 samples of LLaVA's 576 image tokens and 64-token answers.
GEOMETRY = {"cpu": (56, 1, 8), "cuda": (336, 8, 64)}


def seven_b_width(image_size, layers=3):
    """Our Llava at 7B's decoder width, its decoder layers sharing one random layer's weights (normal(0, 0.02), norms
    1, as tools/bench_train.py's checkpoints), which halves the time to build it; a 2-layer CLIP of width 64."""
    vision = model.VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                image_size=image_size)
    cfg = model.LlavaConfig(vision=vision, text=model.TextConfig(num_hidden_layers=layers), vision_feature_layer=-1)
    with torch.device("meta"):
        llava = model.Llava(cfg)
    g, made, state = torch.Generator().manual_seed(0), {}, {}
    for name, p in llava.state_dict().items():
        shared = re.sub(r"language_model\.model\.layers\.\d+\.", "layer.", name)
        if shared not in made:
            made[shared] = (torch.zeros(p.shape) if name.endswith("bias") else torch.ones(p.shape) if "norm" in name
                            else torch.empty(p.shape).normal_(0, 0.02, generator=g))
        state[name] = made[shared]
    llava.load_state_dict(state, assign=True)
    llava.language_model.model.inv_freq = model.rope_inv_freq(cfg.text)
    return llava.eval().requires_grad_(False)


def predictor_gradient(llava, samples, device):
    """The predictor's gradient from the KL term alone (--budget-weight 0: the budget's is float32 in any dtype), and
    the per-logit gradient leaving the LM head (its magnitudes)."""
    args = train.parse_args(["--model", "m", "--data", "d", "--out", "o", "--device", device, "--k", str(K),
                             "--budget-weight", "0"])
    torch.manual_seed(0)
    predictor = dyrate.RatePredictor(32, [i / 8 for i in range(9)], K)
    with torch.no_grad():
        predictor.linear.weight.normal_(0, 3.0)  # varied rates, as test_train.py's step_gradient
    predictor = predictor.to(device)
    per_logit = []
    hook = llava.language_model.lm_head.register_full_backward_hook(lambda m, gin, gout: per_logit.append(gout[0]))
    try:
        train.train_step(llava, predictor, samples, args, 0.7, torch.Generator(device).manual_seed(5), Counter())
    finally:
        hook.remove()
    grad = torch.cat([predictor.linear.weight.grad.flatten(), predictor.linear.bias.grad])
    return grad.double().cpu(), per_logit[0].float().abs().cpu()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_bfloat16_keeps_the_predictor_gradient_that_float16_holds_as_subnormals(device, tmp_path):
    """The KL's gradient leaves the LM head as per-logit values nearly all below float16's smallest normal number
    (measured here on the CPU: median 3e-7, 10% of them round to 0; they scale as 1 / the batch's answer tokens, so
    a real batch's, 8 x 64 tokens, are ~60x smaller); bfloat16 (float32's range) keeps float32's gradient direction.
    Threshold: cosine > 0.99 (8 degrees), where bfloat16's rounding (2^-9 relative, compounded over the layers)
    measured 0.9995 here; a gradient whose direction drifts further trains another predictor."""
    image_size, n_samples, n_answer = GEOMETRY[device]
    llava = seven_b_width(image_size).to(device)
    rng, path = np.random.default_rng(1), str(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(path)
    cfg, samples = llava.config, []
    for _ in range(n_samples):
        text = rng.integers(3, cfg.image_token_index, 8).tolist()
        ids = [cfg.bos_token_id] + text[:4] + [cfg.image_token_index] * cfg.n_image_tokens + text[4:]
        answer = rng.integers(3, cfg.image_token_index, n_answer - 1).tolist() + [cfg.eos_token_id]
        samples.append(train.Sample(path, "", ids, 5, answer))
    reference, per_logit = predictor_gradient(llava, samples, device)
    subnormal = (per_logit < FP16_SMALLEST_NORMAL).double().mean().item()
    print(f"\n{device}: per-logit gradient median {per_logit.median():.2g}, max {per_logit.max():.2g}; "
          f"{subnormal:.2%} below float16's smallest normal, {(per_logit < 2.0 ** -25).double().mean():.2%} round to 0")
    assert subnormal > 0.99
    dtypes = (torch.float16, torch.bfloat16) if device == "cuda" else (torch.bfloat16,)
    for dtype in dtypes:
        half = (llava if dtype == dtypes[-1] else copy.deepcopy(llava)).to(dtype)  # the last one converts in place
        half.language_model.model.inv_freq = model.rope_inv_freq(half.config.text).to(device)  # fp32, as loaded
        grad, _ = predictor_gradient(half, samples, device)
        cosine = F.cosine_similarity(grad, reference, dim=0).item()
        print(f"{device} {dtype}: cosine with float32's gradient {cosine:.5f}, |difference| / |float32's| "
              f"{(grad - reference).norm() / reference.norm():.3f}")
        if dtype == torch.bfloat16:
            assert cosine > 0.99
