"""`oisa init-from-parts`: the stage-1 OISA assembled from InternVL2, the InternOmni Whisper encoder and ViT-Adapter."""

import argparse
import logging
from pathlib import Path


HELP = "assemble the stage-1 OISA from InternVL2-1B, the InternOmni Whisper encoder and the ViT-Adapter"
logger = logging.getLogger("oisa")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--internvl2", type=Path, required=True, help="InternVL2 folder (original layout)")
    parser.add_argument("--whisper", type=Path, required=True, help="InternOmni Whisper encoder folder")
    parser.add_argument("--adapter", type=Path, required=True, help="ViT-Adapter Mask2Former model_final.pth")
    parser.add_argument("--seed", type=int, default=0, help="seed of the freshly initialised parts")
    parser.add_argument("output_dir", type=Path, help="folder to write the model and tokenizer to")


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer, GenerationConfig

    from modeling_oisa.conversion.from_parts import build_stage1_model
    from processing_oisa.tokenization_oisa import NAMED_SPECIAL_TOKENS, OISA_SPECIAL_TOKENS

    # OISA's tokens go after InternVL2's, in the original order, so ids follow the released vocabulary
    tokenizer = AutoTokenizer.from_pretrained(args.internvl2)
    tokenizer.add_tokens(OISA_SPECIAL_TOKENS, special_tokens=True)
    tokenizer.save_pretrained(args.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.output_dir, extra_special_tokens=NAMED_SPECIAL_TOKENS)
    ids = tokenizer.convert_tokens_to_ids
    model, report = build_stage1_model(
        args.internvl2,
        args.whisper,
        args.adapter,
        vocab_size=len(tokenizer),
        seed=args.seed,
        image_token_id=ids("<IMG_CONTEXT>"),
        audio_token_id=ids("<AUDIO_CONTEXT>"),
        seg_token_id=ids("[SEG]"),
        sub_audio_token_id=ids("<SUB_AUDIO_CONTEXT>"),
    )
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.text_config.bos_token_id,
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(args.output_dir, save_original_format=False)
    tokenizer.save_pretrained(args.output_dir)
    fresh_modules = sorted({".".join(name.split(".")[:2]) for name in report.initialized})
    logger.info("wrote the stage-1 OISA to %s; freshly initialised: %s", args.output_dir, ", ".join(fresh_modules))
    return 0
