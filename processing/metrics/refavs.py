"""
The Ref-AVS protocol (`utils/metric/utility.py` driven by `scripts/train.py::test` of GeWu-Lab/Ref-AVS): J with a
0.4 threshold and a true-negative ratio on empty-GT frames, region max-F (beta² 0.3, 255 thresholds), null S.

Each expression is reduced to sufficient statistics (`expression_stats`), so that both the `official` mode (batches of
4 expressions in CSV order, averaged per batch) and the order-free `per_expression` mode can be computed from them.
Not the OmniAVS protocol (`metrics_omniavs`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import datasets
import evaluate
import numpy as np
from scipy.special import expit


J_THRESHOLD = 0.4
S_THRESHOLD = 0.5
BETA2 = 0.3
NUM_THRESHOLDS = 255
OFFICIAL_BATCH_SIZE = 4
IOU_EPS = 1e-7
PR_EPS = 1e-20
NULL_SPLIT = "test_n"
SEEN_SPLIT, UNSEEN_SPLIT = "test_s", "test_u"

InputKind = Literal["logits", "probabilities", "binary"]
Mode = Literal["official", "per_expression"]
INPUT_KINDS = ("logits", "probabilities", "binary")
MODES = ("official", "per_expression")


def to_scores(pred: np.ndarray, input_kind: InputKind) -> np.ndarray:
    """
    Foreground scores in [0, 1] (float64) from logits (sigmoid), probabilities or binary masks.

    Binary masks given as logits are refused: sigmoid(0) = 0.5 > 0.4 would make every pixel foreground for J.
    """
    pred = np.asarray(pred)
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {input_kind!r}")
    binary_valued = pred.dtype == bool or bool(np.all((pred == 0) | (pred == 1)))
    if input_kind == "binary":
        if not binary_valued:
            raise ValueError("input_kind='binary' needs masks whose values are all 0 or 1")
        return pred.astype(np.float64)
    if pred.dtype == bool or (input_kind == "logits" and binary_valued):
        raise ValueError(
            f"input_kind={input_kind!r} got a binary mask; pass logits/probabilities, or input_kind='binary' "
            "with mode='per_expression'"
        )
    scores = pred.astype(np.float64)
    if input_kind == "logits":
        return expit(scores)
    if scores.min() < 0 or scores.max() > 1:
        raise ValueError("input_kind='probabilities' needs values in [0, 1]; were logits passed?")
    return scores


def frame_ious(scores: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """
    Official `mask_iou` per frame on [T, H, W]: P = score > 0.4; IoU = |P∩G| / (|P∪G| + 1e-7) on frames with GT,
    and the true-negative ratio |¬P∩¬G| / (H·W + 1e-7) on frames with empty GT.
    """
    pred = scores > J_THRESHOLD
    frames = pred.shape[0]
    pred, gt = pred.reshape(frames, -1), gt.reshape(frames, -1)
    intersection = np.count_nonzero(pred & gt, axis=1)
    union = np.count_nonzero(pred | gt, axis=1)
    true_negative = np.count_nonzero(~pred & ~gt, axis=1)
    empty = ~gt.any(axis=1)
    return np.where(empty, true_negative / (gt.shape[1] + IOU_EPS), intersection / (union + IOU_EPS)).astype(np.float64)


def _thresholds() -> np.ndarray:
    return np.linspace(0.0, 1.0 - 1e-10, NUM_THRESHOLDS)


def fmeasure_curve(scores: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """
    F_beta over the 255 thresholds of one frame with non-empty GT: P = TP/(#(s>=θ)+1e-20), R = TP/(|G|+1e-20),
    F = (1+β²)PR/(β²P+R) with β² = 0.3 and NaN set to 0 (official `_eval_pr` / `Eval_Fmeasure`).
    """
    flat_scores, flat_gt = scores.ravel(), gt.ravel()
    thresholds = _thresholds()
    # Counting "s >= θ" through sorted scores replaces 255 full-image comparisons per frame.
    all_sorted = np.sort(flat_scores)
    positive_sorted = np.sort(flat_scores[flat_gt])
    predicted = all_sorted.size - np.searchsorted(all_sorted, thresholds, side="left")
    true_positive = positive_sorted.size - np.searchsorted(positive_sorted, thresholds, side="left")
    precision = true_positive / (predicted + PR_EPS)
    recall = true_positive / (positive_sorted.size + PR_EPS)
    with np.errstate(invalid="ignore", divide="ignore"):
        f_beta = (1 + BETA2) * precision * recall / (BETA2 * precision + recall)
    return np.nan_to_num(f_beta, nan=0.0)


@dataclass(frozen=True)
class RefAVSExpressionStats:
    """What both evaluation modes need from one expression; `as_example()` is one `RefAVSMetric` input."""

    row: int
    split: str
    input_kind: str
    frame_iou: tuple[float, ...]
    f_curve_sum: tuple[float, ...]
    f_valid_frames: int
    foreground_pixels: int
    num_pixels: int

    def as_example(self) -> dict:
        return asdict(self)


def expression_stats(
    pred: np.ndarray, gt: np.ndarray, *, row: int, split: str, input_kind: InputKind
) -> RefAVSExpressionStats:
    """
    Statistics of one expression from its prediction [T, H, W] (logits, probabilities or binary per `input_kind`)
    and binary GT [T, H, W] at the evaluation size (256×256 in the official protocol). `row` is the CSV row index.
    """
    gt = np.asarray(gt)
    if np.asarray(pred).shape != gt.shape or gt.ndim != 3:
        raise ValueError(f"expected prediction and GT of one shape [T, H, W], got {np.shape(pred)} and {gt.shape}")
    scores = to_scores(pred, input_kind)
    gt = gt > 0
    valid = [t for t in range(gt.shape[0]) if gt[t].any()]
    curve_sum = np.zeros(NUM_THRESHOLDS, dtype=np.float64)
    for t in valid:
        curve_sum += fmeasure_curve(scores[t], gt[t])
    return RefAVSExpressionStats(
        row=int(row),
        split=split,
        input_kind=input_kind,
        frame_iou=tuple(frame_ious(scores, gt).tolist()),
        f_curve_sum=tuple(curve_sum.tolist()),
        f_valid_frames=len(valid),
        foreground_pixels=int(np.count_nonzero(scores > S_THRESHOLD)),
        num_pixels=int(scores.size),
    )


def _group_score(items: Sequence[RefAVSExpressionStats]) -> dict[str, float | None]:
    """J, F and S of one group of expressions pooled as one official batch."""
    ious = [value for item in items for value in item.frame_iou]
    valid = sum(item.f_valid_frames for item in items)
    if valid:
        curve = np.sum([item.f_curve_sum for item in items], axis=0) / valid
        f_value: float | None = float(curve.max())
    else:
        f_value = None
    pixels = sum(item.num_pixels for item in items)
    return {
        "J": float(np.mean(ious)),
        "F": f_value,
        "S": float(np.sqrt(sum(item.foreground_pixels for item in items) / pixels)),
    }


def score_split(
    items: Sequence[RefAVSExpressionStats], mode: Mode = "official", batch_size: int = OFFICIAL_BATCH_SIZE
) -> dict:
    """
    J and F (or S for `test_n`) of one split.

    `official`: rows sorted by CSV row, cut into batches of `batch_size`; each batch pools its frames (J mean over
    frames, F max of the mean curve with 0 for a batch without GT frames, S sqrt of the pooled foreground fraction),
    and the split value is the mean over batches. `per_expression`: each expression is its own batch; expressions
    without any GT frame have no F and are left out of the F mean.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not items:
        raise ValueError("no expressions to score")
    if len({item.split for item in items}) != 1:
        raise ValueError("score_split scores one split at a time")
    ordered = sorted(items, key=lambda item: item.row)
    rows = [item.row for item in ordered]
    if len(set(rows)) != len(rows):
        raise ValueError("a CSV row was added more than once")
    if mode == "official":
        binary = sorted({item.row for item in ordered if item.input_kind == "binary"})
        if binary:
            raise ValueError(f"official mode needs logits or probabilities; rows {binary[:5]} were given as binary")
        groups = [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]
    else:
        groups = [[item] for item in ordered]
    scores = [_group_score(group) for group in groups]
    split = ordered[0].split
    result: dict = {"num_expressions": len(ordered), "num_groups": len(groups)}
    if split == NULL_SPLIT:
        result["S"] = float(np.mean([s["S"] for s in scores]))
        return result
    result["J"] = float(np.mean([s["J"] for s in scores]))
    if mode == "official":
        f_values = [0.0 if s["F"] is None else s["F"] for s in scores]
    else:
        f_values = [s["F"] for s in scores if s["F"] is not None]
    result["F"] = float(np.mean(f_values)) if f_values else None
    result["J&F"] = (result["J"] + result["F"]) / 2 if result["F"] is not None else None
    return result


class RefAVSMetric(evaluate.Metric):
    """
    Ref-AVS J, F and S per split plus Seen (test_s), Unseen (test_u), Mix (their mean, for J and F separately) and
    Null (test_n S). Add `expression_stats(...).as_example()` per expression; `compute(mode=...)` picks the protocol.
    Values are fractions (the Ref-AVS paper prints J in %, later papers print both ×100).
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Ref-AVS J (mIoU), region max-F (beta^2 0.3) and null S, in batches of 4 or per expression.",
            citation="",
            inputs_description="the fields of RefAVSExpressionStats, one example per expression",
            features=datasets.Features(
                {
                    "row": datasets.Value("int64"),
                    "split": datasets.Value("string"),
                    "input_kind": datasets.Value("string"),
                    "frame_iou": datasets.List(datasets.Value("float64")),
                    "f_curve_sum": datasets.List(datasets.Value("float64")),
                    "f_valid_frames": datasets.Value("int64"),
                    "foreground_pixels": datasets.Value("int64"),
                    "num_pixels": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, mode: Mode = "official", batch_size: int = OFFICIAL_BATCH_SIZE, **columns: list) -> dict:
        by_split: dict[str, list[RefAVSExpressionStats]] = defaultdict(list)
        names = list(RefAVSExpressionStats.__dataclass_fields__)
        for values in zip(*(columns[name] for name in names)):
            item = RefAVSExpressionStats(**dict(zip(names, values)))
            if len(item.f_curve_sum) != NUM_THRESHOLDS:
                raise ValueError(f"row {item.row}: f_curve_sum must have {NUM_THRESHOLDS} values")
            by_split[item.split].append(item)
        splits = {name: score_split(items, mode, batch_size) for name, items in sorted(by_split.items())}
        result: dict = {"mode": mode, "splits": splits}
        for label, name in (("Seen", SEEN_SPLIT), ("Unseen", UNSEEN_SPLIT)):
            if name in splits:
                result[label] = {"J": splits[name]["J"], "F": splits[name]["F"]}
        if "Seen" in result and "Unseen" in result:
            result["Mix"] = {
                key: (result["Seen"][key] + result["Unseen"][key]) / 2
                if result["Seen"][key] is not None and result["Unseen"][key] is not None
                else None
                for key in ("J", "F")
            }
        if NULL_SPLIT in splits:
            result["Null"] = {"S": splits[NULL_SPLIT]["S"]}
        return result
