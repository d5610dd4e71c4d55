"""Pure-PyTorch multi-scale deformable attention: the numerical reference and the fallback of the compiled kernels."""

from collections.abc import Sequence

import torch
from torch.nn import functional as F


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """
    value (N, S, M, D) holding the levels of `spatial_shapes` ((H, W) each) one after the other, sampling_locations
    (N, Lq, M, L, P, 2) normalised (x, y), attention_weights (N, Lq, M, L, P) -> output (N, Lq, M * D).
    """
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    level_values = value.split([height * width for height, width in spatial_shapes], dim=1)
    # grid_sample with align_corners=False maps grid g to pixel ((g + 1) * size - 1) / 2, i.e. loc * size - 0.5
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (height, width) in enumerate(spatial_shapes):
        level_value = level_values[level].permute(0, 2, 3, 1).reshape(batch * heads, channels, height, width)
        level_grid = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, queries, points, 2)
        sampled.append(
            F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (N*M, D, Lq, L*P) samples weighted by (N*M, 1, Lq, L*P) attention, summed over levels and points
    samples = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    output = (samples * weights).sum(-1).view(batch, heads * channels, queries)
    return output.transpose(1, 2).contiguous()
