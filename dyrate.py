"""
DyRate: dynamic visual-token reduction *during generation* for LLaVA-1.5, with the FastV, VTW and training-free
baselines as rules of the same machinery. model.py calls into this file at one place: the `pruner` argument of
LlamaModel.forward, which asks pruner.probe_rows(...) which query rows' attention layer K-1 must return and calls
pruner(...) before layer K. Two such hooks: Pruner (inference: a rule's rate, FastV's ranking, the drop) and TrainMask
(training: a straight-through Gumbel-Softmax keep mask).

Conventions (the README's "How DyRate works" walks through an example):
- Decoder layers are 0-based. Pruning layer K (default 2): layers < K always see every token; layers >= K see only the
  kept image tokens. Statistics and the image ranking come from layer K-1, which still holds every token, for the
  current query token, from the same forward (model.py's probe: no second run of the layer).
- Token types: system (before the first image token, BOS included), image, instruction (after the image to the end
  of the prompt), response (generated so far, including the current query).
- A rate r is the fraction of the image tokens dropped from layers >= K: a row keeps floor((1 - r) * n_image + 1/2).
- Step 0 is the prefill; step t >= 1 is the forward that consumes new token t-1.

Read top to bottom: statistics, the predictor, the rules, the inference Pruner, the training TrainMask, the budget's
cost. tools/costs.py reports a generation's costs from the Pruner's history; tools/fast.py holds the fast path.
"""
import json
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import processing

DEFAULT_K = 2  # the pruning layer of FastV's and the seed paper's LLaVA-1.5 experiments
TYPES = ("system", "image", "instruction", "response")
PREDICTOR_FORMAT = "dyrate-predictor-1"
BUDGETS = ("flops", "kv", "nocache")  # what a budget may be on (budget_cost)


def keep_count(rate, n_image):
    """Image tokens kept at drop rate `rate` (a float or a tensor): round half up, so it is the same in both."""
    return math.floor((1 - rate) * n_image + 0.5) if isinstance(rate, float) else ((1 - rate) * n_image + 0.5).floor()


# ----------------------------------------------------------------------------------------------------------------------
# statistics of the current query at layer K-1, where slot j of the cache holds token j


def type_masks(image_start, n_image, prompt_len, S):
    """(B, S, 4) float: which of system / image / instruction / response each key slot 0..S-1 is."""
    j = torch.arange(S, device=image_start.device)[None]  # (1, S)
    start, end, length = image_start[:, None], image_start[:, None] + n_image, prompt_len[:, None]
    return torch.stack([j < start, (j >= start) & (j < end), (j >= end) & (j < length), j >= length], dim=-1).float()


def type_shares(probs, image_start, n_image, prompt_len):
    """Attention probabilities (B, H, R, S) of R query rows -> (B, R, H, 4): each head's attention mass on each token
    type. Masked (future, padding) slots carry probability 0, so each head's four shares sum to 1."""
    kinds = type_masks(image_start, n_image, prompt_len, probs.shape[-1])  # (B, S, 4)
    return (probs @ kinds[:, None]).transpose(1, 2)  # (B, H, R, 4) -> (B, R, H, 4)


def image_scores(probs, image_start, n_image):
    """(B, H, R, S) -> (B, R, n_image): the attention each image token receives, averaged over heads (FastV's rule)."""
    idx = image_start[:, None] + torch.arange(n_image, device=probs.device)  # (B, N)
    mean = probs.mean(1)  # (B, R, S)
    return mean.gather(2, idx[:, None, :].expand(-1, mean.shape[1], -1))


# ----------------------------------------------------------------------------------------------------------------------
# the rate predictor


class RatePredictor(nn.Module):
    """A linear classifier from the current query's (heads, 4) type shares at layer K-1 to logits over the candidate
    rates. For LLaVA-1.5-7B with 9 rates: 32*4*9 + 9 = 1161 parameters, ~2.3 kFLOPs per step (a decoder layer: ~0.4
    GFLOPs per token). step=True, an extension (train.py --step-feature): it also sees the answer step t (as t / 64),
    so a rate can fall along an answer where the shares do not move."""
    STEP_SCALE = 64

    def __init__(self, n_heads, rates, k=DEFAULT_K, step=False):
        super().__init__()
        if not rates or any(not 0 <= r <= 1 for r in rates) or sorted(rates) != list(rates):
            raise ValueError(f"rates must be increasing fractions in [0, 1], got {rates}")
        self.n_heads, self.rates, self.k, self.step = n_heads, [float(r) for r in rates], k, bool(step)
        self.linear = nn.Linear(4 * n_heads + self.step, len(rates))
        nn.init.zeros_(self.linear.weight)  # start from the uniform distribution over rates
        nn.init.zeros_(self.linear.bias)

    def forward(self, shares, step=None):
        """shares (..., H, 4) -> logits (..., n_rates); step (...): each query's answer step (0: the prefill), read
        when the predictor sees it."""
        x = shares.flatten(-2).to(self.linear.weight.dtype)  # (..., 4H)
        if self.step:
            x = torch.cat([x, (step.to(x.dtype) / self.STEP_SCALE)[..., None]], -1)
        return self.linear(x)

    def flops(self):
        return 2 * self.linear.in_features * self.linear.out_features

    def describe(self, cfg):
        """One line: the predictor's size and cost next to one decoder layer's for one token."""
        layer = layer_flops(cfg.text, 1, cfg.n_image_tokens + 64)  # a token attending to a ~640-token context
        n = sum(p.numel() for p in self.parameters())
        return (f"rate predictor: {n} parameters, {self.flops()} FLOPs per step ({self.flops() / layer:.1e} of one "
                f"decoder layer's {layer:.3g} FLOPs per token); K={self.k}, rates {self.rates}")

    def save(self, path, fingerprint, extra=None):
        meta = dict(format=PREDICTOR_FORMAT, k=self.k, rates=self.rates, n_heads=self.n_heads, fingerprint=fingerprint,
                    step=self.step, **(extra or {}))
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        processing.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"dyrate": json.dumps(meta)}))

    @classmethod
    def load(cls, path, model_cfg, device="cpu"):
        """Load a predictor file written by train.py and check that it was trained for this model."""
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                meta = json.loads((f.metadata() or {}).get("dyrate", "{}"))
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, ValueError, SafetensorError) as e:
            raise ValueError(f"{path} is not a predictor file written by train.py ({e}).") from None
        if meta.get("format") != PREDICTOR_FORMAT:
            raise ValueError(f"{path} is not a predictor file written by train.py (no '{PREDICTOR_FORMAT}' metadata).")
        if meta["fingerprint"] != fingerprint(model_cfg):
            raise ValueError(f"{path} was trained for a different model ({meta['fingerprint']}) than this one "
                             f"({fingerprint(model_cfg)}); train one for this model with train.py.")
        predictor = cls(meta["n_heads"], meta["rates"], meta["k"], meta.get("step", False)).to(device)
        predictor.load_state_dict(state)
        predictor.meta, predictor.path = meta, str(path)
        return predictor.eval()


