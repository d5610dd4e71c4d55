"""
Schema, fake (meta) kernels and autograd of the `oisa_kernels::ms_deform_attn` operator.

The CPU and CUDA kernels are registered by the compiled libraries (`csrc/`) when `backend.load_extension` loads them;
defining the schemas here lets either library load alone and keeps meta tensors and `torch.compile` working without
any compiled code.
"""

import torch


FORWARD = "oisa_kernels::ms_deform_attn"
BACKWARD = "oisa_kernels::ms_deform_attn_backward"


def _forward_fake(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    batch, _, heads, channels = value.shape
    return value.new_empty((batch, sampling_locations.shape[1], heads * channels))


def _backward_fake(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # the kernels return contiguous gradients in the dtypes of the inputs
    return (
        value.new_empty(value.shape),
        sampling_locations.new_empty(sampling_locations.shape),
        attention_weights.new_empty(attention_weights.shape),
    )


def _setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output: torch.Tensor) -> tuple:
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = torch.ops.oisa_kernels.ms_deform_attn_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return grad_value, None, None, grad_locations, grad_weights


_LIBRARY = torch.library.Library("oisa_kernels", "DEF")
_LIBRARY.define(
    "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
    "Tensor attention_weights) -> Tensor"
)
_LIBRARY.define(
    "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
    "Tensor sampling_locations, Tensor attention_weights) -> (Tensor, Tensor, Tensor)"
)
torch.library.register_fake(FORWARD, _forward_fake, lib=_LIBRARY)
torch.library.register_fake(BACKWARD, _backward_fake, lib=_LIBRARY)
torch.library.register_autograd(FORWARD, _backward, setup_context=_setup_context, lib=_LIBRARY)
