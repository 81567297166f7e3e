// Q5_0 weights x int8 activations, batch-invariant as q4k.cpp and q6k.cpp are: every output of every
// row computed by the same instructions in the same order whatever the number of rows.
// models/q5_0.py describes the format and the reasons.
//
// A block holds 32 weights with 5-bit values q in [0, 32) and one fp16 factor d:
//   W[n, k] = d[n, k/32] * (q[n, k] - 16).
// Activations are int8 per row and per 32-block (the 0.5B's hidden size, 896, is no multiple of 256;
// acts.h's portable quantiser, so both kernels see the same bytes). Weights in tiles of 16 outputs:
//   w4 [N/16, K/8, 64] uint8: the low 4 bits of q, laid out as q4k.cpp's tiles (byte 4o + i: input
//      i of the group of 8 in its low nibble, input 4 + i in its high nibble)
//   wh [N/16, K/32, 64] uint8: the fifth bits of block b; byte 4o + i holds input i of the block's
//      group g in bit 2g and input 4 + i in bit 2g + 1
//   d  [N/16, K/32, 16] fp16, as in the file
// Per row, output and block, an exact integer and one fma:
//   I = sum_i q_i x_i - 16 * sum_i x_i        (|I| < 2^18)
//   y += (d * a) * float(I)                    (a: the block's activation scale)

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "acts.h"

namespace {

using namespace adaspec_kernels;

constexpr int QB = 32;

struct Acts32 {
  std::vector<int8_t> q;    // [R, K]
  std::vector<float> d;     // [R, K/32] scale of each block
  std::vector<int32_t> xs;  // [R, K/32] 16 * the sum of each block's integers
};

Acts32 quantize32(const float* x, int64_t R, int64_t K) {
  Acts32 a;
  const int64_t nb = K / QB;
  a.q.resize(R * K);
  a.d.resize(R * nb);
  a.xs.resize(R * nb);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      int8_t* qb = a.q.data() + r * K + b * QB;
      quantize_block_portable(x + r * K + b * QB, qb, &a.d[r * nb + b], QB);
      int32_t sum = 0;
      for (int i = 0; i < QB; ++i) sum += qb[i];
      a.xs[r * nb + b] = 16 * sum;
    }
  return a;
}

struct Weights5 {
  const uint8_t *w4, *wh;
  const at::Half* d;
  int64_t N, K;
};

// The 16 outputs of tile t for every row (any x86-64 CPU): the same integers and float operations as
// the vectorised kernel, so the same results bit for bit.
void tile_portable(const Weights5& w, const Acts32& a, int64_t R, int64_t t, float* y) {
  const int64_t K = w.K, nb = K / QB;
  for (int64_t r = 0; r < R; ++r) {
    const int8_t* x = a.q.data() + r * K;
    float acc[16] = {0};
    for (int64_t b = 0; b < nb; ++b)
      for (int o = 0; o < 16; ++o) {
        const uint8_t* h = w.wh + (t * nb + b) * 64 + 4 * o;
        int32_t dot = 0;
        for (int g = 0; g < 4; ++g) {
          const uint8_t* v = w.w4 + (t * (K / 8) + 4 * b + g) * 64 + 4 * o;
          for (int i = 0; i < 4; ++i) {
            const int lo = (v[i] & 15) | (((h[i] >> (2 * g)) & 1) << 4);
            const int hi = (v[i] >> 4) | (((h[i] >> (2 * g + 1)) & 1) << 4);
            dot += lo * x[QB * b + 8 * g + i] + hi * x[QB * b + 8 * g + 4 + i];
          }
        }
        const float scale = static_cast<float>(w.d[(t * nb + b) * 16 + o]) * a.d[r * nb + b];
        acc[o] = std::fmaf(static_cast<float>(dot - a.xs[r * nb + b]), scale, acc[o]);
      }
    std::memcpy(y + r * w.N + 16 * t, acc, sizeof acc);
  }
}

// bit B of every byte of h moved to bit 4 (the fifth bit of a value), every other bit cleared
template <int B>
__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
inline __m512i fifth_bit(__m512i h) {
  const __m512i bit4 = _mm512_set1_epi8(0x10);
  if constexpr (B < 4) return _mm512_and_si512(_mm512_slli_epi16(h, 4 - B), bit4);
  else if constexpr (B > 4) return _mm512_and_si512(_mm512_srli_epi16(h, B - 4), bit4);
  else return _mm512_and_si512(h, bit4);
}

