// Multi-scale deformable attention on the CPU: forward and backward of oisa_kernels::ms_deform_attn.
//
// Layouts (all contiguous): value (N, S, M, D), sampling locations (N, Lq, M, L, P, 2) as normalised (x, y),
// attention weights (N, Lq, M, L, P), output (N, Lq, M, D). Each sample reads four D-long value rows, so the inner
// loops run over the contiguous channels and vectorise. float16 and bfloat16 are computed in float32.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ms_deform_attn_common.h"

namespace oisa_kernels {
namespace {

// kChannels > 0 fixes the channel count at compile time, so the channel loops unroll into whole vector registers; 0
// reads it from `sizes`.
template <typename scalar_t, int64_t kChannels>
void forward_kernel(
    const MsdaSizes& sizes,
    const scalar_t* value,
    const int64_t* spatial_shapes,
    const int64_t* level_start_index,
    const scalar_t* sampling_locations,
    const scalar_t* attention_weights,
    scalar_t* output) {
  const int64_t channels = kChannels > 0 ? kChannels : sizes.channels;
  const int64_t row_stride = sizes.heads * channels;
  const int64_t samples = sizes.levels * sizes.points;
  // One task is a few (batch, query) rows; each writes only its own output rows, so no synchronisation is needed.
  at::parallel_for(0, sizes.batch * sizes.queries, 16, [&](int64_t begin, int64_t end) {
    // Corners outside the level read this zero row, which keeps the channel loop free of branches.
    const std::vector<scalar_t> zeros(channels, scalar_t(0));
    for (int64_t batch_query = begin; batch_query < end; ++batch_query) {
      const scalar_t* value_batch = value + (batch_query / sizes.queries) * sizes.num_values * row_stride;
      for (int64_t head = 0; head < sizes.heads; ++head) {
        const int64_t group = batch_query * sizes.heads + head;
        scalar_t* __restrict__ out = output + group * channels;
        std::fill(out, out + channels, scalar_t(0));
        for (int64_t level = 0; level < sizes.levels; ++level) {
          const int64_t height = spatial_shapes[2 * level];
          const int64_t width = spatial_shapes[2 * level + 1];
          const scalar_t* value_level = value_batch + level_start_index[level] * row_stride + head * channels;
          for (int64_t point = 0; point < sizes.points; ++point) {
            const int64_t sample = group * samples + level * sizes.points + point;
            Corners<scalar_t> corners;
            if (!bilinear_corners(
                    sampling_locations[2 * sample], sampling_locations[2 * sample + 1], height, width, corners)) {
              continue;
            }
            const scalar_t attention = attention_weights[sample];
            const scalar_t* rows[4];
            scalar_t coefficients[4];
            for (int corner = 0; corner < 4; ++corner) {
              const bool inside = corners.index[corner] >= 0;
              rows[corner] = inside ? value_level + corners.index[corner] * row_stride : zeros.data();
              coefficients[corner] = inside ? attention * corners.weight[corner] : scalar_t(0);
            }
            const scalar_t* __restrict__ v0 = rows[0];
            const scalar_t* __restrict__ v1 = rows[1];
            const scalar_t* __restrict__ v2 = rows[2];
            const scalar_t* __restrict__ v3 = rows[3];
            const scalar_t c0 = coefficients[0], c1 = coefficients[1], c2 = coefficients[2], c3 = coefficients[3];
#pragma omp simd
            for (int64_t d = 0; d < channels; ++d) {
              out[d] += c0 * v0[d] + c1 * v1[d] + c2 * v2[d] + c3 * v3[d];
            }
          }
        }
      }
    }
  });
}

// The value gradient is a scatter. A task is one batch element and a range of heads, so every thread owns the value
// rows it writes: the backward needs neither atomics nor per-thread copies of the gradient. Whole batch elements
// (all heads of a query together) read memory most locally; heads are split only when the batch alone cannot keep
// the threads busy.
template <typename scalar_t, int64_t kChannels>
void backward_kernel(
    const MsdaSizes& sizes,
    const scalar_t* grad_output,
    const scalar_t* value,
    const int64_t* spatial_shapes,
    const int64_t* level_start_index,
    const scalar_t* sampling_locations,
    const scalar_t* attention_weights,
    scalar_t* grad_value,
    scalar_t* grad_locations,
    scalar_t* grad_weights) {
  const int64_t channels = kChannels > 0 ? kChannels : sizes.channels;
  const int64_t row_stride = sizes.heads * channels;
  const int64_t samples = sizes.levels * sizes.points;
  if (sizes.batch == 0 || sizes.heads == 0) {
    return;
  }
  const int64_t wanted_tasks = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t head_blocks =
      std::min(sizes.heads, std::max<int64_t>(1, (wanted_tasks + sizes.batch - 1) / sizes.batch));
  const int64_t heads_per_block = (sizes.heads + head_blocks - 1) / head_blocks;
  const int64_t blocks_per_batch = (sizes.heads + heads_per_block - 1) / heads_per_block;
  at::parallel_for(0, sizes.batch * blocks_per_batch, 1, [&](int64_t begin, int64_t end) {
    // Corners outside the level read a zero row and write to private sink rows, one per corner so that the four
    // written rows of the channel loop never alias.
    const std::vector<scalar_t> zeros(channels, scalar_t(0));
    std::vector<scalar_t> sinks(4 * channels, scalar_t(0));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t batch = task / blocks_per_batch;
      const int64_t first_head = (task % blocks_per_batch) * heads_per_block;
      const int64_t last_head = std::min(sizes.heads, first_head + heads_per_block);
      const int64_t batch_offset = batch * sizes.num_values * row_stride;
      for (int64_t query = 0; query < sizes.queries; ++query) {
        for (int64_t head = first_head; head < last_head; ++head) {
          const int64_t group = (batch * sizes.queries + query) * sizes.heads + head;
          const scalar_t* __restrict__ grad_out = grad_output + group * channels;
          for (int64_t level = 0; level < sizes.levels; ++level) {
            const int64_t height = spatial_shapes[2 * level];
            const int64_t width = spatial_shapes[2 * level + 1];
            const int64_t level_offset = batch_offset + level_start_index[level] * row_stride + head * channels;
            for (int64_t point = 0; point < sizes.points; ++point) {
              const int64_t sample = group * samples + level * sizes.points + point;
              Corners<scalar_t> corners;
              if (!bilinear_corners(
                      sampling_locations[2 * sample], sampling_locations[2 * sample + 1], height, width, corners)) {
                grad_locations[2 * sample] = scalar_t(0);
                grad_locations[2 * sample + 1] = scalar_t(0);
                grad_weights[sample] = scalar_t(0);
                continue;
              }
              const scalar_t attention = attention_weights[sample];
              const scalar_t* rows[4];
              scalar_t* grad_rows[4];
              scalar_t coefficients[4];
              for (int corner = 0; corner < 4; ++corner) {
                const bool inside = corners.index[corner] >= 0;
                const int64_t offset = level_offset + corners.index[corner] * row_stride;
                rows[corner] = inside ? value + offset : zeros.data();
                grad_rows[corner] = inside ? grad_value + offset : sinks.data() + corner * channels;
                coefficients[corner] = inside ? attention * corners.weight[corner] : scalar_t(0);
              }
              const scalar_t* __restrict__ v0 = rows[0];
              const scalar_t* __restrict__ v1 = rows[1];
              const scalar_t* __restrict__ v2 = rows[2];
              const scalar_t* __restrict__ v3 = rows[3];
              scalar_t* __restrict__ g0 = grad_rows[0];
              scalar_t* __restrict__ g1 = grad_rows[1];
              scalar_t* __restrict__ g2 = grad_rows[2];
              scalar_t* __restrict__ g3 = grad_rows[3];
              const scalar_t c0 = coefficients[0], c1 = coefficients[1], c2 = coefficients[2], c3 = coefficients[3];
              // dot_i = <grad_out, corner row i>; outside corners read zeros, matching grid_sample's zero padding.
              scalar_t dot0 = 0, dot1 = 0, dot2 = 0, dot3 = 0;
#pragma omp simd reduction(+ : dot0, dot1, dot2, dot3)
              for (int64_t d = 0; d < channels; ++d) {
                const scalar_t grad = grad_out[d];
                dot0 += grad * v0[d];
                dot1 += grad * v1[d];
                dot2 += grad * v2[d];
                dot3 += grad * v3[d];
                g0[d] += c0 * grad;
                g1[d] += c1 * grad;
                g2[d] += c2 * grad;
                g3[d] += c3 * grad;
              }
              const scalar_t rest_h = scalar_t(1) - corners.frac_h;
              const scalar_t rest_w = scalar_t(1) - corners.frac_w;
              grad_weights[sample] = corners.weight[0] * dot0 + corners.weight[1] * dot1 +
                  corners.weight[2] * dot2 + corners.weight[3] * dot3;
              // Derivatives of the bilinear weights along w and h, scaled by dw/dx = W and dh/dy = H.
              const scalar_t grad_w = attention * (rest_h * (dot1 - dot0) + corners.frac_h * (dot3 - dot2));
              const scalar_t grad_h = attention * (rest_w * (dot2 - dot0) + corners.frac_w * (dot3 - dot1));
              grad_locations[2 * sample] = grad_w * static_cast<scalar_t>(width);
              grad_locations[2 * sample + 1] = grad_h * static_cast<scalar_t>(height);
            }
          }
        }
      }
    }
  });
}

// Runs `body` with the channel count as a compile-time constant for the common head widths.
template <typename Body>
void with_channels(int64_t channels, const Body& body) {
  switch (channels) {
    case 16:
      body(std::integral_constant<int64_t, 16>());
      break;
    case 32:
      body(std::integral_constant<int64_t, 32>());
      break;
    case 64:
      body(std::integral_constant<int64_t, 64>());
      break;
    default:
      body(std::integral_constant<int64_t, 0>());
  }
}

// float64 stays float64; every other floating type is computed in float32.
at::ScalarType compute_type(const at::Tensor& value) {
  return value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_cpu(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(
      tensor.device().is_cpu(), "ms_deform_attn (CPU kernel): ", name, " must be on the CPU, got ", tensor.device());
}

at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const MsdaSizes sizes =
      check_msda_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_cpu(value, "value");
  check_cpu(spatial_shapes, "spatial_shapes");
  check_cpu(level_start_index, "level_start_index");
  check_cpu(sampling_locations, "sampling_locations");
  check_cpu(attention_weights, "attention_weights");
  check_levels_on_host(spatial_shapes, level_start_index, sizes.num_values);

  const at::ScalarType type = compute_type(value);
  const at::Tensor value_c = value.to(type).contiguous();
  const at::Tensor locations_c = sampling_locations.to(type).contiguous();
  const at::Tensor weights_c = attention_weights.to(type).contiguous();
  const at::Tensor shapes_c = spatial_shapes.contiguous();
  const at::Tensor starts_c = level_start_index.contiguous();
  at::Tensor output = at::empty({sizes.batch, sizes.queries, sizes.heads * sizes.channels}, value_c.options());
  AT_DISPATCH_FLOATING_TYPES(type, "ms_deform_attn_forward_cpu", [&] {
    with_channels(sizes.channels, [&](auto fixed_channels) {
      forward_kernel<scalar_t, decltype(fixed_channels)::value>(
          sizes,
          value_c.data_ptr<scalar_t>(),
          shapes_c.data_ptr<int64_t>(),
          starts_c.data_ptr<int64_t>(),
          locations_c.data_ptr<scalar_t>(),
          weights_c.data_ptr<scalar_t>(),
          output.data_ptr<scalar_t>());
    });
  });
  return output.to(value.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output,
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const MsdaSizes sizes =
      check_msda_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_cpu(grad_output, "grad_output");
  check_cpu(value, "value");
  check_cpu(spatial_shapes, "spatial_shapes");
  check_cpu(level_start_index, "level_start_index");
  check_cpu(sampling_locations, "sampling_locations");
  check_cpu(attention_weights, "attention_weights");
  TORCH_CHECK(
      grad_output.numel() == sizes.batch * sizes.queries * sizes.heads * sizes.channels,
      "ms_deform_attn_backward: grad_output must be (N, Lq, M * D), got ",
      grad_output.sizes());
  check_levels_on_host(spatial_shapes, level_start_index, sizes.num_values);

  const at::ScalarType type = compute_type(value);
  const at::Tensor grad_output_c = grad_output.to(type).contiguous();
  const at::Tensor value_c = value.to(type).contiguous();
  const at::Tensor locations_c = sampling_locations.to(type).contiguous();
  const at::Tensor weights_c = attention_weights.to(type).contiguous();
  const at::Tensor shapes_c = spatial_shapes.contiguous();
  const at::Tensor starts_c = level_start_index.contiguous();
  at::Tensor grad_value = at::zeros(value_c.sizes(), value_c.options());
  at::Tensor grad_locations = at::empty(locations_c.sizes(), locations_c.options());
  at::Tensor grad_weights = at::empty(weights_c.sizes(), weights_c.options());
  AT_DISPATCH_FLOATING_TYPES(type, "ms_deform_attn_backward_cpu", [&] {
    with_channels(sizes.channels, [&](auto fixed_channels) {
      backward_kernel<scalar_t, decltype(fixed_channels)::value>(
          sizes,
          grad_output_c.data_ptr<scalar_t>(),
          value_c.data_ptr<scalar_t>(),
          shapes_c.data_ptr<int64_t>(),
          starts_c.data_ptr<int64_t>(),
          locations_c.data_ptr<scalar_t>(),
          weights_c.data_ptr<scalar_t>(),
          grad_value.data_ptr<scalar_t>(),
          grad_locations.data_ptr<scalar_t>(),
          grad_weights.data_ptr<scalar_t>());
    });
  });
  return std::make_tuple(
      grad_value.to(value.scalar_type()),
      grad_locations.to(sampling_locations.scalar_type()),
      grad_weights.to(attention_weights.scalar_type()));
}

} // namespace

// The schemas are defined in Python (oisa_kernels/ops.py) so that the CPU and CUDA libraries can be built and
// loaded independently; this library only adds the CPU kernels.
TORCH_LIBRARY_IMPL(oisa_kernels, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

} // namespace oisa_kernels
