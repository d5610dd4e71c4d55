"""The OmniAVS and Ref-AVS metric protocols on hand-computed cases."""

import sys

import numpy as np
import pytest
from scipy import ndimage

from processing_oisa import metrics_omniavs
from processing_oisa.metrics_omniavs import (
    EPS,
    OmniAVSExplanationMetric,
    OmniAVSMetric,
    boundary_f_measure,
    boundary_map,
    boundary_tolerance,
    dilate_disk,
    disk,
    extract_explanation,
    region_similarity,
    score_expression,
)
from processing_oisa.metrics_refavs import (
    RefAVSMetric,
    expression_stats,
    fmeasure_curve,
    frame_ious,
    score_split,
    to_scores,
)


def square(shape, top, left, size) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


def f_beta(precision: float, recall: float, beta2: float = 0.3) -> float:
    return (1 + beta2) * precision * recall / (beta2 * precision + recall)


# ---------------------------------------------------------------- OmniAVS: J and the boundary F


def test_region_similarity_hand_cases():
    gt = square((20, 20), 0, 0, 10)
    assert region_similarity(gt, gt) == pytest.approx(1.0)
    assert region_similarity(np.zeros_like(gt), np.zeros_like(gt)) == 1.0
    assert region_similarity(np.zeros_like(gt), gt) == pytest.approx(EPS / (100 + EPS))
    # Shifted by half its width: |I| = 50, |U| = 150.
    assert region_similarity(square((20, 20), 0, 5, 10), gt) == pytest.approx(1 / 3)


def test_boundary_map_follows_davis():
    assert not boundary_map(np.ones((5, 6))).any()  # a filled mask has no boundary
    left_half = np.zeros((10, 100), dtype=bool)
    left_half[:, :50] = True
    assert np.array_equal(np.argwhere(boundary_map(left_half))[:, 1], np.full(10, 49))


def test_tolerance_is_an_int_disk_radius():
    assert boundary_tolerance((720, 1280)) == 12  # ceil(0.008 * 1468.6)
    assert boundary_tolerance((10, 100)) == 1
    assert boundary_tolerance((10, 100), bound_th=3) == 3
    assert disk(1).sum() == 5 and disk(2).sum() == 13


def test_distance_dilation_equals_disk_dilation():
    rng = np.random.default_rng(0)
    for radius in (1, 2, 3, 5):
        mask = rng.random((40, 50)) < 0.02
        expected = ndimage.binary_dilation(mask, structure=disk(radius))
        assert np.array_equal(dilate_disk(mask, radius), expected)


def test_boundary_f_offsets_within_and_beyond_tolerance():
    # 10 x 100 frame -> tolerance 1 px; the GT's boundary is column 49.
    gt = np.zeros((10, 100), dtype=bool)
    gt[:, :50] = True
    within, beyond = gt.copy(), gt.copy()
    within[:, 50] = True  # boundary moves 1 px
    beyond[:, 50:52] = True  # boundary moves 2 px
    assert boundary_f_measure(gt, gt) == 1.0
    assert boundary_f_measure(within, gt) == 1.0
    assert boundary_f_measure(beyond, gt) == 0.0
    # Half the rows 1 px off, half 2 px off: P = R = 1/2 on the vertical edges only -> compare with a brute force.
    mixed = gt.copy()
    mixed[:5, 50] = True
    mixed[5:, 50:52] = True
    pred_b, gt_b = boundary_map(mixed), boundary_map(gt)
    precision = (pred_b & ndimage.binary_dilation(gt_b, disk(1))).sum() / pred_b.sum()
    recall = (gt_b & ndimage.binary_dilation(pred_b, disk(1))).sum() / gt_b.sum()
    assert boundary_f_measure(mixed, gt) == pytest.approx(2 * precision * recall / (precision + recall))
    assert 0 < boundary_f_measure(mixed, gt) < 1


