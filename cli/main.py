"""The `oisa` command line: one module per command, each imported light; its work imports what it needs when it runs."""

import argparse
import logging
import sys

from . import app, convert, demo, init_from_parts, make_synthetic, push, segment, tiny_random


logger = logging.getLogger("oisa")

COMMANDS = {
    "segment": segment,
    "demo": demo,
    "convert": convert,
    "init-from-parts": init_from_parts,
    "tiny-random": tiny_random,
    "make-synthetic": make_synthetic,
    "push": push,
    "app": app,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oisa", description="OISA: omnimodal referring audio-visual segmentation.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not only its message")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(commands.add_parser(name, help=command.HELP))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns 0, 2 for bad input (one line naming the file and the problem) or 1 for a failure."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    from modeling_oisa import MissingCheckpointError, OisaCheckpointError
    from processing_oisa.data.errors import OisaDataError
    from processing_oisa.media import OisaInputError

    try:
        return COMMANDS[args.command].run(args)
    except (OisaInputError, OisaCheckpointError, MissingCheckpointError, OisaDataError) as error:
        if args.debug:
            raise
        logger.error("oisa %s: %s", args.command, error)
        return 2
    except Exception as error:
        if args.debug:
            raise
        logger.error("oisa %s failed: %s: %s (--debug shows the traceback)", args.command, type(error).__name__, error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
