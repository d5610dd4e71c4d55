"""Reader of the OmniAVS release: expression records with safe paths, validated files and lazily decoded GT masks."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..prompts import EXPRESSION_TYPES
from ..rle import RleError, decode_union, rle_runs
from .errors import OisaDataError, resolve_inside


DATASET_NAME = "omniavs"
SPLITS = ("train", "test")


def referring_modalities(expr_type: str) -> tuple[bool, bool, bool]:
    """Whether an expression type carries a referring (speech, sound, image)."""
    return expr_type.startswith("speech"), "sound" in expr_type, "image" in expr_type


@dataclass(frozen=True)
class OmniAVSRecord:
    """One OmniAVS expression; `gt_masks()` decodes its ground truth on demand."""

    exp_id: str
    video_id: str
    expr_type: str
    text: str
    explanation: str | None
    frame_paths: tuple[Path, ...]
    soundtrack_path: Path
    referring_speech_path: Path | None
    referring_sound_path: Path | None
    referring_image_path: Path | None
    object_ids: tuple[str, ...]
    is_null: bool
    line: int
    # Per object, per frame: the RLE dict or None (absent). These are the lists of the loaded video_dict, not copies.
    object_rles: tuple[Sequence[Mapping[str, Any] | None], ...] = field(repr=False, compare=False)
    mask_size: tuple[int, int] | None = field(repr=False, compare=False)
    video_dict_path: Path = field(repr=False, compare=False)

    @property
    def key(self) -> str:
        """The id `evaluate.py` keys per-expression results by."""
        return f"{self.video_id}_{self.exp_id}"

    @property
    def num_frames(self) -> int:
        return len(self.frame_paths)

    def frame_size(self) -> tuple[int, int]:
        """(height, width) of the video: from its masks, else from the first frame's header."""
        if self.mask_size is not None:
            return self.mask_size
        return _image_size(self.frame_paths[0], record=self.key)

    def gt_masks(self, frame_indices: Sequence[int] | None = None) -> np.ndarray:
        """
        Bool GT [T, H, W] of the chosen frames (all by default): the union of all the expression's objects.

        The original evaluator used only the first object of multi-object expressions (bug B12); this is the fix.
        Null expressions give all-zero masks.
        """
        indices = list(range(self.num_frames)) if frame_indices is None else [int(i) for i in frame_indices]
        if any(not 0 <= index < self.num_frames for index in indices):
            raise IndexError(f"frame indices {indices} out of range for {self.num_frames} frames")
        try:
            return decode_union(list(zip(self.object_ids, self.object_rles)), indices, self.frame_size())
        except RleError as error:
            raise OisaDataError(str(error), dataset=DATASET_NAME, record=self.key, path=self.video_dict_path) from error


def _image_size(path: Path, *, record: str | None) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError) as error:
        raise OisaDataError(f"cannot read image: {error}", dataset=DATASET_NAME, record=record, path=path) from error
    return height, width


@dataclass
class _Video:
    """What all expressions of one video share, resolved and checked once."""

    frame_paths: tuple[Path, ...]
    soundtrack_path: Path
    mask_dict: Mapping[str, Any]
    mask_size: tuple[int, int] | None
    files_problem: tuple[str, Path] | None = None
    object_problems: dict[str, tuple[str, Path] | None] = field(default_factory=dict)


