// Picks the widest instruction set the processor supports, once, capped by UNET_EXT_CPU_ISA.
#include "cpu_isa.h"

#include <cstdlib>
#include <cstring>

namespace unet_ext {
namespace cpu {
namespace {

Isa detect() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

Isa choose() {
  Isa isa = detect();
  if (const char* cap = std::getenv("UNET_EXT_CPU_ISA")) {
    if (std::strcmp(cap, "baseline") == 0) isa = Isa::kBaseline;
    if (std::strcmp(cap, "avx2") == 0 && isa == Isa::kAvx512) isa = Isa::kAvx2;
  }
  return isa;
}

}  // namespace

Isa best_isa() {
  static const Isa isa = choose();
  return isa;
}

bool has_bf16_dot_products() {
  static const bool has = [] {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
#else
    return false;
#endif
  }();
  return has;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace cpu
}  // namespace unet_ext