def fingerprint(cfg):
    """What a predictor depends on: the decoder's geometry and the number of image tokens."""
    t = cfg.text
    return (f"llava L{t.num_hidden_layers} H{t.num_attention_heads} KV{t.num_key_value_heads} D{t.hidden_size} "
            f"V{t.vocab_size} N{cfg.n_image_tokens}")


# ----------------------------------------------------------------------------------------------------------------------
# inference: rate, rank, drop


def scores_by_position(probs, key_positions, image_start, n_image):
    """(B, H, 1, S) attention over keys holding the tokens at key_positions (B, S) -> (B, n_image): what each image
    token receives, averaged over heads, 0 for those no key holds (a deeper stage's layers hold only the kept ones)."""
    rel = key_positions - image_start[:, None]  # (B, S): index among the image tokens, if one
    is_image = (rel >= 0) & (rel < n_image)
    mean = probs.mean(1)[:, 0] * is_image  # (B, S)
    return torch.zeros(len(rel), n_image, device=rel.device, dtype=mean.dtype).scatter_add(
        1, rel.clamp(0, n_image - 1), mean)


def rank_of(scores):
    """(..., N) -> (..., N) long: each token's place when sorted by descending score (0 = most attended; ties keep
    their order)."""
    return scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)


def real_and_dropped(positions, length, drop_mask, image_start, n_image):
    """positions (B, S): RoPE position of each token/slot (image token i of row b sits at image_start[b] + i);
    length (B,): how many of the S are real. Returns (B, S) bool masks: real slots, and real slots holding an image
    token of drop_mask (B, N)."""
    rel = positions - image_start[:, None]  # (B, S): index among the image tokens, if one
    real = torch.arange(positions.shape[1], device=positions.device) < length[:, None]
    return real, real & (rel >= 0) & (rel < n_image) & drop_mask.gather(1, rel.clamp(0, n_image - 1))


def kept_slots(positions, length, drop_mask, image_start, n_image):
    """Which tokens (or cache slots) of each row remain after dropping the image tokens drop_mask (B, N), in order
    (positions, length: as real_and_dropped). Returns a gather index (B, S') and the new lengths (B,)."""
    real, gone = real_and_dropped(positions, length, drop_mask, image_start, n_image)
    keep = real & ~gone
    new_length = keep.sum(1)
    order = (~keep).to(torch.int8).argsort(dim=1, stable=True)  # kept first, in their order; the rest is junk after
    return order[:, :int(new_length.max())], new_length


def drop_tokens(x, positions, n_valid, drop_mask, image_start, n_image):
    """Physical dropping from a sequence: x (B, T, C) and positions (B, T) without the image tokens in drop_mask
    (B, N). NOTE: the kept tokens keep their original RoPE positions, with gaps where tokens went."""
    idx, n_valid = kept_slots(positions, n_valid, drop_mask, image_start, n_image)  # (B, T')
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[2])), positions.gather(1, idx), n_valid


# ----------------------------------------------------------------------------------------------------------------------
# the rules: which steps rank the image tokens, and the drop rate at a step. A new rule is one class and a RULES line.


@dataclass
class Rule:
    """none: keeps every image token (the statistics are still computed for reporting).
    Every rule also takes k (its own pruning layer K, as 'vtw:k=15': pruning_layer) and stages: with stages=S > 1 it
    drops again before layers 2K, 3K, .. SK, stage s keeping lam**s of the image tokens stage 0 (at K) keeps, the
    best-ranked by the attention at the layer before (PyramidDrop's form), at every step the rule ranks."""
    k: int | None = field(default=None, kw_only=True)
    stages: int = field(default=1, kw_only=True)
    lam: float = field(default=0.5, kw_only=True)

    def default_k(self, n_layers):
        """K when neither the rule nor its caller sets one."""
        return min(DEFAULT_K, max(1, n_layers - 1))

    def layers(self, k, n_layers):
        """[(layer, fraction)]: the layers before which image tokens go, K first, each with the fraction of stage 0's
        kept count that it keeps."""
        return [(k * (s + 1), self.lam ** s) for s in range(self.stages)]

    def image_tokens(self, n):
        """Image tokens the language model gets for an image of n features: all of them but under VisionZip."""
        return n

    def ranks(self, step):
        """Does this step read layer K-1's attention to rank the image tokens?"""
        return False

    def rate(self, step, shares, scores, kept_mask):
        """The drop rate at this step, (B,) or one number for every row, from the type shares (B, H, 4), the image
        tokens' scores (B, N) (None on a step that does not rank) and the still kept image tokens kept_mask (B, N)."""
        return 0.0

    def ranking(self, step, scores):
        """The scores the kept tokens are chosen by: FastV's (layer K-1's attention from the current query)."""
        return scores

    def check(self):
        """A ValueError naming the parameter a user set wrong."""

    def __post_init__(self):
        if isinstance(self.stages, bool) or not isinstance(self.stages, int) or self.stages < 1:
            raise ValueError(f"stages must be a whole number >= 1, got {self.stages!r}.")
        fraction("lam (the kept fraction per stage)", self.lam)
        self.check()


