"""
Evaluation of EEMC (`modeling_refavs`) on Ref-AVS: the expressions cut into batches as the original evaluates them,
before any sharding, the model called on each batch through its processor, and one result line per expression.

Under `release` the integration attention runs across the videos of a batch, so a result depends on which rows share
its batch: the batches are the original's (4 expressions of one split in metadata.csv order), formed before the
batches are shared out, so that any number of processes computes the same thing. Under `fixed` a video's result does
not depend on its batch.
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

from modeling_oisa.precision import resolve_dtype
from modeling_refavs import PROFILE_SWITCHES, PROFILES, RefAvsConfig
from processing_oisa.data.errors import OisaDataError
from processing_oisa.data.refavs import RefAVSRecord
from processing_oisa.metrics.refavs import expression_stats
from processing_oisa.refavs_eemc import resize_masks_like_original

from .runner import EXPRESSION_ERRORS, REFAVS_EVAL_SIZE, EvalTask, EvalTasks


logger = logging.getLogger(__name__)

EEMC_MODEL_TYPE = RefAvsConfig.model_type
# the original's evaluation batch (`run_refavs.py`: DataLoader(batch_size=4, shuffle=False) over one split)
RELEASE_BATCH_SIZE = 4
# what the processor gives the model for one expression
MODEL_INPUT_KEYS = ("pixel_values", "input_ids", "attention_mask", "audio_input_features")


@dataclass
class EemcEvaluator:
    """An EEMC model, its processor, and how many expressions each forward takes."""

    model: torch.nn.Module
    processor: Any
    batch_size: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_eemc_evaluator(
    model_path: str,
    device: torch.device,
    *,
    profile: str | None = None,
    dtype: str | torch.dtype = "auto",
    batch_size: int = RELEASE_BATCH_SIZE,
) -> EemcEvaluator:
    """The model under `profile` (every switch; its own when None) and its processor."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    overrides: dict[str, str] = {}
    if profile is not None:
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
        overrides = {"profile": profile, **{switch: values[profile] for switch, values in PROFILE_SWITCHES.items()}}
    model = AutoModel.from_pretrained(model_path, dtype=resolve_dtype(dtype, device), **overrides)
    processor = AutoProcessor.from_pretrained(model_path)
    if model.config.integration_attention_over == "batch" and batch_size != RELEASE_BATCH_SIZE:
        logger.warning(
            "batches of %d expressions: under the release behaviour a result depends on its batch, and the original "
            "evaluates in batches of %d",
            batch_size,
            RELEASE_BATCH_SIZE,
        )
    return EemcEvaluator(model.to(device).eval(), processor, batch_size)


def expression_batches(tasks: Sequence[EvalTask], batch_size: int) -> list[list[EvalTask]]:
    """
    The original's evaluation batches: per split, consecutive expressions in metadata.csv order, `batch_size` at a time
    (the last one of a split shorter). The tasks come split after split, each in CSV order (`load_tasks`).
    """
    batches: list[list[EvalTask]] = []
    for task in tasks:
        last = batches[-1] if batches else None
        if last is None or last[0].split != task.split or len(last) == batch_size:
            batches.append([task])
        else:
            last.append(task)
    return batches


def limited_batches(
    tasks: EvalTasks, batch_size: int, limit: int | None = None
) -> tuple[EvalTasks, list[list[EvalTask]]]:
    """
    The original's batches over every expression of `tasks`; with `limit`, only the first `limit` expressions and the
    batches holding them. A batch keeps its composition whatever the limit, so that the results of a limited run are
    those of the full run (its last batch runs whole, the expressions past the limit left unscored).
    """
    batches = expression_batches(tasks.tasks, batch_size)
    if limit is None:
        return tasks, batches
    kept = tasks.tasks[:limit]
    batches = [batch for batch in batches if batch[0].index < len(kept)]
    return EvalTasks(tasks.dataset, kept, tasks.skipped), batches


def inference_note(evaluator: EemcEvaluator) -> str:
    """How the predictions were made, for the results file: the batches and the size the maps are scored at."""
    config = evaluator.model.config
    size = f"{REFAVS_EVAL_SIZE[0]}x{REFAVS_EVAL_SIZE[1]}"
    if config.mask_size == REFAVS_EVAL_SIZE[0]:
        maps = f"foreground logits at {size}, as the model outputs them"
    else:
        maps = f"foreground logits resized bilinearly from the model's {config.mask_size}x{config.mask_size} to {size}"
    if config.integration_attention_over == "batch":
        batches = (
            f"batches of {evaluator.batch_size} expressions of one split, in the order of metadata.csv (the original "
            f"evaluates with {RELEASE_BATCH_SIZE}); the integration attention runs across a batch's videos, so a "
            "result depends on which rows share its batch (`batch_rows` in each result line)"
        )
    else:
        batches = f"batches of {evaluator.batch_size} expressions; a video's result does not depend on its batch"
    return f"EEMC: {batches}; {maps}; GT masks resized to {size} as the original (cv2 bilinear, then > 0)."


