// Multi-scale deformable attention on CUDA: forward and backward of oisa_kernels::ms_deform_attn.
//
// Layouts (all contiguous): value (N, S, M, D), sampling locations (N, Lq, M, L, P, 2) as normalised (x, y),
// attention weights (N, Lq, M, L, P), output (N, Lq, M, D). A "group" is one (n, q, m); its channels are spread over
// `lanes` consecutive threads (a power of two up to a warp), so the value rows are read and written coalesced.
// float16 and bfloat16 values are read as stored and accumulated in float32; locations and weights are used in the
// accumulation type.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "ms_deform_attn_common.h"

namespace oisa_kernels {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;

// One thread per (n, q, m, channel chunk): the chunk of a lane is its channels lane, lane + lanes, ... Every output
// element has exactly one writer, so the forward needs no atomics.
template <typename scalar_t, typename opmath_t>
__global__ void forward_kernel(
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index,
    const opmath_t* __restrict__ sampling_locations,
    const opmath_t* __restrict__ attention_weights,
    scalar_t* __restrict__ output,
    const MsdaSizes sizes,
    const int lanes) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t group = thread / lanes;
  const int lane = static_cast<int>(thread % lanes);
  if (group >= sizes.batch * sizes.queries * sizes.heads) {
    return;
  }
  const int64_t batch = group / (sizes.queries * sizes.heads);
  const int64_t head = group % sizes.heads;
  const int64_t row_stride = sizes.heads * sizes.channels;
  const int64_t samples = sizes.levels * sizes.points;
  const scalar_t* value_slice = value + batch * sizes.num_values * row_stride + head * sizes.channels;
  for (int64_t channel = lane; channel < sizes.channels; channel += lanes) {
    opmath_t sum = 0;
    for (int64_t level = 0; level < sizes.levels; ++level) {
      const int64_t height = spatial_shapes[2 * level];
      const int64_t width = spatial_shapes[2 * level + 1];
      const scalar_t* value_level = value_slice + level_start_index[level] * row_stride + channel;
      for (int64_t point = 0; point < sizes.points; ++point) {
        const int64_t sample = group * samples + level * sizes.points + point;
        Corners<opmath_t> corners;
        if (!bilinear_corners(
                sampling_locations[2 * sample], sampling_locations[2 * sample + 1], height, width, corners)) {
          continue;
        }
        opmath_t sampled = 0;
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          if (corners.index[corner] >= 0) {
            sampled += corners.weight[corner] * static_cast<opmath_t>(value_level[corners.index[corner] * row_stride]);
          }
        }
        sum += attention_weights[sample] * sampled;
      }
    }
    output[group * sizes.channels + channel] = static_cast<scalar_t>(sum);
  }
}

