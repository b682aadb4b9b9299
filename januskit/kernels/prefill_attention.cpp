// Attention of a whole prompt (prefill, the understanding encoder): softmax(q k^T * scale) v for T queries against
// S keys, causal or not, with an optional boolean mask; bfloat16 in and out, float32 scores, softmax and sums, on
// AVX-512 BF16 CPUs.
//
// One task is 16 query rows of one head. Keys and values are first repacked per (batch, kv head) so that one
// vdpbf16ps multiplies a query's pair of dims by the same pair of 16 keys (scores), or a pair of probabilities by
// the same pair of rows of 16 value dims (output); the softmax is the streaming one (running max and sum), over
// blocks of 32 keys, and a causal row stops at its own position. SDPA's CPU flash kernel reached ~150 GFLOP/s here
// on Janus-Pro-1B's prompt of one image; this runs the same products on the vector units directly.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace {

constexpr int RB = 16;  // query rows per task: a block of keys and values is read from L2 once for all of them
constexpr int KB = 32;  // keys per softmax block (2 tiles of 16): its keys and values stay in L1
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline __mmask16 first_n(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : (n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1));
}

// Keys of one (batch, kv head), S x D with row stride ks -> tiles of 16 keys: [S_pad / 16][D / 2][16][2], so that
// tile t, dim pair p is 32 contiguous bf16 (the pair of each of its 16 keys). Keys past S are zero.
void pack_keys(const uint16_t* k, int64_t S, int64_t ks, int D, int64_t S_pad, uint16_t* out) {
  const int P = D / 2;
  for (int64_t t = 0; t < S_pad / 16; ++t) {
    uint32_t* tile = reinterpret_cast<uint32_t*>(out) + t * P * 16;
    for (int kk = 0; kk < 16; ++kk) {
      const int64_t j = t * 16 + kk;
      if (j < S) {
        const uint32_t* row = reinterpret_cast<const uint32_t*>(k + j * ks);
        for (int p = 0; p < P; ++p) tile[p * 16 + kk] = row[p];
      } else {
        for (int p = 0; p < P; ++p) tile[p * 16 + kk] = 0;
      }
    }
  }
}

