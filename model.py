"""
LLaVA-1.5 from scratch: CLIP ViT-L/14-336 -> 2-layer GELU projector -> Llama (Vicuna), computing what transformers'
LlavaForConditionalGeneration computes (tests/test_model.py); module names mirror the llava-hf checkpoint keys. Seams:
LlamaModel.forward's `pruner` (dyrate.py); Llava.cache_class and LlamaModel.layers_forward (tools/fast.py).

    model = Llava.from_pretrained("path/to/llava-1.5-7b-hf", device="cuda", dtype=torch.float16)
"""
import json
import os
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import SafetensorError, safe_open

import dyrate

# ----------------------------------------------------------------------------------------------------------------------
# Configs. Defaults are LLaVA-1.5-7B's; the hub config.json lists only some fields, the rest are these.


@dataclass
class VisionConfig:
    """CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336)."""
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14  # 336 / 14 = 24 x 24 = 576 patches
    num_channels: int = 3
    layer_norm_eps: float = 1e-5  # the hub file omits it
    hidden_act: str = "quick_gelu"  # NOTE: x * sigmoid(1.702 x), not GELU; the hub file omits it too


@dataclass
class TextConfig:
    """Vicuna-7B v1.5, a Llama-2 decoder. The hub file gives only vocab size, max positions and rms_norm_eps."""
    vocab_size: int = 32064  # Llama-2's 32000 + <image> + <pad>, padded to a multiple of 64
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32  # fewer than the attention heads = grouped-query attention
    head_dim: int = 128  # hidden_size // num_attention_heads unless the file says otherwise
    rms_norm_eps: float = 1e-5  # NOTE: LLaVA's file says 1e-5; the generic Llama default is 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    hidden_act: str = "silu"


@dataclass
class LlavaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_index: int = 32000
    pad_token_id: int = 32001
    bos_token_id: int = 1
    eos_token_id: int = 2
    vision_feature_layer: int = -2  # NOTE: the image feature is the output of the second-to-last CLIP block
    vision_feature_select_strategy: str = "default"  # "default" drops the CLS token, "full" keeps it
    projector_hidden_act: str = "gelu"  # NOTE: exact (erf) GELU here, unlike CLIP's quick_gelu

    @property
    def n_image_tokens(self):  # image features = image token ids in the prompt, per image: 576 for LLaVA-1.5
        return (self.vision.image_size // self.vision.patch_size) ** 2 + (self.vision_feature_select_strategy == "full")

    @property
    def n_vision_layers_used(self):  # hidden_states[f] is the output of block f-1, hidden_states[0] the embeddings
        return self.vision_feature_layer % (self.vision.num_hidden_layers + 1)

    def check_length(self, n_tokens):
        limit = self.text.max_position_embeddings
        if n_tokens > limit:
            raise ValueError(f"{n_tokens} tokens (prompt with its {self.n_image_tokens} image tokens, plus new tokens) "
                             f"exceed the model's context of {limit}: shorten the prompt or ask for fewer tokens.")

    @classmethod
    def from_json(cls, path):
        """config.json's values over our defaults (null = absent), or a ValueError saying what is wrong."""
        try:
            with open(path) as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); the download may be incomplete.") from None
        subs = ("text_config", "vision_config")
        for what, v in [("the file", d)] + [(k, d[k]) for k in subs if isinstance(d, dict) and d.get(k) is not None]:
            if not isinstance(v, dict):
                raise ValueError(f"{path}: {what} must be a JSON object, not {type(v).__name__}: is this LLaVA-1.5's?")
        tc, vc = (d.get(k) or {} for k in subs)
        rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}  # newer files keep theta in rope_parameters

        def pick(dc, src):  # the fields src gives, type-checked against our defaults' types
            given = {f.name: src[f.name] for f in fields(dc) if src.get(f.name) is not None}
            for name, value in given.items():
                default = getattr(dc, name, None)  # None for the nested configs
                want = (int, float) if type(default) is float else type(default)
                if type(default) in (int, float, str) and (isinstance(value, bool) or not isinstance(value, want)):
                    raise ValueError(f"{path}: {name} = {value!r} is not of type {type(default).__name__} "
                                     f"(LLaVA-1.5-7B has {default!r}).")
            return dc(**given)
        text = pick(TextConfig, {"rope_theta": rope.get("rope_theta"), **tc})
        text.num_key_value_heads = tc.get("num_key_value_heads") or text.num_attention_heads
        text.head_dim = tc.get("head_dim") or text.hidden_size // text.num_attention_heads
        cfg = pick(cls, {**d, **{k: tc[k] for k in ("bos_token_id", "eos_token_id") if tc.get(k) is not None}})
        cfg.vision, cfg.text = pick(VisionConfig, vc), text
        v, strategy = cfg.vision, cfg.vision_feature_select_strategy
        for ok, what in [(rope.get("rope_type", rope.get("type", "default")) == "default", f"RoPE scaling {rope}"),
                         (text.hidden_act == "silu", f"text hidden_act {text.hidden_act!r}"),
                         (v.hidden_act in ("quick_gelu", "gelu"), f"vision hidden_act {v.hidden_act!r}"),
                         (cfg.projector_hidden_act == "gelu", f"projector_hidden_act {cfg.projector_hidden_act!r}"),
                         (strategy in ("default", "full"), f"vision_feature_select_strategy {strategy!r}"),
                         (text.num_attention_heads % text.num_key_value_heads == 0, "key/value head count")]:
            if not ok:
                raise ValueError(f"{path}: unsupported {what}. This is a LLaVA-1.5 (CLIP + Llama) implementation.")
        return cfg