def eemc_run_identity(
    model_path: str, dataset: str, data_root: str | os.PathLike[str], evaluator: EemcEvaluator
) -> dict[str, Any]:
    """What must not change between a run and its restart (the batch size changes results under `release`)."""
    config = evaluator.model.config
    return {
        "model": str(model_path),
        "dataset": dataset,
        "data_root": str(Path(data_root).resolve()),
        "dtype": str(evaluator.model.dtype).removeprefix("torch."),
        "behaviour": {switch: getattr(config, switch) for switch in PROFILE_SWITCHES},
        "batch_size": evaluator.batch_size,
        "inference": inference_note(evaluator),
    }


def _expression_inputs(evaluator: EemcEvaluator, record: RefAVSRecord) -> dict[str, torch.Tensor]:
    """The model inputs of one expression, as the original's dataset reads it: every frame, the text, the soundtrack."""
    encoding = evaluator.processor(
        videos=record.media_dir / "frames", text=record.text, audio=record.audio_path, return_tensors="pt"
    )
    return {key: encoding[key][0] for key in MODEL_INPUT_KEYS}


def _error_line(task: EvalTask, error: Exception) -> dict[str, Any]:
    return {
        "key": task.key,
        "index": task.index,
        "split": task.split,
        "status": "error",
        "error": f"{type(error).__name__}: {error}",
    }


@torch.inference_mode()
def _foreground_logits(evaluator: EemcEvaluator, inputs: Sequence[dict[str, torch.Tensor]]) -> np.ndarray:
    """One forward over the stacked inputs; (B, T, 256, 256) float32 logits."""
    dtype = evaluator.model.dtype
    batch = {}
    for key in MODEL_INPUT_KEYS:
        stacked = torch.stack([item[key] for item in inputs]).to(evaluator.device)
        batch[key] = stacked.to(dtype) if stacked.is_floating_point() else stacked
    logits = evaluator.model(**batch).logits.float()
    if tuple(logits.shape[-2:]) != REFAVS_EVAL_SIZE:
        logits = F.interpolate(
            logits.flatten(0, 1)[:, None], size=REFAVS_EVAL_SIZE, mode="bilinear", align_corners=False
        )
        logits = logits[:, 0].unflatten(0, (len(inputs), -1))
    return logits.cpu().numpy()


def _shape_groups(
    prepared: Sequence[tuple[EvalTask, dict, np.ndarray]],
) -> list[list[tuple[EvalTask, dict, np.ndarray]]]:
    """The prepared expressions split by input shapes: only clips of equal frames and audio length stack."""
    groups: dict[tuple, list] = {}
    for item in prepared:
        shapes = tuple(tuple(item[1][key].shape) for key in MODEL_INPUT_KEYS)
        groups.setdefault(shapes, []).append(item)
    return list(groups.values())


def evaluate_batch(evaluator: EemcEvaluator, tasks: Sequence[EvalTask]) -> Iterator[dict[str, Any]]:
    """
    Result lines of one batch, in order. An expression whose inputs or GT cannot be read gets an error line and the
    others run without it; clips that cannot be stacked (other frame counts or audio lengths) run as separate
    forwards. Each line records the CSV rows of the forward it came from (`batch_rows`).
    """
    prepared, lines = [], {}
    for task in tasks:
        try:
            gt = resize_masks_like_original(task.record.gt_masks(), REFAVS_EVAL_SIZE[0])
            prepared.append((task, _expression_inputs(evaluator, task.record), gt))
        except EXPRESSION_ERRORS as error:
            logger.warning("%s failed: %s", task.key, error)
            lines[task.key] = _error_line(task, error)
    for group in _shape_groups(prepared):
        start = time.perf_counter()
        logits = _foreground_logits(evaluator, [inputs for _, inputs, _ in group])
        seconds = (time.perf_counter() - start) / len(group)
        rows = [task.record.row for task, _, _ in group]
        for (task, _, gt), prediction in zip(group, logits):
            if prediction.shape[0] != gt.shape[0]:
                error = OisaDataError(
                    f"{prediction.shape[0]} predicted frames for {gt.shape[0]} GT masks",
                    dataset="refavs",
                    record=task.key,
                )
                lines[task.key] = _error_line(task, error)
                continue
            stats = expression_stats(prediction, gt, row=task.record.row, split=task.split, input_kind="logits")
            lines[task.key] = {
                "key": task.key,
                "index": task.index,
                "split": task.split,
                "status": "ok",
                "is_null": task.record.is_null,
                "batch_rows": rows,
                "stats": stats.as_example(),
                "seconds": seconds,
            }
    for task in tasks:
        yield lines[task.key]