// Same thread layout as the forward. The value gradient is scattered with atomicAdd (coalesced across the lanes of a
// group); the location and weight gradients are sums over channels, reduced with shuffles inside the group, whose
// lanes are an aligned power-of-two slice of one warp. All lanes of a group share its sample, so they take the same
// branches and reach every shuffle together.
template <typename scalar_t, typename opmath_t>
__global__ void backward_kernel(
    const scalar_t* __restrict__ grad_output,
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index,
    const opmath_t* __restrict__ sampling_locations,
    const opmath_t* __restrict__ attention_weights,
    opmath_t* __restrict__ grad_value,
    opmath_t* __restrict__ grad_locations,
    opmath_t* __restrict__ grad_weights,
    const MsdaSizes sizes,
    const int lanes) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t group = thread / lanes;
  const int lane = static_cast<int>(thread % lanes);
  if (group >= sizes.batch * sizes.queries * sizes.heads) {
    return;
  }
  const unsigned group_mask = lanes == kWarpSize
      ? 0xffffffffu
      : ((1u << lanes) - 1u) << ((threadIdx.x % kWarpSize) / lanes * lanes);
  const int64_t batch = group / (sizes.queries * sizes.heads);
  const int64_t head = group % sizes.heads;
  const int64_t row_stride = sizes.heads * sizes.channels;
  const int64_t samples = sizes.levels * sizes.points;
  const int64_t slice_offset = batch * sizes.num_values * row_stride + head * sizes.channels;
  const scalar_t* grad_out = grad_output + group * sizes.channels;
  for (int64_t level = 0; level < sizes.levels; ++level) {
    const int64_t height = spatial_shapes[2 * level];
    const int64_t width = spatial_shapes[2 * level + 1];
    const int64_t level_offset = slice_offset + level_start_index[level] * row_stride;
    for (int64_t point = 0; point < sizes.points; ++point) {
      const int64_t sample = group * samples + level * sizes.points + point;
      Corners<opmath_t> corners;
      if (!bilinear_corners(
              sampling_locations[2 * sample], sampling_locations[2 * sample + 1], height, width, corners)) {
        continue;  // the gradients of this sample stay zero
      }
      const opmath_t attention = attention_weights[sample];
      opmath_t dots[4] = {0, 0, 0, 0};
      for (int64_t channel = lane; channel < sizes.channels; channel += lanes) {
        const opmath_t grad = static_cast<opmath_t>(grad_out[channel]);
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          if (corners.index[corner] >= 0) {
            const int64_t offset = level_offset + corners.index[corner] * row_stride + channel;
            dots[corner] += grad * static_cast<opmath_t>(value[offset]);
            atomicAdd(grad_value + offset, attention * corners.weight[corner] * grad);
          }
        }
      }
      const opmath_t rest_h = opmath_t(1) - corners.frac_h;
      const opmath_t rest_w = opmath_t(1) - corners.frac_w;
      opmath_t grad_weight = corners.weight[0] * dots[0] + corners.weight[1] * dots[1] +
          corners.weight[2] * dots[2] + corners.weight[3] * dots[3];
      // Derivatives of the bilinear weights along w and h; scaled by dw/dx = W and dh/dy = H below.
      opmath_t grad_w = attention * (rest_h * (dots[1] - dots[0]) + corners.frac_h * (dots[3] - dots[2]));
      opmath_t grad_h = attention * (rest_w * (dots[2] - dots[0]) + corners.frac_w * (dots[3] - dots[1]));
      for (int offset = lanes / 2; offset > 0; offset /= 2) {
        grad_weight += __shfl_xor_sync(group_mask, grad_weight, offset);
        grad_w += __shfl_xor_sync(group_mask, grad_w, offset);
        grad_h += __shfl_xor_sync(group_mask, grad_h, offset);
      }
      if (lane == 0) {
        grad_weights[sample] = grad_weight;
        grad_locations[2 * sample] = grad_w * static_cast<opmath_t>(width);
        grad_locations[2 * sample + 1] = grad_h * static_cast<opmath_t>(height);
      }
    }
  }
}

// Lanes per group: the channels rounded up to a power of two, at most a warp, so that a group never straddles warps.
int lanes_for(int64_t channels) {
  int lanes = 1;
  while (lanes < channels && lanes < kWarpSize) {
    lanes *= 2;
  }
  return lanes;
}

unsigned int blocks_for(const MsdaSizes& sizes, int lanes) {
  const int64_t threads = sizes.batch * sizes.queries * sizes.heads * lanes;
  const int64_t blocks = (threads + kThreadsPerBlock - 1) / kThreadsPerBlock;
  TORCH_CHECK(
      blocks <= INT32_MAX, "ms_deform_attn (CUDA kernel): too many queries for one launch (", threads, " threads)");
  return static_cast<unsigned int>(blocks);
}

void check_cuda(const at::Tensor& tensor, const at::Tensor& value, const char* name) {
  TORCH_CHECK(
      tensor.device() == value.device(),
      "ms_deform_attn (CUDA kernel): ",
      name,
      " must be on ",
      value.device(),
      ", got ",
      tensor.device());
}

// The level tables are tiny and may come from the host (where they are also checked against the value rows).
at::Tensor on_value_device(const at::Tensor& table, const at::Tensor& value) {
  return table.to(value.device()).contiguous();
}

