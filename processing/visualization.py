"""Pictures of masks: frames with the mask tinted over them, and a contact sheet of several frames."""

import numpy as np
from PIL import Image, ImageDraw


# tints to choose from: the one farthest from the masked pixels' mean colour is used
TINTS = np.array(
    [[255, 40, 40], [40, 220, 40], [40, 90, 255], [255, 230, 0], [0, 230, 255], [255, 0, 220]], dtype=np.float32
)


def contrasting_tint(colour: np.ndarray) -> np.ndarray:
    """The tint of `TINTS` farthest from `colour` (an object's mean RGB), so that a red object is not tinted red."""
    return TINTS[np.argmax(((TINTS - colour) ** 2).sum(axis=1))]


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
    pixels = np.asarray(frame, dtype=np.uint8)
    planes = [pixels[..., channel] for channel in range(3)]
    if colour is not None:
        tint = np.asarray(colour, dtype=np.float32)
    elif mask.any():
        # the masked pixels' mean colour from exact per-channel sums (gathering whole pixels is several times slower)
        sums = np.array([np.add.reduce(plane[mask], dtype=np.int64) for plane in planes])
        tint = contrasting_tint(sums / np.count_nonzero(mask))
    else:
        tint = TINTS[0]
    # the blend of each of the 256 values of a channel with the tint, computed as a blend of the whole float frame
    # would compute it, then looked up: a 720p frame in a few milliseconds
    blended = ((1 - alpha) * np.arange(256, dtype=np.float32)[:, None] + alpha * tint).clip(0, 255).astype(np.uint8)
    image = pixels.copy()
    for channel, plane in enumerate(planes):
        np.copyto(image[..., channel], blended[:, channel].take(plane), where=mask)
    # luma of the tint: a light tint gets a black outline, a dark one a white outline
    image[_edge(mask)] = 0 if tint @ np.array([0.299, 0.587, 0.114], dtype=np.float32) > 127 else 255
    return image


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