// Values of one (batch, kv head) -> pairs of rows interleaved: [S_pad / 2][D][2] (value j, dim d at
// ((j / 2) * D + d) * 2 + j % 2). Rows past S are zero.
void pack_values(const uint16_t* v, int64_t S, int64_t vs, int D, int64_t S_pad, uint16_t* out) {
  alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t hi_idx[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                  24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  for (int64_t j = 0; j < S_pad; j += 2) {
    uint16_t* dst = out + j * D;
    for (int d = 0; d < D; d += 32) {
      const __m512i a = j < S ? _mm512_loadu_si512(v + j * vs + d) : _mm512_setzero_si512();
      const __m512i b = j + 1 < S ? _mm512_loadu_si512(v + (j + 1) * vs + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + 2 * d, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(dst + 2 * d + 32, _mm512_permutex2var_epi16(a, hi, b));
    }
  }
}

struct Problem {
  const uint16_t* q;
  int64_t qs0, qs1, qs2;      // q strides (batch, head, row); dims contiguous
  const uint16_t* kp;         // packed keys, (B * Hkv) blocks of S_pad * D
  const uint16_t* vp;         // packed values, same
  const uint8_t* mask;        // (Bm, T, S) contiguous, or null; Bm is B or 1
  int64_t mask_bs;            // batch stride of the mask (0 when broadcast)
  uint16_t* out;              // (B, T, H, D)
  int64_t B, H, Hkv, T, S, S_pad;
  bool causal;
  float scale;
};

template <int D>
void rows_task(const Problem& pb, int64_t b, int64_t h, int64_t i0) {
  constexpr int P = D / 2, C = D / 16;
  const int64_t g = h / (pb.H / pb.Hkv);
  const uint16_t* kp = pb.kp + (b * pb.Hkv + g) * pb.S_pad * D;
  const uint16_t* vp = pb.vp + (b * pb.Hkv + g) * pb.S_pad * D;
  const int64_t off = pb.S - pb.T;  // a causal row i sees keys j <= i + off
  const int nrows = static_cast<int>(std::min<int64_t>(RB, pb.T - i0));
  const uint32_t* qrow[RB];
  int64_t limit[RB];  // row r sees keys j < limit[r] (and, with a mask, only those it allows)
  for (int r = 0; r < RB; ++r) {
    const int64_t i = std::min<int64_t>(i0 + r, pb.T - 1);
    qrow[r] = reinterpret_cast<const uint32_t*>(pb.q + b * pb.qs0 + h * pb.qs1 + i * pb.qs2);
    limit[r] = pb.causal ? std::min<int64_t>(pb.S, i + off + 1) : pb.S;
  }
  const int64_t kend = limit[RB - 1];
  alignas(64) float o[RB][D];
  alignas(64) uint16_t prob[RB][KB];
  float m[RB], l[RB], corr[RB];
  for (int r = 0; r < RB; ++r) {
    m[r] = NEG_INF;
    l[r] = 0.0f;
    std::memset(o[r], 0, sizeof(o[r]));
  }
  const __m512 scale = _mm512_set1_ps(pb.scale);
  for (int64_t j0 = 0; j0 < kend; j0 += KB) {
    // Scores, 8 rows x 32 keys at a time: a key tile is loaded once for 8 rows.
    const uint16_t* kt = kp + (j0 / 16) * P * 32;
    for (int r0 = 0; r0 < RB; r0 += 8) {
      __m512 acc[8][2];
      for (int r = 0; r < 8; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      if (limit[r0 + 7] > j0) {  // (a causal group wholly before this block sees none of it)
        for (int p = 0; p < P; ++p) {
          const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kt + p * 32);
          const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kt + (P + p) * 32);
          for (int r = 0; r < 8; ++r) {
            const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(qrow[r0 + r][p]));
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], k0, qb);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], k1, qb);
          }
        }
      }
      // Streaming softmax: the keys each row may see, the block's max, the rescale of what came before.
      for (int rr = 0; rr < 8; ++rr) {
        const int r = r0 + rr;
        const int64_t i = std::min<int64_t>(i0 + r, pb.T - 1);
        __mmask16 ok[2];
        __m512 sc[2];
        __m512 mx = _mm512_set1_ps(NEG_INF);
        for (int t = 0; t < 2; ++t) {
          const int64_t jt = j0 + 16 * t;
          ok[t] = first_n(limit[r] - jt);
          if (pb.mask && ok[t]) {
            const uint8_t* mrow = pb.mask + b * pb.mask_bs + i * pb.S + jt;
            ok[t] &= _mm_cmpneq_epi8_mask(_mm_maskz_loadu_epi8(ok[t], mrow), _mm_setzero_si128());
          }
          sc[t] = _mm512_mask_mul_ps(_mm512_set1_ps(NEG_INF), ok[t], acc[rr][t], scale);
          mx = _mm512_max_ps(mx, sc[t]);
        }
        const float m_new = std::max(m[r], _mm512_reduce_max_ps(mx));
        if (m_new == NEG_INF) {  // nothing visible yet: probabilities 0, nothing to rescale
          std::memset(prob[r], 0, sizeof(prob[r]));
          corr[r] = 1.0f;
          continue;
        }
        corr[r] = m[r] == NEG_INF ? 0.0f : std::exp(m[r] - m_new);
        m[r] = m_new;
        const __m512 mv = _mm512_set1_ps(m_new);
        const __m512 e0 = _mm512_maskz_mov_ps(ok[0], januskit::exp_ps(_mm512_sub_ps(sc[0], mv)));
        const __m512 e1 = _mm512_maskz_mov_ps(ok[1], januskit::exp_ps(_mm512_sub_ps(sc[1], mv)));
        l[r] = l[r] * corr[r] + _mm512_reduce_add_ps(_mm512_add_ps(e0, e1));
        _mm512_storeu_si512(prob[r], (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
      }
    }
    // Output += probabilities x values: 4 rows x 64 dims at a time, a value chunk loaded once for 4 rows.
    const int64_t pairs = (std::min<int64_t>(KB, kend - j0) + 1) / 2;  // an odd tail's second key has p = 0
    const uint16_t* vb = vp + j0 * D;
    for (int r0 = 0; r0 < RB; r0 += 4) {
      if (limit[r0 + 3] <= j0) {  // causal rows before this block: unchanged (their corr is 1)
        continue;
      }
      const uint32_t* pr[4];
      __m512 cr[4];
      for (int r = 0; r < 4; ++r) {
        pr[r] = reinterpret_cast<const uint32_t*>(prob[r0 + r]);
        cr[r] = _mm512_set1_ps(corr[r0 + r]);
      }
      for (int c0 = 0; c0 < C; c0 += 4) {
        __m512 acc[4][4];
        for (int r = 0; r < 4; ++r)
          for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_mul_ps(_mm512_load_ps(o[r0 + r] + 16 * (c0 + c)), cr[r]);
        for (int64_t q = 0; q < pairs; ++q) {
          const uint16_t* vq = vb + q * 2 * D + 32 * c0;
          __m512bh vv[4];
          for (int c = 0; c < 4; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(vq + 32 * c);
          for (int r = 0; r < 4; ++r) {
            const __m512bh pb2 = (__m512bh)_mm512_set1_epi32(static_cast<int>(pr[r][q]));
            for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], vv[c], pb2);
          }
        }
        for (int r = 0; r < 4; ++r)
          for (int c = 0; c < 4; ++c) _mm512_store_ps(o[r0 + r] + 16 * (c0 + c), acc[r][c]);
      }
    }
  }
  for (int r = 0; r < nrows; ++r) {
    const __m512 inv = _mm512_set1_ps(l[r] > 0.0f ? 1.0f / l[r] : 0.0f);  // a row that sees no key: zeros
    uint16_t* dst = pb.out + (((b * pb.T) + i0 + r) * pb.H + h) * D;
    for (int c = 0; c < C; c += 2) {
      const __m512 a = _mm512_mul_ps(_mm512_load_ps(o[r] + 16 * c), inv);
      const __m512 z = _mm512_mul_ps(_mm512_load_ps(o[r] + 16 * c + 16), inv);
      _mm512_storeu_si512(dst + 16 * c, (__m512i)_mm512_cvtne2ps_pbh(z, a));
    }
  }
}

}  // namespace

