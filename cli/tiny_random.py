"""`oisa tiny-random`: a tiny OISA or EEMC with random weights and its processor."""

import argparse
from pathlib import Path


HELP = "write a tiny OISA (or EEMC) checkpoint with random weights"
FAMILIES = ("oisa", "refavs")
PRESETS = ("reference", "synthetic")
PROFILES = ("release", "fixed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", type=Path, help="folder to write the checkpoint to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        default="oisa",
        help="oisa, or refavs: EEMC, the Ref-AVS baseline (modeling_refavs), with a tiny VGGish and RoBERTa tokenizer",
    )
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        help="oisa only: sizes of the original's tiny reference model (the default), or those of OISA-tiny-synthetic "
        "(untrained)",
    )
    parser.add_argument(
        "--profile", choices=PROFILES, help="refavs only: the released code's behaviour (the default) or the fixed one"
    )


def run(args: argparse.Namespace) -> int:
    from processing_oisa.media import OisaInputError

    if args.family == "refavs":
        if args.preset is not None:
            raise OisaInputError("--preset sizes a tiny OISA; a tiny EEMC (--family refavs) has one size")
        from oisa_tiny.checkpoint import write_tiny_random_refavs

        write_tiny_random_refavs(args.output_dir, args.seed, args.profile or "release")
        return 0
    if args.profile is not None:
        raise OisaInputError("--profile applies to a tiny EEMC (--family refavs) only")
    from oisa_tiny import write_tiny_random

    write_tiny_random(args.output_dir, args.seed, args.preset or "reference")
    return 0
