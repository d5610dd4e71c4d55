// Multi-scale deformable attention on the CPU: forward and backward of oisa_kernels::ms_deform_attn.
//
// Layouts (all contiguous): value (N, S, M, D), sampling locations (N, Lq, M, L, P, 2) as normalised (x, y),
// attention weights (N, Lq, M, L, P), output (N, Lq, M, D). Each sample reads four D-long value rows, so the inner
// loops run over the contiguous channels and vectorise. float16 and bfloat16 tensors are read as stored and each
// element is widened to float32 where it is used: sums, bilinear weights and gradients are accumulated in float32 and
// rounded once, when written out; no input is converted as a whole.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ms_deform_attn_common.h"

namespace oisa_kernels {
namespace {

// How the channel loops read and write scalar_t: as `stored` elements, widened to the accumulation type `opmath` and
// narrowed back. bfloat16 is read as its raw bits (the upper half of a float32), so that widening is a shift and
// narrowing a rounding to nearest even that the compiler vectorises; c10::BFloat16's own conversions do not vectorise.
template <typename scalar_t>
struct Elements {
  using stored = scalar_t;
  using opmath = at::opmath_type<scalar_t>;
  static opmath widen(stored element) {
    return static_cast<opmath>(element);
  }
  static stored narrow(opmath number) {
    return static_cast<stored>(number);
  }
};

template <>
struct Elements<c10::BFloat16> {
  using stored = uint16_t;
  using opmath = float;
  static float widen(uint16_t bits) {
    const uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float number;
    std::memcpy(&number, &wide, sizeof(number));
    return number;
  }
  static uint16_t narrow(float number) {
    uint32_t bits;
    std::memcpy(&bits, &number, sizeof(bits));
    const uint16_t rounded = static_cast<uint16_t>((bits + ((bits >> 16) & 1) + UINT32_C(0x7FFF)) >> 16);
    // a NaN whose payload is only in the dropped bits would round to infinity
    return number != number ? UINT16_C(0x7FC0) : rounded;
  }
};

// Rounds `count` accumulated values into `destination`.
template <typename scalar_t>
void store(
    const at::opmath_type<scalar_t>* accumulated,
    typename Elements<scalar_t>::stored* destination,
    int64_t count) {
#pragma omp simd
  for (int64_t index = 0; index < count; ++index) {
    destination[index] = Elements<scalar_t>::narrow(accumulated[index]);
  }
}

// scalar_t is the type of value, output and their gradients, read and written as Elements<scalar_t>::stored; coord_t
// the type of the sampling locations, attention weights and their gradients (scalar_t or its accumulation type).
// kChannels > 0 fixes the channel count at compile time, so the channel loops unroll into whole vector registers; 0
// reads it from `sizes`.
template <typename scalar_t, typename coord_t, int64_t kChannels>
void forward_kernel(
    const MsdaSizes& sizes,
    const typename Elements<scalar_t>::stored* value,
    const int64_t* spatial_shapes,
    const int64_t* level_start_index,
    const coord_t* sampling_locations,
    const coord_t* attention_weights,
    typename Elements<scalar_t>::stored* output) {
  using stored_t = typename Elements<scalar_t>::stored;
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr bool kInPlace = std::is_same_v<stored_t, opmath_t>;
  const int64_t channels = kChannels > 0 ? kChannels : sizes.channels;
  const int64_t row_stride = sizes.heads * channels;
  const int64_t samples = sizes.levels * sizes.points;
  // One task is a few (batch, query) rows; each writes only its own output rows, so no synchronisation is needed.
  at::parallel_for(0, sizes.batch * sizes.queries, 16, [&](int64_t begin, int64_t end) {
    // Corners outside the level read this zero row, which keeps the channel loop free of branches.
    const std::vector<stored_t> zeros(channels, stored_t(0));
    // float16 and bfloat16 rows are summed here, then rounded into the output
    std::vector<opmath_t> sums(kInPlace ? 0 : channels);
    for (int64_t batch_query = begin; batch_query < end; ++batch_query) {
      const stored_t* value_batch = value + (batch_query / sizes.queries) * sizes.num_values * row_stride;
      for (int64_t head = 0; head < sizes.heads; ++head) {
        const int64_t group = batch_query * sizes.heads + head;
        opmath_t* __restrict__ out;
        if constexpr (kInPlace) {
          out = output + group * channels;
        } else {
          out = sums.data();
        }
        std::fill(out, out + channels, opmath_t(0));
        for (int64_t level = 0; level < sizes.levels; ++level) {
          const int64_t height = spatial_shapes[2 * level];
          const int64_t width = spatial_shapes[2 * level + 1];
          const stored_t* value_level = value_batch + level_start_index[level] * row_stride + head * channels;
          for (int64_t point = 0; point < sizes.points; ++point) {
            const int64_t sample = group * samples + level * sizes.points + point;
            Corners<opmath_t> corners;
            if (!bilinear_corners(
                    static_cast<opmath_t>(sampling_locations[2 * sample]),
                    static_cast<opmath_t>(sampling_locations[2 * sample + 1]),
                    height,
                    width,
                    corners)) {
              continue;
            }
            const opmath_t attention = static_cast<opmath_t>(attention_weights[sample]);
            const stored_t* rows[4];
            opmath_t coefficients[4];
            for (int corner = 0; corner < 4; ++corner) {
              const bool inside = corners.index[corner] >= 0;
              rows[corner] = inside ? value_level + corners.index[corner] * row_stride : zeros.data();
              coefficients[corner] = inside ? attention * corners.weight[corner] : opmath_t(0);
            }
            const stored_t* __restrict__ v0 = rows[0];
            const stored_t* __restrict__ v1 = rows[1];
            const stored_t* __restrict__ v2 = rows[2];
            const stored_t* __restrict__ v3 = rows[3];
            const opmath_t c0 = coefficients[0], c1 = coefficients[1], c2 = coefficients[2], c3 = coefficients[3];
#pragma omp simd
            for (int64_t d = 0; d < channels; ++d) {
              out[d] += c0 * Elements<scalar_t>::widen(v0[d]) + c1 * Elements<scalar_t>::widen(v1[d]) +
                  c2 * Elements<scalar_t>::widen(v2[d]) + c3 * Elements<scalar_t>::widen(v3[d]);
            }
          }
        }
        if constexpr (!kInPlace) {
          store<scalar_t>(out, output + group * channels, channels);
        }
      }
    }
  });
}

// The value gradient is a scatter. A task is one batch element and a range of heads, so every thread owns the value
// rows it writes: the backward needs neither atomics nor per-thread copies of the gradient. Whole batch elements
// (all heads of a query together) read memory most locally; heads are split only when the batch alone cannot keep
// the threads busy. float32 and float64 tasks add into the gradient itself; float16 and bfloat16 tasks sum their
// block of it, (S, heads of the task, D), in a float32 buffer of their thread and round it into the gradient at the
// end.
template <typename scalar_t, typename coord_t, int64_t kChannels>
void backward_kernel(
    const MsdaSizes& sizes,
    const typename Elements<scalar_t>::stored* grad_output,
    const typename Elements<scalar_t>::stored* value,
    const int64_t* spatial_shapes,
    const int64_t* level_start_index,
    const coord_t* sampling_locations,
    const coord_t* attention_weights,
    typename Elements<scalar_t>::stored* grad_value,
    coord_t* grad_locations,
    coord_t* grad_weights) {
  using stored_t = typename Elements<scalar_t>::stored;
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr bool kInPlace = std::is_same_v<stored_t, opmath_t>;
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
  // rows of the gradient being summed: those of the gradient itself, or of the task's buffer
  const int64_t sum_stride = kInPlace ? row_stride : heads_per_block * channels;
  at::parallel_for(0, sizes.batch * blocks_per_batch, 1, [&](int64_t begin, int64_t end) {
    // Corners outside the level read a zero row and write to private sink rows, one per corner so that the four
    // written rows of the channel loop never alias.
    const std::vector<stored_t> zeros(channels, stored_t(0));
    std::vector<opmath_t> sinks(4 * channels, opmath_t(0));
    std::vector<opmath_t> buffer(kInPlace ? 0 : sizes.num_values * sum_stride);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t batch = task / blocks_per_batch;
      const int64_t first_head = (task % blocks_per_batch) * heads_per_block;
      const int64_t last_head = std::min(sizes.heads, first_head + heads_per_block);
      const int64_t batch_offset = batch * sizes.num_values * row_stride;
      // sums[row * sum_stride + (head - first_head) * channels + d] is the gradient of value[batch, row, head, d]
      opmath_t* sums;
      if constexpr (kInPlace) {
        sums = grad_value + batch_offset + first_head * channels;
      } else {
        std::fill(buffer.begin(), buffer.end(), opmath_t(0));
        sums = buffer.data();
      }
      for (int64_t query = 0; query < sizes.queries; ++query) {
        for (int64_t head = first_head; head < last_head; ++head) {
          const int64_t group = (batch * sizes.queries + query) * sizes.heads + head;
          const stored_t* __restrict__ grad_out = grad_output + group * channels;
          for (int64_t level = 0; level < sizes.levels; ++level) {
            const int64_t height = spatial_shapes[2 * level];
            const int64_t width = spatial_shapes[2 * level + 1];
            const stored_t* value_level =
                value + batch_offset + level_start_index[level] * row_stride + head * channels;
            opmath_t* sums_level = sums + level_start_index[level] * sum_stride + (head - first_head) * channels;
            for (int64_t point = 0; point < sizes.points; ++point) {
              const int64_t sample = group * samples + level * sizes.points + point;
              Corners<opmath_t> corners;
              if (!bilinear_corners(
                      static_cast<opmath_t>(sampling_locations[2 * sample]),
                      static_cast<opmath_t>(sampling_locations[2 * sample + 1]),
                      height,
                      width,
                      corners)) {
                grad_locations[2 * sample] = coord_t(0);
                grad_locations[2 * sample + 1] = coord_t(0);
                grad_weights[sample] = coord_t(0);
                continue;
              }
              const opmath_t attention = static_cast<opmath_t>(attention_weights[sample]);
              const stored_t* rows[4];
              opmath_t* grad_rows[4];
              opmath_t coefficients[4];
              for (int corner = 0; corner < 4; ++corner) {
                const bool inside = corners.index[corner] >= 0;
                rows[corner] = inside ? value_level + corners.index[corner] * row_stride : zeros.data();
                grad_rows[corner] =
                    inside ? sums_level + corners.index[corner] * sum_stride : sinks.data() + corner * channels;
                coefficients[corner] = inside ? attention * corners.weight[corner] : opmath_t(0);
              }
              const stored_t* __restrict__ v0 = rows[0];
              const stored_t* __restrict__ v1 = rows[1];
              const stored_t* __restrict__ v2 = rows[2];
              const stored_t* __restrict__ v3 = rows[3];
              opmath_t* __restrict__ g0 = grad_rows[0];
              opmath_t* __restrict__ g1 = grad_rows[1];
              opmath_t* __restrict__ g2 = grad_rows[2];
              opmath_t* __restrict__ g3 = grad_rows[3];
              const opmath_t c0 = coefficients[0], c1 = coefficients[1], c2 = coefficients[2], c3 = coefficients[3];
              // dot_i = <grad_out, corner row i>; outside corners read zeros, matching grid_sample's zero padding.
              opmath_t dot0 = 0, dot1 = 0, dot2 = 0, dot3 = 0;
#pragma omp simd reduction(+ : dot0, dot1, dot2, dot3)
              for (int64_t d = 0; d < channels; ++d) {
                const opmath_t grad = Elements<scalar_t>::widen(grad_out[d]);
                dot0 += grad * Elements<scalar_t>::widen(v0[d]);
                dot1 += grad * Elements<scalar_t>::widen(v1[d]);
                dot2 += grad * Elements<scalar_t>::widen(v2[d]);
                dot3 += grad * Elements<scalar_t>::widen(v3[d]);
                g0[d] += c0 * grad;
                g1[d] += c1 * grad;
                g2[d] += c2 * grad;
                g3[d] += c3 * grad;
              }
              const opmath_t rest_h = opmath_t(1) - corners.frac_h;
              const opmath_t rest_w = opmath_t(1) - corners.frac_w;
              grad_weights[sample] = static_cast<coord_t>(
                  corners.weight[0] * dot0 + corners.weight[1] * dot1 + corners.weight[2] * dot2 +
                  corners.weight[3] * dot3);
              // Derivatives of the bilinear weights along w and h, scaled by dw/dx = W and dh/dy = H.
              const opmath_t grad_w = attention * (rest_h * (dot1 - dot0) + corners.frac_h * (dot3 - dot2));
              const opmath_t grad_h = attention * (rest_w * (dot2 - dot0) + corners.frac_w * (dot3 - dot1));
              grad_locations[2 * sample] = static_cast<coord_t>(grad_w * static_cast<opmath_t>(width));
              grad_locations[2 * sample + 1] = static_cast<coord_t>(grad_h * static_cast<opmath_t>(height));
            }
          }
        }
      }
      if constexpr (!kInPlace) {
        for (int64_t row = 0; row < sizes.num_values; ++row) {
          store<scalar_t>(
              sums + row * sum_stride,
              grad_value + batch_offset + row * row_stride + first_head * channels,
              (last_head - first_head) * channels);
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

// The type the kernels read the sampling locations and attention weights in: value's type when both are in it and it
// is float16 or bfloat16, otherwise value's accumulation type (so float32 locations for bfloat16 values keep their
// precision). Inputs in another type are converted to it.
at::ScalarType coord_type(
    const at::Tensor& value, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const at::ScalarType type = value.scalar_type();
  if (sampling_locations.scalar_type() == type && attention_weights.scalar_type() == type) {
    return type;
  }
  return at::toOpMathType(type);
}

// Runs `body(scalar_t(), coord_t())` for value's type and the type `coords` of the locations and weights.
template <typename Body>
void dispatch(at::ScalarType type, at::ScalarType coords, const Body& body) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "ms_deform_attn_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    if constexpr (!std::is_same_v<scalar_t, opmath_t>) {
      if (coords == type) {
        body(scalar_t(), scalar_t());
        return;
      }
    }
    body(scalar_t(), opmath_t());
  });
}

// The data of a tensor of scalar_t as the elements the kernels read and write.
template <typename scalar_t>
typename Elements<scalar_t>::stored* elements(const at::Tensor& tensor) {
  return reinterpret_cast<typename Elements<scalar_t>::stored*>(tensor.data_ptr<scalar_t>());
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

  const at::ScalarType coords = coord_type(value, sampling_locations, attention_weights);
  const at::Tensor value_c = value.contiguous();
  const at::Tensor locations_c = sampling_locations.to(coords).contiguous();
  const at::Tensor weights_c = attention_weights.to(coords).contiguous();
  const at::Tensor shapes_c = spatial_shapes.contiguous();
  const at::Tensor starts_c = level_start_index.contiguous();
  at::Tensor output = at::empty({sizes.batch, sizes.queries, sizes.heads * sizes.channels}, value_c.options());
  dispatch(value_c.scalar_type(), coords, [&](auto scalar, auto coord) {
    using scalar_t = decltype(scalar);
    using coord_t = decltype(coord);
    with_channels(sizes.channels, [&](auto fixed_channels) {
      forward_kernel<scalar_t, coord_t, decltype(fixed_channels)::value>(
          sizes,
          elements<scalar_t>(value_c),
          shapes_c.data_ptr<int64_t>(),
          starts_c.data_ptr<int64_t>(),
          locations_c.data_ptr<coord_t>(),
          weights_c.data_ptr<coord_t>(),
          elements<scalar_t>(output));
    });
  });
  return output;
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

  const at::ScalarType coords = coord_type(value, sampling_locations, attention_weights);
  const at::Tensor grad_output_c = grad_output.to(value.scalar_type()).contiguous();
  const at::Tensor value_c = value.contiguous();
  const at::Tensor locations_c = sampling_locations.to(coords).contiguous();
  const at::Tensor weights_c = attention_weights.to(coords).contiguous();
  const at::Tensor shapes_c = spatial_shapes.contiguous();
  const at::Tensor starts_c = level_start_index.contiguous();
  // float32 and float64 tasks add straight into the gradient; reduced-precision tasks write all of their rows
  at::Tensor grad_value = value_c.scalar_type() == at::toOpMathType(value_c.scalar_type())
      ? at::zeros(value_c.sizes(), value_c.options())
      : at::empty(value_c.sizes(), value_c.options());
  at::Tensor grad_locations = at::empty(locations_c.sizes(), locations_c.options());
  at::Tensor grad_weights = at::empty(weights_c.sizes(), weights_c.options());
  dispatch(value_c.scalar_type(), coords, [&](auto scalar, auto coord) {
    using scalar_t = decltype(scalar);
    using coord_t = decltype(coord);
    with_channels(sizes.channels, [&](auto fixed_channels) {
      backward_kernel<scalar_t, coord_t, decltype(fixed_channels)::value>(
          sizes,
          elements<scalar_t>(grad_output_c),
          elements<scalar_t>(value_c),
          shapes_c.data_ptr<int64_t>(),
          starts_c.data_ptr<int64_t>(),
          locations_c.data_ptr<coord_t>(),
          weights_c.data_ptr<coord_t>(),
          elements<scalar_t>(grad_value),
          grad_locations.data_ptr<coord_t>(),
          grad_weights.data_ptr<coord_t>());
    });
  });
  return std::make_tuple(
      grad_value,
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
