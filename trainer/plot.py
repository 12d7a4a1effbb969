"""Loss-curve and image-grid PNGs drawn with PIL (no plotting library needed inside a host)."""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw, ImageFont


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the raw per-step loss of diffusion training is very noisy)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curve(losses: list[float], *, width: int = 640, height: int = 360,
               title: str = "training loss") -> Image.Image:
    """A PNG-ready chart: raw loss in light grey, moving average in blue, axes with min/max labels."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 56, 16, 28, 32
    draw.text((left, 6), title, fill="black", font=font)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    finite = [v for v in losses if math.isfinite(v)]
    if not finite:
        draw.text((left + 10, top + 10), "no loss values yet", fill="gray", font=font)
        return img
    lo, hi = min(finite), max(finite)
    hi = hi if hi > lo else lo + 1e-6
    n = len(losses)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (width - left - right) * (i / max(1, n - 1))
        y = top + (height - top - bottom) * (1 - (v - lo) / (hi - lo))
        return x, y

    raw = [xy(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
    if len(raw) > 1:
        draw.line(raw, fill=(200, 200, 200), width=1)
    avg = smooth(finite, max(1, n // 20))
    if len(avg) > 1:
        draw.line([xy(i, v) for i, v in enumerate(avg)], fill=(31, 119, 180), width=2)
    draw.text((4, top - 4), f"{hi:.4g}", fill="black", font=font)
    draw.text((4, height - bottom - 8), f"{lo:.4g}", fill="black", font=font)
    draw.text((left, height - bottom + 6), "step 1", fill="black", font=font)
    draw.text((width - right - 60, height - bottom + 6), f"step {n}", fill="black", font=font)
    return img


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B,3,H,W] in [-1,1] → PIL images."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return [Image.fromarray(a.numpy()) for a in arr]


MIN_CELL = 128  # small samples (tiny model, low resolution) are enlarged so that they can be seen


def image_grid(rows: list[list[Image.Image]], labels: list[str] | None = None) -> Image.Image:
    """Rows of equally sized images in one picture, with an optional label above each row."""
    w, h = rows[0][0].size
    if min(w, h) < MIN_CELL:
        factor = -(-MIN_CELL // min(w, h))
        rows = [[im.resize((w * factor, h * factor), Image.Resampling.NEAREST) for im in row] for row in rows]
        w, h = w * factor, h * factor
    pad = 14 if labels else 0
    grid = Image.new("RGB", (w * max(len(r) for r in rows), (h + pad) * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        if labels:
            draw.text((2, r * (h + pad)), labels[r], fill="black", font=ImageFont.load_default())
        for c, im in enumerate(row):
            grid.paste(im, (c * w, r * (h + pad) + pad))
    return grid
