// y = x @ w.T (+ b) for 3-16 bfloat16 rows of x on Intel AMX tiles, float32 accumulation; the weight bfloat16, or
// int8 with one scale per output channel (linear_amx_int8).
//
// The vdpbf16ps kernel (gemv_bf16.cpp) spends one instruction per activation row for each 32 weights, so from 3 rows
// on it falls behind the memory (2-core Xeon, 2 threads, cold 5632 x 2048 weights: 26 GB/s at 2 rows, 21.5-22 at
// 4-8, 11 at 16; this kernel 26-27 at 2-16 rows). A tile product does 16 weight rows x 32 columns x up to 16
// activation rows in one instruction, which leaves the weight stream as the only cost. The product is computed
// transposed, y.T = w x.T: the weight is the tile's left operand, loaded straight from its (N, K) row-major layout
// (16 rows of 64 bytes, the row stride apart), and x.T the right operand, which the tile unit wants in pairs ("VNNI"
// layout: row r holds x[m][2r], x[m][2r + 1] for every m), so x is transposed once per call as 32-bit pairs. Each
// thread takes blocks of 32 output channels (2 accumulator tiles of 16 channels x M rows), streams their rows 32
// columns at a time with a software prefetch a few steps ahead along every row (the rows are one page apart: too
// many streams for the hardware prefetcher), and writes the block's outputs transposed back.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "gemv_args.h"

namespace {

// Linux hands out the tile registers' state only on request (arch_prctl, per process).
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtileData = 18;

bool tiles_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtileData) == 0;
  return ok;
}

// ldtilecfg's 64-byte operand: palette 1, then bytes per row and rows of each of the 8 tiles.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: 0-1 accumulators (16 channels x M fp32), 4-5 weights (16 channels x 32 bf16, alternated so that a load
// need not wait for the product before it), 6 the right operand (16 column pairs x M rows).
// Blocks of 2 accumulator tiles (32 channels) and a prefetch 2 steps (128 bytes) ahead along each row read fastest
// (2-core Xeon, 2 threads, cold 5632 x 2048 weights, 8 rows: 26.5 GB/s against 20.4 with 4 tiles, whose 64 row
// streams a page apart run out of TLB and prefetch streams; no prefetch 26.1; 16 steps ahead 23.4).
constexpr int64_t kAhead = 2;
constexpr int64_t kTiles = 2;

// The two weight types. A bf16 weight tile is loaded straight from the weight; an int8 one is widened first, 16 rows
// x 32 weights into a 1 KB bf16 buffer (exact: |q| <= 127 fits bf16's 8-bit mantissa), which the tile loads from L1.
// The widening is once per weight whatever the number of rows, where the vdpbf16ps int8 kernel also spends one
// instruction per row. The int8 weight's per-channel scale multiplies the finished sums.
struct Bf16Tile {
  using T = uint16_t;
  static constexpr bool kWiden = false;
};
struct Int8Tile {
  using T = int8_t;
  static constexpr bool kWiden = true;
};

__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline void widen16(const int8_t* p, int64_t K, uint16_t* out) {
  for (int r = 0; r < 16; ++r) {
    const int8_t* q = p + r * K;
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
    const __m512 hi =
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16))));
    _mm512_store_si512(out + r * 32, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
  asm volatile("" : : "r"(out) : "memory");  // GCC 12 does not see tileloadd read the buffer (as for ldtilecfg)
}

