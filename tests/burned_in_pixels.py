"""Pictures with text drawn into them, for the burned-in text tests: chest-like pixels, and lines
drawn with Pillow's own font (no system fonts needed) whose ink boxes are measured from the pixels."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def radiograph(rows: int = 768, cols: int = 640, seed: int = 0) -> np.ndarray:
    """12-bit chest-like pixels: a smooth body, ribs and noise, no text."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    body = 1400 + 1300 * np.exp(-(((yy - rows / 2) / (rows / 3)) ** 2 + ((xx - cols / 2) / (cols / 3.5)) ** 2))
    for k in range(6):
        body += 250 * np.exp(-((yy - rows * 0.25 - k * rows * 0.09 - 0.1 * (xx - cols / 2)) / 9) ** 2)
    return np.clip(body + rng.normal(0, 30, (rows, cols)), 0, 4095).astype(np.uint16)


def draw(pixels: np.ndarray, lines: list[tuple[int, int, str]], *, size: int = 24, ink: int = 4095,
         box: int | None = None) -> list[tuple[int, int, int, int]]:
    """Draw each (top, left, text) onto ``pixels`` in place (on a ``box``-valued panel when
    given); returns each line's ink box (top, left, bottom, right), measured from the pixels."""
    font = ImageFont.load_default(size=size)
    boxes = []
    for top, left, text in lines:
        canvas = Image.fromarray(pixels.astype(np.int32), mode="I")
        pen = ImageDraw.Draw(canvas)
        if box is not None:
            x0, y0, x1, y1 = pen.textbbox((left, top), text, font=font)
            pen.rectangle((x0 - 6, y0 - 6, x1 + 6, y1 + 6), fill=box)
        before = np.array(canvas)
        pen.text((left, top), text, fill=ink, font=font)
        after = np.array(canvas)
        rows, cols = np.nonzero(after != before)
        boxes.append((int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1))
        pixels[...] = after.astype(pixels.dtype)
    return boxes
