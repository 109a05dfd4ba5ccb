// max_pool2x2: argument checks, dense inputs, output allocation and geometry, shared by CPU and CUDA.
#include "max_pool2x2_host.h"

#include <ATen/ATen.h>

#include "common/checks.h"
#include "cpu/huge_pages.h"

namespace unet_ext {
namespace max_pool {
namespace {

// A window needs two rows and two columns (stock max_pool2d rejects smaller inputs too).
void check_size(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.size(2) >= 2 && input.size(3) >= 2, op,
              ": input's height and width must be at least 2 (one 2x2 window), got ", input.sizes());
}

Geometry geometry_of(const at::Tensor& input, bool channels_last) {
  return {input.size(0), input.size(1), input.size(2), input.size(3),
          pooled_size(input.size(2)), pooled_size(input.size(3)), channels_last};
}

at::MemoryFormat format_of(const at::Tensor& t) {
  return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous;
}

}  // namespace

Geometry forward_geometry(at::Tensor& input, at::Tensor& out) {
  constexpr const char* op = "unet_ext.max_pool2x2";
  UNET_CHECK_DIM(op, input, 4);
  UNET_CHECK_FLOATING(op, input);
  check_size(op, input);
  const auto format = format_of(input);
  input = input.contiguous(format);
  const Geometry g = geometry_of(input, format == at::MemoryFormat::ChannelsLast);
  out = cpu::empty_output({g.batch, g.channels, g.out_h, g.out_w}, input.options(), format);
  return g;
}

Geometry backward_geometry(at::Tensor& grad_out, at::Tensor& input, at::Tensor& grad_input) {
  constexpr const char* op = "unet_ext._max_pool2x2_backward";
  UNET_CHECK_DIM(op, input, 4);
  UNET_CHECK_DIM(op, grad_out, 4);
  UNET_CHECK_FLOATING(op, input);
  UNET_CHECK_SAME_DTYPE(op, grad_out, input);
  UNET_CHECK_SAME_DEVICE(op, grad_out, input);
  check_size(op, input);
  const auto format = format_of(input);
  input = input.contiguous(format);
  const Geometry g = geometry_of(input, format == at::MemoryFormat::ChannelsLast);
  const std::vector<int64_t> out_shape{g.batch, g.channels, g.out_h, g.out_w};
  TORCH_CHECK(grad_out.sizes().equals(out_shape), op, ": grad_out must have shape ",
              at::IntArrayRef(out_shape), " (input's pooled), got ", grad_out.sizes());
  grad_out = grad_out.contiguous(format);
  grad_input = cpu::empty_output(input.sizes(), input.options(), format);
  return g;
}

}  // namespace max_pool
}  // namespace unet_ext
