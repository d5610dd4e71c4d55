"""
The OmniAVS protocol of OISA's `evaluate.py`: per-frame J and DAVIS boundary F, J&F per expression, the all-or-nothing
rule for null expressions, per-split means over the 8 expression types, and explanation BLEU / METEOR.

Not the Ref-AVS protocol (`metrics_refavs`): J here has no sigmoid or TN-ratio, and F is a contour measure.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import datasets
import evaluate
import numpy as np
from scipy import ndimage

from ..data.omniavs import EXPRESSION_TYPES


EPS = 1e-7
BOUND_TH = 0.008
# `evaluate.py` averages METEOR over these two splits only for its summary line.
METEOR_SUMMARY_SPLITS = ("text", "speech")

_DESCRIPTION = "OmniAVS J, F (DAVIS boundary, bound_th 0.008) and J&F per expression type, as OISA's evaluate.py."


def region_similarity(pred: np.ndarray, gt: np.ndarray, eps: float = EPS) -> float:
    """J of one frame: (|P∩G| + eps) / (|P∪G| + eps); two empty masks give 1."""
    pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0
    intersection = np.count_nonzero(pred & gt)
    union = np.count_nonzero(pred | gt)
    return float((intersection + eps) / (union + eps))


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """
    DAVIS `_seg2bmap`: a pixel is boundary if it differs from its right, bottom or bottom-right neighbour.

    The last row looks only right, the last column only down, and the corner is never boundary, so a completely
    filled mask has no boundary at all (and scores F = 1 against an empty GT, as the original does).
    """
    seg = np.asarray(mask) > 0
    if seg.ndim != 2:
        raise ValueError(f"boundary_map expects a 2-D mask, got shape {seg.shape}")
    east = np.zeros_like(seg)
    south = np.zeros_like(seg)
    south_east = np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    boundary = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    boundary[-1, :] = seg[-1, :] ^ east[-1, :]
    boundary[:, -1] = seg[:, -1] ^ south[:, -1]
    boundary[-1, -1] = False
    return boundary


def disk(radius: int) -> np.ndarray:
    """skimage's `disk(radius)`: the offsets with dx² + dy² <= radius² in a (2r+1)² square."""
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2


def dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """
    Binary dilation by `disk(radius)`, computed as "Euclidean distance to the mask <= radius".

    This is the same set as `ndimage.binary_dilation(mask, disk(radius))` (and `cv2.dilate`), in time linear in the
    image instead of proportional to the disk area, which matters at 12 px on 720p frames.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros_like(mask)
    return ndimage.distance_transform_edt(~mask) <= radius


def boundary_tolerance(shape: tuple[int, int], bound_th: float = BOUND_TH) -> int:
    """DAVIS tolerance in pixels: `bound_th` itself when >= 1, else ceil(bound_th * image diagonal), as an int (B30)."""
    if bound_th >= 1:
        return int(bound_th)
    return int(math.ceil(bound_th * math.hypot(*shape)))


def boundary_f_measure(pred: np.ndarray, gt: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """DAVIS `f_measure` of one frame with the original's edge-case conventions."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"boundary_f_measure expects two 2-D masks of one shape, got {pred.shape} and {gt.shape}")
    radius = boundary_tolerance(pred.shape, bound_th)
    pred_boundary = boundary_map(pred)
    gt_boundary = boundary_map(gt)
    n_pred = int(np.count_nonzero(pred_boundary))
    n_gt = int(np.count_nonzero(gt_boundary))
    # evaluate.py swaps the argument roles, which swaps precision and recall; F is symmetric so it is unaffected.
    if n_pred == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    elif n_pred == 0:
        precision, recall = 1.0, 0.0
    elif n_gt == 0:
        precision, recall = 0.0, 1.0
    else:
        precision = np.count_nonzero(pred_boundary & dilate_disk(gt_boundary, radius)) / n_pred
        recall = np.count_nonzero(gt_boundary & dilate_disk(pred_boundary, radius)) / n_gt
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


@dataclass(frozen=True)
class ExpressionScore:
    """J and F of one expression (means over its frames, or the null rule's 0/1)."""

    j: float
    f: float

    @property
    def jf(self) -> float:
        return (self.j + self.f) / 2


def score_expression(pred_masks: np.ndarray, gt_masks: np.ndarray, bound_th: float = BOUND_TH) -> ExpressionScore:
    """
    J and F of one expression from binary masks [T, H, W] (nonzero = foreground) at the GT resolution.

    An expression whose GT is empty in every frame (null) scores J = F = 1 if the prediction is empty in every frame,
    else J = F = 0. Otherwise J and F are per-frame values averaged over the T frames.
    """
    pred = np.asarray(pred_masks) > 0
    gt = np.asarray(gt_masks) > 0
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"expected prediction and GT of one shape [T, H, W], got {pred.shape} and {gt.shape}")
    if not gt.any():
        value = 0.0 if pred.any() else 1.0
        return ExpressionScore(value, value)
    j = float(np.mean([region_similarity(p, g) for p, g in zip(pred, gt)]))
    f = float(np.mean([boundary_f_measure(p, g, bound_th) for p, g in zip(pred, gt)]))
    return ExpressionScore(j, f)


