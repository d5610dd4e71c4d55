"""
Stage-3 referring video segmentation sets without audio: readers of the MeViS format (MeViS, LV-VIS, ReVOS) and of the
Ref-YouTube-VOS format (Ref-YouTube-VOS, Ref-DAVIS), and their training samples.

The original `rvos_dataset.py` bugs are fixed, whatever the profile: frames are `round(linspace(0, N - 1, K))` with
repeats for short videos (B17), every sampled frame carries its mask (B7), and an object absent from the sampled frames
keeps the positive answer with empty masks instead of becoming a null expression (B19). The prompt is the OmniAVS text
prompt (frames, soundtrack, question) with a silent soundtrack, so these sets look like OmniAVS to the model (B19).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..media import silent_soundtrack
from ..processing_oisa import OisaExpression, OisaProcessor
from ..prompts import POSITIVE_ANSWER
from ..rle import RleError, decode_union, rle_size
from .errors import OisaDataError, resolve_inside
from .mixture import _video_sample


FRAME_EXTENSION = ".jpg"
# Placeholders the processor expands: an expression holding one would break the prompt layout.
_PLACEHOLDERS = ("<audio>", "<image>")


@dataclass(frozen=True)
class VideoExpressionRecord:
    """One referring expression over a video; `gt_masks()` decodes the union of its annotations on demand."""

    dataset: str
    video_id: str
    exp_id: str
    text: str
    frame_paths: tuple[Path, ...]
    anno_ids: tuple[str, ...]
    # Per annotation, per frame: the RLE dict or None (absent). The lists of the loaded mask dict, not copies.
    anno_rles: tuple[Sequence[Mapping[str, Any] | None], ...] = field(repr=False, compare=False)
    mask_dict_path: Path = field(repr=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.video_id}_{self.exp_id}"

    @property
    def num_frames(self) -> int:
        return len(self.frame_paths)

    def _error(self, message: str) -> OisaDataError:
        return OisaDataError(message, dataset=self.dataset, record=self.key, path=self.mask_dict_path)

    def frame_size(self) -> tuple[int, int]:
        """(height, width): from the first annotated frame, else from the first frame's header."""
        for rles in self.anno_rles:
            for rle in rles:
                if rle is not None:
                    try:
                        return rle_size(rle)
                    except RleError as error:
                        raise self._error(str(error)) from error
        try:
            with Image.open(self.frame_paths[0]) as image:
                width, height = image.size
        except (OSError, ValueError) as error:
            raise OisaDataError(
                f"cannot read frame: {error}", dataset=self.dataset, record=self.key, path=self.frame_paths[0]
            ) from error
        return height, width

    def gt_masks(self, frame_indices: Sequence[int] | None = None) -> np.ndarray:
        """Bool [T, H, W] of the chosen frames (all by default, repeats allowed): the union of the annotations."""
        indices = list(range(self.num_frames)) if frame_indices is None else [int(index) for index in frame_indices]
        if any(not 0 <= index < self.num_frames for index in indices):
            raise IndexError(f"frame indices {indices} out of range for {self.num_frames} frames")
        try:
            annotations = list(zip(self.anno_ids, self.anno_rles))
            return decode_union(annotations, indices, self.frame_size(), label="annotation")
        except RleError as error:
            raise self._error(str(error)) from error


