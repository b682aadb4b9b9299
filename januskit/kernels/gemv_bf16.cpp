// y = x @ w.T (+ b) for a few rows of x, bfloat16 in and out, float32 accumulation, on AVX-512 BF16 CPUs; the
// weight bfloat16, or int8 with one scale per output channel (linear_int8).
//
// A decode step multiplies 1-16 activation rows by every weight matrix of the decoder once: the time is the
// time to stream the weights from memory. This kernel streams R weight rows at a time, each loaded once per 32
// columns and multiplied into every activation row with vdpbf16ps (32 bf16 products summed into 16 fp32
// lanes), so the weights are read exactly once whatever the number of rows. Output rows are split across the
// intra-op threads (at::parallel_for), each thread reading a contiguous block of weight rows.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <vector>

#include "gemv_args.h"

namespace {

// Software prefetch distances in bytes, two of them: into L1 for what the loop reads soon, and into L2 further
// ahead, which keeps more reads in flight (this 2-core EPYC, weights out of cache, alternated in one process:
// 2 activation rows 26-27 against 22-23 GB/s with the L1 prefetch alone, 8 rows 24-25 against 18).
constexpr int64_t kRowAhead = 2048;    // along one weight row, into L1
constexpr int64_t kRowAheadL2 = 8192;  // along one weight row, into L2
constexpr int64_t kBlocksAheadL2 = 4;  // L2 prefetch distance of blocks of several rows, in blocks

// The two weight types. Each loads 32 consecutive weights of a row as 32 bf16 in row order (the order of x's 32
// values that vdpbf16ps pairs them with) and finishes a row's float32 sum.
struct Bf16Weight {
  using T = uint16_t;
  static __m512bh load(const T* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static float finish(float sum, const uint16_t*, int64_t) { return sum; }
};

// int8 with one bf16 scale per output channel (januskit's weight-only int8 mode): half the bytes of bf16. The 32
// int8 weights are widened to float32 and packed into bf16, both exact (|q| <= 127 needs 7 bits of mantissa); the
// scale multiplies the row's sum once.
struct Int8Weight {
  using T = int8_t;
  static __m512bh load(const T* p) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    const __m512 hi =
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
    return _mm512_cvtne2ps_pbh(hi, lo);  // elements 0-15 from lo, 16-31 from hi
  }
  static float finish(float sum, const uint16_t* scale, int64_t n) {
    return sum * static_cast<float>(c10::BFloat16(scale[n], c10::BFloat16::from_bits()));
  }
};

template <class W, int M, int R>
void rows_block(const uint16_t* x, const typename W::T* w, const uint16_t* scale, const uint16_t* bias, uint16_t* y,
                int64_t K, int64_t N, int64_t n, int64_t ahead, int64_t ahead_l2) {
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) {
      const typename W::T* p = w + (n + r) * K + k;
      _mm_prefetch(reinterpret_cast<const char*>(p + ahead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p + ahead_l2), _MM_HINT_T1);
      wv[r] = W::load(p);
    }
    for (int m = 0; m < M; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xv, wv[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const float b = bias ? static_cast<float>(c10::BFloat16(bias[n + r], c10::BFloat16::from_bits())) : 0.0f;
    for (int m = 0; m < M; ++m) {
      const c10::BFloat16 v(W::finish(_mm512_reduce_add_ps(acc[r][m]), scale, n + r) + b);
      y[m * N + n + r] = v.x;
    }
  }
}

template <class W, int M, int R>
void gemv(const uint16_t* x, const typename W::T* w, const uint16_t* scale, const uint16_t* bias, uint16_t* y,
          int64_t K, int64_t N) {
  const int64_t blocks = N / R;
  // One weight row at a time prefetches 2 KB and 8 KB further along its row; blocks of several rows prefetch the
  // next block's rows at the same column (where the loop goes next: 8 rows 23-25 against 16-23 GB/s with the
  // row-wise 2 KB) and the rows four blocks on. Prefetches past the end of the weight are harmless (never fault).
  constexpr int64_t size = sizeof(typename W::T);
  const int64_t ahead = R > 1 ? R * K : kRowAhead / size;
  const int64_t ahead_l2 = R > 1 ? kBlocksAheadL2 * R * K : kRowAheadL2 / size;
  // Grain: enough weight rows per task that the threads' blocks are long sequential streams.
  at::parallel_for(0, blocks, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) rows_block<W, M, R>(x, w, scale, bias, y, K, N, b * R, ahead, ahead_l2);
  });
  for (int64_t n = blocks * R; n < N; ++n)
    rows_block<W, M, 1>(x, w, scale, bias, y, K, N, n, kRowAhead / size, kRowAheadL2 / size);
}