// Block b of rows r0 .. r0 + R and tiles t0 .. t0 + T, added to y; neither R nor T changes a result.
template <int R, int T>
__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
void block_vnni(const Weights5& w, const Acts32& a, int64_t r0, int64_t t0, int64_t b, float* y) {
  const int64_t K = w.K, nb = K / QB;
  const __m512i low4 = _mm512_set1_epi8(15);
  __m512i dot[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) dot[r][t] = _mm512_setzero_si512();
  for (int half = 0; half < 2; ++half) {  // groups 2 half and 2 half + 1 of the block
    __m512i v[T][4];
    for (int t = 0; t < T; ++t) {
      const uint8_t* p = w.w4 + ((t0 + t) * (K / 8) + 4 * b + 2 * half) * 64;
      const uint8_t* hp = w.wh + ((t0 + t) * nb + b) * 64;
      _mm_prefetch(reinterpret_cast<const char*>(p + 1024), _MM_HINT_T0);
      const __m512i p0 = _mm512_loadu_si512(p), p1 = _mm512_loadu_si512(p + 64), h = _mm512_loadu_si512(hp);
      const __m512i l0 = _mm512_and_si512(p0, low4), h0 = _mm512_and_si512(_mm512_srli_epi16(p0, 4), low4);
      const __m512i l1 = _mm512_and_si512(p1, low4), h1 = _mm512_and_si512(_mm512_srli_epi16(p1, 4), low4);
      if (half == 0) {
        v[t][0] = _mm512_or_si512(l0, fifth_bit<0>(h));
        v[t][1] = _mm512_or_si512(h0, fifth_bit<1>(h));
        v[t][2] = _mm512_or_si512(l1, fifth_bit<2>(h));
        v[t][3] = _mm512_or_si512(h1, fifth_bit<3>(h));
      } else {
        v[t][0] = _mm512_or_si512(l0, fifth_bit<4>(h));
        v[t][1] = _mm512_or_si512(h0, fifth_bit<5>(h));
        v[t][2] = _mm512_or_si512(l1, fifth_bit<6>(h));
        v[t][3] = _mm512_or_si512(h1, fifth_bit<7>(h));
      }
    }
    for (int r = 0; r < R; ++r) {
      int32_t xi[4];
      std::memcpy(xi, a.q.data() + (r0 + r) * K + QB * b + 16 * half, 16);
      const __m512i b0 = _mm512_set1_epi32(xi[0]), b1 = _mm512_set1_epi32(xi[1]), b2 = _mm512_set1_epi32(xi[2]),
                    b3 = _mm512_set1_epi32(xi[3]);
      for (int t = 0; t < T; ++t) {
        dot[r][t] = _mm512_dpbusd_epi32(dot[r][t], v[t][0], b0);
        dot[r][t] = _mm512_dpbusd_epi32(dot[r][t], v[t][1], b1);
        dot[r][t] = _mm512_dpbusd_epi32(dot[r][t], v[t][2], b2);
        dot[r][t] = _mm512_dpbusd_epi32(dot[r][t], v[t][3], b3);
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.d + ((t0 + t) * nb + b) * 16)));
    for (int r = 0; r < R; ++r) {
      float* out = y + (r0 + r) * w.N + 16 * (t0 + t);
      const __m512 scale = _mm512_mul_ps(dv, _mm512_set1_ps(a.d[(r0 + r) * nb + b]));
      const __m512i i = _mm512_sub_epi32(dot[r][t], _mm512_set1_epi32(a.xs[(r0 + r) * nb + b]));
      _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), scale, _mm512_loadu_ps(out)));
    }
  }
}

using BlockFn = void (*)(const Weights5&, const Acts32&, int64_t, int64_t, int64_t, float*);
constexpr int GROUP = 6;  // rows that share each weight unpacking (as q4k.cpp)

template <int T>
void tiles_vnni(const Weights5& w, const Acts32& a, int64_t R, int64_t t0, float* y) {
  static constexpr BlockFn by_rows[GROUP] = {block_vnni<1, T>, block_vnni<2, T>, block_vnni<3, T>,
                                             block_vnni<4, T>, block_vnni<5, T>, block_vnni<6, T>};
  for (int64_t r = 0; r < R; ++r) std::memset(y + r * w.N + 16 * t0, 0, sizeof(float) * 16 * T);
  for (int64_t b = 0; b < w.K / QB; ++b)
    for (int64_t r0 = 0; r0 < R; r0 += GROUP) by_rows[std::min<int64_t>(GROUP, R - r0) - 1](w, a, r0, t0, b, y);
}

}  // namespace

// x (R, K) float32 -> y (R, N) float32. kernel: "auto" (AVX-512 VNNI where the CPU has it) or "portable".
torch::Tensor q5_0_linear(torch::Tensor x, torch::Tensor w4, torch::Tensor wh, torch::Tensor d,
                          const std::string& kernel) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be (R, K) float32");
  const int64_t R = x.size(0), K = x.size(1), N = w4.size(0) * 16;
  TORCH_CHECK(K % QB == 0, "K must be a multiple of 32");
  TORCH_CHECK(w4.dim() == 3 && w4.size(1) == K / 8 && w4.size(2) == 64, "w4 must be (N/16, K/8, 64)");
  TORCH_CHECK(wh.dim() == 3 && wh.size(0) == N / 16 && wh.size(1) == K / QB && wh.size(2) == 64,
              "wh must be (N/16, K/32, 64)");
  TORCH_CHECK(d.scalar_type() == torch::kFloat16 && d.numel() == N * (K / QB), "d must be (N/16, K/32, 16) float16");
  const bool vnni = kernel != "portable" && has_vnni();
  const Acts32 a = quantize32(x.data_ptr<float>(), R, K);
  auto y = torch::empty({R, N}, x.options());
  const Weights5 w{w4.data_ptr<uint8_t>(), wh.data_ptr<uint8_t>(), d.data_ptr<at::Half>(), N, K};
  float* Y = y.data_ptr<float>();
  const int64_t tiles = N / 16;
  if (!vnni) {
    at::parallel_for(0, tiles, 8, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) tile_portable(w, a, R, t, Y);
    });
    return y;
  }
  for_tiles(tiles, R, [&](int64_t t) { tiles_vnni<4>(w, a, R, t, Y); },
            [&](int64_t t) { tiles_vnni<1>(w, a, R, t, Y); });
  return y;
}