def test_boundary_f_edge_cases():
    empty = np.zeros((10, 10), dtype=bool)
    full = np.ones((10, 10), dtype=bool)
    blob = square((10, 10), 2, 2, 4)
    assert boundary_f_measure(empty, empty) == 1.0
    assert boundary_f_measure(empty, blob) == 0.0
    assert boundary_f_measure(blob, empty) == 0.0
    assert boundary_f_measure(full, empty) == 1.0  # the original's quirk: a filled mask has no boundary


def test_score_expression_perfect_empty_half_and_null():
    gt = np.stack([square((20, 20), 0, 0, 10)] * 3)
    perfect = score_expression(gt, gt)
    assert (perfect.j, perfect.f, perfect.jf) == (pytest.approx(1.0), 1.0, pytest.approx(1.0))
    empty = score_expression(np.zeros_like(gt), gt)
    assert empty.j == pytest.approx(0.0, abs=1e-8) and empty.f == 0.0
    half = score_expression(np.stack([square((20, 20), 0, 5, 10)] * 3), gt)
    assert half.j == pytest.approx(1 / 3)

    null_gt = np.zeros((3, 20, 20), dtype=bool)
    assert score_expression(np.zeros_like(null_gt), null_gt) == metrics_omniavs.ExpressionScore(1.0, 1.0)
    one_pixel = null_gt.copy()
    one_pixel[2, 5, 5] = True
    assert score_expression(one_pixel, null_gt) == metrics_omniavs.ExpressionScore(0.0, 0.0)


def test_score_expression_averages_frames_including_empty_gt_frames():
    gt = np.stack([square((20, 20), 0, 0, 10), np.zeros((20, 20), dtype=bool)])
    full_on_empty = np.stack([gt[0], np.ones((20, 20), dtype=bool)])
    score = score_expression(full_on_empty, gt)
    # Frame 2: J ~ 0 but F = 1 (no boundary on either side).
    assert score.j == pytest.approx(0.5) and score.f == 1.0


def test_omniavs_metric_split_means_and_unweighted_overall():
    metric = OmniAVSMetric()
    metric.add_batch(
        expression_id=["a_0", "a_1", "b_0"],
        split=["text", "text", "speech"],
        j=[1.0, 0.5, 0.2],
        f=[1.0, 0.7, 0.4],
    )
    result = metric.compute()
    assert result["splits"]["text"] == {"J": 0.75, "F": 0.85, "J&F": 0.8, "num_expressions": 2}
    assert result["splits"]["speech"]["J&F"] == pytest.approx(0.3)
    assert result["J&F"] == pytest.approx((0.8 + 0.3) / 2)  # not (weighted) 0.633
    assert list(result["splits"]) == ["text", "speech"] and len(result["missing_splits"]) == 6
    duplicate = OmniAVSMetric()
    duplicate.add_batch(expression_id=["a_0", "a_0"], split=["text", "text"], j=[1.0, 1.0], f=[1.0, 1.0])
    with pytest.raises(ValueError, match="more than once"):
        duplicate.compute()


# ---------------------------------------------------------------- OmniAVS: explanations


def test_extract_explanation():
    assert extract_explanation("Sure, it is . Explanation: it barks.\nmore") == "it barks."
    assert extract_explanation("Sure, it is .") == ""


def _explanation_inputs():
    return dict(
        expression_id=["a", "b", "c"],
        split=["text", "text", "speech"],
        prediction=["the dog barks", "", "a car"],
        reference=["the dog barks", "a cat", "a red car"],
    )


