"""
Processing for EEMC, the Ref-AVS baseline (`modeling_refavs`): the VGGish log-mel front end, the processor that
turns frames, an expression and a soundtrack into the model's inputs and its maps back into masks, and the one-call
segmenter.

Importing it registers `RefAvsProcessor` with AutoProcessor and `VggishFeatureExtractor` with AutoFeatureExtractor
for the `refavs_eemc` model type.
"""

from transformers import AutoFeatureExtractor, AutoProcessor

from modeling_refavs import RefAvsConfig

from .feature_extraction_vggish import VggishFeatureExtractor
from .processing_refavs import (
    RefAvsProcessor,
    make_refavs_image_processor,
    one_frame_per_second,
    resize_masks_like_original,
    resize_uint8_like_cv2,
)
from .segmenter_refavs import RefAvsVideoSegmenter


AutoProcessor.register(RefAvsConfig, RefAvsProcessor)
AutoFeatureExtractor.register(RefAvsConfig, VggishFeatureExtractor)

__all__ = [
    "RefAvsProcessor",
    "RefAvsVideoSegmenter",
    "VggishFeatureExtractor",
    "make_refavs_image_processor",
    "one_frame_per_second",
    "resize_masks_like_original",
    "resize_uint8_like_cv2",
]
