"""`oisa demo`: a synthetic clip segmented by OISA-tiny-synthetic for several expression types, with pictures."""

import argparse
from pathlib import Path


HELP = "segment a synthetic clip for several expression types with OISA-tiny-synthetic, with pictures"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("oisa-demo"), help="output folder (default: oisa-demo)")
    parser.add_argument(
        "--model", default="oisa-tiny-synthetic", help="checkpoint folder, Hub id or oisa-tiny-synthetic"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the clip's motion")
    parser.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    from .demo_segmentation import run_demo

    run_demo(args.out, args.model, args.seed, args.device)
    return 0