# ----------------------------------------------------------------------------------------------------------------------
# CLIP vision tower (vision_tower.vision_model.*) and the projector (multi_modal_projector.*)


class CLIPEncoderLayer(nn.Module):
    """A pre-LN ViT block: bidirectional attention, its projections with biases; an MLP with quick_gelu."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        C, self.n_head, self.quick_gelu = cfg.hidden_size, cfg.num_attention_heads, cfg.hidden_act == "quick_gelu"
        self.self_attn = nn.ModuleDict({name: nn.Linear(C, C) for name in ("q_proj", "k_proj", "v_proj", "out_proj")})
        self.layer_norm1 = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(C, cfg.intermediate_size), fc2=nn.Linear(cfg.intermediate_size, C)))
        self.layer_norm2 = nn.LayerNorm(C, eps=cfg.layer_norm_eps)

    def forward(self, x, probe=False):
        """x (B, T, C) -> (B, T, C); probe=True: also the CLS token's attention (B, nh, T) and the keys (B, nh, T, hs)
        (what VisionZip chooses and merges the image tokens by)."""
        (B, T, C), attn, mlp = x.shape, self.self_attn, self.mlp
        h, hs = self.layer_norm1(x), C // self.n_head
        q, k, v = [attn[name](h).view(B, T, self.n_head, hs).transpose(1, 2) for name in ("q_proj", "k_proj", "v_proj")]
        y = F.scaled_dot_product_attention(q, k, v, scale=hs ** -0.5)  # (B, nh, T, hs)
        x = x + attn.out_proj(y.transpose(1, 2).reshape(B, T, C))
        h = mlp.fc1(self.layer_norm2(x))
        x = x + mlp.fc2(h * torch.sigmoid(1.702 * h) if self.quick_gelu else F.gelu(h))
        return (x, attention_probs(q[:, :, :1], k, torch.ones(B, 1, 1, T, dtype=torch.bool, device=x.device),
                                   hs ** -0.5)[:, :, 0], k) if probe else x


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        # NOTE: CLIP's patch embedding has no bias
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.hidden_size)

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, C, 24, 24)
        x = x.flatten(2).transpose(1, 2)  # (B, 576, C), patches in row-major order
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (B, 1, C)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, 577, C)


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # NOTE: HF's spelling, kept
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(CLIPEncoderLayer(cfg)
                                                               for _ in range(cfg.num_hidden_layers))))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # in the checkpoint, unused

    def forward(self, pixel_values, n_layers, probe=False):
        """Hidden state after the first `n_layers` blocks (the blocks after LLaVA's feature layer never run); probe:
        with the last block's CLS attention and keys (CLIPEncoderLayer)."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for i, layer in enumerate(self.encoder.layers[:n_layers]):
            x = layer(x, probe and i == n_layers - 1)
        return x  # (B, 577, C), or with the probe's two tensors


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.linear_1 = nn.Linear(cfg.vision.hidden_size, cfg.text.hidden_size)
        self.linear_2 = nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x)))  # NOTE: exact (erf) GELU, unlike CLIP's quick_gelu


