"""Captions to text-encoder states: long captions in 75-token chunks, and clip skip, as kohya does.

CLIP sees 77 tokens: a start token, 75 tokens of text and an end token. A caption of up to 150 or
225 tokens (``data.max_token_length``) is cut into 75-token pieces, each wrapped in its own start
and end tokens and encoded on its own; the states are joined back into one sequence (the first
start state, each piece's 75 text states, the last end state), 152 or 227 states long. The UNet's
cross-attention takes a sequence of any length, so nothing else changes.

Clip skip N takes the hidden states N layers from the end (1 is the last layer, the usual output),
through the encoder's final layer norm, as kohya and AUTOMATIC1111 do.

A model family's ``encode_text`` turns these into :class:`TextStates` for all of its text encoders (SDXL: two,
side by side, and the pooled text).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.errors import ConfigError


def token_limit(tokenizer: Any, text_encoder: Any) -> int:
    """The longest token sequence ``text_encoder`` takes: its ``max_position_embeddings``, whatever the
    tokenizer's ``model_max_length`` says (ComfyUI's SD1 tokenizer config says 8192; CLIP has 77)."""
    positions = getattr(getattr(text_encoder, "config", None), "max_position_embeddings", None)
    return min(int(tokenizer.model_max_length), int(positions)) if positions else int(tokenizer.model_max_length)


def conventional_text_path(path: str) -> str:
    """A CLIP text-encoder module path as the exchange formats (kohya and diffusers files) spell it.

    transformers 5 flattened CLIPTextModel (``encoder.layers...``); transformers 4, A1111, ComfyUI and
    every shared file keep ``text_model.encoder.layers...``. ``text_projection`` sits outside text_model.
    """
    if path.startswith("text_model.") or path == "text_projection":
        return path
    return "text_model." + path


def chunks_for(max_token_length: int, window: int = 77) -> int:
    """How many encoder windows a caption of ``max_token_length`` tokens needs (75 text tokens each)."""
    return max(1, -(-max_token_length // (window - 2)))


def token_ids(tokenizer: Any, captions: list[str], max_token_length: int = 75) -> torch.Tensor:
    """Token ids (batch, chunks, window) of ``captions``, padded, cut at ``max_token_length`` text tokens."""
    window = tokenizer.model_max_length
    inner = window - 2
    chunks = chunks_for(max_token_length, window)
    full = tokenizer(captions, padding="max_length", max_length=chunks * inner + 2, truncation=True,
                     return_tensors="pt").input_ids
    if chunks == 1:
        return full[:, None]
    start, end = full[:, :1], full[:, -1:]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pieces = []
    for i in range(chunks):
        piece = torch.cat([start, full[:, 1 + i * inner : 1 + (i + 1) * inner], end], dim=1)
        if pad != eos:  # SD2's tokenizer pads with another token: every piece must still end its text with EOS
            open_end = (piece[:, -2] != eos) & (piece[:, -2] != pad)
            piece[open_end, -1] = eos
            piece[piece[:, 1] == pad, 1] = eos  # an empty piece reads <start> <end> <pad>...
        pieces.append(piece)
    return torch.stack(pieces, dim=1)


def _final_norm(text_encoder: Any) -> torch.nn.Module:
    inner = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 flattened CLIPTextModel
    return inner.final_layer_norm


def check_clip_skip(text_encoder: Any, clip_skip: int) -> None:
    layers = text_encoder.config.num_hidden_layers
    if clip_skip > layers:
        raise ConfigError(f"model.clip_skip: {clip_skip} is more than the text encoder's {layers} layers; "
                          "use 1 (the last layer) or 2")


def encode(text_encoder: Any, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """States (batch, tokens, width) of ``ids`` from :func:`token_ids`: 77 tokens for one chunk, else the
    chunks joined (2 + 75 x chunks)."""
    if ids.dim() == 2:
        ids = ids[:, None]
    batch, chunks, window = ids.shape
    flat = ids.reshape(batch * chunks, window).to(text_encoder.device)
    if clip_skip <= 1:
        states = text_encoder(flat)[0]
    else:
        check_clip_skip(text_encoder, clip_skip)
        hidden = text_encoder(flat, output_hidden_states=True).hidden_states[-clip_skip]
        states = _final_norm(text_encoder)(hidden)
    states = states.reshape(batch, chunks * window, -1)
    if chunks == 1:
        return states
    pieces = [states[:, :1]] + [states[:, i * window + 1 : (i + 1) * window - 1] for i in range(chunks)]
    return torch.cat([*pieces, states[:, -1:]], dim=1)


def encode_captions(tokenizer: Any, text_encoder: Any, captions: list[str], max_token_length: int = 75,
                    clip_skip: int = 1) -> torch.Tensor:
    """``encode(token_ids(...))`` in one call (samples and previews)."""
    return encode(text_encoder, token_ids(tokenizer, captions, max_token_length), clip_skip)


# --- every text encoder of a model: SD1/SD2 have one, SDXL two -----------------------------------


@dataclass
class TextStates:
    """What a caption conditions the denoiser with: the states it attends to, and (SDXL) the pooled text."""

    states: torch.Tensor  # (batch, tokens, width); SDXL: both encoders' states side by side on width
    pooled: torch.Tensor | None = None  # SDXL: text_encoder_2's projected pooled output (batch, width)

    def __len__(self) -> int:
        return int(self.states.shape[0])

    def row(self, i: int) -> TextStates:
        return TextStates(self.states[i], None if self.pooled is None else self.pooled[i])

    @staticmethod
    def stack(rows: Sequence[TextStates]) -> TextStates:
        pooled = [r.pooled for r in rows]
        return TextStates(torch.stack([r.states for r in rows]),
                          None if any(p is None for p in pooled) else torch.stack(pooled))  # type: ignore[misc]


def tokenize(tokenizers: Sequence[Any], captions: list[str], max_token_length: int = 75) -> list[torch.Tensor]:
    """:func:`token_ids` of ``captions`` for each text encoder's tokenizer (SDXL's pad differently)."""
    return [token_ids(tokenizer, captions, max_token_length) for tokenizer in tokenizers]