class MetaExpressionsReader(Sequence[VideoExpressionRecord]):
    """
    The expressions of a `meta_expressions` json (`videos -> {frames, expressions -> {exp, anno_id, ...}}`) with the
    masks of a `mask_dict.json` (anno id -> one RLE or null per frame), frames at `<frames_dir>/<video>/<frame>.jpg`.

    Everything but the RLEs is checked when the reader is built (paths stay inside the root, `check_files`: frames
    exist); a bad RLE raises when its mask is decoded. A problem raises `OisaDataError`; with `skip_bad=True` it is
    appended to `skipped` as (record id, error) and the video or expression is dropped.
    """

    def __init__(
        self,
        dataset: str,
        root: Path,
        annotation_path: Path,
        mask_dict_path: Path,
        frames_dir: Path,
        *,
        check_files: bool = True,
        skip_bad: bool = False,
    ) -> None:
        self.dataset = dataset
        self.root = root
        self.annotation_path = annotation_path
        self.mask_dict_path = mask_dict_path
        self.frames_dir = frames_dir
        self.check_files = check_files
        self.skip_bad = skip_bad
        self.skipped: list[tuple[str, OisaDataError]] = []
        self._mask_dict = self._load_json(mask_dict_path, "mask dict")
        self._records = self._read_records(self._load_json(annotation_path, "annotations"))

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index):  # type: ignore[override]
        return self._records[index]

    def __iter__(self) -> Iterator[VideoExpressionRecord]:
        return iter(self._records)

    def _error(self, message: str, *, record: str | None, path: str | os.PathLike[str] | None) -> OisaDataError:
        return OisaDataError(message, dataset=self.dataset, record=record, path=path)

    def _load_json(self, path: Path, what: str) -> Mapping[str, Any]:
        try:
            with open(path, encoding="utf-8") as handle:
                content = json.load(handle)
        except (OSError, ValueError) as error:
            raise self._error(f"cannot load the {what}: {error}", record=None, path=path) from error
        if not isinstance(content, Mapping):
            raise self._error(f"the {what} must be a JSON object", record=None, path=path)
        return content

    def _read_records(self, meta: Mapping[str, Any]) -> list[VideoExpressionRecord]:
        videos = meta.get("videos")
        if not isinstance(videos, Mapping):
            raise self._error("the annotations need a 'videos' object", record=None, path=self.annotation_path)
        records: list[VideoExpressionRecord] = []
        for video_id, video in videos.items():
            try:
                frame_paths, expressions = self._parse_video(video_id, video)
            except OisaDataError as error:
                if not self.skip_bad:
                    raise
                self.skipped.append((str(video_id), error))
                continue
            for exp_id, expression in expressions.items():
                try:
                    records.append(self._build_record(video_id, str(exp_id), expression, frame_paths))
                except OisaDataError as error:
                    if not self.skip_bad:
                        raise
                    self.skipped.append((f"{video_id}_{exp_id}", error))
        return records

    def _parse_video(self, video_id: str, video: Any) -> tuple[tuple[Path, ...], Mapping[str, Any]]:
        if not isinstance(video, Mapping):
            raise self._error("a video entry must be an object", record=video_id, path=self.annotation_path)
        frames, expressions = video.get("frames"), video.get("expressions")
        if not isinstance(frames, list) or not frames or not all(isinstance(frame, str) for frame in frames):
            raise self._error("'frames' must be a non-empty list of names", record=video_id, path=self.annotation_path)
        if not isinstance(expressions, Mapping):
            raise self._error("'expressions' must be an object", record=video_id, path=self.annotation_path)
        frame_paths = tuple(
            resolve_inside(self.frames_dir, video_id, frame + FRAME_EXTENSION, dataset=self.dataset, record=video_id)
            for frame in frames
        )
        if self.check_files:
            missing = next((path for path in frame_paths if not path.is_file()), None)
            if missing is not None:
                raise self._error("frame file not found", record=video_id, path=missing)
        return frame_paths, expressions

    def _build_record(
        self, video_id: str, exp_id: str, expression: Any, frame_paths: tuple[Path, ...]
    ) -> VideoExpressionRecord:
        key = f"{video_id}_{exp_id}"
        if not isinstance(expression, Mapping):
            raise self._error("an expression must be an object", record=key, path=self.annotation_path)
        text = expression.get("exp")
        if not isinstance(text, str) or not text.strip():
            raise self._error("'exp' must be a non-empty string", record=key, path=self.annotation_path)
        if any(placeholder in text for placeholder in _PLACEHOLDERS):
            raise self._error(f"'exp' holds a prompt placeholder {_PLACEHOLDERS}", record=key, path=self.annotation_path)
        anno_ids = expression.get("anno_id")
        # Ref-YouTube-VOS / Ref-DAVIS give one id per expression, MeViS a list (several objects)
        anno_ids = anno_ids if isinstance(anno_ids, list) else [anno_ids]
        if not anno_ids or not all(isinstance(value, (int, str)) and not isinstance(value, bool) for value in anno_ids):
            raise self._error("'anno_id' must be an id or a non-empty list of ids", record=key, path=self.annotation_path)
        anno_rles = []
        for anno_id in map(str, anno_ids):
            rles = self._mask_dict.get(anno_id)
            if not isinstance(rles, list) or len(rles) != len(frame_paths):
                raise self._error(
                    f"annotation {anno_id} must be a list of one RLE or null per frame ({len(frame_paths)})",
                    record=key,
                    path=self.mask_dict_path,
                )
            anno_rles.append(rles)
        return VideoExpressionRecord(
            dataset=self.dataset,
            video_id=video_id,
            exp_id=exp_id,
            text=text.strip(),
            frame_paths=frame_paths,
            anno_ids=tuple(map(str, anno_ids)),
            anno_rles=tuple(anno_rles),
            mask_dict_path=self.mask_dict_path,
        )


