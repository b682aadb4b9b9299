// One query position per row against a key/value cache: softmax(q k^T * scale) v, bfloat16 in and out, float32
// inside, on AVX-512 BF16 CPUs.
//
// In a decode step the attention reads the whole cache once (a row's keys, then its values); at the end of an image
// that is ~1 GB a step for 8 rows of Janus-Pro-1B, as much as a third of the weights. SDPA's CPU kernels are built
// for long queries and read that at a few GB/s; here every (row, head) is one task that streams its keys once,
// keeps its scores in a buffer, then streams its values once.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

inline __m512 bf16x16_to_f32(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int HD>
void one_head(const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t S, int64_t ks, int64_t vs,
              const bool* valid, float scale, float* scores, uint16_t* out) {
  __m512bh qv[HD / 32];
  for (int c = 0; c < HD / 32; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + 32 * c);
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < S; ++j) {
    if (valid && !valid[j]) {
      scores[j] = -std::numeric_limits<float>::infinity();
      continue;
    }
    const uint16_t* kj = k + j * ks;
    __m512 acc = _mm512_setzero_ps();
    for (int c = 0; c < HD / 32; ++c) acc = _mm512_dpbf16_ps(acc, qv[c], (__m512bh)_mm512_loadu_si512(kj + 32 * c));
    const float s = _mm512_reduce_add_ps(acc) * scale;
    scores[j] = s;
    mx = s > mx ? s : mx;
  }
  __m512 o[HD / 16];
  for (int c = 0; c < HD / 16; ++c) o[c] = _mm512_setzero_ps();
  float total = 0.0f;
  if (mx != -std::numeric_limits<float>::infinity()) {
    for (int64_t j = 0; j < S; ++j) {
      if (scores[j] == -std::numeric_limits<float>::infinity()) continue;
      const float p = std::exp(scores[j] - mx);
      total += p;
      const __m512 pv = _mm512_set1_ps(p);
      const uint16_t* vj = v + j * vs;
      for (int c = 0; c < HD / 16; ++c) o[c] = _mm512_fmadd_ps(pv, bf16x16_to_f32(vj + 16 * c), o[c]);
    }
  }
  const __m512 inv = _mm512_set1_ps(total > 0.0f ? 1.0f / total : 0.0f);
  alignas(64) float buf[16];
  for (int c = 0; c < HD / 16; ++c) {
    _mm512_store_ps(buf, _mm512_mul_ps(o[c], inv));
    for (int i = 0; i < 16; ++i) out[16 * c + i] = c10::BFloat16(buf[i]).x;
  }
}

}  // namespace

// q (B, H, hd); k, v (B, Hkv, S, hd) with any batch/head strides but contiguous key vectors; valid (B, S) bool
// or None. Returns (B, H, hd).
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> valid,
                               double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4, "decode_attention: q (B, H, hd), k/v (B, Hkv, S, hd)");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "decode_attention: bfloat16 only");
  const int64_t B = q.size(0), H = q.size(1), hd = q.size(2), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == S && k.size(3) == hd &&
                  v.size(3) == hd && H % Hkv == 0, "decode_attention: shapes do not match");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: key/value vectors must be contiguous");
  TORCH_CHECK(hd == 64 || hd == 128, "decode_attention: head dim 64 or 128");
  q = q.contiguous();
  auto out = torch::empty({B, H, hd}, q.options());
  torch::Tensor vm;
  const bool* vp = nullptr;
  if (valid.has_value()) {
    vm = valid->to(at::kBool).contiguous();
    TORCH_CHECK(vm.dim() == 2 && vm.size(0) == B && vm.size(1) == S, "decode_attention: valid must be (B, S)");
    vp = vm.data_ptr<bool>();
  }
  auto qp = reinterpret_cast<const uint16_t*>(q.data_ptr());
  auto kp = reinterpret_cast<const uint16_t*>(k.data_ptr());
  auto vvp = reinterpret_cast<const uint16_t*>(v.data_ptr());
  auto op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t rep = H / Hkv;
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(S);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, h = t % H, g = h / rep;
      const uint16_t* kb = kp + b * k.stride(0) + g * k.stride(1);
      const uint16_t* vb = vvp + b * v.stride(0) + g * v.stride(1);
      const bool* valid_b = vp ? vp + b * S : nullptr;
      if (hd == 128)
        one_head<128>(qp + t * hd, kb, vb, S, k.stride(2), v.stride(2), valid_b, sc, scores.data(), op + t * hd);
      else
        one_head<64>(qp + t * hd, kb, vb, S, k.stride(2), v.stride(2), valid_b, sc, scores.data(), op + t * hd);
    }
  });
  return out;
}
