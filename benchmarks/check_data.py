"""How long the dataset check takes (it runs at the start of every training run).

Usage: python benchmarks/check_data.py [N_IMAGES] [SIZE]
Draws N noisy JPEGs of SIZE x SIZE with captions into a temporary folder, then times
check_dataset on it (the tokenizer is builtin:tiny's, so nothing is downloaded).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stylelora.data.doctor import check_dataset  # noqa: E402


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i in range(n):
            smooth = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)
            Image.fromarray(smooth).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:04d}.jpg",
                                                                                        quality=90)
            (folder / f"{i:04d}.txt").write_text(f"picture {i}, flat poster style, thick outlines")
        check_dataset(folder, 512, model="builtin:tiny")  # warm up imports and the tokenizer
        start = time.perf_counter()
        report = check_dataset(folder, 512, model="builtin:tiny")
        seconds = time.perf_counter() - start
    print(f"{n} images of {size}x{size}: {seconds:.2f} s ({1000 * seconds / n:.1f} ms per image), "
          f"{len(report.usable)} usable")


if __name__ == "__main__":
    main()
