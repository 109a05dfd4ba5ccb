// The one dtype policy of unet_ext: float64, float32, float16 and bfloat16 kernels,
// accumulation in at::opmath_type<scalar_t> (float for the 16-bit types).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#define UNET_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...)                                         \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, \
                                  __VA_ARGS__)