// Accumulators: R * M zmm registers of the 32 (R weight rows at a time), R + 1 more for the loaded vectors. The
// caller picks R (kernels._block_rows: 1, 3 or 2 by row count); a block too large for M falls back to one row.
template <class W, int M>
void dispatch_r(const uint16_t* x, const typename W::T* w, const uint16_t* s, const uint16_t* b, uint16_t* y,
                int64_t K, int64_t N, int r) {
  if constexpr (M <= 9) {
    if (r == 3) return gemv<W, M, 3>(x, w, s, b, y, K, N);
  }
  if constexpr (M <= 14) {
    if (r == 2) return gemv<W, M, 2>(x, w, s, b, y, K, N);
  }
  gemv<W, M, 1>(x, w, s, b, y, K, N);
}

template <class W>
torch::Tensor linear(const char* name, torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> scale,
                     c10::optional<torch::Tensor> bias, int64_t r) {
  januskit::check_rows_operands(name, x, w);
  x = x.contiguous();
  w = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  torch::Tensor bc, sc;
  const uint16_t* bp = januskit::channel_vector(bias, N, name, "bias", bc);
  const uint16_t* sp = januskit::channel_vector(scale, N, name, "scale", sc);
  auto xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  auto wp = reinterpret_cast<const typename W::T*>(w.data_ptr());
  auto yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  switch (M) {
#define CASE(m) case m: dispatch_r<W, m>(xp, wp, sp, bp, yp, K, N, static_cast<int>(r)); break;
    CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
    CASE(9) CASE(10) CASE(11) CASE(12) CASE(13) CASE(14) CASE(15) CASE(16)
#undef CASE
  }
  return y;
}

}  // namespace

torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias, int64_t r) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "linear_bf16: bfloat16 weight only");
  return linear<Bf16Weight>("linear_bf16", x, w, c10::nullopt, bias, r);
}

torch::Tensor linear_int8(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                          int64_t r) {
  TORCH_CHECK(q.scalar_type() == at::kChar, "linear_int8: int8 weight only");
  return linear<Int8Weight>("linear_int8", x, q, scale, bias, r);
}

// The memory-read probe of the benchmark's roofline: the sum of a float32 tensor, streamed with or without a
// software prefetch 2 KB ahead. Which loop reads fastest depends on the machine and the moment (a plain
// torch.sum reads ~10% slower than the prefetched loop on some machines; on a 2-core EPYC VM the loop without
// prefetch read 10-25% faster than with it), so the benchmark takes the best of them.
double read_sum(torch::Tensor a, bool prefetch) {
  TORCH_CHECK(a.scalar_type() == at::kFloat && a.is_contiguous() && a.numel() % 64 == 0,
              "read_sum: contiguous float32, a multiple of 64 elements");
  const float* p = a.data_ptr<float>();
  const int64_t chunks = a.numel() / 64;
  std::vector<double> part(at::get_num_threads() + 1, 0.0);
  at::parallel_for(0, chunks, 4096, [&](int64_t c0, int64_t c1) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t c = c0; c < c1; ++c) {
      const float* q = p + c * 64;
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(q + 512), _MM_HINT_T0);
      s0 = _mm512_add_ps(s0, _mm512_loadu_ps(q));
      s1 = _mm512_add_ps(s1, _mm512_loadu_ps(q + 16));
      s2 = _mm512_add_ps(s2, _mm512_loadu_ps(q + 32));
      s3 = _mm512_add_ps(s3, _mm512_loadu_ps(q + 48));
    }
    part[at::get_thread_num()] += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
  });
  double total = 0.0;
  for (double x : part) total += x;
  return total;
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> valid,
                               double scale);

torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask,
                                bool causal, double scale);

torch::Tensor linear_amx(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
torch::Tensor linear_amx_int8(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> bias);
bool amx_available();

torch::Tensor rmsnorm_bf16(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor rope_bf16(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor silu_mul_bf16(torch::Tensor gate, torch::Tensor up);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rmsnorm_bf16", &rmsnorm_bf16, "RMSNorm of a few bf16 rows, eager rounding");
  m.def("rope_bf16", &rope_bf16, "rotary embedding of one position per row, eager rounding");
  m.def("silu_mul_bf16", &silu_mul_bf16, "silu(gate) * up in bf16, eager rounding");
  m.def("read_sum", &read_sum, "sum of a float32 tensor, streamed, prefetched or not (memory-read probe)");
  m.def("decode_attention", &decode_attention, "one-query attention over a bf16 KV cache (AVX-512 BF16)");
  m.def("prefill_attention", &prefill_attention, "prompt attention, causal or masked, bf16 (AVX-512 BF16)");
  m.def("linear_bf16", &linear_bf16, "y = x @ w.T + b, bf16, 1-16 rows (AVX-512 BF16), r weight rows a block");
  m.def("linear_amx", &linear_amx, "y = x @ w.T + b, bf16, 1-16 rows on AMX tiles, N a multiple of 16");
  m.def("linear_amx_int8", &linear_amx_int8, "y = (x @ q.T) * scale + b, bf16 x, int8 q, 1-16 rows on AMX tiles");
  m.def("amx_available", &amx_available, "whether this process may use the AMX tile registers");
  m.def("linear_int8", &linear_int8, "y = (x @ q.T) * scale + b, bf16 x, int8 q, 1-16 rows (AVX-512 BF16)");
}
