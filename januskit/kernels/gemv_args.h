// Argument handling shared by the GEMV kernels (gemv_bf16.cpp, gemv_amx.cpp).
#pragma once
#include <torch/extension.h>

namespace januskit {

// The operands every GEMV kernel takes: x (M, K) bf16 with 1-16 rows, w (N, K), K a multiple of 32.
inline void check_rows_operands(const char* name, const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), name, ": x (M, K) and w (N, K)");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, name, ": bfloat16 activations only");
  TORCH_CHECK(x.size(1) % 32 == 0, name, ": K must be a multiple of 32");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 16, name, ": 1 to 16 rows, got ", x.size(0));
}

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
