"""Synthetic audio-visual clips: coloured shapes moving over a background while one of them sounds."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..media import SAMPLING_RATE


SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220)}
# each shape sounds at its own pitch, so the soundtrack tells which shape is sounding
TONES_HZ = {"circle": 440.0, "square": 660.0, "triangle": 880.0, "diamond": 550.0}
# Scenes may also hold a fourth shape and two more colours, so that expressions can name objects that are absent.
SCENE_SHAPES = (*SHAPES, "diamond")
SCENE_COLOURS = {**COLOURS, "yellow": (230, 190, 20), "purple": (140, 60, 180)}
# a pitch no shape makes: a soundtrack of it is a sound without a sounding shape
HUM_HZ = 220.0
BACKGROUND = (235, 230, 220)


@dataclass
class SyntheticClip:
    """
    Frames (T, H, W, 3) uint8, the soundtrack (16 kHz mono), per-shape masks (T, H, W), each shape's colour name and
    which shape sounds (None: the clip is silent).
    """

    frames: np.ndarray
    soundtrack: np.ndarray
    masks: dict[str, np.ndarray]
    colours: dict[str, str]
    sounding: str | None
    fps: float


def shape_mask(shape: str, centre: tuple[float, float], radius: float, height: int, width: int) -> np.ndarray:
    """Boolean mask of a shape centred at (y, x)."""
    ys, xs = np.mgrid[0:height, 0:width]
    dy, dx = ys - centre[0], xs - centre[1]
    if shape == "circle":
        return dy**2 + dx**2 <= radius**2
    if shape == "square":
        return (np.abs(dy) <= radius * 0.85) & (np.abs(dx) <= radius * 0.85)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= radius
    return (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)


def tone(frequency: float, seconds: float, amplitude: float = 0.3) -> np.ndarray:
    """A sine tone with short fades, at 16 kHz."""
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    envelope = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.02)
    return (amplitude * envelope * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def _render(
    shapes: Sequence[str],
    colours: dict[str, str],
    starts: np.ndarray,
    ends: np.ndarray,
    radius: float,
    num_frames: int,
    height: int,
    width: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Frames and visible-part masks of shapes moving in straight lines from `starts` to `ends` (y, x)."""
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    masks = {shape: np.zeros((num_frames, height, width), dtype=bool) for shape in shapes}
    for index in range(num_frames):
        frames[index] = BACKGROUND
        progress = index / max(num_frames - 1, 1)
        for shape_index, shape in enumerate(shapes):
            centre = starts[shape_index] + progress * (ends[shape_index] - starts[shape_index])
            mask = shape_mask(shape, tuple(centre), radius, height, width)
            # later shapes are drawn over earlier ones: masks keep only what is visible
            for other in shapes[:shape_index]:
                masks[other][index] &= ~mask
            masks[shape][index] = mask
            frames[index][mask] = SCENE_COLOURS[colours[shape]]
    return frames, masks


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
    frames, masks = _render(SHAPES, colours, starts, ends, radius, num_frames, height, width)
    sounding = str(rng.choice(SHAPES))
    soundtrack = tone(TONES_HZ[sounding], num_frames / fps)
    return SyntheticClip(frames, soundtrack, masks, colours, sounding, fps)


def make_scene(
    shapes: Sequence[str],
    colours: Sequence[str],
    sounding: str | None,
    rng: np.random.Generator,
    num_frames: int = 8,
    height: int = 96,
    width: int = 128,
    fps: float = 4.0,
    min_visible: float = 0.5,
) -> SyntheticClip:
    """
    `shapes` (from SCENE_SHAPES) in `colours` (from SCENE_COLOURS) moving on straight paths drawn from `rng`, so that
    every shape keeps at least `min_visible` of its area in every frame; `sounding` sounds throughout (None: silence).
    """
    if sounding is not None and sounding not in shapes:
        raise ValueError(f"the sounding shape {sounding!r} is not one of the scene's shapes {tuple(shapes)}")
    colour_of = dict(zip(shapes, colours))
    radius = min(height, width) * 0.14
    full_area = {shape: shape_mask(shape, (height / 2, width / 2), radius, height, width).sum() for shape in shapes}
    low, high = [radius, radius], [height - radius, width - radius]
    # Rejection sampling keeps expressions meaningful: a referred shape is never hidden behind another.
    for _ in range(200):
        starts = rng.uniform(low, high, size=(len(shapes), 2))
        ends = rng.uniform(low, high, size=(len(shapes), 2))
        frames, masks = _render(shapes, colour_of, starts, ends, radius, num_frames, height, width)
        if all(masks[shape].sum(axis=(1, 2)).min() >= min_visible * full_area[shape] for shape in shapes):
            break
    else:
        raise ValueError(f"cannot place {len(shapes)} shapes visibly on a {height}x{width} frame; use a larger frame")
    seconds = num_frames / fps
    soundtrack = tone(TONES_HZ[sounding], seconds) if sounding else np.zeros(int(seconds * SAMPLING_RATE), np.float32)
    return SyntheticClip(frames, soundtrack, masks, colour_of, sounding, fps)


def shape_crop(clip: SyntheticClip, shape: str, margin: int = 3) -> np.ndarray:
    """The shape as it looks in the clip: a crop around it in the frame where most of it is visible."""
    areas = clip.masks[shape].sum(axis=(1, 2))
    index = int(np.argmax(areas))
    ys, xs = np.nonzero(clip.masks[shape][index])
    height, width = clip.masks[shape].shape[1:]
    top, bottom = max(int(ys.min()) - margin, 0), min(int(ys.max()) + margin + 1, height)
    left, right = max(int(xs.min()) - margin, 0), min(int(xs.max()) + margin + 1, width)
    return clip.frames[index, top:bottom, left:right].copy()


def shape_image(shape: str, colour: str, size: int = 32) -> np.ndarray:
    """A `size`² picture of one shape in one colour on the clips' background."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    image[shape_mask(shape, ((size - 1) / 2, (size - 1) / 2), size * 0.4, size, size)] = SCENE_COLOURS[colour]
    return image