def fraction(what, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{what} must lie in [0, 1], got {value!r}.")


@dataclass
class FastV(Rule):
    """FastV: drop `ratio` of the image tokens once, at the prefill, the least attended by the last prompt token."""
    ratio: float = 0.5

    def check(self):
        fraction("FastV's drop ratio", self.ratio)

    def ranks(self, step):
        return step == 0

    def rate(self, step, shares, scores, kept_mask):
        return self.ratio


@dataclass
class Random(FastV):
    """A baseline: FastV's step and ratio, but the dropped image tokens drawn uniformly at random, row b of a batch
    seeded with seed + b."""
    seed: int = 0

    def ranking(self, step, scores):
        g = torch.Generator(scores.device)
        return torch.stack([torch.rand(scores.shape[1], generator=g.manual_seed(self.seed + b), device=scores.device)
                            for b in range(len(scores))])  # (B, N)


@dataclass
class VTW(Rule):
    """VTW: withdraw every image token before layer K, at the prefill (nothing to rank)."""

    def default_k(self, n_layers):
        """VTW's own layer: 15 of LLaVA-1.5-7B's 32 (its released code's K), at the same depth in other models."""
        return min(max(1, round(15 * n_layers / 32)), max(1, n_layers - 1))

    def rate(self, step, shares, scores, kept_mask):
        return 1.0


@dataclass
class Pyramid(Rule):
    """PyramidDrop: at the prefill, stages at layers K, 2K, 3K (8, 16, 24 of LLaVA-1.5-7B's 32), each keeping lam of
    the image tokens before it, ranked by the last prompt token's attention at the layer before."""
    stages: int = field(default=3, kw_only=True)

    def default_k(self, n_layers):
        return max(1, round(8 * n_layers / 32))

    def ranks(self, step):
        return step == 0

    def rate(self, step, shares, scores, kept_mask):
        return 1 - self.lam


@dataclass
class Depth(FastV):
    """Depth-based pruning (the seed paper's ablation IV-D1): FastV's ratio at K, then at every deeper layer l the
    kept image tokens fall linearly with depth, keeping (L - l) / (L - K) of K's (docs/costs.md)."""

    def check(self):
        super().check()
        if (self.stages, self.lam) != (Rule.stages, Rule.lam):  # the defaults
            raise ValueError("depth has a stage at every layer from K, its share set by depth: leave stages= and lam= "
                             "out.")

    def layers(self, k, n_layers):
        return [(layer, (n_layers - layer) / (n_layers - k)) for layer in range(k, n_layers)]


@dataclass
class VisionZip(Rule):
    """VisionZip, before the language model (a rule's `compress`: Llava.vision_features calls it): of the feature
    layer's tokens keep the `dominant` that CLS attends to most (CLS among them), in their order, and merge the rest
    into `contextual` tokens by the similarity of their keys. LLaVA-1.5-7B settings: 54 + 10 = 64 tokens, 108 + 20,
    162 + 30. The language model drops nothing more."""
    dominant: int = 54
    contextual: int = 10

    def check(self):
        for what, n in (("dominant", self.dominant), ("contextual", self.contextual)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"VisionZip's {what} must be a whole number >= 1, got {n!r}.")

    def image_tokens(self, n):
        if self.dominant + self.contextual > n:
            raise ValueError(f"VisionZip's dominant + contextual ({self.dominant} + {self.contextual}) must not exceed "
                             f"the image's {n} tokens.")
        return self.dominant + self.contextual

    def compress(self, hidden, cls_attention, keys):
        """hidden (n, T, Cv): the feature layer's output, CLS first; cls_attention (n, H, T): its CLS query's
        attention; keys (n, H, T, hs) -> (n, dominant + contextual, Cv)."""
        n, T, C = hidden.shape
        top = cls_attention.sum(1)[:, 1:].topk(self.dominant - 1, dim=1).indices + 1  # (n, d - 1): patches by CLS
        chosen = torch.zeros(n, T, dtype=torch.bool, device=hidden.device).scatter(1, top, True)
        chosen[:, 0] = True  # CLS is always kept
        R = T - self.dominant  # the rest, in their order
        rest, metric = hidden[~chosen].view(n, R, C), keys.mean(1)[~chosen].view(n, R, -1)  # (n, R, C), (n, R, hs)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        spaced = torch.arange(0, R, max(1, R // self.contextual), device=hidden.device)[:self.contextual]
        target = torch.zeros(R, dtype=torch.bool, device=hidden.device).index_fill(0, spaced, True)  # (R,)
        similarity = metric[:, ~target] @ metric[:, target].transpose(1, 2)  # (n, R - c, c): cosine
        assign = F.one_hot(similarity.argmax(-1), self.contextual).to(hidden.dtype)  # (n, R - c, c)
        merged = assign.transpose(1, 2) @ rest[:, ~target] / assign.sum(1).clamp(min=1)[..., None]  # (n, c, C): means
        return torch.cat([hidden[chosen].view(n, self.dominant, C), rest[:, target] + merged], 1)


@dataclass
class Schedule(Rule):
    """A hand-set rate per step (the last one holds after), ranked by FastV's scores at every step."""
    rates: tuple = (0.5,)

    def check(self):
        if not len(self.rates):
            raise ValueError("a schedule needs at least one rate.")
        for r in self.rates:
            fraction("a scheduled rate", r)

    def ranks(self, step):
        return True

    def rate(self, step, shares=None, scores=None, kept_mask=None):
        return self.rates[min(step, len(self.rates) - 1)]


@dataclass
class Ramp(Rule):
    """A hand-set dynamic schedule: from `start` at the prefill up to 1 (every image token gone) at step steps-1."""
    start: float = 0.5
    steps: int = 32

    def check(self):
        fraction("the ramp's start", self.start)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"the ramp's steps must be a whole number >= 1, got {self.steps!r}.")

    def ranks(self, step):
        return True

    def rate(self, step, shares=None, scores=None, kept_mask=None):
        return self.start + (1 - self.start) * min(step, self.steps - 1) / max(self.steps - 1, 1)


