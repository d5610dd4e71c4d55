"""Pictures of masks: frames with the mask tinted over them, and a contact sheet of several frames."""

import numpy as np
from PIL import Image, ImageDraw


MASK_COLOUR = np.array([255, 40, 40], dtype=np.float32)


def overlay_mask(
    frame: Image.Image | np.ndarray,
    mask: np.ndarray,
    alpha: float = 0.55,
    colour: tuple[int, int, int] | np.ndarray = MASK_COLOUR,
) -> np.ndarray:
    """The frame (H, W, 3) uint8 with the mask tinted (red by default) and outlined."""
    colour = np.asarray(colour, dtype=np.float32)
    image = np.asarray(frame, dtype=np.float32).copy()
    image[mask] = (1 - alpha) * image[mask] + alpha * colour
    edge = mask & ~(
        np.pad(mask, 1, mode="edge")[2:, 1:-1] & np.pad(mask, 1, mode="edge")[:-2, 1:-1]
        & np.pad(mask, 1, mode="edge")[1:-1, 2:] & np.pad(mask, 1, mode="edge")[1:-1, :-2]
    )
    image[edge] = colour
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
