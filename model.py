"""
LLaVA-1.5 written from scratch: CLIP ViT-L/14-336 -> 2-layer GELU projector -> Llama (Vicuna).

Loads the public llava-hf safetensors checkpoints (llava-hf/llava-1.5-7b-hf, -13b-hf) from a local folder and
computes what HF transformers' LlavaForConditionalGeneration computes (tests/test_model.py checks it). Module names
mirror the checkpoint keys, so loading is one key canonicalisation plus a strict, shape-checked copy.

Read top to bottom: configs, the CLIP vision tower, the projector, the Llama decoder with its KV cache, the LLaVA
wrapper (prefill, decode_step) and its loader. dyrate.py plugs in at one place, the `pruner` argument of
LlamaModel.forward; LlamaAttention hands a float training key mask to dyrate.masked_attention. The fast path
(tools/fast.py: compiled decode, chunked prefill) plugs in through Llava.cache_class and LlamaModel.layers_forward.

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
    def n_image_tokens(self):
        """Image features (= image token ids in the prompt) per image: 576 for LLaVA-1.5."""
        n = (self.vision.image_size // self.vision.patch_size) ** 2
        return n + (self.vision_feature_select_strategy == "full")

    @property
    def n_vision_layers_used(self):
        """CLIP blocks that run: hidden_states[f] is the output of block f-1, hidden_states[0] the embeddings."""
        f = self.vision_feature_layer
        return f if f >= 0 else self.vision.num_hidden_layers + 1 + f

    def check_length(self, n_tokens):
        limit = self.text.max_position_embeddings
        if n_tokens > limit:
            raise ValueError(f"{n_tokens} tokens (prompt with its {self.n_image_tokens} image tokens, plus new "
                             f"tokens) exceed the model's context of {limit}: shorten the prompt or ask for fewer "
                             f"tokens.")

    @classmethod
    def from_json(cls, path):
        try:
            with open(path) as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); the download may be incomplete.") from None
        parts = [("the file", d)] + [(key, d.get(key)) for key in ("text_config", "vision_config")
                                     if isinstance(d, dict) and d.get(key) is not None]
        for what, v in parts:
            if not isinstance(v, dict):
                raise ValueError(f"{path}: {what} must be a JSON object, got {type(v).__name__}; is this a "
                                 f"LLaVA-1.5 config.json?")
        tc = d.get("text_config") or {}
        rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}  # newer files keep theta in rope_parameters
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"{path}: RoPE scaling {rope} is not supported; LLaVA-1.5 uses plain RoPE.")

        def pick(dc, src):  # the keys the file gives; absent or null ones keep our (LLaVA-1.5-7B) defaults
            given = {f.name: src[f.name] for f in fields(dc) if src.get(f.name) is not None}
            for f in fields(dc):
                want, value = type(f.default), given.get(f.name)
                if f.name not in given or want not in (int, float, str):
                    continue
                if f.name in ("eos_token_id", "vision_feature_layer") and isinstance(value, list):
                    continue  # these lists get their own message below
                if isinstance(value, bool) or not isinstance(value, (int, float) if want is float else want):
                    raise ValueError(f"{path}: {f.name} = {value!r} is not of type {want.__name__}.")
            return dc(**given)
        text = pick(TextConfig, {"rope_theta": rope.get("rope_theta"), **tc})
        text.num_key_value_heads = tc.get("num_key_value_heads") or text.num_attention_heads
        text.head_dim = tc.get("head_dim") or text.hidden_size // text.num_attention_heads
        cfg = pick(cls, {**d, **{k: tc[k] for k in ("bos_token_id", "eos_token_id") if tc.get(k) is not None}})
        cfg.vision, cfg.text = pick(VisionConfig, d.get("vision_config") or {}), text
        for ok, what in [(text.hidden_act == "silu", f"text hidden_act {text.hidden_act!r}"),
                         (cfg.vision.hidden_act in ("quick_gelu", "gelu"),
                          f"vision hidden_act {cfg.vision.hidden_act!r}"),
                         (cfg.projector_hidden_act == "gelu", f"projector_hidden_act {cfg.projector_hidden_act!r}"),
                         (isinstance(cfg.vision_feature_layer, int), "vision_feature_layer list (LLaVA-1.5 uses -2)"),
                         (cfg.vision_feature_select_strategy in ("default", "full"), "vision_feature_select_strategy"),
                         (isinstance(cfg.eos_token_id, int), "eos_token_id list"),
                         (text.num_attention_heads % text.num_key_value_heads == 0, "key/value head count")]:
            if not ok:
                raise ValueError(f"{path}: unsupported {what}. This is a LLaVA-1.5 (CLIP + Llama) implementation.")
        return cfg


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


# ----------------------------------------------------------------------------------------------------------------------
# CLIP vision tower (vision_tower.vision_model.*)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):
        B, T, C = x.shape
        hs = C // self.n_head
        projections = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = (proj(x).view(B, T, self.n_head, hs).transpose(1, 2) for proj in projections)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, scale=hs ** -0.5)  # (B, nh, T, hs), bidirectional
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = quick_gelu if cfg.hidden_act == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


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
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # in the checkpoint, unused

    def forward(self, pixel_values, n_layers):
        """Hidden state after the first `n_layers` blocks (the blocks after LLaVA's feature layer never run)."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers[:n_layers]:
            x = layer(x)
        return x  # (B, 577, C)


class CLIPVisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(cfg)


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.linear_1 = nn.Linear(cfg.vision.hidden_size, cfg.text.hidden_size)
        self.linear_2 = nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x)))  # NOTE: exact (erf) GELU, unlike CLIP's quick_gelu