# ----------------------------------------------------------------------------------------------------------------------
# Llama decoder (language_model.model.*) with its KV cache


class LlamaRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # NOTE: normalise in fp32 and cast back to the input dtype *before* the weight multiply, as HF does
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_inv_freq(cfg: TextConfig, device=None):
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float, device=device) / cfg.head_dim))


class KVCache:
    """One decoder layer's keys and values (gpt-fast style), allocated at the first write (the prompt) plus `max_new`
    slots. Each row has its own length and each slot its token's RoPE position, so ragged rows share a batch and
    layers hold different numbers of tokens. Attention reads slots [0, used) (`used`: on the host, a bound of the
    lengths) and masks those at or past a row's length (zeros or junk, but finite). Updates are in place."""

    def __init__(self, batch, max_new, n_kv_heads, head_dim, dtype, device):
        self.shape, self.dtype, self.device, self.max_new = (batch, n_kv_heads, head_dim), dtype, device, max_new
        self.used, self.fresh = 0, True
        self.k = self.v = self.pos = None
        self.length = torch.zeros(batch, dtype=torch.long, device=device)

    def reserve(self, T):
        """Before a chunk of T tokens is written (LlamaModel.run): the first call allocates T + max_new slots."""
        self.fresh = self.k is None
        if self.fresh:
            (b, nkv, hs), S = self.shape, T + self.max_new
            self.k = torch.zeros(b, nkv, S, hs, dtype=self.dtype, device=self.device)
            self.v = torch.zeros_like(self.k)
            self.pos = torch.full((b, S), -1, dtype=torch.long, device=self.device)  # -1 = never written
        assert self.used + T <= self.k.shape[2], "KV cache overflow: more new tokens than max_new"
        self.used += T

    def update(self, k, v, positions, n_valid):
        """Write a chunk k/v (B, nkv, T, hs) at each row's end; the first n_valid[b] of row b's T tokens are real.
        Returns the keys/values to attend to (B, nkv, S, hs) and the mask (B, 1, T, S) of the slots each query sees."""
        T = k.shape[2]
        if self.fresh:  # the first write: every row starts at slot 0
            self.k[:, :, :T], self.v[:, :, :T], self.pos[:, :T] = k, v, positions
            self.length.copy_(n_valid)
            return k, v, causal_mask(torch.zeros_like(n_valid), T, T)
        base = self.length.clone()
        slots = base[:, None] + torch.arange(T, device=k.device)  # (B, T), junk tokens of short rows included
        for buf, new in ((self.k, k), (self.v, v)):
            buf.scatter_(2, slots[:, None, :, None].expand_as(new), new)
        self.pos.scatter_(1, slots, positions)
        self.length.add_(n_valid)
        return self.read(base, T)

    def read(self, base, T):
        """Slots [0, used) and the mask of those the T new queries see; base (B,): the row lengths before them."""
        return self.k[:, :, :self.used], self.v[:, :, :self.used], causal_mask(base, T, self.used)

    def drop(self, gone):
        """Each row forgets the slots gone (B, S) marks, its kept slots moving to its front in order (a stable sort,
        as dyrate.kept_slots). Nothing is read back to the host, so `used` stays an upper bound of the lengths."""
        (B, nkv, _, hs), U = self.k.shape, self.used
        keep = ~gone[:, :U] & (torch.arange(U, device=gone.device) < self.length[:, None])  # (B, U)
        order = (~keep).to(torch.int8).argsort(dim=1, stable=True)  # kept first, in their order; the rest is junk
        for buf in (self.k, self.v):
            buf[:, :, :U] = buf[:, :, :U].gather(2, order[:, None, :, None].expand(B, nkv, U, hs))
        self.pos[:, :U] = self.pos[:, :U].gather(1, order)
        self.length.copy_(keep.sum(1))


