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