# ----------------------------------------------------------------------------------------------------------------------
# Llama decoder (language_model.*)


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


def apply_rope(x, cos, sin):
    """Rotate-half RoPE (HF layout, so HF q/k weights load unpermuted). x (B, nh, T, hs), cos/sin (B, 1, T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """One decoder layer's keys and values (gpt-fast style): preallocated at the first write (the prompt) plus
    `max_new` more tokens, so a layer that dropped tokens at prefill (dyrate.py) is physically smaller.

    Each row keeps its own valid length and each slot the RoPE position of the token in it, so rows of different
    lengths share a batch and layers can hold different numbers of positions; attention masks the slots at or past a
    row's length (junk, but finite). Host side, `used` bounds the lengths (it changes only in reserve()), and attention
    reads slots [0, used). drop() forgets slots at a decode step, on the device; every update is in place.
    """

    def __init__(self, batch, max_new, n_kv_heads, head_dim, dtype, device):
        self.shape, self.dtype, self.device, self.max_new = (batch, n_kv_heads, head_dim), dtype, device, max_new
        self.used, self.fresh = 0, True
        self.k = self.v = self.pos = None
        self.length = torch.zeros(batch, dtype=torch.long, device=device)

    def reserve(self, T):
        """Before a chunk of T tokens is written (LlamaModel.run): the first call allocates T + max_new slots."""
        if self.k is None:
            (b, nkv, hs), S = self.shape, T + self.max_new
            # zeros: a ragged batch reads (masked) slots it never wrote, which must be finite
            self.k = torch.zeros(b, nkv, S, hs, dtype=self.dtype, device=self.device)
            self.v = torch.zeros_like(self.k)
            self.pos = torch.full((b, S), -1, dtype=torch.long, device=self.device)  # -1 = never written
        else:
            self.fresh = False
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
        idx = slots[:, None, :, None].expand_as(k)
        self.k.scatter_(2, idx, k)
        self.v.scatter_(2, idx, v)
        self.pos.scatter_(1, slots, positions)
        self.length.add_(n_valid)
        return self.read(base, T)

    def read(self, base, T):
        """Slots [0, used) and the mask of those the T new queries see (their row's, up to their own: base (B,) is
        the row's length before them)."""
        return self.k[:, :, :self.used], self.v[:, :, :self.used], causal_mask(base, T, self.used)

    def drop(self, gone):
        """Physical dropping at a decode step: each row forgets the slots gone (B, S) marks, its kept slots moving to
        its front in order (a stable sort, as dyrate.kept_slots). All on the device: nothing is read back to the host,
        so `used` stays an upper bound of the new lengths. NOTE: attention still reads the freed slots, masked."""
        B, nkv, _, hs = self.k.shape
        U = self.used
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


class LlamaAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, rope, cache=None, n_valid=None, probe_rows=None, key_weight=None):
        """x (B, T, C). rope = (cos, sin, positions). Without a cache the chunk attends to itself (causal).
        probe_rows (B, R): also return those query rows' attention probabilities (B, nh, R, S), from this forward.
        key_weight (B, T, S): bool, a key mask joining the causal one; float in [0, 1], multiplies each query's
        attention over the keys, then renormalises (dyrate.py's differentiable masked softmax for training)."""
        B, T, _ = x.shape
        cos, sin, positions = rope
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        fresh = cache is None or cache.fresh  # then the mask is the plain causal triangle
        if cache is None:
            mask = causal_mask(torch.zeros(B, dtype=torch.long, device=x.device), T, T)  # (B, 1, T, T)
        else:
            k, v, mask = cache.update(k, v, positions, n_valid)  # mask (B, 1, T, S)
        scale, n_rep = self.head_dim ** -0.5, self.n_head // self.n_kv_head
        probs = None
        if probe_rows is not None and T == 1:  # a decode step's only row is probed: its attention, once, explicitly
            probs = attention_probs(q, k, mask, scale)  # (B, nh, 1, S)
            y = (probs @ repeat_kv(v, n_rep).float()).to(v.dtype)  # NOTE: rounds unlike SDPA (see test_model.py)
        elif key_weight is None or key_weight.dtype == torch.bool:  # a hard key mask joins the causal one
            fresh = fresh and key_weight is None
            mask = mask if key_weight is None else mask & key_weight[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if fresh else mask, is_causal=fresh,
                                               scale=scale, enable_gqa=n_rep > 1)
        else:
            y = dyrate.masked_attention(attention_probs(q, k, mask, scale), key_weight[:, None], repeat_kv(v, n_rep))
        if probe_rows is not None and probs is None:  # the probed rows of a longer chunk, beside the kernel's pass
            rows = probe_rows[:, None, :, None]  # (B, 1, R, 1)
            probs = attention_probs(q.gather(2, rows.expand(-1, self.n_head, -1, self.head_dim)), k,
                                    mask.gather(2, rows.expand(-1, -1, -1, mask.shape[3])), scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), probs