@dataclass
class Learned(Rule):
    """DyRate: a rate per step from the trained RatePredictor, which reads the current query's type shares."""
    predictor: "RatePredictor" = None

    def check(self):
        if not isinstance(self.predictor, RatePredictor):
            raise ValueError("the learned rule dyrate needs --predictor FILE (a trained predictor: train.py writes "
                             "one), or dyrate:predictor=FILE.")

    def default_k(self, n_layers):
        return self.predictor.k

    def ranks(self, step):
        return True

    def rate(self, step, shares, scores, kept_mask):
        B, dev = len(kept_mask), kept_mask.device
        rates = torch.tensor(self.predictor.rates, device=dev)
        return rates[self.predictor(shares, torch.full((B,), step, device=dev)).argmax(-1)]


@dataclass
class Mass(Rule):
    """Training-free: at every step, drop the least attended kept image tokens while the attention they carry stays
    below eps (a share of the current query's attention)."""
    eps: float = 0.05

    def check(self):
        fraction("the mass rule's eps", self.eps)

    def ranks(self, step):
        return True

    def rate(self, step, shares, scores, kept_mask):
        ascending = scores.masked_fill(~kept_mask, float("inf")).sort(-1).values  # (B, N), the gone ones last
        keep = kept_mask.sum(1) - (ascending.cumsum(-1) < self.eps).sum(-1)
        return 1 - keep / kept_mask.shape[1]


RULES = {"none": Rule, "fastv": FastV, "vtw": VTW, "schedule": Schedule, "ramp": Ramp, "dyrate": Learned, "mass": Mass,
         "random": Random, "pdrop": Pyramid, "depth": Depth, "visionzip": VisionZip}


def parse_rule(spec, cfg=None, device="cpu"):
    """A rule from its name and parameters, 'name:key=value:key=value' (a schedule's rates joined by '/'): 'fastv',
    'fastv:ratio=0.75', 'mass:eps=1e-5', 'ramp:start=0.5:steps=48', 'vtw:k=15' (every rule takes its own K),
    'dyrate:predictor=FILE' (checked against the model config cfg). A Rule passes through."""
    if isinstance(spec, Rule):
        return spec
    name, *params = str(spec).split(":")
    if name not in RULES:
        raise ValueError(f"Unknown rule {name!r}; choose one of {', '.join(RULES)} (parameters as name:key=value).")
    types = {f.name: f.type for f in fields(RULES[name])}
    args = {}
    for param in params:
        key, _, value = param.partition("=")
        if key not in types or not value:
            common = [f.name for f in fields(Rule)]  # every rule's (k, stages, lam), after its own
            takes = ", ".join(f"{k}=..." for k in sorted(types, key=lambda k: k in common and common.index(k) + 1))
            raise ValueError(f"{spec!r}: {name} takes {takes}, not {param!r}.")
        try:
            args[key] = (RatePredictor.load(value, cfg, device) if key == "predictor" else
                         tuple(float(r) for r in value.split("/")) if key == "rates" else
                         int(value) if types[key] in (int, int | None) else float(value))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{spec!r}: {key}={value!r} is not valid ({e}).") from None
    return RULES[name](**args)


def rule_name(rule):
    """The rule's table name: 'fastv', 'mass', ..."""
    return next(name for name, cls in RULES.items() if type(rule) is cls)


def rule_spec(rule, k):
    """The rule with every setting it runs with at pruning layer k, as parse_rule reads it: 'fastv:ratio=0.5:k=2'."""
    def text(value):
        return (getattr(value, "path", "<in memory>") if isinstance(value, RatePredictor) else
                "/".join(map(str, value)) if isinstance(value, tuple) else str(value))
    single = rule.stages == 1  # lam says nothing then
    params = [f"{f.name}={text(getattr(rule, f.name))}" for f in fields(rule)
              if f.name != "k" and not (single and f.name in ("stages", "lam"))]
    return ":".join([rule_name(rule), *params] + ([f"k={k}"] if type(rule) is not Rule else []))


def protocol(rule):
    """The prompt template and image padding (conv, pad) a learned rule's predictor was trained with, or None."""
    meta = getattr(rule.predictor, "meta", {}) if isinstance(rule, Learned) else {}
    return (meta["conv"], meta["pad"]) if "conv" in meta else None


