"""What every built-in model is made of: a CLIP tokenizer whose vocabulary is generated in code (no
download) and CLIP text configs that fit it. The families build their built-ins from these."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> Any:
    """A CLIP tokenizer whose vocabulary is generated in code: byte-level symbols, no merges. OpenAI's
    CLIP pads with its end token; OpenCLIP's (SD2, SDXL's second) with "!" (id 0 here, as there)."""
    from transformers import CLIPTokenizer

    # GPT-2/CLIP byte-to-unicode table: printable bytes map to themselves, the rest above 255.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    try:
        return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token=pad_token)
    except TypeError:  # transformers 4: the tokenizer reads its vocabulary from files only
        import json
        import tempfile

        with tempfile.TemporaryDirectory(prefix="stylelora-tokenizer-") as tmp:
            files = {"vocab.json": json.dumps(vocab), "merges.txt": "#version: 0.2\n"}
            for name, text in files.items():  # scratch files read once here, not project output (no fileio)
                with open(Path(tmp) / name, "w", encoding="utf-8") as f:
                    f.write(text)
            return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77,
                                 pad_token=pad_token)


def clip_config(tokenizer: Any, **size: Any) -> Any:
    """A CLIP text config of the given size that fits the built-in tokenizer (77 tokens, its special ids)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        **size,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


T5_SPECIAL = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2: padding, end of text, unknown


def t5_tokenizer(max_length: int = 512) -> Any:
    """A T5 tokenizer (``T5TokenizerFast``, as FLUX.1's and SD3's tokenizer_2/_3) whose vocabulary is generated in
    code: sentencepiece's Unigram model over printable characters, each also as a word start ("▁a"), with T5's
    special tokens and its end-of-text post-processing. Built with the ``tokenizers`` library: no download,
    no sentencepiece."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    characters = [chr(c) for c in range(33, 127)]
    pieces = [(token, 0.0) for token in T5_SPECIAL] + [("▁", -2.0)]
    pieces += [("▁" + c, -2.5) for c in characters] + [(c, -3.0) for c in characters]
    model = Tokenizer(models.Unigram(pieces, unk_id=T5_SPECIAL.index("<unk>")))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    model.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                         special_tokens=[("</s>", T5_SPECIAL.index("</s>"))])
    return T5TokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def t5_config(tokenizer: Any, **size: Any) -> Any:
    """A T5 v1.1 encoder config (gated GELU, as T5-XXL) of the given size that fits the built-in T5 tokenizer."""
    from transformers import T5Config

    return T5Config(**size, vocab_size=len(tokenizer), feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    decoder_start_token_id=tokenizer.pad_token_id)
