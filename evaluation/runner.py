"""
Evaluation of OISA on OmniAVS and Ref-AVS: the expressions of the chosen splits as tasks, their sharding across
processes by video, the model under a behaviour profile, and one result line per expression holding the scalars the
metrics need (never the masks).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from transformers import AutoModel, AutoProcessor

from modeling_oisa import PROFILE_SWITCHES
from modeling_oisa.precision import resolve_dtype
from processing_oisa.data.errors import OisaDataError
from processing_oisa.data.omniavs import OmniAVSReader, OmniAVSRecord
from processing_oisa.data.refavs import RefAVSReader, RefAVSRecord
from processing_oisa.media import OisaInputError, VideoReader
from processing_oisa.metrics.omniavs import extract_explanation, score_expression
from processing_oisa.metrics.refavs import expression_stats
from processing_oisa.processing_oisa import OisaExpression
from processing_oisa.segmenter import OisaSegmentation, OisaVideoSegmenter


logger = logging.getLogger(__name__)

DATASETS = ("omniavs", "refavs")
PROFILES = ("release", "fixed")
DEFAULT_SPLITS = {"omniavs": ("test",), "refavs": ("test_s", "test_u", "test_n")}
# Ref-AVS's protocol scores at 256×256: predictions resized, GT PNGs resized with cv2 bilinear (uint8) then > 0.
REFAVS_EVAL_SIZE = (256, 256)
# Problems of one expression's data, recorded in its result line; anything else is a bug and stops the run, which a
# restart resumes.
EXPRESSION_ERRORS = (OisaInputError, OisaDataError)

Record = OmniAVSRecord | RefAVSRecord


@dataclass(frozen=True)
class EvalTask:
    """One expression to evaluate: its position in the evaluation order, its result key and its video (`group`)."""

    index: int
    key: str
    split: str
    group: str
    record: Record


@dataclass(frozen=True)
class EvalTasks:
    """The expressions of a run, in evaluation order, and the records the readers skipped (`--skip-bad`)."""

    dataset: str
    tasks: tuple[EvalTask, ...]
    skipped: tuple[dict[str, str], ...]


def load_tasks(
    dataset: str,
    root: str | os.PathLike[str],
    splits: Sequence[str],
    *,
    skip_bad: bool = False,
    limit: int | None = None,
) -> EvalTasks:
    """The expressions of `splits` in reader order (split after split), the first `limit` of them when given."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    tasks: list[EvalTask] = []
    skipped: list[dict[str, str]] = []
    for split in dict.fromkeys(splits):
        reader_class = OmniAVSReader if dataset == "omniavs" else RefAVSReader
        reader = reader_class(root, split, skip_bad=skip_bad)
        skipped += [{"split": split, "record": record_id, "error": str(error)} for record_id, error in reader.skipped]
        for record in reader:
            if isinstance(record, OmniAVSRecord):
                key, group = f"{split}/{record.key}", f"{split}/{record.video_id}"
            else:
                # uids repeat in Ref-AVS: rows are the only unique key
                key, group = f"{split}/row{record.row}", f"{split}/{record.folder}"
            tasks.append(EvalTask(len(tasks), key, split, group, record))
    if limit is not None:
        tasks = tasks[:limit]
    return EvalTasks(dataset, tuple(tasks), tuple(skipped))


def video_groups(tasks: Sequence[EvalTask]) -> list[list[EvalTask]]:
    """The tasks grouped by video, groups in order of first appearance."""
    groups: dict[str, list[EvalTask]] = {}
    for task in tasks:
        groups.setdefault(task.group, []).append(task)
    return list(groups.values())


def shard(groups: Sequence[list[EvalTask]], process_index: int, num_processes: int) -> list[list[EvalTask]]:
    """
    This process's videos: every `num_processes`-th group from `process_index`. It depends on the indices only, so a
    restart gives each expression the same computation, and a video's expressions share one pass over its frames.
    """
    return list(groups[process_index::num_processes])


# ---------------------------------------------------------------- model