def causal_mask(base, T, S):
    """(B, 1, T, S) bool: query i of row b sits in slot base[b] + i and may see slots up to and including its own."""
    q = base[:, None] + torch.arange(T, device=base.device)  # (B, T)
    return (torch.arange(S, device=base.device) <= q[:, :, None])[:, None]


def repeat_kv(k, n_rep):  # (B, nkv, S, hs) -> (B, nkv * n_rep, S, hs): each key/value head serves n_rep query heads
    return k if n_rep == 1 else k.repeat_interleave(n_rep, dim=1)


def attention_probs(q, k, mask, scale):
    """softmax(q k^T) in fp32: q (B, nh, R, hs), k (B, nkv, S, hs), mask (B, 1, R, S) -> (B, nh, R, S)."""
    scores = (q.float() @ repeat_kv(k, q.shape[1] // k.shape[1]).float().transpose(-1, -2)) * scale
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, rope, cache=None, n_valid=None, probe_rows=None, key_weight=None):
        """x (B, T, C), rope = (cos, sin, positions); without a cache the chunk attends to itself. probe_rows (B, R):
        also return those query rows' attention (B, nh, R, S). key_weight (B, T, S): a bool key mask joining the
        causal one, or float weights in [0, 1] (training: dyrate.masked_attention renormalises them)."""
        (B, T, _), (cos, sin, positions) = x.shape, rope
        projections = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = [p(x).view(B, T, -1, self.head_dim).transpose(1, 2) for p in projections]  # (B, nh or nkv, T, hs)
        half = self.head_dim // 2  # NOTE: rotate-half RoPE (HF's layout), so HF's q/k weights load unpermuted
        q, k = [t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin for t in (q, k)]
        if cache is None:
            mask = causal_mask(torch.zeros(B, dtype=torch.long, device=x.device), T, T)  # (B, 1, T, T)
        else:
            k, v, mask = cache.update(k, v, positions, n_valid)  # (B, nkv, S, hs), mask (B, 1, T, S)
        causal = (cache is None or cache.fresh) and key_weight is None  # the mask is the plain triangle
        scale, n_rep, probs = self.head_dim ** -0.5, self.n_head // self.n_kv_head, None
        if probe_rows is not None and T == 1:  # a decode step's only row is probed: its attention, once, explicitly
            probs = attention_probs(q, k, mask, scale)  # (B, nh, 1, S)
            y = (probs @ repeat_kv(v, n_rep).float()).to(v.dtype)  # NOTE: rounds unlike SDPA (see test_model.py)
        elif key_weight is None or key_weight.dtype == torch.bool:  # a hard key mask joins the causal one
            mask = mask if key_weight is None else mask & key_weight[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                               scale=scale, enable_gqa=n_rep > 1)
        else:
            y = dyrate.masked_attention(attention_probs(q, k, mask, scale), key_weight[:, None], repeat_kv(v, n_rep))
        if probe_rows is not None and probs is None:  # the probed rows of a longer chunk, beside the kernel's pass
            rows = probe_rows[:, None, :, None]  # (B, 1, R, 1)
            probs = attention_probs(q.gather(2, rows.expand(-1, self.n_head, -1, self.head_dim)), k,
                                    mask.gather(2, rows.expand(-1, -1, -1, mask.shape[3])), scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), probs


class LlamaMLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rope, cache=None, n_valid=None, probe_rows=None, key_weight=None):
        h, probs = self.self_attn(self.input_layernorm(x), rope, cache, n_valid, probe_rows, key_weight)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), probs


class LlamaModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def rope(self, positions, dtype):
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, hs/2), built in fp32 like HF
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hs)
        return emb.cos().to(dtype), emb.sin().to(dtype), positions

    def run(self, lo, hi, x, positions, n_valid, caches=None, probe_rows=None, key_weight=None, checkpoint=False):
        """Layers lo .. hi-1 on x (B, T, C), the last also returning the attention of the rows probe_rows (B, R). The
        caches' host-side counts move here; layers_forward is the seam tools/fast.py replaces (compiled, row chunks)."""
        for cache in caches[lo:hi] if caches is not None else ():
            cache.reserve(x.shape[1])
        return self.layers_forward(lo, hi, x, positions, n_valid, caches, probe_rows, key_weight, checkpoint)

    def layers_forward(self, lo, hi, x, positions, n_valid, caches, probe_rows, key_weight, checkpoint=False):
        rope, probs = self.rope(positions, x.dtype), None
        for i in range(lo, hi):
            inputs = (x, rope, caches[i] if caches is not None else None, n_valid, probe_rows if i == hi - 1 else None,
                      key_weight)
            if checkpoint:  # training: keep only the layer's inputs, run it again in the backward pass
                x, probs = torch.utils.checkpoint.checkpoint(self.layers[i], *inputs, use_reentrant=False)
            else:
                x, probs = self.layers[i](*inputs)
        return x, probs

    def forward(self, x, positions=None, n_valid=None, caches=None, pruner=None):
        """x (B, T, C); positions (B, T): each token's index in its row's whole sequence (arange by default, never a
        cache length); n_valid (B,): real tokens per row, then padding. The one hook, `pruner` (dyrate.Pruner or
        TrainMask), acts before each of its stages' layers (one, K, for most rules): it sees the layer before's
        attention of its probe_rows(), then may drop image tokens or mask them as keys for the layers from there on.
        Returns the normed hidden states and the real tokens per row."""
        B, T, _ = x.shape
        positions = torch.arange(T, device=x.device).expand(B, T) if positions is None else positions
        n_valid = torch.full((B,), T, device=x.device) if n_valid is None else n_valid
        lo, key_weight = 0, None
        for stage, k in enumerate(pruner.stages(len(self.layers)) if pruner is not None else ()):
            x, probs = self.run(lo, k, x, positions, n_valid, caches, pruner.probe_rows(n_valid, T, stage), key_weight)
            x, positions, n_valid, key_weight = pruner(probs, x, positions, n_valid, caches, stage)
            lo = k
        x, _ = self.run(lo, len(self.layers), x, positions, n_valid, caches, key_weight=key_weight)
        return self.norm(x), n_valid


# ----------------------------------------------------------------------------------------------------------------------
# LLaVA: the image features replace the image token ids' embeddings, then it is a plain Llama; and its loading


