"""
Stage-1 audio-text alignment sets (captioning, audio QA, ASR): the jsonl reader and its training samples, one audio
clip in a multi-turn Hermes-2 conversation, no image and no mask.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import OisaDataError, resolve_inside
from .media import SAMPLING_RATE
from .processing_oisa import MAX_AUDIO_SECONDS, OisaProcessor
from .prompts import audio_token_count


ROLES = {"human": "user", "gpt": "assistant"}
AUDIO_PLACEHOLDER = "<audio>"


def mel_frames(num_samples: int) -> int:
    """Real log-mel frames (10 ms) of a 16 kHz clip, cut to the encoder's 30 s window."""
    return min(num_samples, MAX_AUDIO_SECONDS * SAMPLING_RATE) // (SAMPLING_RATE // 100)


def expected_audio_length(num_samples: int) -> tuple[int, int, int]:
    """`[after_cnn, token_num, token_num + 2]` of a 16 kHz clip, as the release precomputes it (spec §2.5)."""
    tokens = audio_token_count(num_samples)
    return math.ceil(mel_frames(num_samples) / 2), tokens, tokens + 2


@dataclass(frozen=True)
class AudioTextRecord:
    """One jsonl line: an audio clip, its declared `audio_length` and the conversation as (role, text) turns."""

    dataset: str
    key: str
    audio_path: Path
    audio_length: tuple[int, int, int]
    conversation: tuple[tuple[str, str], ...]


