"""`oisa convert`: an original OISA checkpoint (internvl_chat layout) to OISA's format, with its processor."""

import argparse
import json
import logging
from pathlib import Path


HELP = "convert an original OISA checkpoint (internvl_chat layout, e.g. OISA-1B) to OISA's format"
logger = logging.getLogger("oisa")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="original checkpoint folder or Hub repo id")
    parser.add_argument("dst", type=Path, help="folder to write the converted checkpoint to")
    parser.add_argument(
        "--audio-encoder-config",
        type=Path,
        default=None,
        help="WhisperConfig JSON of the checkpoint's audio encoder (gives its head count), unless one lies beside the "
        "weights as internomni_whisper_config.json or audio_encoder_config.json",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="dtype of the written weights (auto: the checkpoint's)",
    )
    parser.add_argument(
        "--set",
        dest="config_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a size the checkpoint cannot say, VALUE read as JSON: an OisaConfig field (adapter_n_points=4, "
        "adapter_interaction_indexes=[[0,5],[6,11]]) or a sub-config's (vision_config.num_attention_heads=16); "
        "repeatable",
    )


def parse_config_overrides(pairs: list[str]) -> dict:
    """`--set KEY=VALUE` pairs as a dict, each VALUE read as JSON (a bare word stays a string)."""
    from modeling_oisa import OisaCheckpointError

    overrides = {}
    for pair in pairs:
        key, separator, text = pair.partition("=")
        if not separator or not key:
            raise OisaCheckpointError(f"--set {pair!r}: expected KEY=VALUE, e.g. adapter_n_points=4.")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    return overrides


def run(args: argparse.Namespace) -> int:
    from transformers import AutoConfig, AutoTokenizer

    from modeling_oisa.conversion import convert_original_checkpoint
    from processing_oisa.processing_oisa import OisaProcessor
    from processing_oisa.tokenization_oisa import NAMED_SPECIAL_TOKENS

    convert_original_checkpoint(
        args.src,
        args.dst,
        audio_encoder_config=args.audio_encoder_config,
        named_special_tokens=NAMED_SPECIAL_TOKENS,
        dtype=args.dtype,
        config_overrides=parse_config_overrides(args.config_overrides),
    )
    config, tokenizer = AutoConfig.from_pretrained(args.dst), AutoTokenizer.from_pretrained(args.dst)
    OisaProcessor.from_model_config(config, tokenizer).save_pretrained(args.dst)
    logger.info("converted %s to %s", args.src, args.dst)
    return 0
