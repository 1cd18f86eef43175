"""
The shapes model's training from scratch: model.py's classes at a tiny size, a llava-hf checkpoint folder out.

    python -m shapes.train_model --out models/shapes     # ~15 minutes on 2 CPU cores; docs/shapes.md says how

Stage 1 trains the vision tower alone on patch labels; stage 2 trains everything on packed rows (every question about
a scene in one row, the image encoded once) with two training-only heads, dropping image tokens from layer 2 on,
physically: most of the background in the first steps (cheap ones), any share in the last, pruning-aware ones, so
that FastV / DyRate can drop image tokens from layers >= 2 without losing answers.
"""
import argparse
import json
import os
import random
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import dyrate
import model
import processing
from shapes.data import (CELLS, COLOURS, COVERED, IMAGE_SIZE, SHAPES, caption, coverage, draw, item_label, make_scene,
                         named, patch_labels, questions, sample, task)
from shapes.experiment import accuracy_line, evaluate_answers
from tools import tokenizer


def corpus():
    """Every text the model will see, for the tokenizer."""
    rng, lines = random.Random(0), [processing.SYSTEM_PROMPT, *processing.TEMPLATES.values()]
    for _ in range(3000):
        scene = make_scene(rng)
        lines += [f"USER: \n{q} ASSISTANT: {a}" for q, a in questions(scene)]
    return lines



def factor_loss(logits, labels, sizes):
    """Cross-entropy of logits (..., sum(sizes)), split into one group per label, against labels (..., len(sizes)),
    summed over the labels: (...,)."""
    return sum(F.cross_entropy(z.flatten(0, -2), y.flatten(), reduction="none").view(y.shape)
               for z, y in zip(logits.split(sizes, dim=-1), labels.unbind(-1)))


def model_config(vocab_size, image_token_index, pad_token_id):
    """Tiny LLaVA whose FLOPs sit mostly in a deep, narrow decoder (so pruning image tokens from layers >= 2 matters):
    CLIP 64 wide x 2 blocks (feature = last block), decoder 128 wide x 12 layers, 256 image tokens."""
    return model.LlavaConfig(
        vision=model.VisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=14),
        text=model.TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=352, num_hidden_layers=12,
                          num_attention_heads=8, num_key_value_heads=8, head_dim=16, max_position_embeddings=512,
                          rope_theta=1e6),  # NOTE: 16-dim heads keep few slowly turning RoPE pairs at 1e4
        image_token_index=image_token_index, pad_token_id=pad_token_id, vision_feature_layer=-1)


def save_config(cfg, folder):
    """config.json in llava-hf's layout, every size written out."""
    top = {k: v for k, v in asdict(cfg).items() if k not in ("vision", "text")}
    d = dict(architectures=["LlavaForConditionalGeneration"], model_type="llava", tie_word_embeddings=False, **top,
             text_config=dict(model_type="llama", **asdict(cfg.text)),
             vision_config=dict(model_type="clip_vision_model", **asdict(cfg.vision)))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(d, f, indent=1)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(dict(image_processor_type="CLIPImageProcessor", size={"shortest_edge": IMAGE_SIZE}, resample=3,
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=True, do_resize=True,
                       do_rescale=True, do_normalize=True, do_convert_rgb=True, rescale_factor=1 / 255,
                       image_mean=list(processing.CLIP_MEAN), image_std=list(processing.CLIP_STD)), f)