def pruning_layer(n_layers, k=None, rule=None):
    """The pruning layer K for a model of n_layers decoder layers: the rule's own k, else k, else the rule's default
    (a learned rule's predictor's, VTW's own layer, else DEFAULT_K: 1 for a 2-layer model). Layer K-1 ranks the image
    tokens and layers >= K see the kept ones, so 1 <= K <= n_layers - 1."""
    rule = rule or Rule()
    k = rule.k if rule.k is not None else k
    trained = rule.predictor.k if isinstance(rule, Learned) else None
    if trained is not None and k is not None and k != trained:
        raise ValueError(f"The predictor was trained for K={trained}, not K={k}: leave K to the predictor.")
    top = max(1, n_layers - 1)
    k = k if k is not None else rule.default_k(n_layers)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= top:
        raise ValueError(f"K must lie in [1, {top}] for this {n_layers}-layer model: layer K-1 ranks the image tokens "
                         f"and layers K.. see the kept ones; got {k!r}.")
    last = rule.layers(k, n_layers)[-1][0]
    if last > top:
        raise ValueError(f"{rule.stages} stages from K={k} reach layer {last}, past this {n_layers}-layer model's "
                         f"last ({top}): lower stages= or k=.")
    return k


@dataclass
class StepRecord:
    """What a Pruner did at one step, for every row of the batch."""
    kept_count: torch.Tensor  # (B,) image tokens kept in layers >= k after this step
    dropped_mask: torch.Tensor  # (B, N) bool: the image tokens dropped at this step
    rate: torch.Tensor  # (B,) the drop rate chosen
    shares: torch.Tensor | None  # (B, H, 4) type shares of the current query at layer k-1, None if not computed
    ranked: bool  # the method itself read layer k-1 this step (statistics computed only for reporting do not count)
    deeper: list = field(default_factory=list)  # (B, N) bool: the image tokens each stage after the first keeps


