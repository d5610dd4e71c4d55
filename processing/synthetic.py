"""Synthetic audio-visual clips: coloured shapes moving over a background while one of them sounds."""

from dataclasses import dataclass

import numpy as np

from .media import SAMPLING_RATE


SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220)}
# each shape sounds at its own pitch, so the soundtrack tells which shape is sounding
TONES_HZ = {"circle": 440.0, "square": 660.0, "triangle": 880.0}


@dataclass
class SyntheticClip:
    """Frames (T, H, W, 3) uint8, the soundtrack (16 kHz mono), per-shape masks (T, H, W) and which shape sounds."""

    frames: np.ndarray
    soundtrack: np.ndarray
    masks: dict[str, np.ndarray]
    colours: dict[str, str]
    sounding: str
    fps: float


def shape_mask(shape: str, centre: tuple[float, float], radius: float, height: int, width: int) -> np.ndarray:
    """Boolean mask of a shape centred at (y, x)."""
    ys, xs = np.mgrid[0:height, 0:width]
    dy, dx = ys - centre[0], xs - centre[1]
    if shape == "circle":
        return dy**2 + dx**2 <= radius**2
    if shape == "square":
        return (np.abs(dy) <= radius * 0.85) & (np.abs(dx) <= radius * 0.85)
    return (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)


def tone(frequency: float, seconds: float, amplitude: float = 0.3) -> np.ndarray:
    """A sine tone with short fades, at 16 kHz."""
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    envelope = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.02)
    return (amplitude * envelope * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def make_shapes_clip(
    num_frames: int = 12, height: int = 96, width: int = 128, fps: float = 6.0, seed: int = 0
) -> SyntheticClip:
    """Three shapes of different colours moving on straight paths; one of them sounds throughout the clip."""
    rng = np.random.default_rng(seed)
    colour_names = rng.permutation(list(COLOURS))
    colours = {shape: str(colour) for shape, colour in zip(SHAPES, colour_names)}
    radius = min(height, width) * 0.14
    starts = rng.uniform([radius, radius], [height - radius, width - radius], size=(len(SHAPES), 2))
    ends = rng.uniform([radius, radius], [height - radius, width - radius], size=(len(SHAPES), 2))
    background = np.array([235, 230, 220], dtype=np.uint8)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    masks = {shape: np.zeros((num_frames, height, width), dtype=bool) for shape in SHAPES}
    for index in range(num_frames):
        frames[index] = background
        progress = index / max(num_frames - 1, 1)
        for shape_index, shape in enumerate(SHAPES):
            centre = starts[shape_index] + progress * (ends[shape_index] - starts[shape_index])
            mask = shape_mask(shape, tuple(centre), radius, height, width)
            # later shapes are drawn over earlier ones: masks keep only what is visible
            for other in SHAPES[:shape_index]:
                masks[other][index] &= ~mask
            masks[shape][index] = mask
            frames[index][mask] = COLOURS[colours[shape]]
    sounding = str(rng.choice(SHAPES))
    soundtrack = tone(TONES_HZ[sounding], num_frames / fps)
    return SyntheticClip(frames, soundtrack, masks, colours, sounding, fps)