class OmniAVSMetric(evaluate.Metric):
    """
    Aggregates per-expression J and F (from `score_expression`) into per-split J, F, J&F and the overall J&F.

    Add one example per expression: `expression_id` (the record key), `split` (its expr_type), `j`, `f`.
    Expressions weigh equally within a split; the overall J&F is the unweighted mean of the split J&F values.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description="expression_id, split (expr_type), j and f of one expression",
            features=datasets.Features(
                {
                    "expression_id": datasets.Value("string"),
                    "split": datasets.Value("string"),
                    "j": datasets.Value("float64"),
                    "f": datasets.Value("float64"),
                }
            ),
        )

    def _compute(self, expression_id: list[str], split: list[str], j: list[float], f: list[float]) -> dict:
        per_split: dict[str, list[tuple[float, float]]] = defaultdict(list)
        seen: set[tuple[str, str]] = set()
        for key, name, j_value, f_value in zip(expression_id, split, j, f):
            if (name, key) in seen:
                # Typically a sharded evaluation gathered twice; counting it twice would bias the mean.
                raise ValueError(f"expression {key!r} of split {name!r} was added more than once")
            seen.add((name, key))
            per_split[name].append((j_value, f_value))
        order = [name for name in EXPRESSION_TYPES if name in per_split] + sorted(
            set(per_split) - set(EXPRESSION_TYPES)
        )
        splits = {}
        for name in order:
            values = np.asarray(per_split[name], dtype=np.float64)
            j_mean, f_mean = float(values[:, 0].mean()), float(values[:, 1].mean())
            splits[name] = {"J": j_mean, "F": f_mean, "J&F": (j_mean + f_mean) / 2, "num_expressions": len(values)}
        return {
            "splits": splits,
            "J&F": float(np.mean([s["J&F"] for s in splits.values()])) if splits else None,
            "num_splits": len(splits),
            "missing_splits": [name for name in EXPRESSION_TYPES if name not in splits],
        }


_EXPLANATION = re.compile(r"Explanation:\s*(.*)")


def extract_explanation(answer: str) -> str:
    """The generated explanation: the rest of the first line after `Explanation:`; "" when there is none (B13)."""
    match = _EXPLANATION.search(answer)
    return match.group(1).strip() if match else ""


_WORDS = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str, tokenization: Literal["words", "whitespace"]) -> list[str]:
    """`whitespace` is evaluate.py's `str.split` (parity); `words` also splits punctuation off words (B14)."""
    if tokenization == "whitespace":
        return text.split()
    if tokenization == "words":
        return _WORDS.findall(text)
    raise ValueError(f"tokenization must be 'words' or 'whitespace', got {tokenization!r}")


Scorer = Callable[[list[str], list[str]], float]


def explanation_scorers() -> dict[str, Scorer | str]:
    """
    The available explanation scorers, looked up offline only: `bleu` needs nltk, `meteor` also WordNet data.

    Each value is a callable (reference tokens, prediction tokens) -> float, or a string saying why it is unavailable.
    Nothing is downloaded.
    """
    try:
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from nltk.translate.meteor_score import single_meteor_score
    except ImportError as error:
        reason = f"nltk is not installed ({error}); install the 'meteor' extra"
        return {"bleu": reason, "meteor": reason}
    smoothing = SmoothingFunction().method4

    def bleu(reference: list[str], prediction: list[str]) -> float:
        # Default weights: BLEU-4, as evaluate.py (its BLEU-1 weights variable is unused).
        return float(sentence_bleu([reference], prediction, smoothing_function=smoothing))

    scorers: dict[str, Scorer | str] = {"bleu": bleu}
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
    except (LookupError, OSError):
        scorers["meteor"] = "WordNet data for nltk is not available offline (nltk_data/corpora/wordnet)"
    else:
        scorers["meteor"] = lambda reference, prediction: float(single_meteor_score(reference, prediction))
    return scorers


class OmniAVSExplanationMetric(evaluate.Metric):
    """
    Explanation BLEU-4 and METEOR per split, for the expressions that have a GT explanation.

    Add one example per such expression: `expression_id`, `split`, `prediction` (from `extract_explanation`) and
    `reference`. A score whose library or data is missing is reported as None with the reason, never as 0.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="OmniAVS explanation BLEU-4 and METEOR (nltk), per expression type.",
            citation="",
            inputs_description="expression_id, split, prediction and reference explanation strings",
            features=datasets.Features(
                {
                    "expression_id": datasets.Value("string"),
                    "split": datasets.Value("string"),
                    "prediction": datasets.Value("string"),
                    "reference": datasets.Value("string"),
                }
            ),
        )

    def _compute(
        self,
        expression_id: list[str],
        split: list[str],
        prediction: list[str],
        reference: list[str],
        tokenization: Literal["words", "whitespace"] = "words",
    ) -> dict:
        if tokenization not in ("words", "whitespace"):
            raise ValueError(f"tokenization must be 'words' or 'whitespace', got {tokenization!r}")
        if len(set(zip(split, expression_id))) != len(expression_id):
            raise ValueError("an expression was added more than once")
        scorers = explanation_scorers()
        available = {name: scorer for name, scorer in scorers.items() if callable(scorer)}
        counts: dict[str, int] = defaultdict(int)
        scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for name, pred_text, ref_text in zip(split, prediction, reference):
            counts[name] += 1
            pred_tokens, ref_tokens = tokenize(pred_text, tokenization), tokenize(ref_text, tokenization)
            for metric_name, scorer in available.items():
                scores[name][metric_name].append(scorer(ref_tokens, pred_tokens))
        splits = {
            name: {
                "num_explanations": counts[name],
                **{
                    metric_name: float(np.mean(scores[name][metric_name])) if metric_name in available else None
                    for metric_name in scorers
                },
            }
            for name in counts
        }
        summary = None
        if "meteor" in available and all(name in splits for name in METEOR_SUMMARY_SPLITS):
            summary = float(np.mean([splits[name]["meteor"] for name in METEOR_SUMMARY_SPLITS]))
        return {
            "splits": splits,
            "meteor_text_speech": summary,
            "tokenization": tokenization,
            "bleu_n": 4,
            "unavailable": {name: reason for name, reason in scorers.items() if not callable(reason)},
        }
