"""
The shapes model: a tiny LLaVA trained from scratch on synthetic images, so that everything runs with no download
(like nanoGPT's shakespeare_char). Same model.py classes, same checkpoint format as llava-hf. This file: the data, the
experiment and the command line; the model's training from scratch is shapes_model.py.

    python shapes.py data  --out data/shapes        # images + JSONL (train / val / test), deterministic by --seed
    python shapes.py model --out models/shapes      # train the tiny LLaVA (shapes_model.py), ~15 min on 2 cores
    python train.py --model models/shapes --data data/shapes/train.jsonl --val-data data/shapes/val.jsonl \\
        --out models/shapes/predictor-0.55 --target-flops 0.55  # then the DyRate predictors (0.55, 0.33)
    python shapes.py experiment --model models/shapes --data data/shapes/test.jsonl   # the README's table

Images: 224 px (16 x 16 = 256 patches of 14 px) with 1-3 shapes (circle, square, triangle; six colours; two sizes) in
distinct cells of a 3 x 3 grid, on plain or textured backgrounds: most patches are background, the redundancy visual
token pruning exploits. Text: a caption naming every shape with its colour and position, and questions about the
colour of a shape, what is at a position, and how many shapes there are.
"""
import argparse
import json
import os
import random

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "purple": (140, 60, 180), "orange": (245, 130, 30)}
CELLS = ("top left", "top center", "top right", "middle left", "middle center", "middle right", "bottom left",
         "bottom center", "bottom right")  # NOTE: a row word then a column word, never the same word in both roles
NUMBERS = ("zero", "one", "two", "three")
BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (245, 240, 225), (225, 235, 245))
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."  # generate.py's default prompt
IMAGE_SIZE, PATCH = 224, 14  # 16 x 16 = 256 image tokens
SIZES = {"small": 13, "large": 20}  # radius in pixels: 26 px wide on 2 x 2 patches, 40 px wide on 3 x 3 patches


# ----------------------------------------------------------------------------------------------------------------------
# scenes, pictures and their text


def make_scene(rng):
    """A random scene: 1-3 (shape, colour, size, cell, offset in patches) in distinct cells, a background and a
    texture flag."""
    n = rng.randint(1, 3)
    cells = sorted(rng.sample(range(9), n))
    items = [dict(shape=rng.choice(SHAPES), colour=rng.choice(list(COLOURS)), size=rng.choice(("small", "large")),
                  cell=c, dx=rng.randint(-1, 1), dy=rng.randint(-1, 1)) for c in cells]
    return dict(items=items, background=rng.randrange(len(BACKGROUNDS)), texture=rng.random() < 0.4,
                seed=rng.randrange(1 << 30))


