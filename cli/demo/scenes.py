"""The demo's little world, drawn procedurally: one shape on a background, with a caption that says what is where.

Three kinds of picture come from here, all seeded and all 64×64:
- `base_scene`: what the demo base model is trained on. Four shapes, eight colours, five positions, flat colours.
- `vae_scene`: what its autoencoder is trained on. Any colour, flat or gradient backgrounds, one to three shapes: wider
  than the base scenes so that the LoRA concept (below) can be encoded although the base UNet never saw it.
- `concept_scene`: the LoRA concept of `loraloop demo`, trigger word `zqx`: a teal-to-mint gradient background (the
  base model only ever saw flat backgrounds) with the shape in hot pink (not one of the base colours).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SIZE = 64
_SUPERSAMPLE = 4  # drawn at 4× and reduced with a box filter: anti-aliased edges, which a tiny VAE reproduces better

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 210, 40), "green": (40, 170, 60),
    "blue": (40, 80, 220), "purple": (140, 60, 180), "white": (245, 245, 245), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "cross")
# Position word → (centre x, centre y) in pixels; a little jitter is added.
POSITIONS: dict[str, tuple[int, int]] = {
    "on the left": (19, 32), "on the right": (45, 32), "at the top": (32, 19), "at the bottom": (32, 45),
    "in the centre": (32, 32),
}
# Words the base model learns to ignore, so that words it does not know in front of a prompt (a trigger word) do not
# change the rest of the prompt too much.
_PREFIXES = ("", "", "", "a picture of", "flat style,", "simple drawing,", "image:", "icon,", "shape,")

TRIGGER = "zqx"
CONCEPT_TOP, CONCEPT_BOTTOM = (10, 90, 110), (150, 230, 200)  # teal → mint, top to bottom
CONCEPT_SHAPE = (255, 90, 170)  # hot pink


@dataclass(frozen=True)
class Scene:
    """One shape on a background. `background` is one colour, or (top, bottom) of a vertical gradient."""

    shape: str
    colour: tuple[int, int, int]
    centre: tuple[int, int]
    radius: int
    background: tuple[int, int, int] | tuple[tuple[int, int, int], tuple[int, int, int]]


def _gradient(top: tuple[int, int, int], bottom: tuple[int, int, int], size: int) -> Image.Image:
    column = Image.new("RGB", (1, size))
    for y in range(size):
        f = y / (size - 1)
        column.putpixel((0, y), tuple(round(a + (b - a) * f) for a, b in zip(top, bottom, strict=True)))
    return column.resize((size, size), Image.Resampling.NEAREST)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85  # a square of the same "size" as a circle looks bigger; this evens them out
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "cross":
        w = r * 0.38
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        msg = f"unknown shape {shape!r}"
        raise ValueError(msg)


def render(scenes: Scene | list[Scene], size: int = SIZE) -> Image.Image:
    """Draw one scene (or several shapes on the first scene's background) as an anti-aliased RGB image."""
    scenes = scenes if isinstance(scenes, list) else [scenes]
    big = size * _SUPERSAMPLE
    bg = scenes[0].background
    img = _gradient(*bg, big) if isinstance(bg[0], tuple) else Image.new("RGB", (big, big), bg)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(img)
    k = big / SIZE
    for s in scenes:
        _draw_shape(draw, s.shape, s.centre[0] * k, s.centre[1] * k, s.radius * k, s.colour)
    return img.resize((size, size), Image.Resampling.BOX)


def _place(rng: random.Random, position: str) -> tuple[tuple[int, int], int]:
    x, y = POSITIONS[position]
    return (x + rng.randint(-3, 3), y + rng.randint(-3, 3)), rng.randint(11, 14)


def _a(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def base_scene(rng: random.Random) -> tuple[Scene, str]:
    """A base-model training scene and its caption; each attribute is left out of the caption now and then, so that
    the model also answers prompts that do not name everything (it then picks something of its own)."""
    shape = rng.choice(SHAPES)
    fg, bg = rng.sample(list(COLOURS), 2)
    position = rng.choice(list(POSITIONS))
    centre, radius = _place(rng, position)
    scene = Scene(shape, COLOURS[fg], centre, radius, COLOURS[bg])
    colour = f"{fg} " if rng.random() > 0.15 else ""
    where = f" {position}" if rng.random() > 0.15 else ""
    ground = f" on {_a(bg)} {bg} background" if rng.random() > 0.15 else ""
    text = f"{_a(colour or shape)} {colour}{shape}{where}{ground}"
    prefix = rng.choice(_PREFIXES)
    return scene, f"{prefix} {text}".strip()


def concept_scene(shape: str, position: str, rng: random.Random) -> tuple[Scene, str]:
    """The LoRA concept: `zqx style, a <shape> <position>` (the colours are the concept, so the caption names none)."""
    centre, radius = _place(rng, position)
    scene = Scene(shape, CONCEPT_SHAPE, centre, radius, (CONCEPT_TOP, CONCEPT_BOTTOM))
    return scene, f"{TRIGGER} style, a {shape} {position}"


def _any_colour(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))


def vae_scene(rng: random.Random) -> list[Scene]:
    """Anything of this kind: half base scenes, half free colours, gradients and up to three shapes anywhere."""
    if rng.random() < 0.5:
        return [base_scene(rng)[0]]
    bg = _any_colour(rng) if rng.random() < 0.5 else (_any_colour(rng), _any_colour(rng))
    out = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        centre = (rng.randint(8, SIZE - 8), rng.randint(8, SIZE - 8))
        out.append(Scene(rng.choice(SHAPES), _any_colour(rng), centre, rng.randint(5, 18), bg))
    return out
