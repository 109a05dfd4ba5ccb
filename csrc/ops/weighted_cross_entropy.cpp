// weighted_cross_entropy: argument checks and views shared by CPU and CUDA, and the public
// composite op (forward op + the loss output; autograd lives on the forward op).
#include "weighted_cross_entropy_host.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "common/checks.h"

namespace unet_ext {
namespace wce {
namespace {

int parse_reduction(const char* op, c10::string_view reduction) {
  if (reduction == "none") return kNone;
  if (reduction == "mean") return kMean;
  if (reduction == "sum") return kSum;
  TORCH_CHECK(false, op, ": reduction must be 'none', 'mean' or 'sum', got '",
              std::string(reduction), "'");
}

// Stride of dims [first, dim) seen as one flattened dim, if they collapse (size-1 dims ignored).
std::optional<int64_t> collapsed_stride(const at::Tensor& t, int64_t first) {
  int64_t stride = 1;
  bool have = false;
  int64_t expected = 0;  // stride the next (outer) non-trivial dim must have
  for (int64_t d = t.dim() - 1; d >= first; --d) {
    if (t.size(d) == 1) continue;
    if (!have) {
      stride = t.stride(d);
      have = true;
    } else if (t.stride(d) != expected) {
      return std::nullopt;
    }
    expected = t.stride(d) * t.size(d);
  }
  return stride;
}

// (n, s) strides of a tensor seen as (N, S) from dim `first` on; re-lays it out if needed.
at::Tensor as_pixels(const at::Tensor& t, int64_t first, int64_t& n_stride, int64_t& s_stride) {
  auto s = collapsed_stride(t, first);
  at::Tensor out = s ? t : t.contiguous();
  if (!s) s = collapsed_stride(out, first);
  n_stride = out.dim() > 0 && first > 0 ? out.stride(0) : 0;
  s_stride = *s;
  return out;
}

}  // namespace

Prepared prepare(const char* op, const at::Tensor& logits, const at::Tensor& target,
                 const std::optional<at::Tensor>& weight_map,
                 const std::optional<at::Tensor>& class_weight, int64_t ignore_index,
                 c10::string_view reduction) {
  TORCH_CHECK(logits.dim() >= 2, op, ": logits must have shape (N, C) or (N, C, d1, ..., dk), got ",
              logits.sizes());
  UNET_CHECK_FLOATING(op, logits);
  TORCH_CHECK(logits.size(1) >= 1, op, ": logits must have at least one class (dim 1), got ",
              logits.sizes());
  TORCH_CHECK(!at::isFloatingType(target.scalar_type()) && !at::isComplexType(target.scalar_type()) &&
                  target.scalar_type() != at::kBool,
              op, ": target must hold class indices (an integer tensor, e.g. int64), got ",
              target.scalar_type());
  UNET_CHECK_SAME_DEVICE(op, logits, target);
  std::vector<int64_t> pixel_shape{logits.size(0)};
  for (int64_t d = 2; d < logits.dim(); ++d) pixel_shape.push_back(logits.size(d));
  TORCH_CHECK(target.sizes().equals(pixel_shape), op, ": target must have shape ",
              at::IntArrayRef(pixel_shape), " (logits' shape without the class dim), got ",
              target.sizes());

  Prepared p;
  Geometry& g = p.geometry;
  g.batch = logits.size(0);
  g.classes = logits.size(1);
  g.pixels = 1;
  for (int64_t d = 2; d < logits.dim(); ++d) g.pixels *= logits.size(d);
  g.ignore_index = ignore_index;
  g.reduction = parse_reduction(op, reduction);
  const auto opmath = at::toOpMathType(logits.scalar_type());

  // Logits: (N, C, S) view; C's stride read as is, spatial dims must collapse.
  {
    auto s = collapsed_stride(logits, 2);
    p.logits = s ? logits : logits.contiguous();
    g.logits = {p.logits.stride(0), p.logits.stride(1), *collapsed_stride(p.logits, 2)};
  }
  p.target = as_pixels(target.scalar_type() == at::kLong ? target : target.to(at::kLong), 1,
                       g.target_n, g.target_s);

  g.has_weight_map = weight_map.has_value() && weight_map->defined();
  if (g.has_weight_map) {
    const at::Tensor& w = *weight_map;
    UNET_CHECK_FLOATING(op, w);
    UNET_CHECK_SAME_DEVICE(op, logits, w);
    TORCH_CHECK(w.sizes().equals(pixel_shape), op, ": weight_map must have target's shape ",
                at::IntArrayRef(pixel_shape), ", got ", w.sizes());
    p.weight_map = as_pixels(w.to(opmath), 1, g.weight_n, g.weight_s);
  } else {
    g.weight_n = g.weight_s = 0;
  }

  g.has_class_weight = class_weight.has_value() && class_weight->defined();
  if (g.has_class_weight) {
    const at::Tensor& cw = *class_weight;
    UNET_CHECK_FLOATING(op, cw);
    UNET_CHECK_SAME_DEVICE(op, logits, cw);
    TORCH_CHECK(cw.dim() == 1 && cw.size(0) == g.classes, op,
                ": class_weight must have shape [", g.classes, "] (one weight per class), got ",
                cw.sizes());
    p.class_weight = cw.to(opmath).contiguous();
  }
  g.grad_n = g.grad_s = 0;
  g.grad_logits = {0, 0, 0};
  return p;
}

ForwardOutputs allocate_forward(const Prepared& p) {
  const auto& g = p.geometry;
  const auto opmath = at::toOpMathType(p.logits.scalar_type());
  ForwardOutputs out;
  const auto options = p.logits.options().dtype(opmath);
  out.loss = g.reduction == kNone ? at::empty(p.target.sizes(), options) : at::empty({}, options);
  out.logsumexp = at::empty({g.batch, g.pixels}, p.logits.options().dtype(opmath));
  out.total_weight = at::empty({}, p.logits.options().dtype(opmath));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_forward(const Prepared& p, ForwardOutputs& out,
                                                              bool opmath_loss) {
  // One rounding, from the opmath value, as if the kernel had written the logits' dtype.
  at::Tensor loss = opmath_loss ? out.loss : out.loss.to(p.logits.scalar_type());
  return {loss, out.logsumexp, out.total_weight};
}

at::Tensor prepare_backward(Prepared& p, at::Tensor& grad_loss, const at::Tensor& logsumexp,
                            const at::Tensor& total_weight) {
  constexpr const char* op = "unet_ext._weighted_cross_entropy_backward";
  auto& g = p.geometry;
  const auto opmath = at::toOpMathType(p.logits.scalar_type());
  TORCH_CHECK(logsumexp.sizes().equals({g.batch, g.pixels}) && logsumexp.scalar_type() == opmath &&
                  logsumexp.is_contiguous(),
              op, ": logsumexp must be a contiguous ", opmath, " tensor of shape [", g.batch, ", ",
              g.pixels, "], got ", logsumexp.scalar_type(), " ", logsumexp.sizes());
  TORCH_CHECK(total_weight.dim() == 0 && total_weight.scalar_type() == opmath, op,
              ": total_weight must be a 0-d ", opmath, " tensor");
  UNET_CHECK_SAME_DEVICE(op, grad_loss, p.logits);
  if (g.reduction == kNone) {
    TORCH_CHECK(grad_loss.sizes().equals(p.target.sizes()), op,
                ": grad_loss must have target's shape ", p.target.sizes(), ", got ",
                grad_loss.sizes());
    grad_loss = as_pixels(grad_loss.to(opmath), 1, g.grad_n, g.grad_s);
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must be a scalar for reduction ",
                g.reduction == kSum ? "'sum'" : "'mean'", ", got shape ", grad_loss.sizes());
    grad_loss = grad_loss.reshape({}).to(opmath);
  }
  // Keep the logits' memory layout (channels_last in, channels_last grad out).
  at::Tensor grad_logits = at::empty_like(p.logits);
  auto s = collapsed_stride(grad_logits, 2);
  if (!s) {
    grad_logits = at::empty(p.logits.sizes(), p.logits.options());
    s = collapsed_stride(grad_logits, 2);
  }
  g.grad_logits = {grad_logits.stride(0), grad_logits.stride(1), *s};
  return grad_logits;
}

namespace {

at::Tensor weighted_cross_entropy(const at::Tensor& logits, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight_map,
                                  const std::optional<at::Tensor>& class_weight,
                                  int64_t ignore_index, c10::string_view reduction) {
  static auto forward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("unet_ext::_weighted_cross_entropy_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, int64_t, c10::string_view, bool)>();
  return std::get<0>(forward.call(logits, target, weight_map, class_weight, ignore_index, reduction,
                                  /*opmath_loss=*/false));
}

}  // namespace
}  // namespace wce
}  // namespace unet_ext

TORCH_LIBRARY_IMPL(unet_ext, CompositeImplicitAutograd, m) {
  m.impl("weighted_cross_entropy", &unet_ext::wce::weighted_cross_entropy);
}