def save_model(llava, folder):
    """model.safetensors in fp16, the hub's key layout (our module names), written atomically."""
    tensors = {k: v.half().contiguous() for k, v in llava.state_dict().items()}
    processing.atomic_write(os.path.join(folder, "model.safetensors"),
                            lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def init_weights(llava):
    """GPT-2-style initialisation (model.py builds modules with PyTorch's defaults, meant to be overwritten by a load):
    N(0, 0.02), the projections into the residual stream scaled by 1/sqrt(2 * layers)."""
    layers = llava.config.text.num_hidden_layers
    for name, p in llava.named_parameters():
        if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm" in name:
            torch.nn.init.ones_(p) if name.endswith("weight") else torch.nn.init.zeros_(p)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
        else:
            residual = name.endswith(("o_proj.weight", "down_proj.weight", "out_proj.weight", "fc2.weight"))
            torch.nn.init.normal_(p, std=0.02 / (2 * layers) ** 0.5 if residual else 0.02)
    with torch.no_grad():  # CLIP's position embeddings start as 2-D sine-cosine (as in MAE), then train
        grid, dim = llava.config.vision.image_size // llava.config.vision.patch_size, llava.config.vision.hidden_size
        freqs = 1.0 / 100 ** (torch.arange(dim // 4) / (dim // 4))  # (dim/4,)
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        angles = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1)  # (grid^2, dim/2)
        table = llava.vision_tower.vision_model.embeddings.position_embedding.weight
        table[1:] = torch.cat([angles.sin(), angles.cos()], dim=1) * 0.5


def answer_items(tok, scene, question, answer):
    """Which shape each answer token (and the closing </s>) is about, -1 for none: the shape a colour or position
    question names; in a caption (or the caption that opens a detailed description), the shape whose phrase the token
    falls in. And which tokens come after that caption in a detailed description (the </s> too): the "late" ones."""
    enc = tok.tok.encode(answer, add_special_tokens=False)
    items = scene["items"]
    late = [False] * (len(enc.ids) + 1)
    if task(question) == "detail":
        end = len(caption(scene))
        late = [s >= end for s, _ in enc.offsets] + [True]
    if task(question) in ("colour", "position"):
        named_it = next(i for i, it in enumerate(items) if it["shape"] in question and "color" in question
                        or f"the {CELLS[it['cell']]}?" in question)
        return enc.ids, [named_it] * len(enc.ids) + [-1], late
    spans, at = [], 0
    if task(question) in ("caption", "detail"):
        for i, it in enumerate(items):
            phrase = f"{named(it)} at the {CELLS[it['cell']]}"
            at = answer.lower().index(phrase.lower(), at)
            spans.append((at, at + len(phrase), i))
    about = [next((i for lo, hi, i in spans if lo <= (s + e) // 2 < hi), -1) for s, e in enc.offsets]
    return enc.ids, about + [-1], late


def packed(tok, cfg, scene):
    """One training row holding every question about a scene, each exactly as a single-turn prompt would see it:
    the prompt prefix up to the end of the image once, then one segment per question (the rest of its prompt, the
    answer, </s>) whose RoPE positions restart where the prefix ends and which sees only the prefix and itself. So the
    image is encoded once for a dozen questions and no answer can leak into another. Returns ids, positions, segment
    ids (0 = prefix) and per loss row (the row before each answer token and </s>): its index, its target, the shape
    its token is about (-1: none), and whether it is late (answer_items)."""
    qa = questions(scene)
    first, start = tok.encode_prompt(qa[0][0])
    P = start + cfg.n_image_tokens  # the prefix: BOS ... last image token
    ids, positions, segment, rows, targets, about, late = first[:P], list(range(P)), [0] * P, [], [], [], []
    for s, (q, a) in enumerate(qa, 1):
        prompt = tok.encode_prompt(q)[0]
        assert prompt[:P] == first[:P], "every question shares the prefix"
        answer, items, after = answer_items(tok, scene, q, a)
        seg = prompt[P:] + answer + [cfg.eos_token_id]
        n = len(ids) + len(prompt) - P  # index of the first answer token
        rows += range(n - 1, len(ids) + len(seg) - 1)
        targets += seg[len(prompt) - P:]
        about += items
        late += after
        ids, positions, segment = ids + seg, positions + list(range(P, P + len(seg))), segment + [s] * len(seg)
    return ids, positions, segment, rows, targets, about, late


def packed_batch(llava, tok, scenes):
    """Packed rows for scenes, padded at the end: ids, positions, segments (B, T), pixel values, then, indexing the
    rows after the shared prefix (what packed_forward returns): the flat indices and targets of the loss rows, for the
    reading loss the loss rows about a shape (B, R), that shape's item_label (B, R, 3) and which of the R are real
    (B, R), and for the ranking and late-share losses the loss rows (B, L), which are real and which are late."""
    rows = [packed(tok, llava.config, s) for s in scenes]
    B, T = len(rows), max(len(r[0]) for r in rows)
    prefix = rows[0][2].count(0)  # the prefix, the same in every row: BOS ... last image token
    ids = torch.full((B, T), llava.config.pad_token_id)
    positions, segment = torch.zeros(B, T, dtype=torch.long), torch.full((B, T), -1)
    flat, targets, reads, per_row = [], [], [], []
    for b, (seq, pos, seg, loss_rows, tgt, about, _) in enumerate(rows):
        assert seg.count(0) == prefix and min(loss_rows) >= prefix, "every row shares the prefix; answers come after it"
        ids[b, :len(seq)], positions[b, :len(seq)], segment[b, :len(seq)] = (torch.tensor(v) for v in (seq, pos, seg))
        loss_rows = [i - prefix for i in loss_rows]
        flat += [b * (T - prefix) + i for i in loss_rows]
        per_row.append(loss_rows)
        targets += tgt
        its = scenes[b]["items"]
        reads.append([(i, item_label(its[item])) for i, item in zip(loss_rows, about) if item >= 0])
    R = max(map(len, reads))
    read_rows, read_label, read_valid = torch.zeros(B, R, dtype=torch.long), torch.zeros(B, R, 3, dtype=torch.long), \
        torch.zeros(B, R)
    for b, pairs in enumerate(reads):
        for r, (i, label) in enumerate(pairs):
            read_rows[b, r], read_label[b, r], read_valid[b, r] = i, torch.tensor(label), 1
    L = max(map(len, per_row))
    loss_rows, loss_valid, loss_late = torch.zeros(B, L, dtype=torch.long), torch.zeros(B, L), torch.zeros(B, L)
    for b, r in enumerate(per_row):
        loss_rows[b, :len(r)], loss_valid[b, :len(r)] = torch.tensor(r), 1
        loss_late[b, :len(r)] = torch.tensor(rows[b][6], dtype=torch.float32)
    px = torch.stack([processing.preprocess(draw(s), IMAGE_SIZE) for s in scenes])
    return (ids, positions, segment, px, torch.tensor(flat), torch.tensor(targets), (read_rows, read_label, read_valid),
            (loss_rows, loss_valid, loss_late))


READ_LAYERS = 4  # the reading loss looks at the hidden states after this many decoder layers
PRUNE_LAYER = 2  # K: pruning-aware training hides image tokens from layers >= K, ranks them at layer K-1


def packed_forward(llava, ids, positions, segment, px, kept=None, rank_rows=None, blind=None):
    """Packed rows through the model in two passes over per-layer KV caches, as generation runs: the shared prefix
    alone (causal), then all the segments at once (each sees the cached prefix and itself). kept (B, n): the image
    tokens (indices into the N) each row keeps from layer PRUNE_LAYER on, the same number in every row; the others are
    dropped physically, as FastV drops them, so a pruning-aware step is also a cheaper one. blind (B, Ts) bool: the
    segment tokens that see no image token at all in layers >= PRUNE_LAYER (as if DyRate had dropped all). Returns the
    vision
    features (B, N, Cv) and, for the segment tokens only (B, Ts = T - prefix): the hidden states after READ_LAYERS
    decoder layers (B, Ts, C), the attention probabilities of rank_rows (B, R) at layer PRUNE_LAYER - 1 over the
    whole prefix and the segments (B, nh, R, prefix + Ts) or None, and the logits (B, Ts, vocab)."""
    cfg, lm = llava.config, llava.language_model.model
    K, L, N = PRUNE_LAYER, cfg.text.num_hidden_layers, cfg.n_image_tokens
    vision = llava.vision_features(px)  # (B, N, Cv)
    x = llava.embed(ids, vision=vision)  # (B, T, C)
    B, T, C = x.shape
    prefix = int((segment[0] == 0).sum())  # BOS ... last image token, in every row
    full = lambda n: torch.full((B,), n)  # noqa: E731 (every token of a chunk is real: padding is masked by segment)
    caches = llava.new_caches(B, T - prefix)
    h, _ = lm.run(0, K, x[:, :prefix], positions[:, :prefix], full(prefix), caches)  # (B, prefix, C)
    keys, pos = prefix, positions[:, :prefix]
    if kept is not None:  # layers >= K hold only the text and the kept image tokens of the prefix
        drop = torch.ones(B, N, dtype=torch.bool).scatter(1, kept, False)  # (B, N)
        h, pos, _ = dyrate.drop_tokens(h, pos, full(prefix), drop, full(prefix - N), N)  # (B, prefix - N + n, C)
        keys = h.shape[1]
    lm.run(K, L, h, pos, full(keys), caches)  # fills the caches of layers K.. (the prefix's own output is not needed)
    seg = segment[:, prefix:]  # (B, Ts), -1 = padding
    same = seg[:, None, :] == seg[:, :, None]  # (B, Ts, Ts): a segment sees itself (the causal mask does the rest)
    sees = lambda n: torch.cat([same.new_ones(B, T - prefix, n), same], 2)  # noqa: E731 (B, Ts, n + Ts): and the prefix
    xs, pos = x[:, prefix:], positions[:, prefix:]
    xs, probs = lm.run(0, K, xs, pos, full(T - prefix), caches, probe_rows=rank_rows, key_weight=sees(prefix))
    late = sees(keys)  # (B, Ts, keys + Ts)
    if blind is not None:
        late[..., prefix - N:keys] &= ~blind[..., None]  # the prefix's image tokens (all of it after prefix - N)
    mid, _ = lm.run(K, READ_LAYERS, xs, pos, full(T - prefix), caches, key_weight=late)
    xs, _ = lm.run(READ_LAYERS, L, mid, pos, full(T - prefix), caches, key_weight=late)
    return vision, mid, probs, llava.language_model.lm_head(lm.norm(xs))


# NOTE: every stage-2 step drops image tokens from layer PRUNE_LAYER on (physically: cheaper), the way FastV does,
# choosing them by the ground truth: the patches a shape covers most first, partly covered ones mixed with background by
# noise. Shapes cover at most ~27 of the 256 patches, so the answers stay in view. The first steps keep only a few
# (CHEAP_KEEP: every shape patch and some background; half the cost of a whole step, and the model learns from them as
# fast per step); the last, pruning-aware ones keep PRUNE_KEEP, and all of them PRUNE_WHOLE of the time, so the model
# ends up right on whole images and on any share FastV or DyRate leaves it.
CHEAP_KEEP = (0.12, 0.3)  # the kept share of the image tokens, drawn per step
PRUNE_KEEP, PRUNE_WHOLE = (0.15, 1.0), 1 / 3
# NOTE: a detailed description restates the caption's facts; for those late tokens the picture is no longer needed, the
# situation the seed paper describes for LLaVA's long answers. Half of the steps hide every image token from the late
# rows in layers >= PRUNE_LAYER (they learn to read the response), and a loss on layer PRUNE_LAYER - 1's image share
# of the late rows, where DyRate reads its statistics, lets that layer show it.
BLIND_SHARE, LATE_WEIGHT = 0.5, 1.0


def pruned_keys(covers, rng, keep, whole=0.0):
    """The image tokens a step keeps from layer PRUNE_LAYER on, given each scene's coverage(scene) (items, N): with
    probability whole None (all), else (B, n), ascending, n a random share in keep of N, the same for the batch (so
    packed_forward can drop the others physically): the patches covered most by a shape first (the ranking the ranking
    loss teaches layer PRUNE_LAYER - 1), partly covered ones mixed with background by noise."""
    if whole and rng.random() < whole:
        return None
    N = covers[0].shape[1]
    n, noise = int(N * rng.uniform(*keep)), np.random.default_rng(rng.randrange(1 << 30))
    score = [items.max(0) + 0.3 * noise.random(N) for items in covers]  # (N,) each
    return torch.from_numpy(np.stack([np.sort(np.argsort(-s)[:n]) for s in score]))


def ranking_loss(probs, valid, covers, start):
    """Layer PRUNE_LAYER - 1's attention of every loss row (B, nh, R, T), averaged over heads as FastV and DyRate
    rank image tokens, must give each shape (its patches as item_patches counts them, from each scene's coverage) its
    share of the row's attention to the image: mean over shapes and real rows of -log(share of shape i), minimal when
    the image attention is split evenly over the shapes' patches."""
    N = covers[0].shape[1]
    image = probs.mean(1)[..., start:start + N]  # (B, R, N)
    cover = torch.zeros(len(covers), 3, N)
    for b, c in enumerate(covers):
        cover[b, :len(c)] = torch.tensor(c >= COVERED, dtype=torch.float32)
    share = (image @ cover.transpose(1, 2)) / (image.sum(-1, keepdim=True) + 1e-9)  # (B, R, 3)
    weight = valid[..., None] * (cover.sum(-1) > 0)[:, None, :].float()  # (B, R, 3): real rows x real shapes
    return (-(share + 1e-4).log() * weight).sum() / weight.sum()


def train_model(out, iters, vision_iters, batch, lr, seed, eval_every, prune_iters=0, init=None, n_val=192, log=print):
    """Write the tokenizer and config.json to out, train (stage 1: vision_iters steps; stage 2: iters steps, the last
    prune_iters pruning-aware), evaluating on n_val held-out questions and saving every eval_every steps. init: start
    from that saved shapes model instead of random weights (the training-only heads then stay off)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    image_id, pad_id = tokenizer.build_tokenizer(out, corpus(), vocab_size=220)
    vocab = (pad_id + 1 + 63) // 64 * 64  # like llava-hf: the embedding padded to a multiple of 64
    cfg = model_config(vocab, image_id, pad_id)
    save_config(cfg, out)
    if init is None:
        llava = model.Llava(cfg)
        init_weights(llava)
    else:  # go on from a saved shapes model (e.g. only the pruning-aware steps)
        llava = model.Llava.from_pretrained(init).requires_grad_(True)  # (loaded for inference: frozen)
        if llava.config != cfg:
            raise ValueError(f"{init} is not a shapes model of this script's size ({llava.config} != {cfg}).")
    tok = processing.Tokenizer(out, cfg)
    log(f"shapes model: {sum(p.numel() for p in llava.parameters()) / 1e6:.2f}M parameters, {cfg.n_image_tokens} image "
        f"tokens, training the vision tower {vision_iters} steps, then everything {iters} steps of {batch} scenes (the "
        f"last {prune_iters} pruning-aware), on {torch.get_num_threads()} threads")
    val_rng = random.Random(seed + 1)
    val = []
    for _ in range(n_val):
        scene, q, a = sample(val_rng)
        val.append(dict(image=draw(scene), prompt=q, answer=a))
    # NOTE: an auxiliary head, used in training only: it classifies every patch (which shape and colour covers it, or
    # background; which grid cell a covered patch lies in) from the vision features. Stage 1 trains the vision tower
    # alone on it (LLaVA starts from a pretrained CLIP; ours gets its few minutes here); stage 2 keeps it on while
    # everything trains on the answers. NOTE: stage 2 also has a reading loss: a linear head on the hidden state after
    # READ_LAYERS decoder layers must name the shape (class, grid row, grid column) that the token this row predicts is
    # about. Without it the model sat for 1500 steps on a plateau where its attention spread evenly over all shapes: it
    # counted them and guessed the rest (captions <= 22% right); telling one head where to look (an attention loss) did
    # not help, the value it fetched drowned in the residual stream. With the reading loss captions pass 60% in 300
    # steps. Both are training-only heads; the saved model is a plain LLaVA.
    kinds = 1 + len(SHAPES) * len(COLOURS)
    aux = torch.nn.Linear(cfg.vision.hidden_size, kinds + 4 + 4)  # kind, row, column (+ background)
    tower = llava.vision_tower.vision_model

    def patch_loss(vision, scenes):
        labels = torch.tensor(np.stack([patch_labels(s) for s in scenes]), dtype=torch.long)  # (B, 3, N)
        labels = labels.transpose(1, 2)  # (B, N, 3)
        weight = torch.where(labels[..., 0] == 0, 0.05, 1.0)  # background: most patches, and easy
        return (factor_loss(aux(vision), labels, (kinds, 4, 4)) * weight).sum() / weight.sum()

    t0 = time.perf_counter()
    opt = torch.optim.AdamW([*tower.parameters(), *aux.parameters()], lr=lr, betas=(0.9, 0.98), weight_decay=0.01,
                            fused=True)
    for it in range(vision_iters):  # stage 1
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (it + 1) / 50)
        scenes = [make_scene(rng) for _ in range(32)]
        px = torch.stack([processing.preprocess(draw(s), IMAGE_SIZE) for s in scenes])
        loss = patch_loss(tower(px, cfg.n_vision_layers_used)[:, 1:], scenes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % 50 == 0 or it == vision_iters - 1:
            log(f"vision step {it}/{vision_iters}: patch labels {loss.item():.4f} | {time.perf_counter() - t0:.0f} s")
    read = torch.nn.Linear(cfg.text.hidden_size, kinds + 3 + 3)  # kind, row, column of the shape a row is about
    opt = torch.optim.AdamW([*llava.parameters(), *aux.parameters(), *read.parameters()], lr=lr, betas=(0.9, 0.98),
                            weight_decay=0.01, fused=True)
    heads = 1.0 if init is None else 0.0  # the training-only heads start untrained when going on from a model
    for it in range(iters):  # stage 2
        for g in opt.param_groups:  # warmup then cosine to a tenth
            g["lr"] = lr * min(1.0, (it + 1) / 50) * (0.55 + 0.45 * np.cos(np.pi * it / iters))
        scenes = [make_scene(rng) for _ in range(batch)]
        ids, positions, segment, px, flat, targets, (read_rows, read_label, read_valid), \
            (loss_rows, loss_valid, loss_late) = packed_batch(llava, tok, scenes)
        # NOTE: the last prune_iters steps are pruning-aware: trained only on whole images, the model leaned on every
        # image token (FastV dropping just the 10% least attended cost 4 points of accuracy), and the ranking layer's
        # attention favoured background patches. There the kept share varies over the whole range (see pruned_keys),
        # and the ranking loss makes layer K-1 attend to the shapes.
        prune = it >= iters - prune_iters
        start = int((ids[0] == cfg.image_token_index).nonzero()[0])  # the first image token (all rows alike)
        covers = [coverage(s) for s in scenes]  # (items, N) each
        kept = pruned_keys(covers, rng, PRUNE_KEEP, PRUNE_WHOLE) if prune else pruned_keys(covers, rng, CHEAP_KEEP)
        blind = None
        if rng.random() < BLIND_SHARE:  # the late rows of the detailed descriptions see no image in layers >= K
            blind = torch.zeros(segment[:, start + cfg.n_image_tokens:].shape, dtype=torch.bool)
            blind.scatter_(1, loss_rows, (loss_late * loss_valid).bool())
        llava.train()
        vision, mid, probs, logits = packed_forward(llava, ids, positions, segment, px, kept, loss_rows, blind)
        lm_loss, aux_loss = F.cross_entropy(logits.flatten(0, 1)[flat], targets), patch_loss(vision, scenes)
        guess = read(mid.gather(1, read_rows[..., None].expand(-1, -1, mid.shape[-1])))  # (B, R, 19 + 3 + 3)
        read_loss = (factor_loss(guess, read_label, (kinds, 3, 3)) * read_valid).sum() / read_valid.sum()
        rank_loss = ranking_loss(probs, loss_valid, covers, start) if prune else torch.zeros(())
        share = probs.mean(1)[..., start:start + cfg.n_image_tokens].sum(-1)  # (B, L): layer K-1's image share
        late_loss = (share * loss_late * loss_valid).sum() / (loss_late * loss_valid).sum().clamp_min(1)
        opt.zero_grad(set_to_none=True)
        (lm_loss + heads * (aux_loss + read_loss) + 0.2 * rank_loss + LATE_WEIGHT * late_loss).backward()
        torch.nn.utils.clip_grad_norm_(llava.parameters(), 1.0)
        opt.step()
        if it % 25 == 0 or it == iters - 1:
            log(f"step {it}/{iters}: loss {lm_loss.item():.4f} (patch labels {aux_loss.item():.4f}, reading "
                f"{read_loss.item():.3f}, ranking {rank_loss.item():.3f}, late image share {late_loss.item():.3f}) | "
                f"{time.perf_counter() - t0:.0f} s")
        if (it + 1) % eval_every == 0 or it == iters - 1:
            llava.eval()
            acc, rows = evaluate_answers(llava, tok, val)
            log(f"held-out exact match {acc:.3f} on {len(val)} single-turn questions ({accuracy_line(val, rows)}) | "
                f"{time.perf_counter() - t0:.0f} s")
            if prune_iters:
                acc, rows = evaluate_answers(llava, tok, val, rule=dyrate.FastV(0.75))
                log(f"  with FastV K=2 R=0.75: {acc:.3f} ({accuracy_line(val, rows)})")
            save_model(llava, out)
    return llava, tok, cfg


def main(argv=None):
    p = argparse.ArgumentParser(description="Train the shapes model (a tiny LLaVA) from scratch and save it as a "
                                            "llava-hf checkpoint.")
    p.add_argument("--out", required=True, help="checkpoint folder (the shipped one is models/shapes)")
    p.add_argument("--iters", type=int, default=1500, help="stage-2 training steps; 0 saves the untrained model")
    p.add_argument("--vision-iters", type=int, default=200, help="stage 1: vision tower steps on patch labels")
    p.add_argument("--batch-size", type=int, default=8, help="scenes per step (each packs all its questions)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="data stream and initialisation")
    p.add_argument("--eval-every", type=int, default=500, help="steps between held-out evaluations (and saves)")
    p.add_argument("--prune-iters", type=int, default=600, help="the last steps are pruning-aware: any share of the "
                   "image tokens dropped from layer 2 on, layer 1 taught to rank the shapes first (the steps before "
                   "keep only 12-30%%: the shapes and some background)")
    p.add_argument("--init", help="start from this saved shapes model instead of random weights")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    llava = train_model(args.out, args.iters, args.vision_iters, args.batch_size, args.lr, args.seed,
                        args.eval_every, args.prune_iters, args.init)[0]
    save_model(llava, args.out)
    print(f"saved {args.out} ({sum(p.numel() for p in llava.parameters()) / 1e6:.2f}M parameters, fp16"
          + (", untrained: random weights" if args.iters == 0 else "") + f"), torch {torch.__version__}")


if __name__ == "__main__":
    main()
