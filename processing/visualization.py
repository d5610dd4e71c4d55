"""Pictures of masks: frames with the mask tinted over them, and a contact sheet of several frames."""

import numpy as np
from PIL import Image, ImageDraw


# tints to choose from: the one farthest from the masked pixels' mean colour is used
TINTS = np.array(
    [[255, 40, 40], [40, 220, 40], [40, 90, 255], [255, 230, 0], [0, 230, 255], [255, 0, 220]], dtype=np.float32
)


def contrasting_tint(pixels: np.ndarray) -> np.ndarray:
    """The tint of `TINTS` farthest from the mean colour of `pixels` (N, 3), so that a red object is not tinted red."""
    if len(pixels) == 0:
        return TINTS[0]
    mean = pixels.reshape(-1, 3).mean(axis=0)
    return TINTS[np.argmax(((TINTS - mean) ** 2).sum(axis=1))]


def _edge(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, mode="edge")
    interior = padded[2:, 1:-1] & padded[:-2, 1:-1] & padded[1:-1, 2:] & padded[1:-1, :-2]
    return mask & ~interior


def overlay_mask(
    frame: Image.Image | np.ndarray,
    mask: np.ndarray,
    alpha: float = 0.55,
    colour: tuple[int, int, int] | np.ndarray | None = None,
) -> np.ndarray:
    """
    The frame (H, W, 3) uint8 with the mask tinted and outlined: the tint contrasts with the object (see
    [`contrasting_tint`]) unless `colour` is given, and the outline is black or white, whichever stands out more.
    """
    image = np.asarray(frame, dtype=np.float32).copy()
    tint = contrasting_tint(image[mask]) if colour is None else np.asarray(colour, dtype=np.float32)
    image[mask] = (1 - alpha) * image[mask] + alpha * tint
    edge = _edge(mask)
    # luma of the tint: a light tint gets a black outline, a dark one a white outline
    image[edge] = 0.0 if tint @ np.array([0.299, 0.587, 0.114], dtype=np.float32) > 127 else 255.0
    return image.clip(0, 255).astype(np.uint8)


def contact_sheet(tiles: list[np.ndarray], labels: list[str], columns: int = 4, tile_width: int = 256) -> Image.Image:
    """Tiles (H, W, 3) in a grid, each scaled to `tile_width` and captioned."""
    scale = tile_width / tiles[0].shape[1]
    tile_height = int(round(tiles[0].shape[0] * scale))
    caption = 16
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * tile_width, rows * (tile_height + caption)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for index, (tile, label) in enumerate(zip(tiles, labels)):
        left, top = (index % columns) * tile_width, (index // columns) * (tile_height + caption)
        sheet.paste(Image.fromarray(tile).resize((tile_width, tile_height), Image.Resampling.BILINEAR), (left, top + caption))
        draw.text((left + 4, top + 2), label, fill=(0, 0, 0))
    return sheet
