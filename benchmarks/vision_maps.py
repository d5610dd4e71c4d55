"""Seconds of the vision stage of a training step (forward and backward) with the ViT-Adapter run on every image
against on the frames to segment only (referring images and image-text pictures need only the ViT's LLM tokens).

OISA-tiny-synthetic's sizes with random weights, fp32 on CPU, two batches of the recipe's mixtures: part 4 (two clips
of 4 frames, one with a referring image, a gRefCOCO image and an image-text picture: 11 images, 9 to segment) and
part 3 (8 image-text pictures, none to segment). Median of `--repeats` runs, the two ways alternating; the baseline of
the ratio is the adapter on every image, in the same process.

    python benchmarks/vision_maps.py
"""

import argparse
import statistics
import time

import torch

from modeling_oisa import OisaForReferringSegmentation
from oisa_tiny import tiny_synthetic_config


def vision_step_seconds(
    model: OisaForReferringSegmentation, pixels: torch.Tensor, maps_for: torch.Tensor | None
) -> float:
    """One forward and backward of the image features: LLM tokens of every image, adapter maps where asked."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    features = model.get_image_features(pixels, maps_for=maps_for)
    loss = features.vision_embeds.square().mean() + sum(level.square().mean() for level in features.image_maps)
    loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = tiny_synthetic_config(400, 384, 393, 396, 399, 379, 381)
    model = OisaForReferringSegmentation(config).train()
    size = config.image_size
    batches = {
        "part 4 (11 images, 9 to segment)": torch.tensor([True] * 4 + [False] + [True] * 4 + [True, False]),
        "part 3 (8 pictures, none to segment)": torch.zeros(8, dtype=torch.bool),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| batch | adapter on every image (s) | on the frames to segment (s) | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for name, maps_for in batches.items():
        pixels = torch.randn(maps_for.shape[0], 3, size, size)
        vision_step_seconds(model, pixels, None)
        every, some = [], []
        for _ in range(args.repeats):
            every.append(vision_step_seconds(model, pixels, None))
            some.append(vision_step_seconds(model, pixels, maps_for))
        every_s, some_s = statistics.median(every), statistics.median(some)
        print(f"| {name} | {every_s:.3f} | {some_s:.3f} | {every_s / some_s:.2f}x |")


if __name__ == "__main__":
    main()
