"""Multi-scale deformable attention shared by the ViT-Adapter and the pixel decoder."""

import contextlib
import math

import torch
from torch import nn
from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention


# the compiled kernels are optional: these files also run as flat Hub remote code, where the package may be absent
try:
    import oisa_kernels
except ImportError:
    oisa_kernels = None


class OisaMultiscaleDeformableAttention(nn.Module):
    """
    Deformable attention of Deformable DETR with a value width of `int(embed_dim * ratio)` (the ViT-Adapter uses 0.25,
    the pixel decoder 1.0). Its forward signature is the one `Mask2FormerPixelDecoderEncoderLayer` calls, so it
    replaces the pixel decoder's own attention without changing weight names.
    """

    def __init__(self, embed_dim: int, num_heads: int, n_levels: int, n_points: int, ratio: float = 1.0):
        super().__init__()
        value_dim = int(embed_dim * ratio)
        if embed_dim % num_heads or value_dim % num_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) and the value width ({value_dim}) must be divisible by num_heads ({num_heads})."
            )
        self.embed_dim = embed_dim
        self.value_dim = value_dim
        self.n_heads = num_heads
        self.n_levels = n_levels
        self.n_points = n_points

        self.sampling_offsets = nn.Linear(embed_dim, num_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * n_levels * n_points)
        self.value_proj = nn.Linear(embed_dim, value_dim)
        self.output_proj = nn.Linear(value_dim, embed_dim)

    def offset_grid(self) -> torch.Tensor:
        """Initial sampling offsets: head m looks along angle 2*pi*m/heads, point p at distance p+1."""
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        return grid.flatten()

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        position_embeddings: torch.Tensor | None = None,
        reference_points: torch.Tensor | None = None,
        spatial_shapes_list: list[tuple[int, int]] | None = None,
        level_start_index: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        hidden_states (N, Lq, C) are the queries, encoder_hidden_states (N, S, C) the values over the levels of
        `spatial_shapes_list`, reference_points (N, Lq, L, 2) normalised (x, y); attention_mask (N, S) marks padded
        values with True. Returns the output (N, Lq, C) and the attention weights (N, Lq, M, L, P).
        """
        if position_embeddings is not None:
            hidden_states = hidden_states + position_embeddings
        batch_size, num_queries, _ = hidden_states.shape
        sequence_length = encoder_hidden_states.shape[1]
        if sum(height * width for height, width in spatial_shapes_list) != sequence_length:
            raise ValueError(
                f"The spatial shapes {spatial_shapes_list} do not cover the {sequence_length} values given."
            )

        value = self.value_proj(encoder_hidden_states)
        if attention_mask is not None:
            value = value.masked_fill(attention_mask[..., None], 0.0)
        value = value.view(batch_size, sequence_length, self.n_heads, self.value_dim // self.n_heads)

        sampling_offsets = self.sampling_offsets(hidden_states).view(
            batch_size, num_queries, self.n_heads, self.n_levels, self.n_points, 2
        )
        attention_weights = self.attention_weights(hidden_states).view(
            batch_size, num_queries, self.n_heads, self.n_levels * self.n_points
        )
        attention_weights = softmax_over_short_rows(attention_weights).view(
            batch_size, num_queries, self.n_heads, self.n_levels, self.n_points
        )
        # offsets are in pixels of each level: x is divided by the level's width, y by its height
        offset_normalizer = torch.tensor(
            [[width, height] for height, width in spatial_shapes_list],
            dtype=reference_points.dtype,
            device=reference_points.device,
        )
        # reference + offset / normalizer in one pass (the same values as the division then the sum)
        sampling_locations = torch.addcdiv(
            reference_points[:, :, None, :, None, :], sampling_offsets, offset_normalizer[None, None, None, :, None, :]
        )
        if oisa_kernels is not None:
            output = oisa_kernels.ms_deform_attn(
                value, spatial_shapes_list, None, sampling_locations.to(value.dtype), attention_weights.to(value.dtype)
            )
        else:
            output = multi_scale_deformable_attention(
                value, spatial_shapes_list, sampling_locations.to(value.dtype), attention_weights.to(value.dtype)
            )
        return self.output_proj(output), attention_weights


def softmax_over_short_rows(scores: torch.Tensor) -> torch.Tensor:
    """
    Softmax over the last dimension when it is a few values long (a head's 4 to 12 sampling points). On the CPU torch's
    softmax over the last dimension works row by row, which for rows this short takes about 5 times as long as the same
    softmax over the first dimension of the transposed rows, where it works across rows (27 ms against 5 ms for the
    pixel decoder's 8x4116x8 rows of 12 on 2 cores; equal within a float32 ulp): so it runs that way there.
    """
    if scores.device.type != "cpu":
        return scores.softmax(-1)
    rows = scores.reshape(-1, scores.shape[-1])
    return rows.t().softmax(0).t().reshape(scores.shape)


def cell_centre_reference_points(
    spatial_shapes_list: list[tuple[int, int]], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Normalised (x, y) centres of every cell of the given grids, concatenated: shape (sum(H*W), 2)."""
    points = []
    for height, width in spatial_shapes_list:
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, height - 0.5, height, dtype=dtype, device=device) / height,
            torch.linspace(0.5, width - 0.5, width, dtype=dtype, device=device) / width,
            indexing="ij",
        )
        points.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))
    return torch.cat(points, 0)


def forward_in_float32(module: nn.Module, *args: torch.Tensor, **kwargs) -> object:
    """
    Runs `module` in float32, as CUDA autocast with `dtype=float32` does in the original: floating tensor inputs are
    cast to float32 and autocast is off inside. `OisaForReferringSegmentation` keeps the parameters of these modules in
    float32 in every dtype, so a call costs only the casts of its inputs (and the caller's cast of the output). A module
    whose parameters were cast to a lower precision all the same (DeepSpeed's and FSDP's bf16 training cast every
    parameter themselves) runs on float32 copies of them, made on each call, through which gradients still reach them.
    """
    args = tuple(_to_float32(value) for value in args)
    kwargs = {name: _to_float32(value) for name, value in kwargs.items()}
    params = dict(module.named_parameters())
    device_type = next(iter(params.values())).device.type
    with _autocast_off(device_type):
        if all(param.dtype == torch.float32 for param in params.values()):
            return module(*args, **kwargs)
        float_params = {name: param.float() for name, param in params.items()}
        return torch.func.functional_call(module, float_params, args, kwargs)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _to_float32(value: object) -> object:
    """Floating tensors to float32, also inside lists and tuples (the pixel decoder takes a list of maps)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(item) for item in value)
    return value
