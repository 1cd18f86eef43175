"""
A tokenizer.json in llava-hf's structure for a new model (the shapes model, the tests' checkpoints, bench_train's
random ones), trained with the `tokenizers` library: processing.Tokenizer reads it as it reads llava-hf's.
"""
import json
import os

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer


def build_tokenizer(folder, texts, vocab_size=160, legacy=True):
    """Write a tokenizer.json in llava-hf's structure (for the shapes model and the tests), trained on `texts` with the
    `tokenizers` library: BPE with byte fallback (ids 3-258 are the 256 byte tokens, plain vocabulary as in Llama-2),
    the legacy normalizer (Prepend '▁' + Replace ' ' -> '▁'), BOS added by the post-processor, <unk> <s> </s> then
    <image> <pad> after the vocabulary as special added tokens; and a tokenizer_config.json. Returns the ids of
    <image> and <pad>."""
    bpe = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)  # '▁word' pieces
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    d = json.loads(bpe.to_str())
    pieces = [p for p, _ in sorted(d["model"]["vocab"].items(), key=lambda kv: kv[1])]
    pieces = pieces[:3] + [f"<0x{i:02X}>" for i in range(256)] + pieces[3:]
    d["model"]["vocab"] = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    d["pre_tokenizer"] = None
    d["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    tok = HFTokenizer.from_str(json.dumps(d))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    specials = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(dict(add_bos_token=True, add_eos_token=False, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                       pad_token="<pad>", legacy=legacy, tokenizer_class="LlamaTokenizer", padding_side="left",
                       clean_up_tokenization_spaces=False, image_token="<image>",
                       extra_special_tokens={"image_token": "<image>"}), f, indent=1)
    return tok.token_to_id("<image>"), tok.token_to_id("<pad>")