class MevisReader(MetaExpressionsReader):
    """
    A MeViS-format set (MeViS, LV-VIS, ReVOS). The data folder is `<root>/<split>` when it exists (MeViS and LV-VIS
    releases), else `<root>` (ReVOS); it holds `annotation_name` (`{split}` is filled in), `mask_dict.json` and
    `JPEGImages/<video>/<frame>.jpg`.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        *,
        annotation_name: str = "meta_expressions.json",
        dataset: str = "mevis",
        check_files: bool = True,
        skip_bad: bool = False,
    ) -> None:
        root = Path(root)
        data_dir = root / split if (root / split).is_dir() else root
        super().__init__(
            dataset,
            root,
            data_dir / annotation_name.format(split=split),
            data_dir / "mask_dict.json",
            data_dir / "JPEGImages",
            check_files=check_files,
            skip_bad=skip_bad,
        )


# ReVOS: the MeViS format at the root, with the release's `meta_expressions_train_.json` (trailing underscore)
RevosReader = functools.partial(MevisReader, annotation_name="meta_expressions_{split}_.json", dataset="revos")


class RefYoutubeVosReader(MetaExpressionsReader):
    """
    A Ref-YouTube-VOS-format set (Ref-YouTube-VOS, Ref-DAVIS): `<root>/meta_expressions/<split>/meta_expressions.json`
    (each expression with its `anno_id`), frames `<root>/<split>/JPEGImages/<video>/<frame>.jpg` and masks
    `<root>/<split>/mask_dict.json`. The original ships the masks as `mask_dict.pkl`, which is never unpickled here
    (a pickle runs code): convert it once, from a trusted copy, to a JSON file with the same content (anno id -> list
    of COCO RLE dicts with string counts, or null per frame).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        *,
        dataset: str = "refer_ytvos",
        check_files: bool = True,
        skip_bad: bool = False,
    ) -> None:
        root = Path(root)
        mask_dict_path = root / split / "mask_dict.json"
        if not mask_dict_path.is_file() and mask_dict_path.with_suffix(".pkl").is_file():
            raise OisaDataError(
                "only mask_dict.pkl was found, and pickles are not loaded: convert it to mask_dict.json (same content)",
                dataset=dataset,
                path=mask_dict_path.with_suffix(".pkl"),
            )
        super().__init__(
            dataset,
            root,
            root / "meta_expressions" / split / "meta_expressions.json",
            mask_dict_path,
            root / split / "JPEGImages",
            check_files=check_files,
            skip_bad=skip_bad,
        )


def build_video_expression_sample(
    record: VideoExpressionRecord,
    processor: OisaProcessor,
    num_frames: int = 10,
    num_dense_frames: int = 4,
    profile: str = "release",
) -> dict[str, torch.Tensor]:
    """
    One training sample from a MeViS- or Ref-YouTube-VOS-format record: `num_frames` linspace frames (repeated for
    short videos), the positive answer, and the expression's mask on every sampled frame (empty where it is absent).
    `profile` changes nothing: the release's misaligned masks (B7) and noisy null answers (B19) are not reproducible
    with one mask per segmentation frame, so every profile trains the fixed behaviour.
    """
    # These sets have no audio. A short silent soundtrack keeps the OmniAVS prompt (frames with their share of the
    # soundtrack, the whole soundtrack, then the question) instead of the release's audio-less RVOS layout (B19), so
    # the model sees one prompt format; silence is what the processor uses for any video without sound.
    return _video_sample(
        processor,
        record.frame_paths,
        OisaExpression(text=record.text),
        silent_soundtrack(1.0),
        POSITIVE_ANSWER,
        record.gt_masks,
        num_frames,
        num_dense_frames,
        "linspace",
    )


# format -> (reader, sample builder), as `training_loop.SAMPLE_BUILDERS` expects them
VIDEO_SAMPLE_BUILDERS = {
    "mevis": (MevisReader, build_video_expression_sample),
    "lvvis": (functools.partial(MevisReader, dataset="lvvis"), build_video_expression_sample),
    "revos": (RevosReader, build_video_expression_sample),
    "refer_ytvos": (RefYoutubeVosReader, build_video_expression_sample),
    "refer_davis": (functools.partial(RefYoutubeVosReader, dataset="refer_davis"), build_video_expression_sample),
}
