"""Caption options applied each time an example is used: trigger word, tag shuffle, caption dropout.

Captions are comma-separated tags (``"zxc, a cat, oil painting"``). All randomness comes from the
generator the caller derives from (seed, epoch, example), so a resumed run sees the same captions.
"""

from __future__ import annotations

import numpy as np

from .config import DataConfig


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def shuffle_tags(caption: str, keep: int, rng: np.random.Generator) -> str:
    """Shuffle the comma-separated tags of ``caption``, leaving the first ``keep`` in place."""
    tags = split_tags(caption)
    head, tail = tags[:keep], tags[keep:]
    order = rng.permutation(len(tail))
    return ", ".join(head + [tail[i] for i in order])


def build_caption(caption: str, config: DataConfig, rng: np.random.Generator, trigger: bool = True) -> str:
    """The caption one use of an example trains with (``trigger=False`` for regularisation images).

    Dropout is drawn first and always (one draw per use), so turning shuffling on or off does not
    change which examples are dropped. The trigger word goes first, ahead of the ``keep_tags``.
    """
    dropped = bool(rng.random() < config.caption_dropout)
    word = config.trigger_word.strip() if trigger else ""
    tags = [t for t in split_tags(caption) if t != word]
    if config.shuffle_tags:
        keep = config.keep_tags
        tags = tags[:keep] + [tags[keep:][i] for i in rng.permutation(len(tags[keep:]))]
    if word:
        tags.insert(0, word)
    return "" if dropped else ", ".join(tags)