def check_device(device):
    """A torch.device this machine has, or a ValueError saying which to use."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{device!r} is not a device torch knows ({e}); use cpu, cuda or cuda:N.") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"only cpu and cuda devices are supported, not {device!r}.")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{device!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s) here; use one or cpu.")
    return dev


def read_config(model_dir):
    """The LlavaConfig of a checkpoint folder, from its config.json alone (no weights read)."""
    model_dir = os.fspath(model_dir)
    if os.path.isfile(model_dir):
        raise ValueError(f"{model_dir!r} is a file: pass the checkpoint folder (config.json, safetensors files).")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"No LLaVA checkpoint at {model_dir!r} (no config.json).")
    return LlavaConfig.from_json(os.path.join(model_dir, "config.json"))


def checkpoint_files(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):  # sharded: shard names come from the index, never hard-coded
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not os.path.isfile(os.path.join(model_dir, n))]
        if missing:
            raise FileNotFoundError(f"{model_dir}: shards {missing} named in the index are missing; download them.")
        return [os.path.join(model_dir, n) for n in names]
    if os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        return [os.path.join(model_dir, "model.safetensors")]
    pickled = any(n.endswith((".bin", ".pt", ".pth")) for n in os.listdir(model_dir))
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json"
                            + (" (pickled .bin weights are not loaded; use safetensors)" if pickled else "") + ".")


def canonical_key(key):
    """The hub's name (= our module's) of a key in any of three layouts, None for a derived buffer. In memory,
    transformers 4.52-4.57 say model.language_model.*, lm_head.*, model.*; transformers 5 saves no vision_model."""
    for old, new in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.", "")):
        if key.startswith(old):
            key = new + key[len(old):]
            break
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        key = "vision_tower.vision_model." + key[len("vision_tower."):]
    return None if key.endswith(("rotary_emb.inv_freq", "embeddings.position_ids")) else key


class Llava(nn.Module):
    cache_class = KVCache  # what new_caches makes: tools/fast.py sets its subclass on the instance

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.config = cfg  # module names as the checkpoint's: vision_tower.vision_model.*, language_model.model.*
        self.vision_tower = nn.ModuleDict(dict(vision_model=CLIPVisionTransformer(cfg.vision)))
        self.multi_modal_projector = LlavaMultiModalProjector(cfg)
        self.language_model = nn.ModuleDict(dict(  # NOTE: lm_head is not tied to embed_tokens
            model=LlamaModel(cfg.text), lm_head=nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)))

    def vision_features(self, pixel_values, compress=None):
        """(n_images, 3, H, W) -> CLIP features at LLaVA's feature layer (n_images, 576, vision hidden). compress: a
        pruner's, which makes fewer features per image from the feature layer's hidden states, CLS attention and keys
        (dyrate.VisionZip)."""
        v = self.config.vision
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (v.num_channels, v.image_size, v.image_size):
            raise ValueError(f"pixel_values must be (n_images, {v.num_channels}, {v.image_size}, {v.image_size}), got "
                             f"{tuple(pixel_values.shape)}; make them with processing.preprocess().")
        if compress is not None:
            return compress(*self.vision_tower.vision_model(pixel_values, self.config.n_vision_layers_used, True))
        h = self.vision_tower.vision_model(pixel_values, self.config.n_vision_layers_used)  # (n, 577, Cv)
        return h[:, 1:] if self.config.vision_feature_select_strategy == "default" else h  # "default" drops CLS

    def embed(self, input_ids, pixel_values=None, vision=None, pruner=None):
        """(B, T, C) token embeddings, the image ids' replaced by the features of pixel_values (made by the pruner's
        compress_image if it has one), or by `vision`, each image's (n_features, Cv), as many as its image ids."""
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= cfg.text.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {cfg.text.vocab_size}); is the tokenizer from this model?")
        x = self.language_model.model.embed_tokens(input_ids)
        is_image = input_ids == cfg.image_token_index
        per_image = getattr(pruner, "n_image", cfg.n_image_tokens)
        n_ids = int(is_image.sum())
        n_features = sum(map(len, vision)) if vision is not None else 0 if pixel_values is None else \
            len(pixel_values) * per_image
        if n_ids != n_features:
            raise ValueError(f"input_ids hold {n_ids} image token ids ({cfg.image_token_index}) but the images give "
                             f"{n_features} features: each image needs exactly {per_image} image ids "
                             f"(Tokenizer.encode_prompt expands <image> to them).")
        if n_ids:
            compress = getattr(pruner, "compress_image", None)
            vision = self.vision_features(pixel_values, compress) if vision is None else vision
            features = vision if torch.is_tensor(vision) else torch.cat(vision)  # per-image lengths: (n_ids, Cv)
            x = x.masked_scatter(is_image[..., None], self.multi_modal_projector(features).to(x.dtype))
        return x

    def forward(self, input_ids, pixel_values=None, pruner=None):
        """Logits (B, T, V) of the whole sequence, without a cache (only the kept positions' if a pruner drops)."""
        self.config.check_length(input_ids.shape[1])
        h, _ = self.language_model.model(self.embed(input_ids, pixel_values, pruner=pruner), pruner=pruner)
        return self.language_model.lm_head(h)

    def new_caches(self, batch, max_new):
        """One KV cache per decoder layer, each sized at its first write (the prompt) plus max_new tokens."""
        t, p = self.config.text, self.language_model.lm_head.weight
        return [self.cache_class(batch, max_new, t.num_key_value_heads, t.head_dim, p.dtype, p.device)
                for _ in range(t.num_hidden_layers)]

    def prefill(self, input_ids, caches, n_valid=None, pixel_values=None, pruner=None):
        """Step 0: the prompts (B, T), rows padded at the end (n_valid real tokens each), into fresh caches. Returns
        the logits of each row's last real token (B, V)."""
        return self.last_logits(self.embed(input_ids, pixel_values, pruner=pruner), None, n_valid, caches, pruner)

    def decode_step(self, token, positions, caches, pruner=None):
        """One new token per row, token (B,) at RoPE positions (B,) (its index in the row's full sequence), over the
        caches. Returns the next logits (B, V). NOTE: plain embeddings here, even for the image id (as transformers)."""
        x = self.language_model.model.embed_tokens(token[:, None])  # (B, 1, C)
        return self.last_logits(x, positions[:, None], None, caches, pruner)

    def last_logits(self, x, positions, n_valid, caches, pruner):
        h, n_valid = self.language_model.model(x, positions, n_valid, caches, pruner)
        last = h.gather(1, (n_valid - 1)[:, None, None].expand(-1, 1, h.shape[2]))[:, 0]  # (B, C)
        return self.language_model.lm_head(last)

    @classmethod
    def from_pretrained(cls, model_dir, device="cpu", dtype=torch.float32):
        """Load a llava-hf checkpoint folder (config.json + model.safetensors or a sharded index). Tensors go from the
        memory-mapped files straight to `device` in `dtype`, one at a time, into a model built on the meta device."""
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch dtype such as torch.float16, got {dtype!r}.")
        device, cfg = check_device(device), read_config(model_dir)
        with torch.device("meta"):
            model = cls(cfg)
        expected, state = model.state_dict(), {}
        for path in checkpoint_files(model_dir):
            try:
                f = safe_open(path, framework="pt", device=str(device))
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{path} is not a readable safetensors file ({e}); download it again.") from None
            with f:
                for key in f.keys():
                    name = canonical_key(key)
                    if name is None:
                        continue
                    if name not in expected or name in state:
                        raise ValueError(f"{path}: unexpected tensor {key!r}" + (" (seen twice)" if name in state else
                                         "; is this a LLaVA-1.5 checkpoint, and does config.json match it?"))
                    shape, want = tuple(f.get_slice(key).get_shape()), tuple(expected[name].shape)
                    if shape != want:
                        raise ValueError(f"{path}: tensor {key!r} has shape {shape} but config.json implies {want}; "
                                         f"the weights and config.json come from different models.")
                    state[name] = f.get_tensor(key).to(dtype)
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"{model_dir}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[:3]}; "
                             f"the download is partial or not a LLaVA-1.5 checkpoint.")
        model.load_state_dict(state, strict=True, assign=True)
        model.language_model.model.inv_freq = rope_inv_freq(cfg.text).to(device)  # meta buffer -> real one
        return model.eval().requires_grad_(False)