def apply_profile(model: torch.nn.Module, processor: Any, profile: str) -> None:
    """Sets every behaviour switch of the model's config and of the processor to its value under `profile`."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    for switch, values in PROFILE_SWITCHES.items():
        setattr(model.config, switch, values[profile])
    model.config.profile = profile
    processor.video_processor.frame_sampler = model.config.frame_sampler
    processor.sub_audio_layout = model.config.sub_audio_layout


def load_segmenter(
    model_path: str,
    device: torch.device,
    *,
    profile: str | None = None,
    max_new_tokens: int = 100,
    dtype: str | torch.dtype = "auto",
) -> OisaVideoSegmenter:
    """
    The model and its processor, with `profile` applied when given; `dtype` "auto" is bfloat16 on GPUs and on CPUs with
    bfloat16 matrix units, float32 elsewhere (`modeling_oisa.precision.resolve_dtype`).
    """
    model = AutoModel.from_pretrained(model_path, dtype=resolve_dtype(dtype, device)).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_path)
    if profile is not None:
        apply_profile(model, processor, profile)
    return OisaVideoSegmenter(model, processor, max_new_tokens=max_new_tokens)


def behaviour(segmenter: OisaVideoSegmenter) -> dict[str, Any]:
    """The switches that change results, as the run uses them."""
    config = segmenter.model.config
    return {
        **{switch: getattr(config, switch) for switch in PROFILE_SWITCHES},
        "processor_frame_sampler": segmenter.processor.video_processor.frame_sampler,
        "processor_sub_audio_layout": segmenter.processor.sub_audio_layout,
    }


def run_identity(
    model_path: str, dataset: str, data_root: str | os.PathLike[str], segmenter: OisaVideoSegmenter
) -> dict[str, Any]:
    """What must not change between a run and its restart."""
    return {
        "model": str(model_path),
        "dataset": dataset,
        "data_root": str(Path(data_root).resolve()),
        "max_new_tokens": segmenter.max_new_tokens,
        "dtype": str(segmenter.model.dtype).removeprefix("torch."),
        "behaviour": behaviour(segmenter),
    }


# ---------------------------------------------------------------- one video


def omniavs_expression(record: OmniAVSRecord) -> OisaExpression:
    """The model input of an OmniAVS record; an explanation is asked for exactly when the GT has one (evaluate.py)."""
    explain = bool(record.explanation)
    if record.referring_speech_path is not None:
        return OisaExpression(
            speech=record.referring_speech_path,
            sound=record.referring_sound_path,
            image=record.referring_image_path,
            explain=explain,
        )
    return OisaExpression(
        text=record.text, sound=record.referring_sound_path, image=record.referring_image_path, explain=explain
    )


def _omniavs_video(record: OmniAVSRecord) -> VideoReader:
    folder = record.frame_paths[0].parent
    video = VideoReader(folder)
    if tuple(video.frame_paths) != record.frame_paths:
        raise OisaDataError(
            f"the folder's {video.info.num_frames} frames are not the {record.num_frames} of video_dict's file_name",
            dataset="omniavs",
            record=record.key,
            path=folder,
        )
    return video


def _segment(segmenter: OisaVideoSegmenter, tasks: Sequence[EvalTask]) -> list[OisaSegmentation]:
    first = tasks[0].record
    if isinstance(first, OmniAVSRecord):
        expressions = [omniavs_expression(task.record) for task in tasks]
        return segmenter(_omniavs_video(first), expressions, soundtrack=first.soundtrack_path)
    expressions = [OisaExpression(text=task.record.text) for task in tasks]
    video = VideoReader(first.media_dir / "frames")
    return segmenter(video, expressions, soundtrack=first.audio_path, return_probabilities=True)


def _base_line(task: EvalTask, status: str) -> dict[str, Any]:
    line: dict[str, Any] = {"key": task.key, "index": task.index, "split": task.split, "status": status}
    if isinstance(task.record, OmniAVSRecord):
        line["expr_type"] = task.record.expr_type
    return line


def _error_line(task: EvalTask, error: Exception) -> dict[str, Any]:
    return {**_base_line(task, "error"), "error": f"{type(error).__name__}: {error}"}


def _check_size(task: EvalTask, prediction: np.ndarray, gt: np.ndarray, dataset: str) -> None:
    if prediction.shape != gt.shape:
        raise OisaDataError(
            f"the prediction {prediction.shape} and the GT {gt.shape} differ in size", dataset=dataset, record=task.key
        )


def _score_omniavs(task: EvalTask, result: OisaSegmentation) -> dict[str, Any]:
    record = task.record
    gt = record.gt_masks()
    _check_size(task, result.masks, gt, "omniavs")
    score = score_expression(result.masks, gt)
    return {
        **_base_line(task, "ok"),
        "is_null": record.is_null,
        "j": score.j,
        "f": score.f,
        "has_seg": result.has_seg,
        "answer": result.answer,
        "predicted_explanation": extract_explanation(result.answer),
        "reference_explanation": record.explanation,
    }


def _resize(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (T, H, W) without antialiasing, as cv2.resize."""
    tensor = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))[:, None]
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()


def _score_refavs(task: EvalTask, result: OisaSegmentation) -> dict[str, Any]:
    record = task.record
    gt = record.gt_masks()
    _check_size(task, result.probabilities, gt, "refavs")
    scores = np.clip(_resize(result.probabilities, REFAVS_EVAL_SIZE), 0.0, 1.0)
    # cv2 resizes the 0/255 PNG to uint8, so a pixel is foreground when its value rounds to at least 1
    gt_small = _resize(gt.astype(np.float32) * 255.0, REFAVS_EVAL_SIZE) >= 0.5
    stats = expression_stats(scores, gt_small, row=record.row, split=record.split, input_kind="probabilities")
    return {
        **_base_line(task, "ok"),
        "is_null": record.is_null,
        "has_seg": result.has_seg,
        "answer": result.answer,
        "stats": stats.as_example(),
    }


def evaluate_group(segmenter: OisaVideoSegmenter, tasks: Sequence[EvalTask]) -> Iterator[dict[str, Any]]:
    """
    Result lines of the expressions of one video, in order, from one pass over its frames. An expression whose input
    or GT is unusable gets an error line; when the shared pass fails, the expressions are run one by one so that
    one bad file costs only its own expression.
    """
    start = time.perf_counter()
    try:
        results = _segment(segmenter, tasks)
    except EXPRESSION_ERRORS as error:
        if len(tasks) == 1:
            logger.warning("%s failed: %s", tasks[0].key, error)
            yield _error_line(tasks[0], error)
            return
        logger.warning("video %s failed (%s); running its %d expressions one by one", tasks[0].group, error, len(tasks))
        for task in tasks:
            yield from evaluate_group(segmenter, [task])
        return
    seconds = (time.perf_counter() - start) / len(tasks)
    for task, result in zip(tasks, results):
        try:
            score = _score_omniavs if isinstance(task.record, OmniAVSRecord) else _score_refavs
            yield {**score(task, result), "seconds": seconds}
        except EXPRESSION_ERRORS as error:
            logger.warning("%s failed: %s", task.key, error)
            yield _error_line(task, error)
