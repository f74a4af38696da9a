"""Contact sheets: rows of image tiles with text under them, or text-only tiles (captions, a query), as one PNG.

Used by the image–text evaluation picture and by ``python -m src.search``.
"""

from __future__ import annotations

import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

Tile = tuple[torch.Tensor | None, str]  # (image C x H x W, uint8 or floats in [0, 1]; or None for text only), text


def _to_pil(image: torch.Tensor, size: int) -> Image.Image:
    x = image.detach().float().cpu()
    x = x / 255.0 if image.dtype == torch.uint8 else x
    x = x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]
    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr, "RGB").resize((size, size), Image.NEAREST if max(arr.shape[:2]) < size else Image.BILINEAR)


def contact_sheet(rows: list[list[Tile]], tile: int = 112, text_lines: int = 3, text_width: int | None = None) -> Image.Image:
    """One RGB image: each row's tiles left to right, each image ``tile`` px square with up to ``text_lines`` lines
    of its text below; a text-only tile is ``text_width`` px wide (default 2 tiles) and shows its whole text."""
    font = ImageFont.load_default()
    line_h, char_w, pad = 12, 6, 6
    text_width = text_width or 2 * tile
    wrap = max(tile // char_w, 8)

    def lines_of(t: Tile) -> list[str]:
        if t[0] is None:
            return [ln for para in t[1].splitlines() for ln in textwrap.wrap(para, max(text_width // char_w, 8)) or [""]]
        return textwrap.wrap(t[1], wrap)[:text_lines]

    widths = [sum((tile if t[0] is not None else text_width) + pad for t in row) + pad for row in rows]
    heights = [max(tile + pad + line_h * text_lines if t[0] is not None else line_h * len(lines_of(t))
                   for t in row) + 2 * pad for row in rows]
    sheet = Image.new("RGB", (max(widths), sum(heights)), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for row, h in zip(rows, heights, strict=True):
        x = pad
        for t in row:
            if t[0] is not None:
                sheet.paste(_to_pil(t[0], tile), (x, y + pad))
                for n, ln in enumerate(lines_of(t)):
                    draw.text((x, y + pad + tile + 2 + n * line_h), ln, fill="black", font=font)
                x += tile + pad
            else:
                for n, ln in enumerate(lines_of(t)):
                    draw.text((x, y + pad + n * line_h), ln, fill="black", font=font)
                x += text_width + pad
        y += h
    return sheet
