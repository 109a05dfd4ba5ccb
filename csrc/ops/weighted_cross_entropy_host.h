// Host-side half of weighted_cross_entropy shared by the CPU and CUDA entry points: argument
// checks, the (N, C, S) views the kernels read, and output allocation.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

#include "weighted_cross_entropy.h"

namespace unet_ext {
namespace wce {

// Inputs in the form the kernels read: tensors re-laid out only when their spatial dims do
// not collapse to one stride; target as int64; weight map and class weights in opmath dtype.
struct Prepared {
  at::Tensor logits, target, weight_map, class_weight;
  Geometry geometry;
};

Prepared prepare(const char* op, const at::Tensor& logits, const at::Tensor& target,
                 const std::optional<at::Tensor>& weight_map,
                 const std::optional<at::Tensor>& class_weight, int64_t ignore_index,
                 c10::string_view reduction);

// Outputs of the forward: loss ("none": target's shape; else 0-d), the per-pixel logsumexp
// (N, S) and the mean's denominator (0-d), all three in opmath dtype: the kernels write the loss
// as they compute it, and finish_forward rounds it to the logits' dtype unless opmath_loss.
struct ForwardOutputs {
  at::Tensor loss, logsumexp, total_weight;
};
ForwardOutputs allocate_forward(const Prepared& p);
std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_forward(const Prepared& p, ForwardOutputs& out,
                                                              bool opmath_loss);

// Backward: also checks grad_loss / logsumexp shapes, converts grad_loss to the opmath dtype
// (a float32 loss's gradient is not rounded to 16 bits), sets grad_n/grad_s and the grad_logits
// strides in the geometry, and allocates grad_logits in the logits' dtype and memory layout.
at::Tensor prepare_backward(Prepared& p, at::Tensor& grad_loss, const at::Tensor& logsumexp,
                            const at::Tensor& total_weight);

}  // namespace wce
}  // namespace unet_ext
