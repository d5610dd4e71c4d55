"""
COCO run-length encoding of binary masks in numpy, byte-compatible with pycocotools (compressed and list counts).

Kept instead of `pycocotools.mask` (2.0.11), which decodes runs that fall short of the mask into uninitialised memory
instead of failing, so the readers' checks need this parser anyway, and which decodes 720p and 1080p masks no faster
(ours 0.8-1.1x its time; encoding, which only writes synthetic data, 1.1-1.7x; benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


class RleError(ValueError):
    """A malformed COCO RLE: bad `size`, bad characters in `counts`, negative runs, or runs not covering the mask."""


# A run needs at most 7 characters for masks below 2**34 pixels; 12 keeps every value inside int64 while still catching
# garbage strings that never terminate a value.
_MAX_CHARS_PER_VALUE = 12


def rle_size(rle: Mapping[str, Any]) -> tuple[int, int]:
    """The (height, width) of an RLE, validated."""
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise RleError("an RLE must be a mapping with 'size' and 'counts'")
    size = rle["size"]
    if (
        not isinstance(size, Sequence)
        or isinstance(size, (str, bytes))
        or len(size) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in size)
    ):
        raise RleError(f"RLE 'size' must be [height, width] of non-negative integers, got {size!r}")
    return int(size[0]), int(size[1])


def string_to_counts(counts: str | bytes) -> np.ndarray:
    """Decode COCO's compressed counts string (LEB128-like, 5 bits per char, delta-coded from the 4th run) to runs."""
    if isinstance(counts, bytes):
        try:
            counts = counts.decode("ascii")
        except UnicodeDecodeError as error:
            raise RleError("RLE counts bytes are not ASCII") from error
    if not counts:
        return np.zeros(0, dtype=np.int64)
    if not counts.isascii():
        raise RleError("RLE counts string is not ASCII")
    chars = np.frombuffer(counts.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    if chars.min() < 0 or chars.max() > 63:
        raise RleError("RLE counts string has characters outside '0'..'o'")
    more = (chars & 0x20) != 0
    if more[-1]:
        raise RleError("RLE counts string ends inside a value")
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > _MAX_CHARS_PER_VALUE:
        raise RleError("RLE counts string has a value too long to be a run length")
    shift = 5 * (np.arange(chars.size) - np.repeat(starts, lengths))
    values = np.add.reduceat((chars & 0x1F) << shift, starts)
    negative = (chars[ends] & 0x10) != 0
    # Sign extension: OR-ing ones above the 5*k value bits is the same as subtracting 2**(5*k).
    values[negative] -= np.left_shift(1, 5 * lengths[negative])
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    if runs.size > 2:
        runs[2::2] = np.cumsum(values[2::2])
    return runs


def counts_to_string(runs: Sequence[int] | np.ndarray) -> str:
    """Encode run lengths as COCO's compressed counts string (the inverse of `string_to_counts`)."""
    runs = [int(v) for v in runs]
    out: list[str] = []
    for index, run in enumerate(runs):
        value = run - runs[index - 2] if index > 2 else run
        while True:
            char = value & 0x1F
            value >>= 5
            more = value != -1 if char & 0x10 else value != 0
            out.append(chr((char | 0x20 if more else char) + 48))
            if not more:
                break
    return "".join(out)


def rle_runs(rle: Mapping[str, Any]) -> tuple[tuple[int, int], np.ndarray]:
    """Validate an RLE and return its size and run lengths without building the mask."""
    height, width = rle_size(rle)
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        runs = string_to_counts(counts)
    elif isinstance(counts, (Sequence, np.ndarray)):
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in counts):
            raise RleError("RLE list counts must be integers")
        runs = np.asarray(counts, dtype=np.int64).reshape(-1)
    else:
        raise RleError(f"RLE 'counts' must be a string or a list of integers, got {type(counts).__name__}")
    if runs.size and runs.min() < 0:
        raise RleError("RLE has a negative run length")
    if int(runs.sum()) != height * width:
        raise RleError(f"RLE runs cover {int(runs.sum())} pixels, the size {height}x{width} has {height * width}")
    return (height, width), runs


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode one COCO RLE to a bool mask [height, width] (runs are column-major and start with background)."""
    (height, width), runs = rle_runs(rle)
    values = np.zeros(runs.size, dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return np.ascontiguousarray(flat.reshape((height, width), order="F"))


def encode_rle(mask: np.ndarray, *, compressed: bool = True) -> dict[str, Any]:
    """Encode a 2-D mask (nonzero = foreground) as a COCO RLE with string (default) or list counts."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode_rle expects a 2-D mask, got shape {mask.shape}")
    flat = mask.ravel(order="F") != 0
    if flat.size:
        changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        edges = np.concatenate(([0], changes, [flat.size]))
        runs = np.diff(edges)
        if flat[0]:
            runs = np.concatenate(([0], runs))
    else:
        runs = np.zeros(0, dtype=np.int64)
    counts: str | list[int] = counts_to_string(runs) if compressed else [int(v) for v in runs]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def decode_union(
    objects: Sequence[tuple[str, Sequence[Mapping[str, Any] | None]]],
    frame_indices: Sequence[int],
    size: tuple[int, int],
    label: str = "object",
) -> np.ndarray:
    """
    Bool [T, H, W]: for each chosen frame, the union of the objects' RLE masks (None where an object is absent).
    `objects` pairs each object's name with its per-frame RLEs. A bad RLE or a mask of another size raises RleError
    naming the object (called `label` in the message) and the frame.
    """
    masks = np.zeros((len(frame_indices), *size), dtype=bool)
    for row, index in enumerate(frame_indices):
        for name, rles in objects:
            rle = rles[index]
            if rle is None:
                continue
            try:
                mask = decode_rle(rle)
            except RleError as error:
                raise RleError(f"{label} {name}, frame {index}: {error}") from error
            if mask.shape != tuple(size):
                raise RleError(f"{label} {name}, frame {index}: mask {mask.shape} is not the frame size {tuple(size)}")
            masks[row] |= mask
    return masks
