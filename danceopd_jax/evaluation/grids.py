"""Captioned PNG grids: one row per example, a caption above each row, one column per image."""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from danceopd_jax.sampling import to_uint8

MIN_CELL = 80  # pixels: small images are upscaled (nearest neighbour) to at least this width
PAD = 4
CAPTION_HEIGHT = 14


def caption_grid(rows: list[tuple[str, list[np.ndarray]]], column_titles: list[str]) -> Image.Image:
    """``rows`` = ``[(caption, [image per column])]`` with images float in [-1, 1], all one size."""
    height, width = rows[0][1][0].shape[:2]
    scale = max(1, -(-MIN_CELL // width))
    cell_h, cell_w = height * scale, width * scale
    columns = len(column_titles)
    grid_w = PAD + columns * (cell_w + PAD)
    grid_h = CAPTION_HEIGHT + PAD + len(rows) * (CAPTION_HEIGHT + cell_h + PAD)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(measure.textlength(caption, font=font) for caption, _ in rows)
    canvas = Image.new("RGB", (max(grid_w, int(text_w) + 2 * PAD), grid_h), "white")
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(column_titles):
        draw.text((PAD + column * (cell_w + PAD), 1), title, fill="black", font=font)
    y = CAPTION_HEIGHT + PAD
    for caption, images in rows:
        draw.text((PAD, y), caption, fill=(60, 60, 60), font=font)
        y += CAPTION_HEIGHT
        for column, image in enumerate(images):
            cell = Image.fromarray(to_uint8(image)).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(cell, (PAD + column * (cell_w + PAD), y))
        y += cell_h + PAD
    return canvas
