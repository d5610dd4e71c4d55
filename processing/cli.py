"""The `oisa` command line."""

import argparse
import logging
import sys
from pathlib import Path

import torch


logger = logging.getLogger("oisa")


def write_tiny_random(output_dir: Path, seed: int) -> None:
    """Writes a tiny OISA with random weights and the tiny tokenizer, loadable with `AutoModel.from_pretrained`."""
    from modeling_oisa import OisaForReferringSegmentation, tiny_oisa_config

    from .tokenization_oisa import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = tiny_oisa_config(
        vocab_size=len(tokenizer),
        image_token_id=ids("<IMG_CONTEXT>"),
        audio_token_id=ids("<AUDIO_CONTEXT>"),
        seg_token_id=ids("[SEG]"),
        sub_audio_token_id=ids("<SUB_AUDIO_CONTEXT>"),
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
    )
    torch.manual_seed(seed)
    model = OisaForReferringSegmentation(config)
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    logger.info("wrote a tiny random OISA (%d parameters) to %s", model.num_parameters(), output_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oisa", description="OISA: omnimodal referring audio-visual segmentation.")
    commands = parser.add_subparsers(dest="command", required=True)
    tiny = commands.add_parser("tiny-random", help="write a tiny OISA checkpoint with random weights")
    tiny.add_argument("output_dir", type=Path, help="folder to write the checkpoint to")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "tiny-random":
        write_tiny_random(args.output_dir, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