class Pruner:
    """The inference hook for one generation of a batch: its prefill (step 0) and decode steps. image_start,
    prompt_len: (B,) tensors; the image occupies token positions image_start .. image_start + n_image - 1 of each row.
    rule: a Rule (or its name, parse_rule) says which steps rank and the rate at each. stats=True computes the type
    shares at every step (for --json / --viz), whether the rule reads them or not."""

    def __init__(self, rule, n_image, image_start, prompt_len, k=DEFAULT_K, stats=True):
        self.rule = parse_rule(rule)
        assert not isinstance(self.rule, Learned) or self.rule.predictor.k == k, "trained for another K (pruning_layer)"
        self.k, self.image_start, self.prompt_len, self.stats = k, image_start, prompt_len, stats
        self.n_image = self.rule.image_tokens(n_image)  # what the language model gets of an image's n_image features
        self.cut = n_image - self.n_image
        self.compress_image = getattr(self.rule, "compress", None)  # Llava.vision_features calls it (VisionZip)
        B, dev = len(image_start), image_start.device
        self.kept_mask = torch.ones(B, self.n_image, dtype=torch.bool, device=dev)  # (B, N)
        self.step = 0  # the next step: 0 = the prefill
        self.history: list[StepRecord] = []
        self.plan = None  # [(layer, fraction of stage 0's kept count)] of the rule's stages, K first (stages())
        self.deeper_masks = []  # (B, N) each: what each stage after the first keeps

    def stages(self, n_layers):
        """The layers before which this pruner acts (model.py): K, and any deeper stage's of the rule."""
        if self.plan is None:
            self.plan = self.rule.layers(self.k, n_layers)
            self.deeper_masks = [self.kept_mask.clone() for _ in self.plan[1:]]
        return [layer for layer, _ in self.plan]

    def probe_rows(self, n_valid, T, stage=0):
        """The query rows whose attention at the layer before the stage this step needs: each row's last real token,
        or none."""
        ranks = self.rule.ranks(self.step - (stage > 0))  # a deeper stage comes after stage 0 counted the step
        return (n_valid - 1)[:, None] if ranks or (self.stats and stage == 0) else None

    def __call__(self, probs, x, positions, n_valid, caches, stage=0):
        """Called before layer k. probs (B, H, 1, S): layer k-1's attention of each row's current query (None when
        this step needs no ranking); x (B, T, C), positions (B, T), n_valid (B,): what enters layer k; caches: every
        layer's KVCache. Chooses the rate, then drops the lowest-ranked of the still kept image tokens: at the
        prefill from x itself (layers >= k never compute them), at a decode step from the caches of every layer >= k
        (physically, at once: KVCache.drop). Kept counts never grow.
        A decode step reads nothing back to the host. Returns x, positions, n_valid and key mask (None) for layers
        >= k. A deeper stage (stage >= 1): deeper()."""
        if stage:
            return self.deeper(stage, probs, x, positions, n_valid, caches)
        prefill, ranks = self.step == 0, self.rule.ranks(self.step)
        shares = scores = None
        if probs is not None:
            shares = type_shares(probs, self.image_start, self.n_image, self.prompt_len)[:, 0]  # (B, H, 4)
            scores = image_scores(probs, self.image_start, self.n_image)[:, 0]  # (B, N)
        rate, keep, kept_mask = self.decide(shares, scores if ranks else None)
        drop = self.kept_mask & ~kept_mask  # (B, N)
        self.history.append(StepRecord(keep, drop, rate, shares, ranks))
        self.kept_mask, self.step = kept_mask, self.step + 1
        if prefill and bool(drop.any()):  # the dropped tokens never enter layers >= k
            x, positions, n_valid = drop_tokens(x, positions, n_valid, drop, self.image_start, self.n_image)
        elif not prefill and ranks:
            self.drop_from_caches(drop, caches)
        return x, positions, n_valid, None

    def decide(self, shares, scores):
        """This step's rate (B,), kept count (B,) and kept image tokens (B, N): the rate's kept count of the still kept
        image tokens, the best-ranked by the rule's ranking of this step's scores (None: a step that does not rank,
        so nothing or everything goes). Kept counts never grow."""
        rate = self.rule.rate(self.step, shares, scores, self.kept_mask)
        if not torch.is_tensor(rate):  # one rate for every row
            rate = torch.full(self.kept_mask.shape[:1], float(rate), device=self.kept_mask.device)
        kept_before = self.kept_mask.sum(1)  # (B,)
        keep = torch.minimum(kept_before, keep_count(rate, self.n_image).long())  # (B,): never grows
        if scores is None:  # no ranking this step: nothing or everything goes
            assert self.step > 0 or bool(((keep == 0) | (keep == kept_before)).all())
            return rate, keep, self.kept_mask & (keep[:, None] > 0)
        ranking = self.rule.ranking(self.step, scores)
        return rate, keep, rank_of(ranking.masked_fill(~self.kept_mask, float("-inf"))) < keep[:, None]

    def deeper(self, stage, probs, x, positions, n_valid, caches):
        """Stage s >= 1, before its layer: of the image tokens stage s-1 keeps after this step and stage s kept before,
        keep the best-ranked (by the rule's ranking of this layer's scores) plan[s]'s fraction of stage 0's kept
        count, and drop the rest from layers >= its layer, as stage 0 does from layers >= K."""
        layer, share = self.plan[stage]
        record, before, prefill = self.history[-1], self.deeper_masks[stage - 1], self.step == 1  # stage 0 counted it
        candidates = (self.kept_mask if stage == 1 else self.deeper_masks[stage - 2]) & before  # (B, N)
        kept = candidates
        if probs is not None:  # keys: the tokens entering this stage at the prefill, else the layer's cache slots
            keys = positions if prefill else caches[layer - 1].pos[:, :probs.shape[-1]]  # (B, S)
            scores = self.rule.ranking(self.step - 1, scores_by_position(probs, keys, self.image_start, self.n_image))
            keep = torch.minimum(candidates.sum(1), (share * record.kept_count + 0.5).floor().long())  # (B,)
            kept = rank_of(scores.masked_fill(~candidates, float("-inf"))) < keep[:, None]
        drop = before & ~kept
        self.deeper_masks[stage - 1] = kept
        record.deeper.append(kept.clone())  # the history's own copy (beam search reorders both)
        if prefill and bool(drop.any()):
            x, positions, n_valid = drop_tokens(x, positions, n_valid, drop, self.image_start, self.n_image)
        elif not prefill and probs is not None:
            self.drop_from_caches(drop, caches, stage)
        return x, positions, n_valid, None

    def drop_from_caches(self, drop, caches, stage=0):
        """A decode step's drops (B, N) leave the caches of every layer from the stage's on; the layers of each stage
        (up to the next one's) hold the same slots."""
        bounds = [layer for layer, _ in self.plan] + [len(caches)]
        for lo, hi in zip(bounds[stage:], bounds[stage + 1:]):
            _, gone = real_and_dropped(caches[lo].pos, caches[lo].length, drop, self.image_start, self.n_image)
            for cache in caches[lo:hi]:  # (B, S)
                cache.drop(gone)

    def summary(self, b, n_steps, history=None):
        """Row b's first n_steps steps (of `history`, else this pruner's) as plain lists: what tools/costs.py counts
        and --json, --viz report."""
        steps = (self.history if history is None else history)[:n_steps]
        learned = isinstance(self.rule, Learned)
        return dict(kept_visual=[int(h.kept_count[b]) for h in steps], probes=sum(h.ranked for h in steps),
                    dropped_at_step=[h.dropped_mask[b].nonzero()[:, 0].tolist() for h in steps],
                    rates=[round(float(h.rate[b]), 6) for h in steps],
                    type_shares=[None if h.shares is None else [round(v, 6) for v in h.shares[b].mean(0).tolist()]
                                 for h in steps],
                    k=self.k, predictor_flops=self.rule.predictor.flops() if learned else 0,
                    # for the costs: each stage's layer and kept count; an image compressed before the language model
                    # (VisionZip) is a stage at layer 0 of a prompt `prompt_cut` tokens longer
                    stages=[0] * bool(self.cut) + [layer for layer, _ in self.plan or [(self.k, 1.0)]],
                    kept_stages=[[self.n_image] * bool(self.cut) + [int(h.kept_count[b])] +
                                 [int(m[b].sum()) for m in h.deeper] for h in steps],
                    prompt_cut=self.cut, compressed=[self.rule.dominant, self.rule.contextual] if self.cut else None)


# ----------------------------------------------------------------------------------------------------------------------
# training: a differentiable choice of rate and the keep masks it implies


def gumbel_softmax_st(logits, tau, noise=None):
    """Straight-through Gumbel-Softmax: a hard one-hot sample forward, the softmax's gradient backward, temperature tau.
    noise: uniform samples of logits' shape (drawn here when None), so a caller can draw them once for a step.
    NOTE: the noise is added to logits / tau, so the hard sample is drawn from softmax(logits / tau) and becomes the
    argmax inference uses as tau anneals (on the raw logits it would sample softmax(logits) whatever tau)."""
    u = (torch.rand(logits.shape, device=logits.device) if noise is None else noise).clamp(1e-10, 1 - 1e-7)
    soft = (logits.float() / tau - torch.log(-torch.log(u))).softmax(-1)
    hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


