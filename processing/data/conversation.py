"""
Conversation sets in the InternVL chat layout (`{"conversations": [{"from": "human"|"gpt", "value": ...}], ...}` per
jsonl line, one media file per line): the shared jsonl reader and the tokenization with labels on the answers.
"""

from __future__ import annotations

import json
import os
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from ..processing_oisa import OisaProcessor
from .errors import OisaDataError, resolve_inside


ROLES = {"human": "user", "gpt": "assistant"}
RecordT = TypeVar("RecordT")


class ConversationReader(Sequence[RecordT], Generic[RecordT]):
    """
    The lines of a conversation jsonl (`annotation`, default `<root>/<split>.jsonl`) whose media paths (under
    `media_key`) are relative to `root`. Structure, path containment and (`check_files`) the media files' presence are
    checked here. A problem raises `OisaDataError`; with `skip_bad=True` it is appended to `skipped` as (record id,
    error) instead. `dataset` (default: the subclass's `default_dataset`) names the set in errors. Subclasses turn a
    checked line into a record in `_make_record`.
    """

    media_key: str
    placeholder: str
    default_dataset: str

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        *,
        annotation: str | os.PathLike[str] | None = None,
        dataset: str | None = None,
        check_files: bool = True,
        skip_bad: bool = False,
    ) -> None:
        self.root = Path(root)
        self.annotation_path = Path(annotation) if annotation is not None else self.root / f"{split}.jsonl"
        self.dataset = dataset or self.default_dataset
        self.check_files = check_files
        self.skip_bad = skip_bad
        self.skipped: list[tuple[str, OisaDataError]] = []
        self._records = self._read_records()

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index):  # type: ignore[override]
        return self._records[index]

    def __iter__(self) -> Iterator[RecordT]:
        return iter(self._records)

    def _error(self, message: str, record: str | None) -> OisaDataError:
        return OisaDataError(message, dataset=self.dataset, record=record, path=self.annotation_path)

    def _read_records(self) -> list[RecordT]:
        try:
            handle = open(self.annotation_path, encoding="utf-8")
        except OSError as error:
            raise self._error(f"cannot open the annotations: {error}", None) from error
        records: list[RecordT] = []
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

    def _parse_line(self, line: str, key: str) -> RecordT:
        try:
            entry: Any = json.loads(line)
        except ValueError as error:
            raise self._error(f"not JSON: {error}", key) from error
        if not isinstance(entry, dict):
            raise self._error("a line must be a JSON object", key)
        if isinstance(entry.get("id"), (str, int)):
            key = f"{key} (id {entry['id']})"
        media_path = self._media_file(entry, self.media_key, key)
        conversation = self._parse_conversation(entry.get("conversations"), key)
        return self._make_record(entry, key, media_path, conversation)

    def _media_file(self, entry: dict, media_key: str, key: str) -> Path:
        """The file `entry[media_key]` names, inside `root` and (with `check_files`) present."""
        media = entry.get(media_key)
        if not isinstance(media, str):
            raise self._error(f"'{media_key}' must be a path relative to the root", key)
        media_path = resolve_inside(self.root, media, dataset=self.dataset, record=key)
        if self.check_files and not media_path.is_file():
            raise OisaDataError(f"{media_key} file not found", dataset=self.dataset, record=key, path=media_path)
        return media_path

    @abstractmethod
    def _make_record(
        self, entry: dict, key: str, media_path: Path, conversation: tuple[tuple[str, str], ...]
    ) -> RecordT:
        """The record of a checked line: its entry, its key, its media file and its (role, text) turns."""

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
        self._check_placeholder(conversation, self.placeholder, key)
        return tuple(conversation)

    def _check_placeholder(
        self, conversation: Sequence[tuple[str, str]], placeholder: str, key: str, expected: int = 1
    ) -> None:
        """Raises unless `placeholder` occurs `expected` times (0 or 1), in a human turn."""
        counts = [(role, text.count(placeholder)) for role, text in conversation]
        in_user_turn = any(count and role == "user" for role, count in counts)
        if sum(count for _, count in counts) != expected or (expected and not in_user_turn):
            wanted = f"exactly one {placeholder}, in a human turn" if expected else f"no {placeholder}"
            raise self._error(f"the conversation needs {wanted}", key)


def tokenize_conversation(
    processor: OisaProcessor, messages: list[dict[str, str]]
) -> tuple[torch.Tensor, torch.Tensor]:
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