at::Tensor ms_deform_attn_forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const MsdaSizes sizes =
      check_msda_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn (CUDA kernel): value must be a CUDA tensor");
  check_cuda(sampling_locations, value, "sampling_locations");
  check_cuda(attention_weights, value, "attention_weights");
  if (spatial_shapes.device().is_cpu() && level_start_index.device().is_cpu()) {
    check_levels_on_host(spatial_shapes, level_start_index, sizes.num_values);
  }
  const c10::cuda::CUDAGuard device_guard(value.device());
  const at::Tensor shapes = on_value_device(spatial_shapes, value);
  const at::Tensor starts = on_value_device(level_start_index, value);
  const at::Tensor value_c = value.contiguous();
  at::Tensor output = at::empty({sizes.batch, sizes.queries, sizes.heads * sizes.channels}, value_c.options());
  const int lanes = lanes_for(sizes.channels);
  const unsigned int blocks = blocks_for(sizes, lanes);
  if (blocks == 0 || sizes.channels == 0) {
    return output.zero_();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value_c.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const at::ScalarType op_type = c10::CppTypeToScalarType<opmath_t>::value;
    const at::Tensor locations_c = sampling_locations.to(op_type).contiguous();
    const at::Tensor weights_c = attention_weights.to(op_type).contiguous();
    forward_kernel<scalar_t, opmath_t><<<blocks, kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
        value_c.data_ptr<scalar_t>(),
        shapes.data_ptr<int64_t>(),
        starts.data_ptr<int64_t>(),
        locations_c.data_ptr<opmath_t>(),
        weights_c.data_ptr<opmath_t>(),
        output.data_ptr<scalar_t>(),
        sizes,
        lanes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output,
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const MsdaSizes sizes =
      check_msda_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn (CUDA kernel): value must be a CUDA tensor");
  check_cuda(grad_output, value, "grad_output");
  check_cuda(sampling_locations, value, "sampling_locations");
  check_cuda(attention_weights, value, "attention_weights");
  TORCH_CHECK(
      grad_output.numel() == sizes.batch * sizes.queries * sizes.heads * sizes.channels,
      "ms_deform_attn_backward: grad_output must be (N, Lq, M * D), got ",
      grad_output.sizes());
  if (spatial_shapes.device().is_cpu() && level_start_index.device().is_cpu()) {
    check_levels_on_host(spatial_shapes, level_start_index, sizes.num_values);
  }
  const c10::cuda::CUDAGuard device_guard(value.device());
  const at::Tensor shapes = on_value_device(spatial_shapes, value);
  const at::Tensor starts = on_value_device(level_start_index, value);
  const at::Tensor value_c = value.contiguous();
  const at::Tensor grad_output_c = grad_output.to(value_c.scalar_type()).contiguous();
  const int lanes = lanes_for(sizes.channels);
  const unsigned int blocks = blocks_for(sizes, lanes);
  at::Tensor grad_value;
  at::Tensor grad_locations;
  at::Tensor grad_weights;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value_c.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const at::ScalarType op_type = c10::CppTypeToScalarType<opmath_t>::value;
    const at::Tensor locations_c = sampling_locations.to(op_type).contiguous();
    const at::Tensor weights_c = attention_weights.to(op_type).contiguous();
    // accumulated in the accumulation type: atomics on half-precision rows would round at every add
    grad_value = at::zeros(value_c.sizes(), value_c.options().dtype(op_type));
    grad_locations = at::zeros(locations_c.sizes(), locations_c.options());
    grad_weights = at::zeros(weights_c.sizes(), weights_c.options());
    if (blocks > 0 && sizes.channels > 0) {
      backward_kernel<scalar_t, opmath_t><<<blocks, kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
          grad_output_c.data_ptr<scalar_t>(),
          value_c.data_ptr<scalar_t>(),
          shapes.data_ptr<int64_t>(),
          starts.data_ptr<int64_t>(),
          locations_c.data_ptr<opmath_t>(),
          weights_c.data_ptr<opmath_t>(),
          grad_value.data_ptr<opmath_t>(),
          grad_locations.data_ptr<opmath_t>(),
          grad_weights.data_ptr<opmath_t>(),
          sizes,
          lanes);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return std::make_tuple(
      grad_value.to(value.scalar_type()),
      grad_locations.to(sampling_locations.scalar_type()),
      grad_weights.to(attention_weights.scalar_type()));
}

} // namespace

// The schemas are defined in Python (oisa_kernels/ops.py) so that the CPU and CUDA libraries can be built and
// loaded independently; this library only adds the CUDA kernels.
TORCH_LIBRARY_IMPL(oisa_kernels, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

} // namespace oisa_kernels
