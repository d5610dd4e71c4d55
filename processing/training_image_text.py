"""
Image-text conversation sets (InternVL's chat layout: captioning, visual QA): the jsonl reader and its training
samples, one image in a multi-turn Hermes-2 conversation with labels on the answers, no mask and no audio.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .media import load_image
from .processing_oisa import OisaProcessor
from .training_conversation import ConversationReader, tokenize_conversation
from .training_image import NUM_MEL_BINS, NUM_MEL_FRAMES


IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class ImageTextRecord:
    """One jsonl line: an image and the conversation about it as (role, text) turns."""

    dataset: str
    key: str
    image_path: Path
    conversation: tuple[tuple[str, str], ...]


class ImageTextReader(ConversationReader[ImageTextRecord]):
    """
    The lines of an image-text jsonl (`annotation`, default `<root>/<split>.jsonl`), each an `image` path relative to
    `root` and `conversations` holding one `<image>` in a human turn. A problem raises `OisaDataError`; with
    `skip_bad=True` it is appended to `skipped` as (record id, error) instead.
    """

    media_key, placeholder, default_dataset = "image", IMAGE_PLACEHOLDER, "image_text"

    def _make_record(
        self, entry: dict, key: str, media_path: Path, conversation: tuple[tuple[str, str], ...]
    ) -> ImageTextRecord:
        return ImageTextRecord(dataset=self.dataset, key=key, image_path=media_path, conversation=conversation)


def build_image_text_sample(
    record: ImageTextRecord,
    processor: OisaProcessor,
    num_frames: int = 1,
    num_dense_frames: int = 1,
    profile: str = "release",
) -> dict[str, torch.Tensor]:
    """
    One training sample from an image-text record: the image as one dense frame in place of `<image>`, labels on the
    gpt turns, no mask and no audio. `num_frames`, `num_dense_frames` and `profile` are the shared builder signature;
    they do not apply here.
    """
    image = load_image(record.image_path, "Image")
    block = processor._image_tokens(processor.num_image_tokens)
    messages = [{"role": role, "content": text.replace(IMAGE_PLACEHOLDER, block)} for role, text in record.conversation]
    input_ids, labels = tokenize_conversation(processor, messages)
    size = processor.image_processor.size["height"]
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": processor.image_processor(images=[image], return_tensors="pt")["pixel_values"],
        "image_token_modes": torch.tensor([2]),
        "segmentation_frame_mask": torch.tensor([False]),
        "input_features": torch.zeros(0, NUM_MEL_BINS, NUM_MEL_FRAMES),
        "audio_feature_lengths": torch.zeros(0, dtype=torch.long),
        "audio_token_modes": torch.zeros(0, dtype=torch.long),
        "gt_masks": torch.zeros(0, size, size),
        "gt_mask_valid": torch.zeros(0, dtype=torch.bool),
    }


# format -> (reader, sample builder), as `training_loop.SAMPLE_BUILDERS` expects them
IMAGE_TEXT_SAMPLE_BUILDERS = {"image_text": (ImageTextReader, build_image_text_sample)}