template <class W, int T>
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16"))) void block(
    const uint32_t* xt, const typename W::T* w, const uint16_t* scale, const uint16_t* bias, uint16_t* y, int64_t M,
    int64_t K, int64_t N, int64_t n0) {
  _tile_zero(0);
  if constexpr (T > 1) _tile_zero(1);
  const int64_t stride = K * sizeof(typename W::T);  // bytes between weight rows
  const typename W::T* base = w + n0 * K;
  alignas(64) uint16_t wide[2][16 * 32];
  for (int64_t k = 0; k < K; k += 32) {
    const typename W::T* p = base + k;
    for (int r = 0; r < 16 * T; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(p + r * K + kAhead * 32), _MM_HINT_T0);
    _tile_loadd(6, xt + (k / 2) * M, M * 4);
    if constexpr (W::kWiden) {
      widen16(reinterpret_cast<const int8_t*>(p), K, wide[0]);
      _tile_loadd(4, wide[0], 64);
    } else {
      _tile_loadd(4, p, stride);
    }
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (T > 1) {
      if constexpr (W::kWiden) {
        widen16(reinterpret_cast<const int8_t*>(p + 16 * K), K, wide[1]);
        _tile_loadd(5, wide[1], 64);
      } else {
        _tile_loadd(5, p + 16 * K, stride);
      }
      _tile_dpbf16ps(1, 5, 6);
    }
  }
  alignas(64) float out[2][16][16];
  _tile_stored(0, out[0], M * 4);
  if constexpr (T > 1) _tile_stored(1, out[1], M * 4);
  asm volatile("" : : "r"(&out[0][0][0]) : "memory");  // and tilestored's writes, read below
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < 16; ++i) {
      const int64_t n = n0 + 16 * t + i;
      const float b = bias ? static_cast<float>(c10::BFloat16(bias[n], c10::BFloat16::from_bits())) : 0.0f;
      const float sc = scale ? static_cast<float>(c10::BFloat16(scale[n], c10::BFloat16::from_bits())) : 1.0f;
      const float* row = &out[t][0][0] + i * M;  // tile t's row i, stored with a row stride of M floats
      for (int64_t m = 0; m < M; ++m) y[m * N + n] = c10::BFloat16(row[m] * sc + b).x;
    }
}

__attribute__((target("amx-tile,amx-bf16"))) void configure(int64_t M) {
  TileConfig cfg;
  for (int t : {0, 1, 6}) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = static_cast<uint16_t>(M * 4);
  }
  for (int t : {4, 5}) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  // GCC 12 does not see ldtilecfg read its operand and drops the stores above; the barrier keeps them.
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) void release() { _tile_release(); }

}  // namespace

bool amx_available() { return tiles_permitted(); }

namespace {

template <class W>
torch::Tensor linear_tiles(const char* name, torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> scale,
                           c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(tiles_permitted(), name, ": the kernel did not get the AMX tile state (arch_prctl)");
  januskit::check_rows_operands(name, x, w);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(N % 16 == 0, name, ": K a multiple of 32 and N of 16, got K ", K, ", N ", N);
  x = x.contiguous();
  w = w.contiguous();
  torch::Tensor bc, sc;
  const uint16_t* bp = januskit::channel_vector(bias, N, name, "bias", bc);
  const uint16_t* sp = januskit::channel_vector(scale, N, name, "scale", sc);
  // x.T in column pairs: xt[j][m] = the j-th pair of x's row m, (K / 2, M) 32-bit words, each written below (so an
  // uninitialised buffer from torch's allocator, not a zero-filled vector, on this per-call path).
  auto xt_buf = torch::empty({K / 2 * M}, x.options().dtype(at::kInt));
  uint32_t* xt = reinterpret_cast<uint32_t*>(xt_buf.data_ptr());
  const uint32_t* xs = reinterpret_cast<const uint32_t*>(x.data_ptr());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < K / 2; ++j) xt[j * M + m] = xs[m * (K / 2) + j];
  auto y = torch::empty({M, N}, x.options());
  const auto* wp = reinterpret_cast<const typename W::T*>(w.data_ptr());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  constexpr int64_t width = 16 * kTiles;
  const int64_t blocks = N / width;
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    configure(M);
    for (int64_t b = b0; b < b1; ++b) block<W, kTiles>(xt, wp, sp, bp, yp, M, K, N, b * width);
    release();
  });
  if (blocks * width < N) {
    configure(M);
    for (int64_t n = blocks * width; n < N; n += 16) block<W, 1>(xt, wp, sp, bp, yp, M, K, N, n);
    release();
  }
  return y;
}

}  // namespace

torch::Tensor linear_amx(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "linear_amx: bfloat16 weight only");
  return linear_tiles<Bf16Tile>("linear_amx", x, w, c10::nullopt, bias);
}

torch::Tensor linear_amx_int8(torch::Tensor x, torch::Tensor q, torch::Tensor scale,
                              c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(q.scalar_type() == at::kChar, "linear_amx_int8: int8 weight only");
  return linear_tiles<Int8Tile>("linear_amx_int8", x, q, scale, bias);
}
