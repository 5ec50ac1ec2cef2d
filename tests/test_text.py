"""Text encoding: clip skip, and long captions in 75-token chunks (kohya's max_token_length 150/225)."""

from __future__ import annotations

import pytest
import torch

from stylelora.core.errors import ConfigError
from stylelora.families import load_base_model
from stylelora.model.text import encode, encode_captions, token_ids


@pytest.fixture(scope="module")
def tiny():
    return load_base_model("builtin:tiny")


def caption_of(tokens: int, last: str = "z") -> str:
    """A caption of exactly ``tokens`` text tokens for builtin:tiny's tokenizer (one token per character)."""
    return "a" * (tokens - 1) + last


def test_clip_skip_2_takes_the_layer_before_the_last(tiny) -> None:
    tokenizer, te = tiny.tokenizer, tiny.text_encoder
    with torch.no_grad():
        one = encode_captions(tokenizer, te, ["a lighthouse, flat style"], clip_skip=1)
        two = encode_captions(tokenizer, te, ["a lighthouse, flat style"], clip_skip=2)
        ids = tokenizer(["a lighthouse, flat style"], padding="max_length", max_length=77,
                        return_tensors="pt").input_ids
        hidden = te(ids, output_hidden_states=True).hidden_states
    assert one.shape == two.shape == (1, 77, 32)
    assert torch.equal(one, te(ids)[0].detach())  # clip skip 1 is the encoder's usual output
    assert (one - two).abs().max() > 1e-3
    assert torch.allclose(two, te.final_layer_norm(hidden[-2]))
    with pytest.raises(ConfigError, match="model.clip_skip: 5 is more than the text encoder's 2 layers"):
        encode(te, token_ids(tokenizer, ["a cat"]), clip_skip=5)


def test_a_200_token_caption_is_kept_whole_at_225(tiny) -> None:
    tokenizer, te = tiny.tokenizer, tiny.text_encoder
    caption = caption_of(200)
    assert len(tokenizer(caption).input_ids) == 202  # start + 200 + end
    ids = token_ids(tokenizer, [caption], 225)
    assert ids.shape == (1, 3, 77)
    text = ids[:, :, 1:-1].reshape(-1)
    assert (text == tokenizer.convert_tokens_to_ids("a")).sum() == 199
    assert (text == tokenizer.convert_tokens_to_ids("z</w>")).sum() == 1  # the last token made it in
    assert (ids[:, :, 0] == tokenizer.bos_token_id).all() and (ids[:, :, -1] == tokenizer.eos_token_id).all()
    with torch.no_grad():
        long = encode(te, ids)
        other = encode_captions(tokenizer, te, [caption_of(200, last="y")], 225)
        short = encode_captions(tokenizer, te, [caption], 75)
        short_other = encode_captions(tokenizer, te, [caption_of(200, last="y")], 75)
    assert long.shape == (1, 227, 32)
    assert (long - other).abs().max() > 1e-3  # the 200th token changes the states: nothing was cut
    assert torch.equal(short, short_other)  # at 75 tokens it is cut off
    plain = tokenizer([caption], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(token_ids(tokenizer, [caption], 75)[:, 0], plain)  # 75: exactly as before
