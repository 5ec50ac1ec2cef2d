"""Draw the example dataset (datasets/example): 12 captioned images in one flat 'poster' style.

The images are generated here, so they carry no third-party licence (the project's licence
applies). Style: a halftone-dot pastel background, flat colours, thick black outlines.
Run: python scripts/make_example_dataset.py
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 256
OUT = Path(__file__).resolve().parent.parent / "datasets" / "example"
INK = (20, 20, 28)
W = 7  # outline width: the style's signature


def background(color: tuple[int, int, int], dot: tuple[int, int, int]) -> Image.Image:
    im = Image.new("RGB", (SIZE, SIZE), color)
    d = ImageDraw.Draw(im)
    for y in range(0, SIZE, 16):
        for x in range((y // 16) % 2 * 8, SIZE, 16):
            d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=dot)
    return im


def star_points(cx: float, cy: float, r1: float, r2: float, n: int = 5) -> list[tuple[float, float]]:
    pts = []
    for i in range(2 * n):
        r = r1 if i % 2 == 0 else r2
        a = -math.pi / 2 + i * math.pi / n
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def apple(d: ImageDraw.ImageDraw) -> None:
    d.ellipse((58, 78, 198, 214), fill=(222, 56, 60), outline=INK, width=W)
    d.line((128, 84, 136, 44), fill=INK, width=W)
    d.ellipse((138, 44, 184, 70), fill=(90, 170, 80), outline=INK, width=W)


def house(d: ImageDraw.ImageDraw) -> None:
    d.rectangle((64, 120, 192, 214), fill=(80, 130, 220), outline=INK, width=W)
    d.polygon([(48, 124), (128, 50), (208, 124)], fill=(230, 90, 70), outline=INK, width=W)
    d.rectangle((112, 160, 144, 214), fill=(250, 210, 90), outline=INK, width=W)


def tree(d: ImageDraw.ImageDraw) -> None:
    d.rectangle((114, 150, 142, 222), fill=(140, 90, 50), outline=INK, width=W)
    d.ellipse((54, 40, 202, 170), fill=(70, 170, 90), outline=INK, width=W)


def star(d: ImageDraw.ImageDraw) -> None:
    d.polygon(star_points(128, 134, 92, 40), fill=(250, 205, 60), outline=INK, width=W)


def boat(d: ImageDraw.ImageDraw) -> None:
    d.polygon([(50, 170), (206, 170), (178, 210), (78, 210)], fill=(200, 80, 60), outline=INK, width=W)
    d.line((128, 170, 128, 46), fill=INK, width=W)
    d.polygon([(134, 52), (134, 160), (196, 160)], fill=(245, 245, 240), outline=INK, width=W)


def mountain(d: ImageDraw.ImageDraw) -> None:
    d.ellipse((160, 30, 220, 90), fill=(250, 170, 60), outline=INK, width=W)
    d.polygon([(20, 220), (110, 80), (200, 220)], fill=(120, 110, 160), outline=INK, width=W)
    d.polygon([(110, 220), (170, 130), (236, 220)], fill=(90, 140, 120), outline=INK, width=W)


def flower(d: ImageDraw.ImageDraw) -> None:
    d.line((128, 140, 128, 230), fill=INK, width=W)
    for i in range(6):
        a = i * math.pi / 3
        cx, cy = 128 + 44 * math.cos(a), 100 + 44 * math.sin(a)
        d.ellipse((cx - 28, cy - 28, cx + 28, cy + 28), fill=(240, 120, 170), outline=INK, width=W)
    d.ellipse((100, 72, 156, 128), fill=(250, 210, 70), outline=INK, width=W)


def cup(d: ImageDraw.ImageDraw) -> None:
    d.arc((150, 100, 214, 170), -90, 90, fill=INK, width=W)
    d.rectangle((60, 80, 170, 200), fill=(100, 200, 200), outline=INK, width=W)
    d.line((80, 60, 90, 30), fill=INK, width=4)
    d.line((120, 60, 130, 30), fill=INK, width=4)


def moon(d: ImageDraw.ImageDraw) -> None:
    d.ellipse((50, 50, 190, 190), fill=(250, 230, 130), outline=INK, width=W)
    d.ellipse((96, 30, 226, 160), fill=(40, 50, 100), outline=INK, width=W)
    for x, y in ((200, 190), (70, 210), (210, 60)):
        d.polygon(star_points(x, y, 18, 8), fill=(250, 230, 130), outline=INK, width=3)


def fish(d: ImageDraw.ImageDraw) -> None:
    d.polygon([(170, 128), (226, 84), (226, 172)], fill=(250, 150, 50), outline=INK, width=W)
    d.ellipse((36, 80, 186, 176), fill=(250, 150, 50), outline=INK, width=W)
    d.ellipse((70, 110, 90, 130), fill=INK)


def mushroom(d: ImageDraw.ImageDraw) -> None:
    d.rectangle((104, 130, 152, 220), fill=(245, 235, 210), outline=INK, width=W)
    d.pieslice((40, 50, 216, 210), 180, 360, fill=(220, 50, 50), outline=INK, width=W)
    for x, y in ((90, 100), (140, 80), (170, 110)):
        d.ellipse((x - 12, y - 12, x + 12, y + 12), fill=(250, 250, 250))


def heart(d: ImageDraw.ImageDraw) -> None:
    d.ellipse((48, 60, 134, 146), fill=(230, 60, 110), outline=INK, width=W)
    d.ellipse((122, 60, 208, 146), fill=(230, 60, 110), outline=INK, width=W)
    d.polygon([(54, 118), (202, 118), (128, 214)], fill=(230, 60, 110), outline=INK, width=W)
    d.ellipse((58, 70, 124, 136), fill=(230, 60, 110))
    d.ellipse((132, 70, 198, 136), fill=(230, 60, 110))


SUBJECTS = [
    ("apple", apple, "a red apple with a green leaf", (250, 230, 200), (240, 210, 180)),
    ("house", house, "a small blue house with a red roof", (210, 235, 250), (190, 220, 240)),
    ("tree", tree, "a round green tree", (250, 240, 200), (240, 225, 175)),
    ("star", star, "a yellow star", (60, 70, 130), (80, 90, 150)),
    ("boat", boat, "a sailboat with a white sail", (190, 225, 245), (170, 210, 235)),
    ("mountain", mountain, "purple mountains under an orange sun", (250, 225, 190), (240, 205, 170)),
    ("flower", flower, "a pink flower with a yellow centre", (220, 245, 220), (200, 235, 200)),
    ("cup", cup, "a steaming teal cup", (250, 220, 220), (240, 200, 200)),
    ("moon", moon, "a crescent moon and stars at night", (40, 50, 100), (60, 70, 120)),
    ("fish", fish, "an orange fish", (200, 235, 250), (180, 220, 240)),
    ("mushroom", mushroom, "a red mushroom with white spots", (235, 245, 210), (220, 235, 190)),
    ("heart", heart, "a pink heart", (250, 235, 240), (240, 215, 225)),
]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, draw, caption, bg, dot in SUBJECTS:
        im = background(bg, dot)
        draw(ImageDraw.Draw(im))
        im.save(OUT / f"{name}.png", optimize=True)
        (OUT / f"{name}.txt").write_text(f"{caption}, flat poster style, thick black outlines\n", encoding="utf-8")
    (OUT / "LICENSE.txt").write_text(
        "These images were drawn by scripts/make_example_dataset.py and are part of stylelora,\n"
        "under the project's licence. No third-party images are included.\n",
        encoding="utf-8",
    )


if __name__ == "__main__":
    main()