class AudioTextReader(Sequence[AudioTextRecord]):
    """
    The lines of an audio-text jsonl (`annotation`, default `<root>/<split>.jsonl`) whose `audio` paths are relative
    to `root`. Structure, path containment and (`check_files`) the audio files' presence are checked here; that
    `audio_length` matches the audio is checked when the sample is built, since it needs the decoded clip. A problem
    raises `OisaDataError`; with `skip_bad=True` it is appended to `skipped` as (record id, error) instead.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        *,
        annotation: str | os.PathLike[str] | None = None,
        dataset: str = "audio_text",
        check_files: bool = True,
        skip_bad: bool = False,
    ) -> None:
        self.root = Path(root)
        self.annotation_path = Path(annotation) if annotation is not None else self.root / f"{split}.jsonl"
        self.dataset = dataset
        self.check_files = check_files
        self.skip_bad = skip_bad
        self.skipped: list[tuple[str, OisaDataError]] = []
        self._records = self._read_records()

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index):  # type: ignore[override]
        return self._records[index]

    def __iter__(self) -> Iterator[AudioTextRecord]:
        return iter(self._records)

    def _error(self, message: str, record: str | None) -> OisaDataError:
        return OisaDataError(message, dataset=self.dataset, record=record, path=self.annotation_path)

    def _read_records(self) -> list[AudioTextRecord]:
        try:
            handle = open(self.annotation_path, encoding="utf-8")
        except OSError as error:
            raise self._error(f"cannot open the annotations: {error}", None) from error
        records: list[AudioTextRecord] = []
        with handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(self._parse_line(line, f"line {line_number}"))
                except OisaDataError as error:
                    if not self.skip_bad:
                        raise
                    self.skipped.append((error.record or f"line {line_number}", error))
        return records

    def _parse_line(self, line: str, key: str) -> AudioTextRecord:
        try:
            entry: Any = json.loads(line)
        except ValueError as error:
            raise self._error(f"not JSON: {error}", key) from error
        if not isinstance(entry, dict):
            raise self._error("a line must be a JSON object", key)
        if isinstance(entry.get("id"), (str, int)):
            key = f"{key} (id {entry['id']})"
        audio = entry.get("audio")
        if not isinstance(audio, str):
            raise self._error("'audio' must be a path relative to the root", key)
        audio_path = resolve_inside(self.root, audio, dataset=self.dataset, record=key)
        if self.check_files and not audio_path.is_file():
            raise OisaDataError("audio file not found", dataset=self.dataset, record=key, path=audio_path)
        length = entry.get("audio_length")
        if (
            not isinstance(length, list)
            or len(length) != 3
            or not all(isinstance(value, int) and not isinstance(value, bool) for value in length)
            or length[2] != length[1] + 2
        ):
            raise self._error(f"'audio_length' must be [after_cnn, tokens, tokens + 2], got {length!r}", key)
        return AudioTextRecord(
            dataset=self.dataset,
            key=key,
            audio_path=audio_path,
            audio_length=(length[0], length[1], length[2]),
            conversation=self._parse_conversation(entry.get("conversations"), key),
        )

    def _parse_conversation(self, turns: Any, key: str) -> tuple[tuple[str, str], ...]:
        if not isinstance(turns, list) or not turns:
            raise self._error("'conversations' must be a non-empty list", key)
        conversation = []
        for turn in turns:
            if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
                raise self._error("each turn must be {from: human|gpt, value: text}", key)
            conversation.append((ROLES[turn["from"]], turn["value"]))
        roles = [role for role, _ in conversation]
        if roles[0] != "user" or "assistant" not in roles:
            raise self._error("the conversation must start with a human turn and hold a gpt turn", key)
        placeholders = [text.count(AUDIO_PLACEHOLDER) for _, text in conversation]
        if sum(placeholders) != 1 or not any(count and role == "user" for (role, _), count in zip(conversation, placeholders)):
            raise self._error(f"the conversation needs exactly one {AUDIO_PLACEHOLDER}, in a human turn", key)
        return tuple(conversation)


def _tokenize_conversation(processor: OisaProcessor, messages: list[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids of the chat and labels on the assistant turns and their `<|im_end|>` (-100 elsewhere)."""

    def render(prefix: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return processor.tokenizer.apply_chat_template(
            prefix, chat_template=processor.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    text = render(messages)
    supervised = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = len(render(messages[:index], add_generation_prompt=True)), len(render(messages[: index + 1]))
        # character spans are only valid for a template that renders a conversation as the sum of its turns
        if not text.startswith(render(messages[: index + 1])):
            raise ValueError("The chat template does not render the conversation turn by turn.")
        supervised.append((start, end))
    encoding = processor.tokenizer(text, return_offsets_mapping=True)
    input_ids = torch.tensor(encoding["input_ids"])
    labels = torch.full_like(input_ids, -100)
    for position, (token_start, token_end) in enumerate(encoding["offset_mapping"]):
        if any(start <= token_start and token_end <= end for start, end in supervised):
            labels[position] = input_ids[position]
    return input_ids, labels


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
    waveform = processor.load_audio(record.audio_path, "Audio")
    actual = expected_audio_length(waveform.size)
    if actual != record.audio_length:
        # the prompt would hold `audio_length[1]` context tokens while the model fills the count of the file
        raise OisaDataError(
            f"'audio_length' {list(record.audio_length)} does not match the audio, which gives {list(actual)}",
            dataset=record.dataset,
            record=record.key,
            path=record.audio_path,
        )
    block = processor._audio_tokens(actual[1])
    messages = [{"role": role, "content": text.replace(AUDIO_PLACEHOLDER, block)} for role, text in record.conversation]
    input_ids, labels = _tokenize_conversation(processor, messages)

    features = processor.feature_extractor(
        [waveform], sampling_rate=SAMPLING_RATE, padding="max_length", truncation=True, return_tensors="pt"
    )["input_features"]
    size = processor.image_processor.size["height"]
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": torch.zeros(0, 3, size, size),
        "image_token_modes": torch.zeros(0, dtype=torch.long),
        "segmentation_frame_mask": torch.zeros(0, dtype=torch.bool),
        "input_features": features,
        "audio_feature_lengths": torch.tensor([mel_frames(waveform.size)]),
        "audio_token_modes": torch.tensor([1]),
        "gt_masks": torch.zeros(0, size, size),
        "gt_mask_valid": torch.zeros(0, dtype=torch.bool),
    }


# format -> (reader, sample builder), as `training_loop.SAMPLE_BUILDERS` expects them
AUDIO_TEXT_SAMPLE_BUILDERS = {"audio_text": (AudioTextReader, build_audio_text_sample)}
