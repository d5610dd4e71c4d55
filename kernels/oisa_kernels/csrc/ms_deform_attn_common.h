// Sizes, input checks and bilinear sampling shared by the CPU and CUDA kernels of oisa_kernels::ms_deform_attn.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

namespace oisa_kernels {

// Sizes of one call: value (N, S, M, D), sampling locations (N, Lq, M, L, P, 2).
struct MsdaSizes {
  int64_t batch;
  int64_t num_values;
  int64_t heads;
  int64_t channels;
  int64_t queries;
  int64_t levels;
  int64_t points;
};

inline MsdaSizes check_msda_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(
      sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
      "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got ",
      sampling_locations.sizes());
  const MsdaSizes sizes{
      value.size(0),
      value.size(1),
      value.size(2),
      value.size(3),
      sampling_locations.size(1),
      sampling_locations.size(3),
      sampling_locations.size(4)};
  TORCH_CHECK(
      sampling_locations.size(0) == sizes.batch && sampling_locations.size(2) == sizes.heads,
      "ms_deform_attn: sampling_locations ",
      sampling_locations.sizes(),
      " do not match value ",
      value.sizes());
  TORCH_CHECK(
      attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
      "ms_deform_attn: attention_weights must be (N, Lq, M, L, P) = ",
      sampling_locations.sizes().slice(0, 5),
      ", got ",
      attention_weights.sizes());
  TORCH_CHECK(
      spatial_shapes.dim() == 2 && spatial_shapes.size(0) == sizes.levels && spatial_shapes.size(1) == 2,
      "ms_deform_attn: spatial_shapes must be (L, 2) with L = ",
      sizes.levels,
      ", got ",
      spatial_shapes.sizes());
  TORCH_CHECK(
      level_start_index.dim() == 1 && level_start_index.size(0) == sizes.levels,
      "ms_deform_attn: level_start_index must be (L,) with L = ",
      sizes.levels,
      ", got ",
      level_start_index.sizes());
  TORCH_CHECK(
      spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
      "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(
      value.is_floating_point() && sampling_locations.is_floating_point() && attention_weights.is_floating_point(),
      "ms_deform_attn: value, sampling_locations and attention_weights must be floating point");
  return sizes;
}

// Host code and, under nvcc, device code.
#if defined(__CUDACC__)
#define OISA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define OISA_HOST_DEVICE inline
#endif

// The four bilinear corners of one sample: row index (y * W + x) inside the level, or -1 when outside the level.
template <typename scalar_t>
struct Corners {
  int64_t index[4];
  scalar_t weight[4];
  scalar_t frac_h;
  scalar_t frac_w;
};

template <typename scalar_t>
OISA_HOST_DEVICE scalar_t floor_of(scalar_t value) {
#if defined(__CUDA_ARCH__)
  return ::floor(value);
#else
  return std::floor(value);
#endif
}

// Pixel coordinates (x * W - 0.5, y * H - 0.5), as grid_sample with align_corners=False. Returns false when no corner
// can be inside the level (this also rejects NaN), in which case the sample contributes nothing.
template <typename scalar_t>
OISA_HOST_DEVICE bool bilinear_corners(
    scalar_t x, scalar_t y, int64_t height, int64_t width, Corners<scalar_t>& corners) {
  const scalar_t h = y * static_cast<scalar_t>(height) - scalar_t(0.5);
  const scalar_t w = x * static_cast<scalar_t>(width) - scalar_t(0.5);
  if (!(h > scalar_t(-1) && w > scalar_t(-1) && h < static_cast<scalar_t>(height) &&
        w < static_cast<scalar_t>(width))) {
    return false;
  }
  const scalar_t h_floor = floor_of(h);
  const scalar_t w_floor = floor_of(w);
  const int64_t h0 = static_cast<int64_t>(h_floor);
  const int64_t w0 = static_cast<int64_t>(w_floor);
  corners.frac_h = h - h_floor;
  corners.frac_w = w - w_floor;
  const scalar_t rest_h = scalar_t(1) - corners.frac_h;
  const scalar_t rest_w = scalar_t(1) - corners.frac_w;
  const bool top = h0 >= 0;
  const bool bottom = h0 + 1 < height;
  const bool left = w0 >= 0;
  const bool right = w0 + 1 < width;
  corners.index[0] = top && left ? h0 * width + w0 : -1;
  corners.index[1] = top && right ? h0 * width + w0 + 1 : -1;
  corners.index[2] = bottom && left ? (h0 + 1) * width + w0 : -1;
  corners.index[3] = bottom && right ? (h0 + 1) * width + w0 + 1 : -1;
  corners.weight[0] = rest_h * rest_w;
  corners.weight[1] = rest_h * corners.frac_w;
  corners.weight[2] = corners.frac_h * rest_w;
  corners.weight[3] = corners.frac_h * corners.frac_w;
  return true;
}

// The kernels index the value rows of each level without bounds checks, so every level must lie inside the S rows.
inline void check_levels_on_host(
    const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, int64_t num_values) {
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const int64_t* shape = shapes.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  for (int64_t level = 0; level < shapes.size(0); ++level) {
    const int64_t height = shape[2 * level];
    const int64_t width = shape[2 * level + 1];
    TORCH_CHECK(
        height > 0 && width > 0 && start[level] >= 0 && start[level] + height * width <= num_values,
        "ms_deform_attn: level ",
        level,
        " (",
        height,
        "x",
        width,
        " starting at ",
        start[level],
        ") does not fit in the ",
        num_values,
        " values");
  }
}

} // namespace oisa_kernels