// q (B, H, T, hd), k / v (B, Hkv, S, hd): any strides with contiguous head vectors; mask None or bool (Bm, T, S)
// with Bm = B or 1 ("may attend"); causal: query i sees keys j <= i + S - T. Returns (B, T, H, hd), contiguous.
torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask,
                                bool causal, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "prefill_attention: q (B, H, T, hd), k/v (B, Hkv, S, hd)");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "prefill_attention: bfloat16 only");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == S && k.size(3) == hd &&
                  v.size(3) == hd && H % Hkv == 0 && S >= T && T > 0, "prefill_attention: shapes do not match");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "prefill_attention: head vectors must be contiguous");
  TORCH_CHECK(q.stride(2) % 2 == 0 && k.stride(2) % 2 == 0, "prefill_attention: rows must be 4-byte aligned");
  TORCH_CHECK(hd == 64 || hd == 128, "prefill_attention: head dim 64 or 128");
  torch::Tensor mc;
  Problem pb{};
  if (mask.has_value()) {
    mc = mask->to(at::kBool).contiguous();
    TORCH_CHECK(mc.dim() == 3 && (mc.size(0) == B || mc.size(0) == 1) && mc.size(1) == T && mc.size(2) == S,
                "prefill_attention: mask must be (B or 1, T, S)");
    pb.mask = reinterpret_cast<const uint8_t*>(mc.data_ptr<bool>());
    pb.mask_bs = mc.size(0) == 1 ? 0 : T * S;
  }
  const int64_t S_pad = (S + KB - 1) / KB * KB;
  auto kpack = torch::empty({B * Hkv, S_pad * hd}, k.options());
  auto vpack = torch::empty({B * Hkv, S_pad * hd}, v.options());
  auto out = torch::empty({B, T, H, hd}, q.options());
  const auto* kptr = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const auto* vptr = reinterpret_cast<const uint16_t*>(v.data_ptr());
  auto* kpp = reinterpret_cast<uint16_t*>(kpack.data_ptr());
  auto* vpp = reinterpret_cast<uint16_t*>(vpack.data_ptr());
  at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / Hkv, g = t % Hkv;
      pack_keys(kptr + b * k.stride(0) + g * k.stride(1), S, k.stride(2), hd, S_pad, kpp + t * S_pad * hd);
      pack_values(vptr + b * v.stride(0) + g * v.stride(1), S, v.stride(2), hd, S_pad, vpp + t * S_pad * hd);
    }
  });
  pb.q = reinterpret_cast<const uint16_t*>(q.data_ptr());
  pb.qs0 = q.stride(0);
  pb.qs1 = q.stride(1);
  pb.qs2 = q.stride(2);
  pb.kp = kpp;
  pb.vp = vpp;
  pb.out = reinterpret_cast<uint16_t*>(out.data_ptr());
  pb.B = B, pb.H = H, pb.Hkv = Hkv, pb.T = T, pb.S = S, pb.S_pad = S_pad;
  pb.causal = causal;
  pb.scale = static_cast<float>(scale);
  const int64_t blocks = (T + RB - 1) / RB;
  // Tasks in (batch, head, row block) order; causal rows near the end cost more, so hand out small chunks.
  at::parallel_for(0, B * H * blocks, 2, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t blk = t % blocks, bh = t / blocks, b = bh / H, h = bh % H;
      if (hd == 128)
        rows_task<128>(pb, b, h, blk * RB);
      else
        rows_task<64>(pb, b, h, blk * RB);
    }
  });
  return out;
}
