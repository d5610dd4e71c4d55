"""
Image-text conversation sets (InternVL's chat layout: captioning, visual QA): the jsonl reader and its training
samples, one image in a multi-turn Hermes-2 conversation with labels on the answers, no mask. A line may also hold one
spoken clip (`audio`, `audio_length` as in the audio-text sets), for questions asked in speech about the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..media import load_image
from ..processing_oisa import OisaProcessor
from .audio_text import AUDIO_LENGTH_ERROR, AUDIO_PLACEHOLDER, expression_audio, parse_audio_length
from .conversation import ConversationReader, tokenize_conversation
from .image_sets import NUM_MEL_BINS, NUM_MEL_FRAMES


IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class ImageTextRecord:
    """One jsonl line: an image, the conversation about it as (role, text) turns and, optionally, a spoken clip."""

    dataset: str
    key: str
    image_path: Path
    conversation: tuple[tuple[str, str], ...]
    audio_path: Path | None = None
    audio_length: tuple[int, int, int] | None = None


class ImageTextReader(ConversationReader[ImageTextRecord]):
    """
    The lines of an image-text jsonl (`annotation`, default `<root>/<split>.jsonl`), each an `image` path relative to
    `root` and `conversations` holding one `<image>` in a human turn; a line with an `audio` path (and its
    `audio_length`) holds one `<audio>` in a human turn too. A problem raises `OisaDataError`; with `skip_bad=True` it
    is appended to `skipped` as (record id, error) instead.
    """

    media_key, placeholder, default_dataset = "image", IMAGE_PLACEHOLDER, "image_text"

    def _make_record(
        self, entry: dict, key: str, media_path: Path, conversation: tuple[tuple[str, str], ...]
    ) -> ImageTextRecord:
        if entry.get("audio") is None:
            self._check_placeholder(conversation, AUDIO_PLACEHOLDER, key, expected=0)
            return ImageTextRecord(dataset=self.dataset, key=key, image_path=media_path, conversation=conversation)
        audio_path = self._media_file(entry, "audio", key)
        length = parse_audio_length(entry.get("audio_length"))
        if length is None:
            raise self._error(AUDIO_LENGTH_ERROR.format(entry.get("audio_length")), key)
        self._check_placeholder(conversation, AUDIO_PLACEHOLDER, key)
        return ImageTextRecord(
            dataset=self.dataset,
            key=key,
            image_path=media_path,
            conversation=conversation,
            audio_path=audio_path,
            audio_length=length,
        )


def build_image_text_sample(
    record: ImageTextRecord,
    processor: OisaProcessor,
    num_frames: int = 1,
    num_dense_frames: int = 1,
    profile: str = "release",
) -> dict[str, torch.Tensor]:
    """
    One training sample from an image-text record: the image as one dense frame in place of `<image>`, the spoken clip
    (if any) as an expression clip in place of `<audio>`, labels on the gpt turns, no mask. `num_frames`,
    `num_dense_frames` and `profile` are the shared builder signature; they do not apply here.
    """
    image = load_image(record.image_path, "Image")
    blocks = {IMAGE_PLACEHOLDER: processor._image_tokens(processor.num_image_tokens)}
    input_features = torch.zeros(0, NUM_MEL_BINS, NUM_MEL_FRAMES)
    audio_feature_lengths, audio_token_modes = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    if record.audio_path is not None and record.audio_length is not None:
        blocks[AUDIO_PLACEHOLDER], input_features, num_mel_frames = expression_audio(
            record.audio_path, record.audio_length, processor, dataset=record.dataset, record=record.key
        )
        audio_feature_lengths, audio_token_modes = torch.tensor([num_mel_frames]), torch.tensor([1])
    messages = []
    for role, text in record.conversation:
        for placeholder, block in blocks.items():
            text = text.replace(placeholder, block)
        messages.append({"role": role, "content": text})
    input_ids, labels = tokenize_conversation(processor, messages)
    size = processor.image_processor.size["height"]
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": processor.image_processor(images=[image], return_tensors="pt")["pixel_values"],
        "image_token_modes": torch.tensor([2]),
        "segmentation_frame_mask": torch.tensor([False]),
        "input_features": input_features,
        "audio_feature_lengths": audio_feature_lengths,
        "audio_token_modes": audio_token_modes,
        "gt_masks": torch.zeros(0, size, size),
        "gt_mask_valid": torch.zeros(0, dtype=torch.bool),
    }


# format -> (reader, sample builder), as `training_loop.SAMPLE_BUILDERS` expects them
IMAGE_TEXT_SAMPLE_BUILDERS = {"image_text": (ImageTextReader, build_image_text_sample)}
