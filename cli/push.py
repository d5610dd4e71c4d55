"""`oisa push`: a checkpoint published to the Hugging Face Hub with its remote code and a model card."""

import argparse
import logging
from pathlib import Path


HELP = "publish a checkpoint to the Hugging Face Hub with its remote code and a model card"
logger = logging.getLogger("oisa")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_dir", type=Path, help="the checkpoint folder, OISA or EEMC (save_pretrained, oisa convert, train.py)"
    )
    parser.add_argument("repo_id", help="the model repo to create or update, owner/name")
    parser.add_argument(
        "--private", action="store_true", help="create the repo private (an existing one keeps its visibility)"
    )
    parser.add_argument(
        "--card-template",
        default=None,
        help="model card template: for OISA oisa-1b, oisa-tiny-synthetic or fine-tune (the default), for EEMC "
        "refavs-eemc (the default), or a template file",
    )
    parser.add_argument("--metrics", type=Path, help="an eval.py metrics.json whose results go into the card")
    parser.add_argument(
        "--card-field",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a template field, VALUE read as YAML (e.g. license=mit; oisa-1b needs license); repeatable",
    )


def run(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from oisa_hub_cards.model_card import ModelCardError, parse_card_fields
    from oisa_hub_cards.publish import PublishError, publish_checkpoint

    try:
        publish_checkpoint(
            args.model_dir,
            args.repo_id,
            template=args.card_template,
            metrics_path=args.metrics,
            private=args.private,
            **parse_card_fields(args.card_field),
        )
    except (ModelCardError, PublishError, HfHubHTTPError) as error:
        logger.error("oisa push: %s", error)
        return 2
    return 0