class OmniAVSReader(Sequence[OmniAVSRecord]):
    """
    The expressions of `meta_expressions_{split}.jsonl` under `root`, optionally restricted to some `expr_types`.

    All annotations are parsed and checked when the reader is built: annotation paths must stay inside `root`,
    `check_files` checks that frames, soundtrack and referrings exist (and that the first frame matches the mask size),
    `check_masks` validates every RLE the kept expressions use (without building the masks). A problem raises
    `OisaDataError`; with `skip_bad=True` it is appended to `skipped` as (record id, error) and the record is dropped.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "test",
        *,
        expr_types: Sequence[str] | None = None,
        check_files: bool = True,
        check_masks: bool = True,
        skip_bad: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        unknown = set(expr_types or ()) - set(EXPRESSION_TYPES)
        if unknown:
            raise ValueError(f"unknown expression types {sorted(unknown)}; known: {EXPRESSION_TYPES}")
        self.root = Path(root)
        self.split = split
        self.expr_types = tuple(expr_types) if expr_types is not None else EXPRESSION_TYPES
        self.check_files = check_files
        self.check_masks = check_masks
        self.skip_bad = skip_bad
        self.annotation_path = self.root / f"meta_expressions_{split}.jsonl"
        self.video_dict_path = self.root / "video_dict.json"
        self.skipped: list[tuple[str, OisaDataError]] = []
        self._video_dict = self._load_video_dict()
        self._videos: dict[str, _Video] = {}
        self._records = self._read_records()

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index):  # type: ignore[override]
        return self._records[index]

    def __iter__(self) -> Iterator[OmniAVSRecord]:
        return iter(self._records)

    def _error(self, message: str, *, record: str | None, path: str | os.PathLike[str] | None) -> OisaDataError:
        return OisaDataError(message, dataset=DATASET_NAME, record=record, path=path)

    def _load_video_dict(self) -> Mapping[str, Any]:
        try:
            with open(self.video_dict_path, encoding="utf-8") as handle:
                video_dict = json.load(handle)
        except (OSError, ValueError) as error:
            raise self._error(f"cannot load video_dict: {error}", record=None, path=self.video_dict_path) from error
        if not isinstance(video_dict, Mapping):
            raise self._error("video_dict must map video names to entries", record=None, path=self.video_dict_path)
        return video_dict

    def _read_records(self) -> list[OmniAVSRecord]:
        try:
            handle = open(self.annotation_path, encoding="utf-8")
        except OSError as error:
            raise self._error(f"cannot open annotations: {error}", record=None, path=self.annotation_path) from error
        records: list[OmniAVSRecord] = []
        with handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                record_id = f"line {line_number}"
                try:
                    entry = self._parse_line(line, record_id)
                    record_id = f"{entry['video_name']}_{entry['exp_id']}"
                    if entry["expr_type"] not in self.expr_types:
                        continue
                    records.append(self._build_record(entry, line_number, record_id))
                except OisaDataError as error:
                    if not self.skip_bad:
                        raise
                    self.skipped.append((record_id, error))
        return records

    def _parse_line(self, line: str, record_id: str) -> dict[str, Any]:
        path = self.annotation_path
        try:
            entry = json.loads(line)
        except ValueError as error:
            raise self._error(f"malformed JSON line: {error}", record=record_id, path=path) from error
        if not isinstance(entry, dict):
            raise self._error("a line must hold a JSON object", record=record_id, path=path)
        for name, kinds in (("video_name", str), ("exp_id", (str, int)), ("expr_type", str), ("expr", str)):
            value = entry.get(name)
            if not isinstance(value, kinds) or isinstance(value, bool):
                raise self._error(f"field {name!r} is missing or has the wrong type", record=record_id, path=path)
        if entry["expr_type"] not in EXPRESSION_TYPES:
            raise self._error(f"unknown expr_type {entry['expr_type']!r}", record=record_id, path=path)
        object_ids = entry.get("obj_id")
        if not isinstance(object_ids, list) or not all(
            isinstance(v, (str, int)) and not isinstance(v, bool) for v in object_ids
        ):
            raise self._error("field 'obj_id' must be a list of ids", record=record_id, path=path)
        for name in ("expl", "referring_image", "referring_speech", "referring_sound"):
            if entry.get(name) is not None and not isinstance(entry[name], str):
                raise self._error(f"field {name!r} must be a string or null", record=record_id, path=path)
        return entry

    def _build_record(self, entry: dict[str, Any], line_number: int, record_id: str) -> OmniAVSRecord:
        video = self._video(entry["video_name"], record_id)
        if video.files_problem is not None:
            raise self._error(video.files_problem[0], record=record_id, path=video.files_problem[1])
        # The annotation keys are strings; evaluate.py's int lookup is what broke multi-object GT (B12).
        object_ids = tuple(str(v) for v in entry["obj_id"])
        object_rles = tuple(
            self._object_rles(entry["video_name"], video, object_id, record_id) for object_id in object_ids
        )
        referrings = self._referrings(entry, record_id)
        explanation = entry.get("expl") or None
        return OmniAVSRecord(
            exp_id=str(entry["exp_id"]),
            video_id=entry["video_name"],
            expr_type=entry["expr_type"],
            text=entry["expr"],
            explanation=explanation,
            frame_paths=video.frame_paths,
            soundtrack_path=video.soundtrack_path,
            referring_speech_path=referrings[0],
            referring_sound_path=referrings[1],
            referring_image_path=referrings[2],
            object_ids=object_ids,
            is_null=not object_ids,
            line=line_number,
            object_rles=object_rles,
            mask_size=video.mask_size,
            video_dict_path=self.video_dict_path,
        )

    def _video(self, name: str, record_id: str) -> _Video:
        if name in self._videos:
            return self._videos[name]
        # The name becomes a folder and a file name: refuse an escaping one before using it at all.
        resolve_inside(self.root, "images", name, dataset=DATASET_NAME, record=record_id)
        entry = self._video_dict.get(name)
        path = self.video_dict_path
        if not isinstance(entry, Mapping):
            raise self._error(f"video {name!r} is not in video_dict", record=record_id, path=path)
        file_names = entry.get("file_name")
        mask_dict = entry.get("mask_dict", {})
        if not isinstance(file_names, list) or not file_names or not all(isinstance(v, str) for v in file_names):
            raise self._error(
                f"video {name!r}: 'file_name' must be a non-empty list of names", record=record_id, path=path
            )
        if not isinstance(mask_dict, Mapping):
            raise self._error(f"video {name!r}: 'mask_dict' must be a mapping", record=record_id, path=path)
        frame_paths = tuple(
            resolve_inside(self.root, "images", name, file_name, dataset=DATASET_NAME, record=record_id)
            for file_name in file_names
        )
        soundtrack = resolve_inside(self.root, "audios", f"{name}.mp3", dataset=DATASET_NAME, record=record_id)
        video = _Video(frame_paths, soundtrack, mask_dict, _first_mask_size(mask_dict))
        if self.check_files:
            video.files_problem = self._check_video_files(video)
        self._videos[name] = video
        return video

    def _check_video_files(self, video: _Video) -> tuple[str, Path] | None:
        for path in (*video.frame_paths, video.soundtrack_path):
            if not path.is_file():
                return "missing file", path
        if video.mask_size is not None:
            try:
                size = _image_size(video.frame_paths[0], record=None)
            except OisaDataError as error:
                return error.reason, video.frame_paths[0]
            if size != video.mask_size:
                return f"frame size {size} differs from the mask size {video.mask_size}", video.frame_paths[0]
        return None

    def _object_rles(
        self, video_name: str, video: _Video, object_id: str, record_id: str
    ) -> Sequence[Mapping[str, Any] | None]:
        rles = video.mask_dict.get(object_id)
        path = self.video_dict_path
        if not isinstance(rles, list) or len(rles) != len(video.frame_paths):
            raise self._error(
                f"video {video_name!r}: object {object_id} needs one mask entry per frame ({len(video.frame_paths)})",
                record=record_id,
                path=path,
            )
        if self.check_masks:
            if object_id not in video.object_problems:
                video.object_problems[object_id] = self._check_rles(object_id, rles, video.mask_size)
            problem = video.object_problems[object_id]
            if problem is not None:
                raise self._error(problem[0], record=record_id, path=problem[1])
        return rles

    def _check_rles(
        self, object_id: str, rles: Sequence[Any], mask_size: tuple[int, int] | None
    ) -> tuple[str, Path] | None:
        for index, rle in enumerate(rles):
            if rle is None:
                continue
            try:
                size, _ = rle_runs(rle)
            except RleError as error:
                return f"object {object_id}, frame {index}: undecodable RLE: {error}", self.video_dict_path
            if size != mask_size:
                return (
                    f"object {object_id}, frame {index}: mask size {size} differs from {mask_size}",
                    self.video_dict_path,
                )
        return None

    def _referrings(self, entry: dict[str, Any], record_id: str) -> tuple[Path | None, Path | None, Path | None]:
        expected = referring_modalities(entry["expr_type"])
        paths: list[Path | None] = []
        for field_name, folder, needed in zip(
            ("referring_speech", "referring_sound", "referring_image"),
            ("referring_speeches", "referring_sounds", "referring_images"),
            expected,
        ):
            name = entry.get(field_name)
            if bool(name) != needed:
                state = "missing" if needed else "set"
                raise self._error(
                    f"{field_name} is {state} for expr_type {entry['expr_type']!r}",
                    record=record_id,
                    path=self.annotation_path,
                )
            if not name:
                paths.append(None)
                continue
            path = resolve_inside(self.root, "referrings", folder, name, dataset=DATASET_NAME, record=record_id)
            if self.check_files and not path.is_file():
                raise self._error("missing file", record=record_id, path=path)
            paths.append(path)
        return paths[0], paths[1], paths[2]


def _first_mask_size(mask_dict: Mapping[str, Any]) -> tuple[int, int] | None:
    for rles in mask_dict.values():
        if not isinstance(rles, list):
            continue
        for rle in rles:
            if isinstance(rle, Mapping):
                size = rle.get("size")
                if isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size):
                    return size[0], size[1]
    return None
