"""
The shapes data: synthetic pictures and their text, deterministic by seed. Plain Python, numpy and Pillow: no torch,
nothing else of this project.

    python -m shapes.data --out data/shapes                              # train / val / test images + JSONL
    python -m shapes.data --out data/shapes --examples assets/examples   # also rewrite the shipped example images

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
DETAIL_PROMPT = "Describe the image in detail."  # the long answer: the caption, then facts read off the caption
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
    kind = 1 + SHAPES.index(it["shape"]) * len(COLOURS) + list(COLOURS).index(it["colour"])
    return kind, it["cell"] // 3, it["cell"] % 3


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


def caption_items(text):
    """The caption's facts, read back from its text alone: [(colour, shape, cell index)] in the caption's order."""
    body = text[:-1]  # no final "."
    parts = body.replace(" and ", ", ").split(", ")
    items = []
    for part in parts:
        words = part.split(" ")  # a(n) colour shape at the row column
        items.append((words[1].lower(), words[2], CELLS.index(" ".join(words[5:]))))
    return items


def plural(shape, n):
    return f"{NUMBERS[n]} {shape}s" if n > 1 else f"{'an' if shape[0] in 'aeiou' else 'a'} {shape}"


def listed(words):
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def derived_sentences(text):
    """What a detailed description adds to the caption `text`, computed from that text alone (no picture): how many
    shapes of each kind, which colours, and where the first shape named lies relative to the last."""
    items = caption_items(text)
    kinds = {}
    for _, shape, _ in items:
        kinds[shape] = kinds.get(shape, 0) + 1
    n = len(items)
    out = [f"There is one shape: {plural(items[0][1], 1)}." if n == 1 else
           f"There are {NUMBERS[n]} shapes: {listed([plural(k, c) for k, c in kinds.items()])}."]
    colours = list(dict.fromkeys(c for c, _, _ in items))
    out.append(f"It is {colours[0]}." if n == 1 else f"They are all {colours[0]}." if len(colours) == 1 else
               f"The colors are {listed(colours)}.")
    if n > 1:
        (c0, s0, cell0), (c1, s1, cell1) = items[0], items[-1]
        where = "above" if cell0 // 3 < cell1 // 3 else "left of"  # reading order: never below, never right of
        out.append(f"The {c0} {s0} is {where} the {c1} {s1}.")
    return out


def detail(scene):
    """The answer to DETAIL_PROMPT: the caption, then derived_sentences of it."""
    text = caption(scene)
    return " ".join([text, *derived_sentences(text)])


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
    return qa + [(DETAIL_PROMPT, detail(scene))]


def task(prompt):
    """caption / detail / count / colour / position: the kind of a question."""
    return {"P": "caption", "D": "detail", "H": "count"}.get(prompt[0], "colour" if "color" in prompt else "position")


def sample(rng):
    """One example: a scene and one of its questions (captions and detailed descriptions a quarter of the time each,
    the count an eighth, else a colour or position question)."""
    scene = make_scene(rng)
    qa = questions(scene)
    kind = rng.random()
    if kind < 0.25:
        q, a = qa[0]
    elif kind < 0.5:
        q, a = qa[-1]
    elif kind < 0.625:
        q, a = qa[1]
    else:
        q, a = rng.choice(qa[2:-1])
    return scene, q, a


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


def write_eval_sets(out, name):
    """The split's scenes as eval.py's inputs: every caption in COCO captions format (NAME_captions.json), every
    short-answer question (count, colour, position) as JSONL (NAME_questions.jsonl) and every detailed description as
    JSONL (NAME_details.jsonl, eval.py --figure2), image paths relative to out."""
    with open(os.path.join(out, f"{name}.jsonl")) as f:
        records = [json.loads(line) for line in f]
    images = [dict(id=i, file_name=r["image"]) for i, r in enumerate(records)]
    annotations = [dict(id=i, image_id=i, caption=caption(r["scene"])) for i, r in enumerate(records)]
    with open(os.path.join(out, f"{name}_captions.json"), "w") as f:
        json.dump(dict(images=images, annotations=annotations), f)
    with open(os.path.join(out, f"{name}_questions.jsonl"), "w") as f:
        for i, r in enumerate(records):
            for q, a in questions(r["scene"])[1:-1]:  # neither the caption nor the detailed description
                f.write(json.dumps(dict(id=f"{i}-{q}", image=r["image"], question=q, answers=[a])) + "\n")
    with open(os.path.join(out, f"{name}_details.jsonl"), "w") as f:
        for i, r in enumerate(records):
            record = dict(id=i, image=r["image"], question=DETAIL_PROMPT, answers=[detail(r["scene"])])
            f.write(json.dumps(record) + "\n")


def write_examples(out, n, seed):
    """n scenes as out/0.png .. and examples.json: per scene its caption, count, one colour and one occupied position
    question and the detailed description (the images shipped in the repo; test_shapes.py checks the shipped model's
    answers to them)."""
    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    examples = []
    for i in range(n):
        scene = make_scene(rng)
        draw(scene).save(os.path.join(out, f"{i}.png"))
        qa = questions(scene)
        colour = [x for x in qa if "color" in x[0]]
        occupied = [x for x in qa if x[0].startswith("What is at")]
        for q, a in qa[:2] + colour[:1] + [rng.choice(occupied), qa[-1]]:
            examples.append(dict(image=f"{i}.png", prompt=q, answer=a))
    with open(os.path.join(out, "examples.json"), "w") as f:
        json.dump(examples, f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description="Write the shapes data: train / val / test images and JSONL.")
    p.add_argument("--out", default="data/shapes", help="folder")
    p.add_argument("--seed", type=int, default=0, help="the whole data set is a function of this seed")
    p.add_argument("--train", type=int, default=1000, help="training scenes (for the predictor)")
    p.add_argument("--val", type=int, default=100, help="validation scenes")
    p.add_argument("--test", type=int, default=300, help="test scenes (the experiment's held-out set)")
    p.add_argument("--examples", default=None, help="also write the example images and questions to this folder "
                   "(the shipped ones are assets/examples: rewritten only when asked for)")
    args = p.parse_args(argv)
    for name, n, offset in (("train", args.train, 0), ("val", args.val, 1), ("test", args.test, 2)):
        write_dataset(args.out, n, args.seed * 10 + offset, name)
        print(f"wrote {n} scenes to {os.path.join(args.out, name + '.jsonl')}")
    write_eval_sets(args.out, "test")
    print(f"wrote the test scenes' captions and questions for eval.py to {os.path.join(args.out, 'test_*')}")
    if args.examples:
        write_examples(args.examples, 4, args.seed * 10 + 3)
        print(f"wrote 4 example scenes to {args.examples}")


if __name__ == "__main__":
    main()
