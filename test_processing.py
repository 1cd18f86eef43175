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
