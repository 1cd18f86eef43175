"""
Tests of processing.py: image preprocessing bit-exact with transformers' CLIPImageProcessorPil, image modes and EXIF,
prompt ids against transformers' LlavaProcessor and the original LLaVA tokenisation, and bad images and prompts.
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import model
import processing
from conftest import IMAGE_SIZE, PATCH, random_image


# ----------------------------------------------------------------------------------------------------------------------
# preprocessing


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (336, 336), (1000, 200), (17, 33), (337, 500)])
def test_preprocess_bit_exact_with_transformers(size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    image, crop = random_image(size[0], size), {"height": 336, "width": 336}
    ref = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size=crop)(image, return_tensors="pt").pixel_values[0]
    assert torch.equal(processing.preprocess(image), ref)
    ref = LlavaImageProcessorPil(size={"shortest_edge": 336}, crop_size=crop, do_pad=True)(image, return_tensors="pt")
    assert torch.equal(processing.preprocess(image, pad=True), ref.pixel_values[0])


def test_image_modes_and_exif(tmp_path):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    hf = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    rgb = random_image(11, (200, 150))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 200, dtype=np.uint8), (150, 1))))
    for image in (rgba, rgb.convert("L"), rgb.convert("P"), rgb.convert("CMYK"), rgb.convert("LA")):
        assert torch.equal(processing.preprocess(image), hf(image, return_tensors="pt").pixel_values[0]), image.mode
    grey = np.asarray(rgb.convert("L"))  # 16-bit greyscale is scaled, not clipped to white
    assert torch.equal(processing.preprocess(Image.fromarray(grey.astype(np.uint16) * 257)),
                       processing.preprocess(Image.fromarray(grey)))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    rgb.save(tmp_path / "rot.jpg", exif=exif)
    upright = ImageOps.exif_transpose(Image.open(tmp_path / "rot.jpg"))
    assert upright.size == (150, 200)
    assert torch.equal(processing.preprocess(tmp_path / "rot.jpg"), hf(upright, return_tensors="pt").pixel_values[0])


# ----------------------------------------------------------------------------------------------------------------------
# prompt and tokenizer


@pytest.mark.parametrize("conv", ["llava-hf", "vicuna_v1"])
def test_prompt_ids_match_transformers(conv, ckpt, ours):
    """Same ids as transformers' LlavaProcessor (expands <image> in the text, then tokenizes) on the same files, and as
    the original LLaVA tokenizer_image_token (tokenize the text around <image> separately, drop the inner BOS)."""
    from transformers import AutoTokenizer, LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    llava, tok = ours
    question = "What is unusual about this image? Answer in one sentence."
    ids, start = tok.encode_prompt(question, conv)
    text = processing.TEMPLATES[conv].format(question)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(ckpt[0]),
                               patch_size=PATCH, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    assert processor(images=random_image(0), text=text, return_tensors="pt").input_ids[0].tolist() == ids
    file_as_is = PreTrainedTokenizerFast(tokenizer_file=os.path.join(ckpt[0], "tokenizer.json"))
    before, after = text.split("<image>")
    original = file_as_is(before).input_ids + [llava.config.image_token_index] * 64 + file_as_is(after).input_ids[1:]
    assert original == ids
    assert ids[start:start + 64] == [llava.config.image_token_index] * 64 and ids[start - 1] != ids[start]
    assert ids[start + 64] == tok.tok.token_to_id("▁")  # the '▁' before '\n' that legacy=False tokenizers lose


def test_bad_images_and_prompts(ckpt, ours, tmp_path):
    llava, tok = ours
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="not an image Pillow can read"):
        processing.preprocess(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        processing.preprocess(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="must not contain '<image>'"):
        tok.encode_prompt("look: <image>")
    with pytest.raises(ValueError, match="Unknown conversation template"):
        tok.encode_prompt("hi", conv="chatml")
    wrong = model.LlavaConfig(image_token_index=5)
    with pytest.raises(ValueError, match="do not belong together"):
        processing.Tokenizer(ckpt[0], wrong)


def test_images_of_absurd_shape_or_size(tmp_path, monkeypatch):
    """Up to 64:1 the preprocessing stays bit-exact with transformers; a 20000 x 1 image is centre-cropped to 64:1
    first (llava-hf would build a 6.7M x 336 image for it) and preprocesses in bounded memory; a decompression bomb, a
    folder and a non-path are clear errors."""
    import resource
    import subprocess
    import sys
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    hf = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    for size in ((640, 10), (10, 640), (3, 192)):  # exactly 64:1
        image = random_image(1, size)
        assert torch.equal(processing.preprocess(image), hf(image, return_tensors="pt").pixel_values[0]), size
    Image.new("RGB", (20000, 1), (200, 10, 10)).save(tmp_path / "long.png")
    script = ("import resource, sys, processing\n"
              "x = processing.preprocess(sys.argv[1])\n"
              "print(tuple(x.shape), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "long.png")], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.split()
    assert out[:3] == ["(3,", "336,", "336)"] and int(out[3]) < 1.5e9, f"peak RSS {int(out[3]) / 1e9:.2f} GB"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    random_image(2, (100, 100)).save(tmp_path / "bomb.png")
    with pytest.raises(ValueError, match="too large to decode safely"):
        processing.preprocess(tmp_path / "bomb.png")
    with pytest.raises(ValueError, match="is a folder, not an image file"):
        processing.preprocess(tmp_path)
    with pytest.raises(ValueError, match="file path or a PIL image"):
        processing.preprocess(3)


def test_tokenizer_from_another_model_is_refused(ckpt, ours, tmp_path):
    """A tokenizer.json whose <image> id matches but whose vocabulary or special ids do not."""
    import json
    llava, _ = ours
    cfg = llava.config
    d = json.loads(open(os.path.join(ckpt[0], "tokenizer.json")).read())
    for change, message in (("bos", "<s> has id"), ("size", "tokens but the model's vocabulary holds")):
        bad = json.loads(json.dumps(d))
        if change == "bos":  # <s> and the piece with id 5 trade places
            vocab = bad["model"]["vocab"]
            other = next(p for p, i in vocab.items() if i == 5)
            vocab["<s>"], vocab[other] = 5, 1
            bad["added_tokens"] = [dict(t, id=5) if t["content"] == "<s>" else t for t in bad["added_tokens"]]
        else:  # more special tokens after <pad> than the model's embedding has rows
            template = bad["added_tokens"][-1]
            bad["added_tokens"] += [dict(template, id=template["id"] + 1 + i, content=f"<extra{i}>")
                                    for i in range(cfg.text.vocab_size)]
        (tmp_path / change).mkdir()
        (tmp_path / change / "tokenizer.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            processing.Tokenizer(tmp_path / change, cfg)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a tokenizer.json"):
        processing.Tokenizer(tmp_path / "junk", cfg)


def test_atomic_write_gives_the_usual_permissions(tmp_path):
    from safetensors.torch import save_file
    processing.atomic_write(tmp_path / "t.safetensors", lambda tmp: save_file({"a": torch.zeros(1)}, tmp))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "t.safetensors").st_mode & 0o777 == 0o666 & ~umask
    assert not os.path.exists(tmp_path / "t.safetensors.tmp")
