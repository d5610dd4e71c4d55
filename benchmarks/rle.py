"""Encode and decode speed of COCO RLE: `processing_oisa.rle` (numpy) against `pycocotools.mask` (C), same process.

Masks: 96x128 (the synthetic datasets' default frame), 720x1280 and 1080x1920, each as one ellipse, the synthetic
generator's four shapes, an ellipse with a ragged outline (a hand-drawn or predicted mask's border), salt-and-pepper
noise (the worst case: a run every other pixel), empty and full. pycocotools is timed as a drop-in for bool masks: a
Fortran-ordered copy in and `str` counts out for encoding, a bool view of its 0/1 mask out for decoding. Every pair of
results is checked equal before it is timed; times are medians, the four functions alternating.

    python benchmarks/rle.py [--repeats 7]
"""

import argparse
import statistics
import time
from collections.abc import Callable
from importlib.metadata import version

import numpy as np
from pycocotools import mask as coco_mask

from processing_oisa.data.synthetic_clips import shape_mask
from processing_oisa.rle import decode_rle, encode_rle


SIZES = ((96, 128), (720, 1280), (1080, 1920))


def make_masks(height: int, width: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The benchmark's masks at one size."""
    ys, xs = np.mgrid[0:height, 0:width]
    dy, dx = (ys - 0.5 * height) / (0.3 * height), (xs - 0.45 * width) / (0.2 * width)
    angle, radius = np.arctan2(dy, dx), np.hypot(dy, dx)
    # a smooth wobble plus a one-pixel jitter along the outline
    outline = 1 + 0.15 * np.sin(5 * angle) + rng.normal(0, 1.0 / min(height, width), size=(height, width))
    unit = min(height, width) / 8
    shapes = np.zeros((height, width), dtype=bool)
    for index, shape in enumerate(("circle", "square", "diamond", "triangle")):
        shapes |= shape_mask(shape, ((1 + 2 * (index % 2)) * height / 4, (1 + index) * width / 5), unit, height, width)
    return {
        "ellipse": radius <= 1,
        "four shapes": shapes,
        "ragged outline": radius <= outline,
        "noise (worst case)": rng.random((height, width)) < 0.5,
        "empty": np.zeros((height, width), dtype=bool),
        "full": np.ones((height, width), dtype=bool),
    }


def coco_encode(mask: np.ndarray) -> dict:
    rle = coco_mask.encode(np.asfortranarray(mask.view(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def coco_decode(rle: dict) -> np.ndarray:
    return coco_mask.decode(rle).view(bool)


def median_seconds(functions: dict[str, Callable[[], object]], repeats: int, budget: float = 0.02) -> dict[str, float]:
    """
    Per function, the median over `repeats` of the mean time of a loop lasting about `budget` seconds; the functions
    alternate, so that a busy moment weighs on all of them.
    """
    loops = {}
    for name, function in functions.items():
        start = time.perf_counter()
        function()
        loops[name] = max(1, int(budget / max(time.perf_counter() - start, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            for _ in range(loops[name]):
                function()
            times[name].append((time.perf_counter() - start) / loops[name])
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    versions = f"numpy {np.__version__}, pycocotools {version('pycocotools')}"
    print(f"{versions}, medians of {args.repeats}, ratio < 1: ours faster")
    print(f"{'size':>9s} {'mask':18s} {'runs':>7s} | {'encode ms':>9s} {'coco ms':>8s} {'ours/coco':>9s} | "
          f"{'decode ms':>9s} {'coco ms':>8s} {'ours/coco':>9s}")
    for height, width in SIZES:
        for name, mask in make_masks(height, width, rng).items():
            ours = encode_rle(mask)
            if coco_encode(mask) != ours:
                raise AssertionError(f"{height}x{width} {name}: the encodings differ")
            if not np.array_equal(coco_decode(ours), decode_rle(ours)) or not np.array_equal(decode_rle(ours), mask):
                raise AssertionError(f"{height}x{width} {name}: the decodings differ")
            runs = int(np.count_nonzero(np.diff(mask.ravel(order="F").astype(np.int8)))) + 1
            functions = {
                "encode": lambda: encode_rle(mask),
                "coco encode": lambda: coco_encode(mask),
                "decode": lambda: decode_rle(ours),
                "coco decode": lambda: coco_decode(ours),
            }
            seconds = median_seconds(functions, args.repeats)
            encode, coco_enc, decode, coco_dec = (seconds[name] for name in functions)
            print(f"{height:4d}x{width:<4d} {name:18s} {runs:7d} | {1e3 * encode:9.3f} {1e3 * coco_enc:8.3f} "
                  f"{encode / coco_enc:9.2f} | {1e3 * decode:9.3f} {1e3 * coco_dec:8.3f} {decode / coco_dec:9.2f}")


if __name__ == "__main__":
    main()
