// The unet_ext operator library: every schema is declared here, once. Backends register their
// kernels with TORCH_LIBRARY_IMPL next to the kernels (cpu/, cuda/); fake kernels and autograd
// are registered from Python (unet_ext/ops/). Backward passes are ops too (_<op>_backward), so
// opcheck, torch.compile and CPU/CUDA parity cover them.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/cpu_isa.h"
#include "cpu/huge_pages.h"
#include "cpu/winograd_cpu.h"

TORCH_LIBRARY(unet_ext, m) {
  m.def("crop_concat(Tensor skip, Tensor up) -> Tensor");
  m.def(
      "_crop_concat_backward(Tensor grad_out, SymInt skip_channels, SymInt skip_height, "
      "SymInt skip_width) -> (Tensor grad_skip, Tensor grad_up)");

  // Convolution with stride 1 and the bias (+ ReLU) fused into its epilogue; conv2d_bias is the
  // same kernel with the ReLU off (the U-Net head). The backward masks grad_out with
  // (zero where output <= 0) when `output` is given (conv2d_relu) and computes the grads output_mask asks for
  // (an empty tensor for the others).
  m.def("conv2d_relu(Tensor input, Tensor weight, Tensor? bias, int padding) -> Tensor");
  m.def("conv2d_bias(Tensor input, Tensor weight, Tensor? bias, int padding) -> Tensor");
  m.def(
      "_conv2d_backward(Tensor grad_out, Tensor input, Tensor weight, Tensor? output, "
      "int padding, bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, "
      "Tensor grad_bias)");
  // The decoder's first conv: conv2d_relu(crop_concat(skip, up), weight, bias, padding) without
  // materialising the concatenation (weight's C_in = skip's + up's channels). The backward takes
  // the saved output for the ReLU mask; grad_skip is zero outside the crop window.
  m.def("conv2d_relu_concat(Tensor skip, Tensor up, Tensor weight, Tensor? bias, int padding) -> Tensor");
  m.def(
      "_conv2d_relu_concat_backward(Tensor grad_out, Tensor skip, Tensor up, Tensor weight, "
      "Tensor output, int padding, bool[4] output_mask) -> (Tensor grad_skip, Tensor grad_up, "
      "Tensor grad_weight, Tensor grad_bias)");
  // The U-Net up-conv: F.conv_transpose2d(input, weight, bias, stride=2), weight (C_in, C_out, 2, 2).
  m.def("conv_transpose2x2(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "_conv_transpose2x2_backward(Tensor grad_out, Tensor input, Tensor weight, "
      "bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // A convolution weight in another dtype and memory format (a copy, in one pass on the CPU): CPU
  // bf16 autocast casts the float32 weights of channels_last convolutions with it, straight to the
  // channels_last bf16 weight oneDNN wants; its backward casts the gradient back the same way.
  m.def("_cast_weight(Tensor weight, ScalarType dtype, MemoryFormat memory_format) -> Tensor");

  // The U-Net down-step: F.max_pool2d(input, 2). The backward recomputes each window's argmax
  // from the input (no index tensor is kept) and routes grad_out there.
  m.def("max_pool2x2(Tensor input) -> Tensor");
  m.def("_max_pool2x2_backward(Tensor grad_out, Tensor input) -> Tensor");

  // The public loss is composite (weighted_cross_entropy.cpp): it calls the forward op, which
  // also returns what the backward needs: the per-pixel logsumexp and the mean's denominator.
  // The loss is in the logits' dtype, or with opmath_loss in their opmath dtype (float32 for
  // 16-bit logits: what autocast asks for, read from the 16-bit logits without a float32 copy).
  m.def(
      "weighted_cross_entropy(Tensor logits, Tensor target, Tensor? weight_map, "
      "Tensor? class_weight, int ignore_index, str reduction) -> Tensor");
  m.def(
      "_weighted_cross_entropy_forward(Tensor logits, Tensor target, Tensor? weight_map, "
      "Tensor? class_weight, int ignore_index, str reduction, bool opmath_loss=False) -> "
      "(Tensor loss, Tensor logsumexp, Tensor total_weight)");
  m.def(
      "_weighted_cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, "
      "Tensor? weight_map, Tensor? class_weight, Tensor logsumexp, Tensor total_weight, "
      "int ignore_index, str reduction) -> Tensor");

  // Frees the blocks the CPU output cache holds (cpu/huge_pages.h): unet_ext.empty_cache().
  m.def("_empty_cache() -> ()", &unet_ext::cpu::empty_cache);
  // unet_ext.backends.cpu.allow_winograd: whether float32 3x3 convolutions may take the Winograd
  // F(4x4, 3x3) path (cpu/winograd_cpu.h); and its tile math on one float64 tile (forward, and the
  // weight gradient's F(3x3, 4x4)), for the unit tests.
  m.def("_allow_winograd() -> bool", [] { return unet_ext::winograd::allow_winograd(); });
  m.def("_set_allow_winograd(bool allow) -> ()", [](bool allow) { unet_ext::winograd::set_allow_winograd(allow); });
  m.def("_winograd_tile(Tensor input, Tensor filter) -> Tensor");
  m.def("_winograd_wgrad_tile(Tensor input, Tensor grad) -> Tensor");
  // The instruction set the per-ISA CPU kernels run with (cpu/cpu_isa.h): unet-ext info, tests.
  m.def("_cpu_isa() -> str", [] { return std::string(unet_ext::cpu::isa_name(unet_ext::cpu::best_isa())); });
}

#ifdef UNET_EXT_CUDA_ARCHS
// The CUDA arch list this library was built for, as text in the file: unet_ext.build_info() reads
// it, so that a prebuilt library (the GPU lease kit's) says what it holds.
#define UNET_EXT_STRINGIFY(...) #__VA_ARGS__
#define UNET_EXT_EXPAND_STRINGIFY(...) UNET_EXT_STRINGIFY(__VA_ARGS__)
extern "C" __attribute__((used)) const char unet_ext_cuda_archs[] =
    "unet_ext_cuda_archs=" UNET_EXT_EXPAND_STRINGIFY(UNET_EXT_CUDA_ARCHS) ";";
#endif

// `import unet_ext._C` loads this library, which runs the registrations above. The module
// itself is empty: every entry point is reached through torch.ops.unet_ext.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                                         nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