def masked_attention(probs, weight, v):
    """probs (B, nh, T, S) fp32 attention, weight (B, 1, T, S) in [0, 1] (TrainMask's), v (B, nh, S, hs): the
    attention renormalised over the weighted keys, applied to v; the value and every other gradient are exact.
    NOTE: the gradient reaching `weight` is p_j (v_j - y), not the exact p_j (v_j - y) / Z: when a mask drops the few
    keys holding nearly all the mass, Z ~ 1e-16 and the exact one drowns the loss; this one is bounded by |v_j - y|."""
    kept = probs * weight.detach()
    y = (kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).tiny)).to(v.dtype) @ v  # (B, nh, T, hs)
    if not weight.requires_grad:
        return y
    delta = probs * (weight - weight.detach())  # zero; its gradient is probs
    return y + (delta.to(v.dtype) @ v - delta.sum(-1, keepdim=True).to(v.dtype) * y.detach())


def candidate_masks(scores, keeps):
    """scores (..., N), keeps (C,) -> (..., C, N) bool: candidate c keeps its keeps[c] best-ranked image tokens.
    One sort serves every candidate (DiffRate's cumulative masks)."""
    return rank_of(scores)[..., None, :] < keeps[:, None]


class TrainMask:
    """The training hook (train.py): the same statistics as the Pruner for *every* query row of a teacher-forced
    sequence, a straight-through Gumbel-Softmax choice of rate per row, and the keep mask it implies, handed to layers
    >= k as a float key weight (masked_attention), so the language-model loss reaches the predictor. Prompt rows take
    the last prompt row's (the step-0) decision, as inference does. noise: the Gumbel noise's uniform samples
    (B, T, n_rates), or None to draw them.

    Two halves, so that train.py can run layers < k once, without autograd, for the teacher and the student:
    statistics() (data: no gradient reaches the predictor through layers < k, whose output does not depend on it)
    and decide() (the predictor, the sample, the mask: where the gradient goes)."""

    def __init__(self, predictor, n_image, image_start, prompt_len, tau=1.0, noise=None):
        self.predictor, self.n_image, self.k = predictor, n_image, predictor.k
        self.image_start, self.prompt_len, self.tau, self.noise = image_start, prompt_len, tau, noise
        self.logits = None  # (B, T, C) the predictor's logits of the last forward
        self.onehot = None  # (B, T, C) its straight-through choice
        self.kept_count = None  # (B, T) float: each query row's kept count, differentiable (the cost terms use it)

    def stages(self, n_layers):
        return [self.k]

    def probe_rows(self, n_valid, T, stage=0):
        """Every query row of the sequence."""
        return torch.arange(T, device=n_valid.device).expand(len(n_valid), T)

    def statistics(self, probs):
        """probs (B, H, T, S), layer k-1's attention of every row -> what each row decides from: the type shares
        (B, T, H, 4) and the image tokens' scores (B, T, N), the prompt rows' taken from the last prompt row."""
        B, H, T, S = probs.shape
        src = torch.maximum(torch.arange(T, device=probs.device)[None], (self.prompt_len - 1)[:, None])  # (B, T)
        shares = type_shares(probs, self.image_start, self.n_image, self.prompt_len)  # (B, T, H, 4)
        scores = image_scores(probs, self.image_start, self.n_image)  # (B, T, N)
        return shares.gather(1, src[..., None, None].expand(-1, -1, H, 4)), \
            scores.gather(1, src[..., None].expand(-1, -1, self.n_image))

    def decide(self, shares, scores, S):
        """Each row's rate (sampled), its keep mask and kept count; returns the (B, T, S) key weight over S keys."""
        B, T, _ = scores.shape
        step = (torch.arange(T, device=scores.device) - (self.prompt_len - 1)[:, None]).clamp(min=0)  # (B, T)
        self.logits = self.predictor(shares, step)  # (B, T, C)
        self.onehot = gumbel_softmax_st(self.logits, self.tau, self.noise)  # (B, T, C)
        keeps = keep_count(torch.tensor(self.predictor.rates, device=scores.device), self.n_image)  # (C,)
        masks = candidate_masks(scores, keeps)  # (B, T, C, N)
        weight = (self.onehot[..., None] * masks).sum(-2)  # (B, T, N): 0/1 forward, gradient into onehot
        self.kept_count = self.onehot @ keeps.to(self.onehot.dtype)  # (B, T)
        idx = (self.image_start[:, None] + torch.arange(self.n_image, device=scores.device))[:, None].expand(-1, T, -1)
        return torch.ones(B, T, S, device=scores.device).scatter(2, idx, weight)

    def __call__(self, probs, x, positions, n_valid, caches, stage=0):
        """Called before layer k with probs (B, H, T, S), layer k-1's attention of every row; drops nothing, returns
        the (B, T, S) key weight for layers >= k."""
        return x, positions, n_valid, self.decide(*self.statistics(probs), probs.shape[-1])


# ----------------------------------------------------------------------------------------------------------------------
# costs: FLOPs and KV-cache bytes of a generation, from its kept counts


def layer_flops(t, T, S):
    """Matmul FLOPs (2 per multiply-add) of one decoder layer on T tokens attending to S keys each (dense count)."""
    proj = 2 * T * t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim \
        + 2 * T * t.num_attention_heads * t.head_dim * t.hidden_size  # q, k, v, o
    return proj + 2 * 3 * T * t.hidden_size * t.intermediate_size + 2 * 2 * t.num_attention_heads * T * S * t.head_dim


