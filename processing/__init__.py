"""Files <-> tensors <-> masks: media decoding, prompts, special tokens, the processor, the segmenter and the pipeline.

Importing it registers `OisaProcessor` with AutoProcessor for the `oisa` model type, and EEMC's `RefAvsProcessor`
(`processing_oisa.refavs_eemc`) for the `refavs_eemc` one.
"""

from transformers import AutoProcessor

from modeling_oisa import OisaConfig

from .auto_segmenter import load_video_segmenter, video_segmenter
from .media import OisaInputError, VideoReader, decode_audio, load_image, write_video
from .pipeline import OisaReferringSegmentationPipeline, register_pipeline
from .processing_oisa import (
    OisaExpression,
    OisaProcessor,
    make_feature_extractor,
    make_image_processor,
    make_video_processor,
    upsample_masks,
)
from .prompts import EXPRESSION_TYPES, frame_token_modes, target_answer
from .refavs_eemc import RefAvsProcessor, RefAvsVideoSegmenter
from .segmenter import OisaSegmentation, OisaVideoSegmenter
from .tokenization_oisa import NAMED_SPECIAL_TOKENS, OISA_SPECIAL_TOKENS
from .video_processing_oisa import OisaVideoProcessor


AutoProcessor.register(OisaConfig, OisaProcessor)
OisaProcessor.register_for_auto_class()
register_pipeline()

__all__ = [
    "EXPRESSION_TYPES",
    "NAMED_SPECIAL_TOKENS",
    "OISA_SPECIAL_TOKENS",
    "OisaExpression",
    "OisaInputError",
    "OisaProcessor",
    "OisaReferringSegmentationPipeline",
    "OisaSegmentation",
    "OisaVideoProcessor",
    "OisaVideoSegmenter",
    "RefAvsProcessor",
    "RefAvsVideoSegmenter",
    "VideoReader",
    "decode_audio",
    "frame_token_modes",
    "load_image",
    "load_video_segmenter",
    "make_feature_extractor",
    "make_image_processor",
    "make_video_processor",
    "target_answer",
    "upsample_masks",
    "video_segmenter",
    "write_video",
]
