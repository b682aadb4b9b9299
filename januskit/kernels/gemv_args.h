// Argument handling shared by the GEMV kernels (gemv_bf16.cpp, gemv_amx.cpp).
#pragma once
#include <torch/extension.h>

namespace januskit {

// An optional vector of one value per output channel (bias, scale) as bf16 bits, or nullptr when absent; `keep`
// holds the converted tensor for as long as the pointer is used.
inline const uint16_t* channel_vector(const c10::optional<torch::Tensor>& t, int64_t n, const char* name,
                                      const char* what, torch::Tensor& keep) {
  if (!t.has_value()) return nullptr;
  keep = t->to(at::kBFloat16).contiguous();
  TORCH_CHECK(keep.numel() == n, name, ": ", what, " of ", keep.numel(), " for ", n, " outputs");
  return reinterpret_cast<const uint16_t*>(keep.data_ptr());
}

}  // namespace januskit