def paint(pen, it, fill):
    """Draw one shape with an ImageDraw pen, in the picture or as a class id in a label map. NOTE: shapes sit on the
    patch grid (a small one inside one patch, a large one on 2 x 2 patches), so each patch holds a whole shape or a
    fixed quarter of one: the 2-layer vision tower tells them apart after minutes of CPU training. Off the grid, a
    patch holds arbitrary slivers and needs a larger tower trained for much longer."""
    grid = IMAGE_SIZE // PATCH
    cx, cy = ((it["cell"] % 3 + 0.5) * grid / 3 + it["dx"], (it["cell"] // 3 + 0.5) * grid / 3 + it["dy"])  # patches
    if it["size"] == "small":  # centred on a patch corner: 2 x 2 patches
        cx, cy, r = round(cx) * PATCH, round(cy) * PATCH, SIZES["small"]
    else:  # centred in a patch: 3 x 3 patches
        cx, cy, r = (int(cx) + 0.5) * PATCH, (int(cy) + 0.5) * PATCH, SIZES["large"]
    cx, cy = cx - 0.5, cy - 0.5  # PIL's pixel (i, j) covers [i, i + 1): centre the figure between pixel rows
    if it["shape"] == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif it["shape"] == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def draw(scene):
    bg = np.array(BACKGROUNDS[scene["background"]], dtype=np.float64)
    pixels = np.tile(bg, (IMAGE_SIZE, IMAGE_SIZE, 1))
    if scene["texture"]:  # faint noise and stripes: background that is not uniform, still uninformative
        noise = np.random.default_rng(scene["seed"]).normal(0, 10, (IMAGE_SIZE, IMAGE_SIZE, 1))
        stripes = 8 * np.sin(np.arange(IMAGE_SIZE) / 3.0)[:, None, None]
        pixels = pixels + noise + stripes
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    pen = ImageDraw.Draw(image)
    for it in scene["items"]:
        paint(pen, it, COLOURS[it["colour"]])
    return image


def named(it):
    return f"{'an' if it['colour'][0] in 'aeiou' else 'a'} {it['colour']} {it['shape']}"


def coverage(scene):
    """(items, 256) float: the fraction of each patch each shape covers (shapes sit in distinct cells: no overlap)."""
    g, p = IMAGE_SIZE // PATCH, PATCH
    out = []
    for it in scene["items"]:
        label = Image.new("1", (IMAGE_SIZE, IMAGE_SIZE), 0)
        paint(ImageDraw.Draw(label), it, 1)
        blocks = np.asarray(label).reshape(g, p, g, p).transpose(0, 2, 1, 3).reshape(g * g, p * p)  # (patches, pixels)
        out.append(blocks.mean(1))
    return np.stack(out)


COVERED = 0.15  # a patch belongs to a shape when the shape covers at least this fraction of it


def item_patches(scene):
    """(items, 256) bool: the patches each shape covers at least COVERED of."""
    return coverage(scene) >= COVERED


def item_label(it):
    """(kind, grid row, grid column) of one shape: kind = 1 + shape * 6 + colour (0 is background)."""
    return 1 + SHAPES.index(it["shape"]) * len(COLOURS) + list(COLOURS).index(it["colour"]), it["cell"] // 3, it["cell"] % 3


def patch_labels(scene):
    """(3, N) targets of the auxiliary heads that speed up training (train_model), one column per patch, row-major: the
    kind of the shape covering it (0 = background) and the grid row and column of the patch (3 = background). NOTE:
    row and column as two labels, not one of nine cells: the features then hold them as separate directions, the way
    the text names a cell (a row word, then a column word)."""
    covered = item_patches(scene)  # (items, N)
    kinds = (covered * np.array([item_label(it)[0] for it in scene["items"]])[:, None]).max(0)  # (N,)
    g = IMAGE_SIZE // PATCH
    third = np.minimum((np.arange(g) * PATCH + PATCH // 2) * 3 // IMAGE_SIZE, 2)  # grid row (or column) of each patch
    return np.stack([kinds, np.where(kinds > 0, np.repeat(third, g), 3), np.where(kinds > 0, np.tile(third, g), 3)])


def caption(scene):
    parts = [f"{named(it)} at the {CELLS[it['cell']]}" for it in scene["items"]]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def questions(scene):
    """The (question, answer) pairs of a scene: caption, how many shapes, the colour of each shape it holds once, what
    is at each occupied cell. NOTE: questions about empty cells ("nothing") are left out: softmax attention compares
    keys only with each other, so a query for an empty cell lands on a shape in the same row or column, and telling
    that half match from a full one took the tiny model far longer to learn than everything else together."""
    qa = [(CAPTION_PROMPT, caption(scene)), ("How many shapes are there?", NUMBERS[len(scene["items"])])]
    for shape in SHAPES:
        found = [it for it in scene["items"] if it["shape"] == shape]
        if len(found) == 1:
            qa.append((f"What color is the {shape}?", found[0]["colour"]))
    at = {it["cell"]: named(it) for it in scene["items"]}
    qa += [(f"What is at the {CELLS[c]}?", at[c]) for c in sorted(at)]
    return qa


def task(prompt):
    """caption / count / colour / position: the kind of a question."""
    return {"P": "caption", "H": "count"}.get(prompt[0], "colour" if "color" in prompt else "position")


def sample(rng):
    """One training example: a scene and one of its questions (captions a third of the time)."""
    scene = make_scene(rng)
    qa = questions(scene)
    kind = rng.random()
    if kind < 0.34:
        q, a = qa[0]
    elif kind < 0.5:
        q, a = qa[1]
    else:
        q, a = rng.choice(qa[2:])
    return scene, q, a


def corpus():
    """Every text the model will see, for the tokenizer."""
    from processing import SYSTEM_PROMPT, TEMPLATES
    rng, lines = random.Random(0), [SYSTEM_PROMPT, *TEMPLATES.values()]
    for _ in range(3000):
        scene = make_scene(rng)
        lines += [f"USER: \n{q} ASSISTANT: {a}" for q, a in questions(scene)]
    return lines


def write_dataset(out, n, seed, name):
    """n scenes as PNG files and a JSONL of {image, prompt, answer, task}, one record per scene (a random task)."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, name), exist_ok=True)
    with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
        for i in range(n):
            scene, q, a = sample(rng)
            path = f"{name}/{i:05d}.png"
            draw(scene).save(os.path.join(out, path))
            f.write(json.dumps(dict(image=path, prompt=q, answer=a, scene=scene)) + "\n")


def write_examples(out, n, seed):
    """n scenes as out/0.png .. and examples.json: per scene its caption, count, one colour and one occupied position
    question (the images shipped in the repo; test_shapes.py checks the shipped model's answers to them)."""
    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    examples = []
    for i in range(n):
        scene = make_scene(rng)
        draw(scene).save(os.path.join(out, f"{i}.png"))
        qa = questions(scene)
        colour = [x for x in qa if "color" in x[0]]
        occupied = [x for x in qa if x[0].startswith("What is at")]
        for q, a in qa[:2] + colour[:1] + [rng.choice(occupied)]:
            examples.append(dict(image=f"{i}.png", prompt=q, answer=a))
    with open(os.path.join(out, "examples.json"), "w") as f:
        json.dump(examples, f, indent=1)


# ----------------------------------------------------------------------------------------------------------------------
# the experiment: accuracy, FLOPs, time and memory of every method on a fixed held-out set


def evaluate_answers(model, tok, records, batch=32, **kw):
    """Exact-match accuracy of the greedy answers (generate(), batched) on records {image, prompt, answer}."""
    import generate as G
    right, out = 0, []
    for i in range(0, len(records), batch):
        chunk = records[i:i + batch]
        rows = G.generate(model, tok, [r["image"] for r in chunk], [r["prompt"] for r in chunk], max_new_tokens=48,
                          stats=False, **kw).rows
        for r, row in zip(chunk, rows):
            right += row["text"].strip() == r["answer"]
            out.append(row)
    return right / len(records), out


def accuracy_line(records, rows):
    kinds = {}
    for r, row in zip(records, rows):
        kinds.setdefault(task(r["prompt"]), []).append(row["text"].strip() == r["answer"])
    return ", ".join(f"{k} {np.mean(v):.3f}" for k, v in sorted(kinds.items()))



def experiment(model_dir, data, predictors, out, n_timed=16, log=print):
    """The README table and figures: none, VTW, and per predictor (budget) the learned DyRate against FastV and a
    hand-set ramp matched to its achieved FLOPs. Accuracy = exact match of the free-running greedy answers."""
    import torch

    import dyrate as D
    import generate as G
    import model as M
    import processing as P
    import train as TR
    import viz
    model = M.Llava.from_pretrained(model_dir)
    tok, cfg, N = P.Tokenizer(model_dir, model.config), model.config, model.config.n_image_tokens
    folder = os.path.dirname(os.path.abspath(data))
    records = [json.loads(line) for line in open(data)]
    for r in records:
        r["image"] = os.path.join(folder, r["image"])

    def run(name, **kw):
        acc, rows = evaluate_answers(model, tok, records, **kw)
        none = sum(D.generation_flops(cfg, r["prompt_tokens"], [N] * len(r["token_ids"]), r["k"])["total"] for r in rows)
        timed = []
        for r in records[:n_timed]:  # batch 1, for milliseconds
            g = G.generate(model, tok, [r["image"]], [r["prompt"]], max_new_tokens=48, stats=False, **kw)
            timed.append((g.prefill_ms, g.decode_ms_per_token))
        result = dict(accuracy=acc, flops_ratio=sum(r["flops"] for r in rows) / none,
                      prefill_ms=float(np.median([t[0] for t in timed])), decode_ms=float(np.median([t[1] for t in timed])),
                      kv_bytes=float(np.mean([r["kv_cache_bytes"] for r in rows])),
                      kept_prefill=float(np.mean([r["kept_visual"][0] for r in rows])),
                      kept_last=float(np.mean([r["kept_visual"][-1] for r in rows])))
        log(f"{name:34}{result['accuracy']:9.3f}{result['flops_ratio']:8.3f}{result['prefill_ms']:9.1f}"
            f"{result['decode_ms']:9.2f}{result['kv_bytes'] / 1024:9.1f}{result['kept_prefill']:8.1f}{result['kept_last']:8.1f}")
        return result, rows

    log(f"{len(records)} held-out questions ({data}); ms: median of {n_timed} at batch 1 on "
        f"{torch.get_num_threads()} CPU threads")
    log(f"{'method':34}{'accuracy':>9}{'FLOPs':>8}{'prefill':>9}{'ms/tok':>9}{'KV KiB':>9}{'kept@0':>8}{'kept@end':>8}")
    table = {"none": run("none")[0], "vtw": run("vtw", method="vtw")[0]}
    for path in predictors:
        predictor = D.RatePredictor.load(path, cfg)
        learned, rows = run(f"dyrate learned ({os.path.basename(path)})", method="dyrate", predictor=predictor)
        lengths = [(row["prompt_tokens"], len(row["token_ids"])) for row in rows]
        keep = TR.matched_keep(cfg, lengths, learned["flops_ratio"], predictor.k)
        start = TR.matched_keep(cfg, lengths, learned["flops_ratio"], predictor.k, ramp=True)
        fastv = run(f"fastv R={1 - keep / N:.3f}", method="fastv", ratio=1 - keep / N)[0]
        ramp = [TR.ramp_rates(1 - start / N, 24)]  # a hand-set schedule over a typical answer length
        hand = run(f"dyrate ramp {1 - start / N:.2f}->1", method="dyrate", schedule=ramp[0])[0]
        table[os.path.basename(path)] = dict(learned=learned, fastv=fastv, ramp=hand)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "experiment.json"), "w") as f:
        json.dump(table, f, indent=1)
    if predictors:  # the figures: type shares over the steps and the kept patches, for a few captions
        predictor = D.RatePredictor.load(predictors[-1], cfg)
        captions = [r for r in records if r["prompt"] == CAPTION_PROMPT][:3]
        for i, r in enumerate(captions):
            row = G.generate(model, tok, [r["image"]], [r["prompt"]], max_new_tokens=48, method="dyrate",
                             predictor=predictor).rows[0]
            for p in viz.save(os.path.join(out, f"example{i}"), r["image"], row, tok, cfg):
                log(f"wrote {p}")
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description="The shapes model: synthetic data, a tiny LLaVA trained from scratch, "
                                            "and the pruning experiment on it.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="write train / val / test images and JSONL")
    d.add_argument("--out", default="data/shapes", help="folder")
    d.add_argument("--seed", type=int, default=0, help="the whole data set is a function of this seed")
    d.add_argument("--train", type=int, default=1000, help="training scenes (for the predictor)")
    d.add_argument("--val", type=int, default=100, help="validation scenes")
    d.add_argument("--test", type=int, default=300, help="test scenes (the experiment's held-out set)")
    d.add_argument("--examples", default="assets/examples", help="folder for the example images shipped in the repo")
    m = sub.add_parser("model", help="train the tiny LLaVA from scratch and save it as a llava-hf checkpoint")
    m.add_argument("--out", default="models/shapes", help="checkpoint folder")
    m.add_argument("--iters", type=int, default=1500, help="training steps (see the README for the time); 0 saves "
                   "the untrained model (random weights)")
    m.add_argument("--vision-iters", type=int, default=200, help="stage 1: vision tower steps on patch labels")
    m.add_argument("--batch-size", type=int, default=8, help="scenes per step (each packs all its questions)")
    m.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    m.add_argument("--seed", type=int, default=0, help="data stream and initialisation")
    m.add_argument("--eval-every", type=int, default=500, help="steps between held-out evaluations (and saves)")
    m.add_argument("--prune-iters", type=int, default=600, help="the last steps are pruning-aware: any share of the "
                   "image tokens dropped from layer 2 on, layer 1 taught to rank the shapes first (the steps before "
                   "keep only 12-30%%: the shapes and some background)")
    m.add_argument("--init", help="start from this saved shapes model instead of random weights")
    e = sub.add_parser("experiment", help="accuracy / FLOPs / time / memory of every method, and the figures")
    e.add_argument("--model", default="models/shapes", help="checkpoint folder")
    e.add_argument("--data", default="data/shapes/test.jsonl", help="held-out JSONL")
    e.add_argument("--predictors", nargs="*", default=["models/shapes/predictor-0.55", "models/shapes/predictor-0.33"],
                   help="predictor files, one per budget")
    e.add_argument("--out", default="assets", help="folder for experiment.json and the figures")
    args = p.parse_args(argv)
    if args.command == "data":
        for name, n, offset in (("train", args.train, 0), ("val", args.val, 1), ("test", args.test, 2)):
            write_dataset(args.out, n, args.seed * 10 + offset, name)
            print(f"wrote {n} scenes to {os.path.join(args.out, name + '.jsonl')}")
        write_examples(args.examples, 4, args.seed * 10 + 3)
        print(f"wrote 4 example scenes to {args.examples}")
    elif args.command == "model":
        import torch

        from shapes_model import save_model, train_model
        os.makedirs(args.out, exist_ok=True)
        model, tok, cfg = train_model(args.out, args.iters, args.vision_iters, args.batch_size, args.lr, args.seed,
                                      args.eval_every, args.prune_iters, args.init)
        save_model(model, args.out)
        print(f"saved {args.out} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, fp16"
              + (", untrained: random weights" if args.iters == 0 else "") + f"), torch {torch.__version__}")
    else:
        experiment(args.model, args.data, args.predictors, args.out)


if __name__ == "__main__":
    main()
