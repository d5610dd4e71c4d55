"""
Multi-scale deformable attention (Deformable DETR's MSDeformAttn core) as a compiled PyTorch operator.

`ms_deform_attn` runs the CPU or CUDA kernels of `csrc/` (built on first use) or the pure-PyTorch reference, as chosen
by `backend.backend_for`; the operator `torch.ops.oisa_kernels.ms_deform_attn` supports autograd, meta tensors and
`torch.compile`.
"""

from collections.abc import Sequence

import torch

from . import ops  # noqa: F401  (defines the operator)
from .backend import available_backends, backend_for, build_directory, last_backend, load_extension, requested_backend
from .reference import ms_deform_attn_reference


__all__ = [
    "available_backends",
    "backend_for",
    "build_directory",
    "last_backend",
    "load_extension",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "requested_backend",
]


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | Sequence[tuple[int, int]],
    level_start_index: torch.Tensor | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """
    Multi-scale deformable attention.

    value (N, S, M, D) holds the L levels one after the other; spatial_shapes is (L, 2) int64 or a list of (H, W);
    level_start_index (L,) int64 is the first row of each level in S (None: packed from row 0, which the PyTorch
    fallback always assumes);
    sampling_locations (N, Lq, M, L, P, 2) are normalised (x, y) in [0, 1]; attention_weights (N, Lq, M, L, P).
    Returns (N, Lq, M * D) in value's dtype: for each head, the attention-weighted sum over levels and points of the
    bilinear samples (zero padding, pixel centres at (i + 0.5) / size), as `ms_deform_attn_reference`. float16 and
    bfloat16 are summed in float32 by the compiled kernels; their locations and weights may be float32.
    """
    backend = backend_for(value.device.type)
    if backend == "torch":
        shapes = spatial_shapes.tolist() if isinstance(spatial_shapes, torch.Tensor) else spatial_shapes
        return ms_deform_attn_reference(value, shapes, sampling_locations, attention_weights)
    if isinstance(spatial_shapes, torch.Tensor):
        shapes = spatial_shapes.to(device=value.device, dtype=torch.long)
    else:
        if sum(height * width for height, width in spatial_shapes) != value.shape[1]:
            raise ValueError(f"The spatial shapes {list(spatial_shapes)} do not cover the {value.shape[1]} values.")
        shapes = torch.tensor(spatial_shapes, dtype=torch.long, device=value.device).view(-1, 2)
    if level_start_index is None:
        sizes = shapes[:, 0] * shapes[:, 1]
        level_start_index = sizes.cumsum(0) - sizes
    else:
        level_start_index = level_start_index.to(device=value.device, dtype=torch.long)
    return torch.ops.oisa_kernels.ms_deform_attn(
        value, shapes, level_start_index, sampling_locations, attention_weights
    )
