// exp and log that the compiler can vectorise: branch-free Cephes-style polynomials for float
// (about 1 ulp), std:: for double. glibc's vector math needs -ffast-math, and ATen's
// Vectorized needs per-ISA builds; these compile to SIMD in plain -O3 loops on any x86/Arm.
// Defined in the UNET_CPU_ISA namespace: each per-ISA build gets its own copy (no ODR clash).
#pragma once
#ifndef UNET_CPU_ISA
#error "define UNET_CPU_ISA before including vec_math.h"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace unet_ext {
namespace cpu {
namespace UNET_CPU_ISA {

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}

inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
}

// exp(x) = 2^n * exp(r), n = round(x / ln2), |r| <= ln2 / 2. Inputs below -87.3 return 0
// (the float result would be denormal); inputs above 88 are clamped; NaN stays NaN.
inline float exp_poly(float x) {
  const float clamped = std::min(std::max(x, -87.33654f), 88.0f);
#if UNET_CPU_VECTOR_FLOOR  // set by the AVX builds: GCC vectorises this form there, not the one below
  const float fn = __builtin_floorf(clamped * 1.44269504088896341f + 0.5f);
  const int32_t n = static_cast<int32_t>(fn);
#else  // SSE2 has no vector floor: truncate, then step down where that rounded up
  const float scaled = clamped * 1.44269504088896341f + 0.5f;
  int32_t n = static_cast<int32_t>(scaled);
  n -= (static_cast<float>(n) > scaled) ? 1 : 0;
  const float fn = static_cast<float>(n);
#endif
  const float r = (clamped - fn * 0.693359375f) + fn * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  float result = y * bits_to_float((n + 127) << 23);
  result = x < -87.33654f ? 0.0f : result;
  return x != x ? x : result;
}

// log(x) for positive normal x: x = m * 2^e with m in [sqrt(1/2), sqrt(2)), polynomial in m-1.
inline float log_poly(float x) {
  const int32_t bits = float_to_bits(x);
  int32_t e = ((bits >> 23) & 0xff) - 126;
  float m = bits_to_float((bits & 0x007fffff) | 0x3f000000);  // in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e -= small ? 1 : 0;
  m = small ? (m + m - 1.0f) : (m - 1.0f);
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y *= m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  const float result = (m + y) + 0.693359375f * fe;
  return x != x ? x : result;
}

inline float vexp(float x) { return exp_poly(x); }
inline double vexp(double x) { return std::exp(x); }
inline float vlog(float x) { return log_poly(x); }
inline double vlog(double x) { return std::log(x); }

}  // namespace UNET_CPU_ISA
}  // namespace cpu
}  // namespace unet_ext
