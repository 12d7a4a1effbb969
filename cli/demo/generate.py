"""Regenerate the demo's datasets (`python -m loraloop.cli.demo.generate`), images with captions in metadata.csv:

- `dataset/`: 12 flat shapes in three sizes and aspect ratios (what the tests train the tiny random models on);
- `concept/`: the `zqx` concept `loraloop demo` teaches `builtin:demo-base` (scenes.py: a teal-to-mint gradient
  background and a hot-pink shape, which the base model never saw), every shape at every position.

The images are drawn, not downloaded, so the repo can ship them; the script stays so anyone can rebuild them.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from PIL import Image, ImageDraw

from .scenes import POSITIONS, SHAPES, concept_scene, render

COLORS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60), "yellow": (235, 200, 30),
          "purple": (140, 50, 170), "orange": (240, 130, 20)}
SIZES = [(64, 64)] * 8 + [(96, 64)] * 2 + [(64, 96)] * 2


def draw(index: int, rng: random.Random) -> tuple[Image.Image, str]:
    fg, bg = rng.sample(list(COLORS), 2)
    shape = ["circle", "square", "triangle"][index % 3]
    w, h = SIZES[index % len(SIZES)]
    img = Image.new("RGB", (w, h), COLORS[bg])
    d = ImageDraw.Draw(img)
    cx, cy, r = w // 2 + rng.randint(-6, 6), h // 2 + rng.randint(-6, 6), min(w, h) // 3
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=COLORS[fg])
    elif shape == "square":
        d.rectangle(box, fill=COLORS[fg])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[fg])
    return img, f"flat style, a {fg} {shape} on a {bg} background"


def _write(folder: Path, items: list[tuple[Image.Image, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, caption) in enumerate(items):
        name = f"img_{i + 1:03d}.png"
        img.save(folder / name, optimize=True)
        rows.append((name, caption))
    with (folder / "metadata.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filename", "prompt"])
        writer.writerows(rows)


def concept_items(seed: int = 11) -> list[tuple[Image.Image, str]]:
    rng = random.Random(seed)
    items = []
    for shape in SHAPES:
        for position in POSITIONS:
            scene, caption = concept_scene(shape, position, rng)
            items.append((render(scene), caption))
    return items


def main(root: Path = Path(__file__).parent) -> None:
    rng = random.Random(7)
    _write(root / "dataset", [draw(i, rng) for i in range(len(SIZES))])
    _write(root / "concept", concept_items())


if __name__ == "__main__":
    main()