def repeat_kv(k, n_rep):
    """(B, nkv, S, hs) -> (B, nkv * n_rep, S, hs): each key/value head serves n_rep query heads."""
    return k if n_rep == 1 else k.repeat_interleave(n_rep, dim=1)


def attention_probs(q, k, mask, scale):
    """Explicit softmax(q k^T) in fp32 for the given query rows: q (B, nh, R, hs), k (B, nkv, S, hs),
    mask (B, 1, R, S)."""
    scores = (q.float() @ repeat_kv(k, q.shape[1] // k.shape[1]).float().transpose(-1, -2)) * scale  # (B, nh, R, S)
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


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
        """Layers lo .. hi-1 on x (B, T, C); the last of them also returns the attention probabilities of the query
        rows probe_rows (B, R), else None. The caches' host-side counts move here, outside the layers' forward.
        checkpoint=True (training): each layer keeps only its inputs for the backward pass and runs again there
        (activation checkpointing)."""
        for cache in caches[lo:hi] if caches is not None else ():
            cache.reserve(x.shape[1])
        # the seam for speed: tools/fast.py replaces self.layers_forward on the instance (compiled, row chunks)
        return self.layers_forward(lo, hi, x, positions, n_valid, caches, probe_rows, key_weight, checkpoint)

    def layers_forward(self, lo, hi, x, positions, n_valid, caches, probe_rows, key_weight, checkpoint=False):
        rope = self.rope(positions, x.dtype)
        probs = None
        for i in range(lo, hi):
            inputs = (x, rope, caches[i] if caches is not None else None, n_valid, probe_rows if i == hi - 1 else None,
                      key_weight)
            if checkpoint:
                x, probs = torch.utils.checkpoint.checkpoint(self.layers[i], *inputs, use_reentrant=False)
            else:
                x, probs = self.layers[i](*inputs)
        return x, probs

    def forward(self, x, positions, n_valid=None, caches=None, pruner=None):
        """x (B, T, C) input embeddings; positions (B, T): each token's RoPE position = its index in its row's full
        sequence (never a cache length); n_valid (B,): real tokens per row, the rest of a row is padding at its end.

        `pruner` (dyrate.Pruner at inference, dyrate.TrainMask in training) is the only hook: layer pruner.k - 1 also
        returns the attention probabilities of the query rows pruner.probe_rows(...) asks for, and before layer
        pruner.k the pruner may drop image tokens (gather x and positions, KVCache.drop in the later layers' caches)
        or return a key mask for them. Returns the final-normed hidden states and the real tokens per row after it."""
        B, T, _ = x.shape
        n_valid = torch.full((B,), T, device=x.device) if n_valid is None else n_valid
        L = len(self.layers)
        if pruner is None:
            return self.norm(self.run(0, L, x, positions, n_valid, caches)[0]), n_valid
        K = pruner.k
        x, probs = self.run(0, K, x, positions, n_valid, caches, pruner.probe_rows(n_valid, T))
        # dyrate: from layer K on, layers see only the kept image tokens (or, in training, a key mask)
        x, positions, n_valid, key_weight = pruner(probs, x, positions, n_valid, caches)
        x, _ = self.run(K, L, x, positions, n_valid, caches, key_weight=key_weight)
        return self.norm(x), n_valid


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # not tied to embed_tokens


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint files: which safetensors files hold the weights, in which key layout (Llava.from_pretrained reads them)


def check_device(device):
    """A torch.device this machine has, or a clear error."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{device!r} is not a device torch knows ({e}); use cpu, cuda or cuda:N.") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"only cpu and cuda devices are supported, not {device!r}.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("this machine has no CUDA GPU that torch can use; use cpu.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"there are only {torch.cuda.device_count()} CUDA devices.")
    return dev


def read_config(model_dir):
    """The LlavaConfig of a checkpoint folder, from its config.json alone (no weights read)."""
    config_path = os.path.join(os.fspath(model_dir), "config.json")
    if os.path.isfile(model_dir):
        raise ValueError(f"{os.fspath(model_dir)!r} is a file: pass the checkpoint folder (with config.json and the "
                         f"safetensors files).")
    if not os.path.isdir(model_dir) or not os.path.isfile(config_path):
        raise FileNotFoundError(f"No LLaVA checkpoint at {os.fspath(model_dir)!r} (no config.json).")
    return LlavaConfig.from_json(config_path)


def checkpoint_files(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):  # sharded: shard names come from the index, never hard-coded
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not os.path.isfile(os.path.join(model_dir, n))]
        if missing:
            raise FileNotFoundError(f"{model_dir}: shard(s) {missing} listed in model.safetensors.index.json are "
                                    f"missing (partial download?).")
        return [os.path.join(model_dir, n) for n in names]
    if os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        return [os.path.join(model_dir, "model.safetensors")]
    pickled = any(n.endswith((".bin", ".pt", ".pth")) for n in os.listdir(model_dir))
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json"
                            + (" (pickled .bin weights are not loaded; use safetensors)" if pickled else "")
                            + ".")


def canonical_key(key):
    """Map any of the three key layouts to the hub's, which our module names mirror; None = a buffer to skip.
    hub: language_model.model.*, language_model.lm_head.*, vision_tower.vision_model.*, multi_modal_projector.*
    transformers 4.52-4.57 in memory: model.language_model.*, lm_head.*, model.vision_tower.vision_model.*, ...
    transformers 5 save_pretrained: the hub's, but vision_tower.* without vision_model."""
    if key.startswith("model.language_model."):
        key = "language_model.model." + key[len("model.language_model."):]
    elif key == "lm_head.weight":
        key = "language_model.lm_head.weight"
    elif key.startswith("model."):
        key = key[len("model."):]
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        key = "vision_tower.vision_model." + key[len("vision_tower."):]
    if key.endswith(("rotary_emb.inv_freq", "embeddings.position_ids")):  # derived buffers some exports contain
        return None
    return key


# ----------------------------------------------------------------------------------------------------------------------
# LLaVA: the image features replace the image token ids' embeddings, then it is a plain Llama


class Llava(nn.Module):
    cache_class = KVCache  # what new_caches makes: a fast path (tools/fast.py) sets its subclass on the instance

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.config = cfg
        self.vision_tower = CLIPVisionModel(cfg.vision)
        self.multi_modal_projector = LlavaMultiModalProjector(cfg)
        self.language_model = LlamaForCausalLM(cfg.text)

    def vision_features(self, pixel_values):
        """(n_images, 3, H, W) -> CLIP features at LLaVA's feature layer (n_images, 576, vision hidden)."""
        v = self.config.vision
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (v.num_channels, v.image_size, v.image_size):
            raise ValueError(f"pixel_values must be (n_images, {v.num_channels}, {v.image_size}, {v.image_size}), got "
                             f"{tuple(pixel_values.shape)}; make them with processing.preprocess().")
        h = self.vision_tower.vision_model(pixel_values, self.config.n_vision_layers_used)  # (n, 577, Cv)
        return h[:, 1:] if self.config.vision_feature_select_strategy == "default" else h  # "default" drops CLS

    def embed(self, input_ids, pixel_values=None, vision=None):
        """Token embeddings (B, T, C) with the image token ids' rows replaced by the image features, in order.
        vision: the images' vision_features, when the caller computed them already (instead of pixel_values)."""
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= cfg.text.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {cfg.text.vocab_size}); is the tokenizer from this model?")
        x = self.language_model.model.embed_tokens(input_ids)
        is_image = input_ids == cfg.image_token_index
        n_images = len(vision) if vision is not None else 0 if pixel_values is None else len(pixel_values)
        n_ids, n_features = int(is_image.sum()), n_images * cfg.n_image_tokens
        if n_ids != n_features:
            raise ValueError(f"input_ids hold {n_ids} image token ids ({cfg.image_token_index}) but the images give "
                             f"{n_features} features: each image needs exactly {cfg.n_image_tokens} image ids "
                             f"(Tokenizer.encode_prompt expands <image> to them).")
        if n_ids:
            vision = self.vision_features(pixel_values) if vision is None else vision
            x = x.masked_scatter(is_image[..., None], self.multi_modal_projector(vision).to(x.dtype))
        return x

    def forward(self, input_ids, pixel_values=None, pruner=None):
        """The full sequence without a cache: logits (B, T, vocab). With a training pruner (dyrate.py), layers >= K
        see its key mask; a pruner that drops tokens returns logits for the kept positions only."""
        B, T = input_ids.shape
        self.config.check_length(T)
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        h, _ = self.language_model.model(self.embed(input_ids, pixel_values), positions, pruner=pruner)
        return self.language_model.lm_head(h)

    def new_caches(self, batch, max_new):
        """One KV cache per decoder layer, each sized at its first write (the prompt) plus max_new tokens."""
        t, p = self.config.text, self.language_model.lm_head.weight
        return [self.cache_class(batch, max_new, t.num_key_value_heads, t.head_dim, p.dtype, p.device)
                for _ in range(t.num_hidden_layers)]

    def prefill(self, input_ids, caches, n_valid=None, pixel_values=None, pruner=None):
        """Step 0 of a generation: the whole prompt (B, T) into fresh caches, rows padded at the end (n_valid real
        tokens each), with the images. Returns the logits of each row's last real token (B, V)."""
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        return self.last_logits(self.embed(input_ids, pixel_values), positions, n_valid, caches, pruner)

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
        model_dir = os.fspath(model_dir)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch dtype such as torch.float16, got {dtype!r}.")
        device = check_device(device)
        cfg = read_config(model_dir)
        with torch.device("meta"):
            model = cls(cfg)
        expected, state = model.state_dict(), {}
        for path in checkpoint_files(model_dir):
            try:
                f = safe_open(path, framework="pt", device=str(device))
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{path} is not a readable safetensors file ({e}): the download is incomplete or "
                                 f"corrupt.") from None
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
