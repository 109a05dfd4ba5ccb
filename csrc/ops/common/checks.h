// Argument checks with messages that say which argument, what was expected and what came.
// Every op's host entry point uses these, so CPU and CUDA reject bad input identically.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define UNET_CHECK_DIM(op, t, expected)                                                      \
  TORCH_CHECK((t).dim() == (expected), op, ": ", #t, " must be a ", expected,                \
              "-D tensor, got ", (t).dim(), "-D with shape ", (t).sizes())

#define UNET_CHECK_FLOATING(op, t)                                                           \
  TORCH_CHECK(at::isFloatingType((t).scalar_type()), op, ": ", #t,                           \
              " must be a floating-point tensor, got ", (t).scalar_type())

#define UNET_CHECK_SAME_DTYPE(op, a, b)                                                      \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), op, ": ", #a, " and ", #b,            \
              " must have the same dtype, got ", (a).scalar_type(), " and ", (b).scalar_type())

#define UNET_CHECK_SAME_DEVICE(op, a, b)                                                     \
  TORCH_CHECK((a).device() == (b).device(), op, ": ", #a, " and ", #b,                       \
              " must be on the same device, got ", (a).device(), " and ", (b).device())
