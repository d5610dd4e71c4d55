"""
`oisa tiny-random`'s writers: a tiny OISA, or a tiny EEMC, with random weights and its processor, loadable with the
Auto classes.
"""

import logging
from pathlib import Path

import torch

from modeling_oisa import OisaForReferringSegmentation
from modeling_refavs import RefAvsForReferringSegmentation
from processing_oisa.data.synthetic import expression_corpus
from processing_oisa.processing_oisa import OisaProcessor
from processing_oisa.prompts import RELEASE_SYSTEM_MESSAGE
from processing_oisa.refavs_eemc.processing_refavs import RefAvsProcessor

from .models import init_tiny_synthetic_weights, tiny_oisa_config, tiny_synthetic_config
from .refavs import TINY_TEXT, tiny_refavs_config
from .refavs_tokenizer import build_tiny_refavs_tokenizer
from .tokenizer import build_tiny_tokenizer


logger = logging.getLogger(__name__)

TINY_PRESETS = ("reference", "synthetic")
# merges of the synthetic preset's tokenizer: enough for every word of the synthetic expressions and the system
# message to take one token or a few, which keeps the LLM's input short
SYNTHETIC_TOKENIZER_MERGES = 400
SYNTHETIC_VISIBLE_FRAMES, SYNTHETIC_DENSE_FRAMES = 4, 2


def write_tiny_random(output_dir: Path, seed: int, preset: str = "reference") -> None:
    """
    Writes a tiny OISA with random weights and its processor, loadable with `AutoModel` / `AutoProcessor`: at the
    sizes of the original's tiny reference model (`reference`), or OISA-tiny-synthetic before training (`synthetic`).
    """
    if preset not in TINY_PRESETS:
        raise ValueError(f"preset must be one of {TINY_PRESETS}, got {preset!r}")
    if preset == "synthetic":
        tokenizer = build_tiny_tokenizer(SYNTHETIC_TOKENIZER_MERGES, [RELEASE_SYSTEM_MESSAGE, *expression_corpus()])
        make_config = tiny_synthetic_config
    else:
        tokenizer = build_tiny_tokenizer()
        make_config = tiny_oisa_config
    ids = tokenizer.convert_tokens_to_ids
    config = make_config(
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
    if preset == "synthetic":
        init_tiny_synthetic_weights(model)
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = OisaProcessor.from_model_config(config, tokenizer)
    if preset == "synthetic":
        # the LLM sees as many frames at inference as configs/tiny_synthetic/oisa_tiny_synthetic.json shows in training
        processor.video_processor.max_visible_frames = SYNTHETIC_VISIBLE_FRAMES
        processor.video_processor.num_dense_frames = SYNTHETIC_DENSE_FRAMES
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    logger.info("wrote a tiny random OISA (%d parameters) to %s", model.num_parameters(), output_dir)


def write_tiny_random_refavs(output_dir: Path, seed: int, profile: str = "release") -> None:
    """
    Writes a tiny EEMC with random weights (`tiny_refavs_config` with its tiny VGGish, the text encoder's vocabulary
    that of the tiny RoBERTa tokenizer) and its processor, loadable with `AutoModel` / `AutoProcessor` once
    `modeling_refavs` and `processing_oisa` are imported.
    """
    tokenizer = build_tiny_refavs_tokenizer()
    config = tiny_refavs_config(profile, with_vggish=True, text_config={**TINY_TEXT, "vocab_size": len(tokenizer)})
    torch.manual_seed(seed)
    model = RefAvsForReferringSegmentation(config)
    processor = RefAvsProcessor.from_model_config(config, tokenizer)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    logger.info("wrote a tiny random EEMC (%d parameters) to %s", model.num_parameters(), output_dir)
