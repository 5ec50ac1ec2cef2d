"""What turns an image into numbers that say its style, its content and which picture it is.

A descriptor embeds images three ways (each row an L2-normalised vector, so a dot product is a cosine):

- ``style``: what a style changes and a subject does not (colour, texture);
- ``content``: what a subject keeps and a style should not change (the layout of the picture);
- ``copy``: the picture itself, to find a generated image that repeats a training image.

``builtin`` needs no weights and no download: colour and texture statistics (Gram matrices of the colours and of
fixed filters' responses, at two scales, in the way Gatys et al. describe style), a blurred grey thumbnail for
the layout, and a colour thumbnail for the picture. The learned ones (CLIP, DINOv2, CSD) come through
transformers (``learned.py``, whose ``load_descriptor`` gives any of them from the ``eval.descriptor``
string).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

BUILTIN = "builtin"


@dataclass
class Embeddings:
    """One row per image, each L2-normalised."""

    style: torch.Tensor
    content: torch.Tensor
    copy: torch.Tensor

    def __len__(self) -> int:
        return self.style.shape[0]

    def take(self, rows: Sequence[int]) -> Embeddings:
        index = torch.as_tensor(list(rows), dtype=torch.long)
        return Embeddings(self.style[index], self.content[index], self.copy[index])

    @staticmethod
    def join(parts: Sequence[Embeddings]) -> Embeddings:
        return Embeddings(*(torch.cat([getattr(p, f) for p in parts]) for f in ("style", "content", "copy")))


class Descriptor:
    """Embeds images (``embed``) and, for text-image models, prompts (``text``: None where it cannot)."""

    name = BUILTIN
    what = ""  # one line: what its style and content measure (the README and the app show it)
    copy_threshold = 0.95  # copying (a generated image's highest similarity to one training image) above: flagged

    def embed(self, images: Sequence[Image.Image]) -> Embeddings:
        raise NotImplementedError

    def text(self, prompts: Sequence[str]) -> torch.Tensor | None:
        return None

    def image_text(self, images: Sequence[Image.Image]) -> torch.Tensor | None:
        """The image embeddings that compare with ``text`` (None where there is no text side)."""
        return None


def square(image: Image.Image, size: int) -> np.ndarray:
    """The image's centre square at ``size`` px as float RGB in 0..1 (H, W, 3)."""
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    resized = image.resize((size, size), Image.Resampling.BOX if side >= size else Image.Resampling.BICUBIC, box=box)
    return np.asarray(resized, dtype=np.float32) / 255.0


def normalised(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.flatten(1).double(), dim=1).float()


def _filters() -> torch.Tensor:
    """Fixed 5x5 filters on luminance: edges in four directions, a Laplacian, and two oriented frequencies."""
    sobel = torch.tensor([[1.0, 2, 0, -2, -1], [2, 4, 0, -4, -2], [3, 6, 0, -6, -3], [2, 4, 0, -4, -2],
                          [1, 2, 0, -2, -1]]) / 48
    grid = torch.arange(5.0) - 2
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    laplace = torch.exp(-(xx**2 + yy**2) / 2)
    laplace = laplace / laplace.sum() - (torch.zeros(5, 5).index_put_((torch.tensor(2), torch.tensor(2)),
                                                                       torch.tensor(1.0)))
    envelope = torch.exp(-(xx**2 + yy**2) / 4)
    waves = [envelope * torch.cos(np.pi / 2 * (xx * c + yy * s)) for c, s in ((1, 0), (0.7071, 0.7071))]
    waves = [w - w.mean() for w in waves]
    bank = [sobel, sobel.T, (sobel + sobel.T) / 2, (sobel - sobel.T) / 2, laplace, *[w / w.abs().sum() for w in waves]]
    return torch.stack(bank)[:, None]  # (7, 1, 5, 5)


class BuiltinDescriptor(Descriptor):
    """Colour and texture statistics: no weights, no download, the same numbers on every machine."""

    name = BUILTIN
    what = ("style: colour and texture statistics (Gram matrices of the colours and of fixed edge and frequency "
            "filters, at two scales); content: the layout of a blurred grey thumbnail; copying: a colour thumbnail")
    copy_threshold = 0.95
    SIZE = 64  # pixels the statistics are taken at

    def __init__(self) -> None:
        self.bank = _filters()

    def embed(self, images: Sequence[Image.Image]) -> Embeddings:
        x = torch.from_numpy(np.stack([square(im, self.SIZE) for im in images])).permute(0, 3, 1, 2)
        return Embeddings(self._style(x), self._layout(x), self._picture(x))

    def _style(self, x: torch.Tensor) -> torch.Tensor:
        blocks = []
        for level in range(2):
            y = x if level == 0 else F.avg_pool2d(x, 2)
            grey = (y * torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]).sum(1, keepdim=True)
            responses = F.conv2d(F.pad(grey, (2, 2, 2, 2), mode="reflect"), self.bank) * 4
            channels = torch.cat([y - 0.5, responses], 1).flatten(2)
            gram = channels @ channels.transpose(1, 2) / channels.shape[-1]
            rows, cols = torch.triu_indices(gram.shape[1], gram.shape[1])
            blocks.append(gram[:, rows, cols])
        means = x.flatten(2).mean(-1)
        spread = x.flatten(2).std(-1)
        saturation = (x.max(1).values - x.min(1).values).flatten(1).mean(-1, keepdim=True)
        blocks.append(torch.cat([means, spread, saturation], 1))
        # signed square roots tame the largest statistics; each block weighs the same
        return normalised(torch.cat([normalised(b.sign() * b.abs().sqrt()) for b in blocks], 1))

    @staticmethod
    def _layout(x: torch.Tensor) -> torch.Tensor:
        grey = x.mean(1, keepdim=True)
        small = F.adaptive_avg_pool2d(F.avg_pool2d(grey, 3, stride=1, padding=1, count_include_pad=False), 16)
        flat = small.flatten(1)
        return normalised(flat - flat.mean(1, keepdim=True))

    @staticmethod
    def _picture(x: torch.Tensor) -> torch.Tensor:
        flat = F.adaptive_avg_pool2d(x, 32).flatten(1)
        return normalised(flat - flat.mean(1, keepdim=True))

