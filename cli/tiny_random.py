"""`oisa tiny-random`: a tiny OISA with random weights and its processor."""

import argparse
from pathlib import Path


HELP = "write a tiny OISA checkpoint with random weights"
PRESETS = ("reference", "synthetic")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", type=Path, help="folder to write the checkpoint to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default="reference",
        help="sizes of the original's tiny reference model, or those of OISA-tiny-synthetic (untrained)",
    )


def run(args: argparse.Namespace) -> int:
    from oisa_tiny import write_tiny_random

    write_tiny_random(args.output_dir, args.seed, args.preset)
    return 0
