"""
Pictures of one generation's visual-token pruning (generate.py --viz OUT), drawn with Pillow alone:

    OUT.gif         the image as the model saw it, dropped patches greyed, one frame per step with the text so far
    OUT_strip.png   up to 8 of those frames side by side
    OUT_shares.png  the attention mass of the current query on system / image / instruction / response tokens at
                    layer K-1, averaged over heads, at every step (the seed paper's figure 2)

and bench.py's throughput plot (tokens/s against batch size per method, bench.py --plot).
"""
import os
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dyrate import TYPES
from processing import CLIP_MEAN, CLIP_STD, preprocess

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14)]  # system, image, instruction, response


def model_view(image, image_size, pad):
    """The centre crop the model saw, as an RGB uint8 array (undoing the normalisation of processing.preprocess)."""
    x = preprocess(image, image_size, pad).numpy().transpose(1, 2, 0)  # (S, S, 3)
    return np.clip((x * np.array(CLIP_STD) + np.array(CLIP_MEAN)) * 255 + 0.5, 0, 255).astype(np.uint8)


def frames(view, row, tokenizer, cfg, size=336, text_height=120):
    """One picture per step: patches dropped so far greyed out, and the step's numbers and text below."""
    grid = cfg.vision.image_size // cfg.vision.patch_size
    patch = size // grid
    base = Image.fromarray(view).resize((grid * patch, grid * patch), Image.NEAREST)
    first = 1 if cfg.vision_feature_select_strategy == "full" else 0  # feature 0 is CLS, not a patch
    font, dropped, out = ImageFont.load_default(size=13), np.zeros(cfg.n_image_tokens, bool), []
    for step, gone in enumerate(row["dropped_at_step"]):
        dropped[gone] = True
        pic = np.asarray(base).copy()
        for i in np.flatnonzero(dropped[first:]):
            r, c = divmod(int(i), grid)
            cell = pic[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
            cell[:] = (0.25 * cell + 0.75 * 128).astype(np.uint8)  # grey, a trace of the image left
        frame = Image.new("RGB", (base.width, base.height + text_height), "white")
        frame.paste(Image.fromarray(pic), (0, 0))
        draw = ImageDraw.Draw(frame)
        draw.text((6, base.height + 4), f"step {step}  kept {row['kept_visual'][step]}/{cfg.n_image_tokens}  "
                  f"rate {row['rates'][step]:.2f}", fill="black", font=font)
        text = tokenizer.decode(row["token_ids"][:step + 1])
        lines = textwrap.wrap(text, width=max(10, base.width // 7))[-5:]
        draw.multiline_text((6, base.height + 24), "\n".join(lines), fill=(60, 60, 60), font=font)
        out.append(frame)
    return out


def shares_plot(shares, width=640, height=360):
    """Line plot of the four type shares (a list per step of 4 floats) over the steps."""
    img = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=13)
    left, right, top, bottom = 50, width - 130, 20, height - 40
    draw.rectangle((left, top, right, bottom), outline="black")
    for y in (0, 0.25, 0.5, 0.75, 1.0):
        py = bottom - y * (bottom - top)
        draw.line((left - 4, py, left, py), fill="black")
        draw.text((8, py - 7), f"{y:.2f}", fill="black", font=font)
    n = len(shares)
    xs = [left + (right - left) * (i / max(n - 1, 1)) for i in range(n)]
    for i in range(0, n, max(1, n // 8)):
        draw.text((xs[i] - 4, bottom + 6), str(i), fill="black", font=font)
    draw.text(((left + right) // 2 - 40, height - 18), "generation step", fill="black", font=font)
    for j, (name, colour) in enumerate(zip(TYPES, COLOURS)):
        points = [(x, bottom - s[j] * (bottom - top)) for x, s in zip(xs, shares)]
        if n > 1:
            draw.line(points, fill=colour, width=2)
        else:
            draw.ellipse((points[0][0] - 3, points[0][1] - 3, points[0][0] + 3, points[0][1] + 3), fill=colour)
        draw.line((right + 12, top + 12 + 20 * j, right + 32, top + 12 + 20 * j), fill=colour, width=3)
        draw.text((right + 38, top + 5 + 20 * j), name, fill="black", font=font)
    return img


def save(out, image, row, tokenizer, cfg, pad=False):
    """Write OUT.gif, OUT_strip.png and OUT_shares.png for one generated row (a generate() row dict)."""
    pics = frames(model_view(image, cfg.vision.image_size, pad), row, tokenizer, cfg)
    paths = [f"{out}.gif", f"{out}_strip.png", f"{out}_shares.png"]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    pics[0].save(paths[0], save_all=True, append_images=pics[1:], duration=[500] * (len(pics) - 1) + [2500], loop=0)
    chosen = sorted({round(i * (len(pics) - 1) / 7) for i in range(8)}) if len(pics) > 8 else range(len(pics))
    strip = Image.new("RGB", (len(chosen) * (pics[0].width + 4), pics[0].height), "white")
    for n, i in enumerate(chosen):
        strip.paste(pics[i], (n * (pics[0].width + 4), 0))
    strip.save(paths[1])
    if any(s is None for s in row["type_shares"]):
        raise ValueError("no type shares were recorded (generate(..., stats=True) records them)")
    shares_plot(row["type_shares"]).save(paths[2])
    return paths


def throughput_plot(rows, title, width=720, height=420):
    """bench.py's tokens/s against batch size, one line per method over the batch sizes all methods ran (rows: its
    result dicts, log2 batch axis); a method's largest batch in the memory budget (rows with largest=True) is a ring,
    labelled with its batch."""
    img = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=13)
    left, right, top, bottom = 60, width - 190, 34, height - 44
    draw.text((left, 8), title, fill="black", font=font)
    draw.rectangle((left, top, right, bottom), outline="black")
    ticks = sorted({r["batch"] for r in rows if not r.get("largest")})
    every = sorted({r["batch"] for r in rows})
    lo, hi = np.log2(every[0]), max(np.log2(every[-1]), np.log2(every[0]) + 1)
    peak = max(r["tokens_per_s"] for r in rows) * 1.1
    x_of = lambda b: left + (right - left) * (np.log2(b) - lo) / (hi - lo)  # noqa: E731
    y_of = lambda v: bottom - (bottom - top) * v / peak  # noqa: E731
    for b in ticks:
        draw.line((x_of(b), bottom, x_of(b), bottom + 4), fill="black")
        draw.text((x_of(b) - 6, bottom + 6), str(b), fill="black", font=font)
    for i in range(5):
        v = peak * i / 4
        draw.text((6, y_of(v) - 7), f"{v:.0f}", fill="black", font=font)
    draw.text(((left + right) // 2 - 30, height - 18), "batch size", fill="black", font=font)
    draw.text((6, top - 18), "tokens/s", fill="black", font=font)
    palette = COLOURS + [(148, 103, 189), (140, 86, 75), (127, 127, 127), (23, 190, 207)]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for j, method in enumerate(methods):
        colour = palette[j % len(palette)]
        points = sorted((r["batch"], r["tokens_per_s"]) for r in rows if r["method"] == method and not r.get("largest"))
        xy = [(x_of(b), y_of(v)) for b, v in points]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        for r in rows:
            if r["method"] == method and r.get("largest"):
                x, y = x_of(r["batch"]), y_of(r["tokens_per_s"])
                draw.ellipse((x - 6, y - 6, x + 6, y + 6), outline=colour, width=2)
                draw.text((x + 8, y - 16), str(r["batch"]), fill=colour, font=font)
        draw.line((right + 12, top + 12 + 20 * j, right + 32, top + 12 + 20 * j), fill=colour, width=3)
        draw.text((right + 38, top + 5 + 20 * j), method, fill="black", font=font)
    if any(r.get("largest") for r in rows):
        y = top + 12 + 20 * len(methods)
        draw.ellipse((right + 16, y - 6, right + 28, y + 6), outline="black", width=2)
        draw.text((right + 38, y - 7), "largest batch that fits", fill="black", font=font)
    return img


def curves_plot(series, none, title, xlabel, width=720, height=440):
    """Accuracy against a cost ratio: one line per method ({name: [(cost, accuracy), ...] by cost}; a method of one
    point is a dot), and `none`'s accuracy as a grey line (the shapes sweep)."""
    img = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=13)
    left, right, top, bottom = 60, width - 130, 34, height - 44
    draw.text((left, 8), title, fill="black", font=font)
    draw.rectangle((left, top, right, bottom), outline="black")
    x_of = lambda c: left + (right - left) * c  # noqa: E731  (cost ratios lie in [0, 1])
    y_of = lambda a: bottom - (bottom - top) * a  # noqa: E731
    for i in range(6):
        v = i / 5
        draw.text((x_of(v) - 10, bottom + 6), f"{v:.1f}", fill="black", font=font)
        draw.text((20, y_of(v) - 7), f"{v:.1f}", fill="black", font=font)
        draw.line((left, y_of(v), right, y_of(v)), fill=(235, 235, 235))
    draw.text(((left + right) // 2 - 60, height - 18), xlabel, fill="black", font=font)
    draw.text((6, top - 18), "accuracy", fill="black", font=font)
    draw.line((left, y_of(none), right, y_of(none)), fill=(150, 150, 150), width=1)
    palette = COLOURS + [(148, 103, 189), (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207),
                         (0, 0, 0), (255, 187, 120)]  # tab10's, then black and a light orange: eleven series apart
    names = list(series) + ["none"]
    for j, name in enumerate(names):
        colour = (150, 150, 150) if name == "none" else palette[j % len(palette)]
        xy = [(x_of(c), y_of(a)) for c, a in series.get(name, [])]
        if len(xy) > 1 and not name.startswith("learned"):
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            r = 5 if name.startswith("learned") else 3
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        draw.line((right + 12, top + 12 + 20 * j, right + 32, top + 12 + 20 * j), fill=colour, width=3)
        draw.text((right + 38, top + 5 + 20 * j), name, fill="black", font=font)
    return img
