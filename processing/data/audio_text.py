"""
Stage-1 audio-text alignment sets (captioning, audio QA, ASR): the jsonl reader and its training samples, one audio
clip in a multi-turn Hermes-2 conversation, no image and no mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..media import SAMPLING_RATE
from ..processing_oisa import MAX_AUDIO_SECONDS, OisaProcessor
from ..prompts import audio_token_count
from .conversation import ConversationReader, tokenize_conversation
from .errors import OisaDataError


AUDIO_PLACEHOLDER = "<audio>"
AUDIO_LENGTH_ERROR = "'audio_length' must be [after_cnn, tokens, tokens + 2], got {!r}"


def mel_frames(num_samples: int) -> int:
    """Real log-mel frames (10 ms) of a 16 kHz clip, cut to the encoder's 30 s window."""
    return min(num_samples, MAX_AUDIO_SECONDS * SAMPLING_RATE) // (SAMPLING_RATE // 100)


def expected_audio_length(num_samples: int) -> tuple[int, int, int]:
    """`[after_cnn, token_num, token_num + 2]` of a 16 kHz clip, as the release precomputes it (spec §2.5)."""
    tokens = audio_token_count(num_samples)
    return math.ceil(mel_frames(num_samples) / 2), tokens, tokens + 2


def parse_audio_length(value: object) -> tuple[int, int, int] | None:
    """A jsonl line's `audio_length` as a tuple, or None unless it is `[after_cnn, tokens, tokens + 2]` of ints."""
    if (
        not isinstance(value, list)
        or len(value) != 3
        or not all(isinstance(item, int) and not isinstance(item, bool) for item in value)
        or value[2] != value[1] + 2
    ):
        return None
    return value[0], value[1], value[2]


@dataclass(frozen=True)
class AudioTextRecord:
    """One jsonl line: an audio clip, its declared `audio_length` and the conversation as (role, text) turns."""

    dataset: str
    key: str
    audio_path: Path
    audio_length: tuple[int, int, int]
    conversation: tuple[tuple[str, str], ...]


class AudioTextReader(ConversationReader[AudioTextRecord]):
    """
    The lines of an audio-text jsonl (`annotation`, default `<root>/<split>.jsonl`) whose `audio` paths are relative
    to `root`. Structure, path containment and (`check_files`) the audio files' presence are checked here; that
    `audio_length` matches the audio is checked when the sample is built, since it needs the decoded clip. A problem
    raises `OisaDataError`; with `skip_bad=True` it is appended to `skipped` as (record id, error) instead.
    """

    media_key, placeholder, default_dataset = "audio", AUDIO_PLACEHOLDER, "audio_text"

    def _make_record(
        self, entry: dict, key: str, media_path: Path, conversation: tuple[tuple[str, str], ...]
    ) -> AudioTextRecord:
        length = parse_audio_length(entry.get("audio_length"))
        if length is None:
            raise self._error(AUDIO_LENGTH_ERROR.format(entry.get("audio_length")), key)
        return AudioTextRecord(
            dataset=self.dataset,
            key=key,
            audio_path=media_path,
            audio_length=length,
            conversation=conversation,
        )


def expression_audio(
    path: Path, audio_length: tuple[int, int, int], processor: OisaProcessor, *, dataset: str, record: str
) -> tuple[str, torch.Tensor, int]:
    """
    A conversation's clip as an expression clip (token mode 1): its `<aud>` block, its log-mel features (1, mels,
    frames) and its real mel frame count. Raises `OisaDataError` where the declared `audio_length` does not match.
    """
    waveform = processor.load_audio(path, "Audio")
    actual = expected_audio_length(waveform.size)
    if actual != audio_length:
        # the prompt would hold `audio_length[1]` context tokens while the model fills the count of the file
        raise OisaDataError(
            f"'audio_length' {list(audio_length)} does not match the audio, which gives {list(actual)}",
            dataset=dataset,
            record=record,
            path=path,
        )
    features = processor.feature_extractor(
        [waveform], sampling_rate=SAMPLING_RATE, padding="max_length", truncation=True, return_tensors="pt"
    )["input_features"]
    return processor._audio_tokens(actual[1]), features, mel_frames(waveform.size)


def build_audio_text_sample(
    record: AudioTextRecord,
    processor: OisaProcessor,
    num_frames: int = 10,
    num_dense_frames: int = 4,
    profile: str = "release",
) -> dict[str, torch.Tensor]:
    """
    One training sample from an audio-text record: the clip as one `<aud>` block in place of `<audio>` (an expression
    clip, token mode 1), the conversation with labels on the gpt turns, no image and no mask. `num_frames`,
    `num_dense_frames` and `profile` are the shared builder signature; they do not apply here.
    """
    block, features, num_mel_frames = expression_audio(
        record.audio_path, record.audio_length, processor, dataset=record.dataset, record=record.key
    )
    messages = [{"role": role, "content": text.replace(AUDIO_PLACEHOLDER, block)} for role, text in record.conversation]
    input_ids, labels = tokenize_conversation(processor, messages)
    size = processor.image_processor.size["height"]
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": torch.zeros(0, 3, size, size),
        "image_token_modes": torch.zeros(0, dtype=torch.long),
        "segmentation_frame_mask": torch.zeros(0, dtype=torch.bool),
        "input_features": features,
        "audio_feature_lengths": torch.tensor([num_mel_frames]),
        "audio_token_modes": torch.tensor([1]),
        "gt_masks": torch.zeros(0, size, size),
        "gt_mask_valid": torch.zeros(0, dtype=torch.bool),
    }


# format -> (reader, sample builder), as `training_loop.SAMPLE_BUILDERS` expects them
AUDIO_TEXT_SAMPLE_BUILDERS = {"audio_text": (AudioTextReader, build_audio_text_sample)}
