// The small per-layer operations of the decoder (RMSNorm, RoPE, the MLP's silu(gate) * up), each one pass over its
// rows (bfloat16 in and out) instead of the 3-10 eager ops (and their temporaries) that express them in PyTorch: a
// decode step's few rows on one thread, a prompt's hundreds split over the threads. Rounding follows the eager
// code: every point where the eager version stores a bfloat16 result rounds to nearest-even here too.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "vec_math.h"

namespace {

inline __m512 load_bf16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m512 round_bf16(__m512 v) {  // float -> nearest bfloat16 -> float
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline void store_bf16(uint16_t* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}

}  // namespace

// RMSNorm as llama.RMSNorm computes it: w * bf16(x * rsqrt(mean(x^2) + eps)), statistics in float32.
torch::Tensor rmsnorm_bf16(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "rmsnorm_bf16: bfloat16 only");
  const int64_t D = x.size(-1);
  TORCH_CHECK(D % 16 == 0 && w.numel() == D, "rmsnorm_bf16: width a multiple of 16, weight of the same width");
  x = x.contiguous();
  w = w.contiguous();
  auto out = torch::empty_like(x);
  const int64_t M = x.numel() / D;
  auto xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  auto wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  auto op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const uint16_t* row = xp + m * D;
      __m512 ss = _mm512_setzero_ps();
      for (int64_t i = 0; i < D; i += 16) {
        const __m512 v = load_bf16(row + i);
        ss = _mm512_fmadd_ps(v, v, ss);
      }
      const float r = 1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(D) + static_cast<float>(eps));
      const __m512 rv = _mm512_set1_ps(r);
      for (int64_t i = 0; i < D; i += 16)
        store_bf16(op + m * D + i,
                   _mm512_mul_ps(load_bf16(wp + i), round_bf16(_mm512_mul_ps(load_bf16(row + i), rv))));
    }
  });
  return out;
}

// Rotary embedding of one position per row, as llama.apply_rope: bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)).
// x (B, H, hd) contiguous; cos, sin (B, hd) contiguous. A prompt passes its B * T positions as the rows.
torch::Tensor rope_bf16(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && cos.scalar_type() == at::kBFloat16 &&
                  sin.scalar_type() == at::kBFloat16, "rope_bf16: bfloat16 only");
  TORCH_CHECK(x.dim() == 3 && cos.dim() == 2 && sin.dim() == 2, "rope_bf16: x (B, H, hd), cos/sin (B, hd)");
  const int64_t B = x.size(0), H = x.size(1), hd = x.size(2), half = hd / 2;
  TORCH_CHECK(half % 16 == 0 && cos.size(0) == B && cos.size(1) == hd && sin.sizes() == cos.sizes(),
              "rope_bf16: head dim a multiple of 32, cos/sin (B, hd)");
  x = x.contiguous();
  cos = cos.contiguous();
  sin = sin.contiguous();
  auto out = torch::empty_like(x);
  auto xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  auto cp = reinterpret_cast<const uint16_t*>(cos.data_ptr());
  auto sp = reinterpret_cast<const uint16_t*>(sin.data_ptr());
  auto op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const __m512 neg = _mm512_set1_ps(-1.0f);
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint16_t* c = cp + b * hd;
      const uint16_t* s = sp + b * hd;
      for (int64_t h = 0; h < H; ++h) {
        const uint16_t* v = xp + (b * H + h) * hd;
        uint16_t* o = op + (b * H + h) * hd;
        for (int64_t i = 0; i < half; i += 16) {
          const __m512 x1 = load_bf16(v + i), x2 = load_bf16(v + half + i);
          // first half: x1 * cos - x2 * sin; second half: x2 * cos + x1 * sin (rotate_half = [-x2, x1])
          const __m512 a1 = round_bf16(_mm512_mul_ps(x1, load_bf16(c + i)));
          const __m512 b1 = round_bf16(_mm512_mul_ps(_mm512_mul_ps(x2, neg), load_bf16(s + i)));
          const __m512 a2 = round_bf16(_mm512_mul_ps(x2, load_bf16(c + half + i)));
          const __m512 b2 = round_bf16(_mm512_mul_ps(x1, load_bf16(s + half + i)));
          store_bf16(o + i, _mm512_add_ps(a1, b1));
          store_bf16(o + half + i, _mm512_add_ps(a2, b2));
        }
      }
    }
  });
  return out;
}

// The MLP's bf16(bf16(silu(gate)) * up), as F.silu(gate) * up computes it in bfloat16; gate, up (M, F) contiguous,
// F a multiple of 16.
torch::Tensor silu_mul_bf16(torch::Tensor gate, torch::Tensor up) {
  TORCH_CHECK(gate.scalar_type() == at::kBFloat16 && up.scalar_type() == at::kBFloat16, "silu_mul_bf16: bfloat16 only");
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.numel() % 16 == 0, "silu_mul_bf16: same shapes, a multiple of 16");
  gate = gate.contiguous();
  up = up.contiguous();
  auto out = torch::empty_like(gate);
  auto gp = reinterpret_cast<const uint16_t*>(gate.data_ptr());
  auto up_ = reinterpret_cast<const uint16_t*>(up.data_ptr());
  auto op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t n = gate.numel() / 16;
  const __m512 one = _mm512_set1_ps(1.0f);
  at::parallel_for(0, n, 2048, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const __m512 g = load_bf16(gp + 16 * i);
      const __m512 e = januskit::exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g));
      const __m512 silu = round_bf16(_mm512_div_ps(g, _mm512_add_ps(one, e)));
      store_bf16(op + 16 * i, _mm512_mul_ps(silu, load_bf16(up_ + 16 * i)));
    }
  });
  return out;
}