def segments(cfg, k, kept):
    """[(layers, image tokens they hold)] from layer 0 up: layers < K every image token, then each stage's layers (to
    the next stage's) its kept count. k: K, or the stages' layers (Pruner.summary's `stages`); kept: a count, or one
    per stage (or one for every stage)."""
    ks = list(k) if isinstance(k, (list, tuple)) else [k]
    counts = list(kept) if isinstance(kept, (list, tuple)) else [kept] * len(ks)
    ends = ks[1:] + [cfg.text.num_hidden_layers]
    return [(ks[0], cfg.n_image_tokens)] + [(end - start, c) for start, end, c in zip(ks, ends, counts)]


def generation_flops(cfg, prompt_len, kept, k=DEFAULT_K, probes=0, predictor_flops=0, cache=True, compressed=None):
    """Matmul FLOPs of generating len(kept) tokens for one row: kept[t] image tokens remain in layers >= k at step t
    (kept[0] at prefill; with several stages, k their layers and kept[t] a count per stage: segments). `probes` steps
    computed the layer k-1 statistics and ran the predictor (and ranked at each deeper stage). cache=False: every
    step recomputes the whole kept sequence so far (FastV's original code); the image features are computed once.
    compressed: VisionZip's (dominant, contextual), whose work in the vision tower counts too."""
    t, v, N = cfg.text, cfg.vision, cfg.n_image_tokens
    Tv = (v.image_size // v.patch_size) ** 2 + 1  # CLIP runs on the patches + CLS
    vision = (2 * (Tv - 1) * v.num_channels * v.patch_size ** 2 * v.hidden_size + cfg.n_vision_layers_used
                         * (2 * 4 * Tv * v.hidden_size ** 2 + 2 * 2 * Tv * v.hidden_size * v.intermediate_size
                            + 2 * 2 * Tv * Tv * v.hidden_size))
    projector = 2 * (sum(compressed) if compressed else N) * (v.hidden_size * t.hidden_size + t.hidden_size ** 2)
    if compressed:  # the CLS query's scores in the feature layer, the keys' similarities, the merge
        other, hs = Tv - sum(compressed), v.hidden_size // v.num_attention_heads
        vision += 2 * Tv * v.hidden_size + 2 * other * compressed[1] * (hs + v.hidden_size)
    lm_head, steps = 2 * t.hidden_size * t.vocab_size, []
    for step in range(len(kept)):
        if cache and step > 0:  # one new token attending to the cached keys
            # NOTE: a decode step's own drops are counted from the next step on (tools/fast.py compacts them then)
            steps.append(sum(n * layer_flops(t, 1, prompt_len - (N - c) + step)
                             for n, c in segments(cfg, k, kept[step - 1])) + lm_head)
        else:  # the whole (kept) sequence so far
            steps.append(sum(n * layer_flops(t, T, T) for n, c in segments(cfg, k, kept[step])
                             for T in [prompt_len - (N - c) + step]) + lm_head)
    keys_at_probe = sum(prompt_len + s for s in range(probes))  # layer k-1 holds every token
    # the prefill's probe scores at each stage (beside SDPA's pass; a decode step's probe is its attention), over the
    # tokens the layer before holds; type shares; predictor
    probed = [prompt_len - (N - c) for _, c in segments(cfg, k, kept[0])[:-1]] if probes else []
    overhead = sum(2 * t.num_attention_heads * t.head_dim * n for n in probed) \
        + 2 * t.num_attention_heads * 4 * keys_at_probe + probes * predictor_flops
    return vision + projector + sum(steps) + overhead


def kv_cache_bytes(cfg, prompt_len, n_new, kept, k, dtype):
    """Bytes of keys and values one row holds after generating n_new tokens (the last is never fed back) with `kept`
    image tokens left in layers >= k (or per stage: segments)."""
    t = cfg.text
    n = prompt_len + n_new - 1
    per_token = 2 * t.num_key_value_heads * t.head_dim * torch.finfo(dtype).bits // 8
    return per_token * sum(layers * (n - (cfg.n_image_tokens - c)) for layers, c in segments(cfg, k, kept))


def budget_cost(cfg, prompt_len, kept, k, budget, probes=0, predictor_flops=0, dtype=torch.float16, compressed=None):
    """The cost a budget is on (one of BUDGETS) of one row's generation with kept[t] image tokens in layers >= k at
    step t, and none's (every image token kept, no statistics): `flops` with a KV cache, `nocache` FLOPs when every
    step recomputes the kept sequence, `kv` the KV cache held after each step summed over the steps (over many rows:
    the mean KV-cache size, long answers weighing more). Ints give ints; tensors (training) give a differentiable
    tensor."""
    n, none = len(kept), [cfg.n_image_tokens] * len(kept)
    if budget == "kv":
        def held(counts):
            return sum(kv_cache_bytes(cfg, prompt_len, s + 1, counts[s], k, dtype) for s in range(n))
        return held(kept), held(none)
    cache = budget == "flops"
    return (generation_flops(cfg, prompt_len, kept, k, probes, predictor_flops, cache, compressed),
            generation_flops(cfg, prompt_len, none, k, cache=cache))


def row_cost(cfg, row, budget, dtype=torch.float16):
    """budget_cost of a generation row (Pruner.summary with its prompt_tokens)."""
    return budget_cost(cfg, row["prompt_tokens"] + row["prompt_cut"], row["kept_stages"], row["stages"], budget,
                       row["probes"], row["predictor_flops"], dtype, row["compressed"])