def test_explanation_scores_are_unavailable_without_nltk(monkeypatch):
    for name in [name for name in sys.modules if name == "nltk" or name.startswith("nltk.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "nltk", None)
    metric = OmniAVSExplanationMetric()
    metric.add_batch(**_explanation_inputs())
    result = metric.compute()
    assert result["splits"]["text"] == {"num_explanations": 2, "bleu": None, "meteor": None}
    assert result["meteor_text_speech"] is None
    assert set(result["unavailable"]) == {"bleu", "meteor"} and "nltk" in result["unavailable"]["meteor"]


def test_explanation_aggregation_with_a_missing_meteor(monkeypatch):
    def exact(reference, prediction):
        return float(reference == prediction)

    monkeypatch.setattr(metrics_omniavs, "explanation_scorers", lambda: {"bleu": exact, "meteor": "no WordNet"})
    metric = OmniAVSExplanationMetric()
    metric.add_batch(**_explanation_inputs())
    result = metric.compute(tokenization="whitespace")
    assert result["splits"]["text"] == {"num_explanations": 2, "bleu": 0.5, "meteor": None}
    assert result["splits"]["speech"]["bleu"] == 0.0
    assert result["unavailable"] == {"meteor": "no WordNet"} and result["meteor_text_speech"] is None


# ---------------------------------------------------------------- Ref-AVS


def logits_of(mask: np.ndarray, scale: float = 10.0) -> np.ndarray:
    return np.where(mask, scale, -scale).astype(np.float32)


def test_refavs_j_perfect_empty_half_and_tn_ratio():
    gt = np.zeros((3, 4, 4), dtype=bool)
    gt[0, :2] = True  # top half
    gt[1, :2] = True
    pred = gt.copy()
    pred[1] = False
    pred[1, :, :2] = True  # left half: |I| = 4, |U| = 12
    pred[2, 0, :3] = True  # 3 false positives on an empty-GT frame: TN = 13 of 16
    ious = frame_ious(to_scores(logits_of(pred), "logits"), gt)
    assert ious == pytest.approx([1.0, 1 / 3, 13 / 16])
    empty_on_empty = frame_ious(to_scores(logits_of(np.zeros((1, 4, 4), bool)), "logits"), np.zeros((1, 4, 4), bool))
    assert empty_on_empty == pytest.approx([1.0])


def test_refavs_j_uses_threshold_0_4():
    gt = np.ones((1, 2, 2), dtype=bool)
    probabilities = np.array([[[0.41, 0.41], [0.39, 0.39]]])
    assert frame_ious(to_scores(probabilities, "probabilities"), gt) == pytest.approx([0.5])


def test_refavs_fmeasure_on_a_hand_computed_curve():
    scores = np.full((4, 4), 0.1)
    gt = np.zeros((4, 4), dtype=bool)
    gt[0, :4] = True
    scores[0, :4] = [0.9, 0.9, 0.6, 0.2]
    scores[1, 0] = 0.7
    curve = fmeasure_curve(scores, gt)
    # theta <= 0.1: 16 predicted, P = 1/4; (0.1, 0.2]: 5 predicted, P = 4/5; (0.2, 0.6]: P = R = 3/4;
    # (0.6, 0.7]: P = 2/3, R = 1/2; (0.7, 0.9]: P = 1, R = 1/2; above 0.9 nothing (NaN -> 0).
    assert curve[0] == pytest.approx(f_beta(0.25, 1.0))
    assert curve[30] == pytest.approx(f_beta(0.8, 1.0))
    assert curve[100] == pytest.approx(f_beta(0.75, 0.75))
    assert curve[170] == pytest.approx(f_beta(2 / 3, 0.5))
    assert curve[200] == pytest.approx(f_beta(1.0, 0.5))
    assert curve[240] == 0.0
    assert curve.max() == pytest.approx(26 / 31)
    stats = expression_stats(scores[None], gt[None], row=0, split="test_s", input_kind="probabilities")
    assert score_split([stats])["F"] == pytest.approx(26 / 31)


def test_refavs_perfect_and_null_s():
    gt = np.zeros((10, 8, 8), dtype=bool)
    gt[:, 2:6, 2:6] = True
    perfect = score_split([expression_stats(logits_of(gt), gt, row=0, split="test_s", input_kind="logits")])
    assert perfect["J"] == pytest.approx(1.0) and perfect["F"] == pytest.approx(1.0)
    null = np.zeros_like(gt)
    empty = expression_stats(logits_of(null), null, row=0, split="test_n", input_kind="logits")
    full = expression_stats(logits_of(~null), null, row=1, split="test_n", input_kind="logits")
    assert score_split([empty])["S"] == 0.0 and score_split([full])["S"] == 1.0


def test_refavs_wrong_input_kinds_are_errors():
    binary = np.zeros((1, 4, 4), dtype=np.float32)
    binary[0, 0, 0] = 1
    gt = binary > 0
    with pytest.raises(ValueError, match="binary"):
        expression_stats(binary, gt, row=0, split="test_s", input_kind="logits")
    with pytest.raises(ValueError, match="binary"):
        expression_stats(gt, gt, row=0, split="test_s", input_kind="probabilities")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expression_stats(logits_of(gt), gt, row=0, split="test_s", input_kind="probabilities")
    stats = expression_stats(binary, gt, row=0, split="test_s", input_kind="binary")
    assert score_split([stats], "per_expression")["J"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="official"):
        score_split([stats], "official")


def _one_frame(pred: np.ndarray, gt: np.ndarray, row: int, split: str):
    return expression_stats(logits_of(pred)[None], gt[None], row=row, split=split, input_kind="logits")


def test_refavs_official_batches_of_four_versus_per_expression():
    gt = square((4, 4), 0, 0, 2)
    empty = np.zeros((4, 4), dtype=bool)
    # Rows 0-3 perfect, row 4 predicts nothing on a non-empty GT (IoU 0; its best F is at theta = 0: P = 4/16, R = 1).
    items = [_one_frame(gt, gt, row, "test_s") for row in range(4)] + [_one_frame(empty, gt, 4, "test_s")]
    worst_f = f_beta(0.25, 1.0)
    official = score_split(items[::-1], "official")  # added out of order: batches follow the CSV row
    assert official["num_groups"] == 2
    assert official["J"] == pytest.approx((1.0 + 0.0) / 2)
    assert official["F"] == pytest.approx((1.0 + worst_f) / 2)
    clean = score_split(items, "per_expression")
    assert clean["J"] == pytest.approx(4 / 5)
    assert clean["F"] == pytest.approx((4 + worst_f) / 5)


def test_refavs_batch_without_gt_frames_scores_f_zero_only_officially():
    gt = square((4, 4), 0, 0, 2)
    empty = np.zeros((4, 4), dtype=bool)
    items = [_one_frame(empty, empty, row, "val") for row in range(4)]
    items += [_one_frame(gt, gt, row, "val") for row in range(4, 8)]
    assert score_split(items, "official")["F"] == pytest.approx(0.5)
    assert score_split(items, "per_expression")["F"] == pytest.approx(1.0)


def test_refavs_null_s_pooled_per_batch():
    empty = np.zeros((4, 4), dtype=bool)
    items = [_one_frame(~empty, empty, 0, "test_n")] + [_one_frame(empty, empty, row, "test_n") for row in range(1, 5)]
    assert score_split(items, "official")["S"] == pytest.approx((np.sqrt(1 / 4) + 0.0) / 2)
    assert score_split(items, "per_expression")["S"] == pytest.approx(1 / 5)


def test_refavs_metric_seen_unseen_mix_null():
    gt = square((4, 4), 0, 0, 2)
    half = square((4, 4), 0, 1, 2)  # |I| = 2, |U| = 6
    empty = np.zeros((4, 4), dtype=bool)
    examples = [
        _one_frame(gt, gt, 0, "test_s"),
        _one_frame(half, gt, 1, "test_u"),
        _one_frame(~empty, empty, 2, "test_n"),
    ]
    metric = RefAVSMetric()
    metric.add_batch(**{key: [e.as_example()[key] for e in examples] for key in examples[0].as_example()})
    result = metric.compute(mode="official")
    assert result["Seen"]["J"] == pytest.approx(1.0)
    assert result["Unseen"]["J"] == pytest.approx(1 / 3)
    assert result["Mix"]["J"] == pytest.approx((1 + 1 / 3) / 2)
    assert result["Mix"]["F"] == pytest.approx((result["Seen"]["F"] + result["Unseen"]["F"]) / 2)
    assert result["Null"] == {"S": pytest.approx(1.0)}
    assert "J" not in result["splits"]["test_n"]
