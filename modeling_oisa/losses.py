"""Per-frame mask losses of OISA: presence cross-entropy and point-sampled BCE and Dice."""

import torch
from torch.nn import functional as F
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerLoss,
    dice_loss,
    sample_point,
    sigmoid_cross_entropy_loss,
)


def presence_loss(class_logits: torch.Tensor, gt_masks: torch.Tensor, no_object_weight: float) -> torch.Tensor:
    """Weighted 2-class cross-entropy over frames (N, 2): class 0 when the frame's GT (N, H, W) is non-empty, else 1."""
    targets = (gt_masks.flatten(1).sum(-1) == 0).long()
    weight = torch.tensor([1.0, no_object_weight], dtype=class_logits.dtype, device=class_logits.device)
    return F.cross_entropy(class_logits, targets, weight=weight)


def sample_uncertain_points(
    mask_logits: torch.Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float
) -> torch.Tensor:
    """PointRend's sampler: the most uncertain of `oversample_ratio * num_points` random points plus fresh random ones."""
    # the sampler is a stateless method of Mask2FormerLoss; building the loss would also build its Hungarian matcher
    return Mask2FormerLoss.sample_points_using_uncertainty(
        None,
        mask_logits[:, None],
        lambda logits: -logits.abs(),
        num_points,
        oversample_ratio,
        importance_sample_ratio,
    )


def point_mask_losses(
    mask_logits: torch.Tensor,
    gt_masks: torch.Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    point_coords: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """
    BCE and Dice at sampled points of mask logits (N, h, w) against GT masks (N, H, W) in {0, 1}, each summed over frames
    and divided by the number of frames with a non-empty GT (at least 1). `point_coords` (N, P, 2) in [0, 1] replaces
    the random sampling. Returns `bce`, `dice` and the `point_coords` used.
    """
    num_masks = max(int((gt_masks.flatten(1).sum(-1) > 0).sum()), 1)
    with torch.no_grad():
        if point_coords is None:
            point_coords = sample_uncertain_points(mask_logits.float(), num_points, oversample_ratio, importance_sample_ratio)
        point_labels = sample_point(gt_masks[:, None].float(), point_coords, align_corners=False).squeeze(1)
    point_logits = sample_point(mask_logits[:, None].float(), point_coords, align_corners=False).squeeze(1)
    return {
        "bce": sigmoid_cross_entropy_loss(point_logits, point_labels, num_masks),
        "dice": dice_loss(point_logits, point_labels, num_masks),
        "point_coords": point_coords,
    }
