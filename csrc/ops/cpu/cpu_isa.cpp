// Picks the widest instruction set the processor supports, once, capped by UNET_EXT_CPU_ISA.
#include "cpu_isa.h"

#include <cstdlib>
#include <cstring>

namespace unet_ext {
namespace cpu {
namespace {

// Every flag in the kernels' #pragma GCC target (weighted_cross_entropy_avx2.cpp, _avx512.cpp):
// the compiler may use any of them anywhere in those files (e.g. BMI2's shlx for a shift), so a
// processor (or VM) that lacks one must get the narrower kernels. tests/test_cpu_runtime.py
// checks that these lists match the pragmas.
#if defined(__x86_64__) || defined(__i386__)
bool has_avx2_set() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
         __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c");
}

bool has_avx512_set() {
  return has_avx2_set() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
#endif

Isa detect() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (has_avx512_set()) return Isa::kAvx512;
  if (has_avx2_set()) return Isa::kAvx2;
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

namespace {
// Chosen while the library loads: a fork while another thread is inside a static's first call
// leaves its guard held in the child (huge_pages.cpp).
[[maybe_unused]] const bool chosen_at_load = (best_isa(), has_bf16_dot_products(), true);
}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace cpu
}  // namespace unet_ext
