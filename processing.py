"""
What goes into LLaVA-1.5 (model.py) and what comes out to disk: an image as pixel values, bit-exact with llava-hf's
processor; a question as prompt ids in llava-hf's or the original LLaVA's template, with the tokenizers library on the
checkpoint's tokenizer.json (tools/tokenizer.py writes one for a new model); and the two ways files are saved here:
atomic_write (a whole file) and append_lines/read_lines (a JSONL stream that long runs extend as they go, so that an
interrupt loses at most the last batch).

    pixels = preprocess("photo.jpg")                                  # (3, 336, 336)
    ids, image_start = Tokenizer("llava-1.5-7b-hf", model.config).encode_prompt("What is this?")
"""
import json
import os

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tokenizers import Tokenizer as HFTokenizer

def atomic_write(path, write):
    """write(tmp_path) writes the file; it then replaces `path` in one step, so a reader (or a crash, Ctrl-C, SIGKILL)
    sees the old file or the new one, never half of one."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # NOTE: safetensors writes 0600; files here get the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """A JSON file, written atomically (atomic_write)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write)


def append_lines(f, objects):
    """Append JSON objects, one per line, to an open file and make them durable (flush + fsync): a batch's results
    are on disk before the next batch starts."""
    for obj in objects:
        f.write(json.dumps(obj) + "\n")
    f.flush()
    os.fsync(f.fileno())


def read_lines(path):
    """The JSON objects of a file append_lines wrote; a last line cut off by a kill is dropped, from the file too, so
    that appending continues on a whole line."""
    objects, good = [], 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                objects.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good += len(line)
    if good < os.path.getsize(path):
        with open(path, "rb+") as f:
            f.truncate(good)
    return objects

# ----------------------------------------------------------------------------------------------------------------------
# Image preprocessing, bit-exact with llava-hf (transformers' CLIPImageProcessorPil)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_image_file(path):
    """The path as a string, if it names an image file that exists (what can be checked before loading a model)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"An image is a file path or a PIL image, got {type(path).__name__}.")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"Image {path!r} is a folder, not an image file.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image {path!r} does not exist.")
    return path


def load_image(image):
    """A path or PIL image -> an RGB PIL image: EXIF orientation applied, transparency composited onto white (as HF
    does), 16-bit greyscale scaled to 8 bits, palette/CMYK/greyscale converted."""
    if not isinstance(image, Image.Image):
        path = check_image_file(image)
        try:
            image = Image.open(path)
            image.load()
        except Image.DecompressionBombError as e:
            raise ValueError(f"{path!r} is too large to decode safely ({e}); downscale it first.") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"{path!r} is not an image Pillow can read ({e}); give a JPEG, PNG, WebP, ... file.")
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):  # 16/32-bit greyscale: assume 16-bit range
        image = Image.fromarray((np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257).round().astype(np.uint8))
    if "A" in image.getbands() or "transparency" in image.info:
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return image.convert("RGB")


MAX_ASPECT = 64  # longer images are centre-cropped to 64:1 first (llava-hf would take GBs of memory on them)


def preprocess(image, size=336, pad=False):
    """A path or PIL image -> pixel values (3, size, size) float32, exactly like llava-hf's processor: resize the short
    side to `size` (bicubic, long side truncated), centre-crop, x/255 in float64 then float32, CLIP mean/std.
    pad=True first pastes the image centred on a square filled with the mean colour (original LLaVA expand2square)."""
    image = load_image(image)
    if pad:
        side = max(image.size)
        square = Image.new("RGB", (side, side), tuple(int(m * 255) for m in CLIP_MEAN))  # (122, 116, 104)
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = square
    w, h = image.size
    if max(w, h) > MAX_ASPECT * min(w, h):  # NOTE: the resize would build a (size x size * aspect) image first
        keep = min(w, h) * MAX_ASPECT
        left, top = max(0, (w - keep) // 2), max(0, (h - keep) // 2)
        image = image.crop((left, top, left + min(w, keep), top + min(h, keep)))
        w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    image = image.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    x = np.asarray(image.crop((left, top, left + size, top + size)))  # (size, size, 3) uint8
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())  # (3, size, size)


# ----------------------------------------------------------------------------------------------------------------------
# Prompt and tokenizer (the `tokenizers` library on the checkpoint's tokenizer.json)

SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
TEMPLATES = {"llava-hf": "USER: <image>\n{} ASSISTANT:",  # what llava-hf's model card uses
             "vicuna_v1": SYSTEM_PROMPT + " USER: <image>\n{} ASSISTANT:"}  # original LLaVA-1.5 evaluation


class Tokenizer:
    """llava-hf's tokenizer.json is Llama-2's SentencePiece BPE with the "legacy" normalizer: loaded as is, it encodes
    the text after <image> as '▁', '\\n', ... exactly like the original LLaVA tokenizer_image_token."""

    def __init__(self, model_dir, cfg):
        path = os.path.join(os.fspath(model_dir), "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No tokenizer.json in {model_dir!r}.")
        try:
            self.tok, self.cfg = HFTokenizer.from_file(path), cfg
        except Exception as e:  # the tokenizers library raises its own exception type
            raise ValueError(f"{path} is not a tokenizer.json the tokenizers library can read ({e}).") from None
        size = self.tok.get_vocab_size(with_added_tokens=True)
        if size > cfg.text.vocab_size:
            raise ValueError(f"{path} has {size} tokens but the model's vocabulary holds {cfg.text.vocab_size}; the "
                             f"tokenizer and the model do not belong together.")
        for token, want, what in (("<image>", cfg.image_token_index, "image_token_index"),
                                  ("<s>", cfg.bos_token_id, "bos_token_id"), ("</s>", cfg.eos_token_id, "eos_token_id"),
                                  ("<pad>", cfg.pad_token_id, "pad_token_id")):
            if self.tok.token_to_id(token) != want and not (token == "<pad>" and self.tok.token_to_id(token) is None):
                raise ValueError(f"{path}: {token} has id {self.tok.token_to_id(token)} but config.json's {what} is "
                                 f"{want}; the tokenizer and the model do not belong together.")

    def encode_prompt(self, question, conv="llava-hf", n_image=None):
        """Prompt ids with the one <image> expanded to n_image ids (default: the model's n_image_tokens), and the index
        of the first image id."""
        if conv not in TEMPLATES:
            raise ValueError(f"Unknown conversation template {conv!r}; choose one of {sorted(TEMPLATES)}.")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"The question must be non-empty text, got {question!r}.")
        if "<image>" in question:
            raise ValueError("The question must not contain '<image>': the template places the image.")
        ids = self.tok.encode(TEMPLATES[conv].format(question)).ids  # BOS added by the post-processor
        start = ids.index(self.cfg.image_token_index)
        n_image = self.cfg.n_image_tokens if n_image is None else n_image
        return ids[:start] + [self.cfg.image_token_index] * n_image + ids[start + 1:], start

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=True)
