"""Caption options applied each time an example is used: trigger word, tag shuffle, caption dropout.

Captions are comma-separated tags (``"zxc, a cat, oil painting"``). All randomness comes from the
generator the caller derives from (seed, epoch, example), so a resumed run sees the same captions.
"""

from __future__ import annotations

import numpy as np

from ..core.config import DataConfig


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def shuffle_tags(tags: list[str], keep: int, rng: np.random.Generator) -> list[str]:
    """The tags in a random order, except the first ``keep``, which stay in place."""
    head, tail = tags[:keep], tags[keep:]
    return head + [tail[i] for i in rng.permutation(len(tail)).tolist()]


def with_trigger(caption: str, trigger: str) -> str:
    """The caption with the trigger word first, once: what training uses when nothing is shuffled or dropped.

    Validation and the dataset check use this too, so they see the captions training sees."""
    word = trigger.strip()
    tags = [t for t in split_tags(caption) if t != word]
    return ", ".join([word, *tags] if word else tags)


def build_caption(caption: str, config: DataConfig, rng: np.random.Generator, trigger: bool = True) -> str:
    """The caption one use of an example trains with (``trigger=False`` for regularisation images).

    Dropout is drawn first and always (one draw per use), so turning shuffling on or off does not
    change which examples are dropped. The trigger word goes first, ahead of the ``keep_tags``.
    """
    dropped = bool(rng.random() < config.caption_dropout)
    word = config.trigger_word.strip() if trigger else ""
    tags = [t for t in split_tags(caption) if t != word]
    if config.shuffle_tags:
        tags = shuffle_tags(tags, config.keep_tags, rng)
    return "" if dropped else with_trigger(", ".join(tags), word)
