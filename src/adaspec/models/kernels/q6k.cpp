// Q6_K weights x int8 activations, batch-invariant as q4k.cpp is: the same activations (acts.h), and
// every output of every row computed by the same instructions in the same order whatever the number
// of rows. models/q6k.py describes the format and the reasons.
//
// A 256-block holds 16 sub-blocks s of 16 weights with 6-bit values q in [0, 64), an 8-bit signed
// scale each and one float factor d:  W[n, k] = d[n, k/256] * sc[n, k/16] * (q[n, k] - 32).
// Weights in tiles of 16 outputs, as q4k.cpp's:
//   w4 [N/16, K/8, 64] uint8: the low 4 bits of q, laid out as q4k.cpp's tiles (byte 4o + i: input
//      i of the group of 8 in its low nibble, input 4 + i in its high nibble)
//   w2 [N/16, K/16, 64] uint8: the high 2 bits of sub-block s's two groups 2s and 2s + 1; byte 4o + i
//      holds inputs i and 4 + i of group 2s in bits 0-1 and 2-3, of group 2s + 1 in bits 4-5 and 6-7
//   sc [N/16, K/16, 16] int8, d [N/16, K/256, 16] float
// Per row, output and 256-block, everything up to one float conversion is an exact integer:
//   I = sum_s sc_s * (sum_i q_i x_i - 32 * sum_i x_i)     |I| <= 16 * 128 * 32 * 16 * 127 < 2^31
//   y += (d * a) * float(I)                                (a: the block's activation scale; one fma)

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

struct Weights6 {
  const uint8_t *w4, *w2;
  const int8_t* sc;
  const float* d;
  int64_t N, K;
};

// 32 * the sum of each sub-block of 16 activations: [R, K/16]
std::vector<int32_t> sums16(const Acts& a, int64_t R, int64_t K) {
  std::vector<int32_t> xs(R * (K / 16));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t s = 0; s < K / 16; ++s) {
      int32_t sum = 0;
      for (int i = 0; i < 16; ++i) sum += a.q[r * K + 16 * s + i];
      xs[r * (K / 16) + s] = 32 * sum;
    }
  return xs;
}

// The 16 outputs of tile t for every row (any x86-64 CPU): the same integers and float operations as
// the vectorised kernel, so the same results bit for bit.
void tile_portable(const Weights6& w, const Acts& a, const int32_t* xs, int64_t R, int64_t t, float* y) {
  const int64_t K = w.K, nb = K / QK, ns = K / 16;
  for (int64_t r = 0; r < R; ++r) {
    const int8_t* x = a.q.data() + r * K;
    float acc[16] = {0};
    for (int64_t b = 0; b < nb; ++b)
      for (int o = 0; o < 16; ++o) {
        int32_t isum = 0;
        for (int j = 0; j < 16; ++j) {
          const int64_t s = b * 16 + j;
          const uint8_t* h = w.w2 + (t * ns + s) * 64 + 4 * o;
          int32_t dot = 0;
          for (int gg = 0; gg < 2; ++gg) {
            const int64_t g = 2 * s + gg;
            const uint8_t* v = w.w4 + (t * (K / 8) + g) * 64 + 4 * o;
            for (int i = 0; i < 4; ++i) {
              const int lo = (v[i] & 15) | (((h[i] >> (4 * gg)) & 3) << 4);
              const int hi = (v[i] >> 4) | (((h[i] >> (4 * gg + 2)) & 3) << 4);
              dot += lo * x[8 * g + i] + hi * x[8 * g + 4 + i];
            }
          }
          isum += static_cast<int32_t>(w.sc[(t * ns + s) * 16 + o]) * (dot - xs[r * ns + s]);
        }
        acc[o] = std::fmaf(static_cast<float>(isum), w.d[(t * nb + b) * 16 + o] * a.d[r * nb + b], acc[o]);
      }
    std::memcpy(y + r * w.N + 16 * t, acc, sizeof acc);
  }
}

// One 256-block b of rows r0 .. r0 + R and tiles t0 .. t0 + T, added to y (see q4k.cpp's block_vnni:
// neither R nor T changes a single result).
template <int R, int T>
__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
void block_vnni(const Weights6& w, const Acts& a, const int32_t* xs, int64_t r0, int64_t t0, int64_t b, float* y) {
  const int64_t K = w.K, nb = K / QK, ns = K / 16;
  const __m512i low4 = _mm512_set1_epi8(15), high2 = _mm512_set1_epi8(0x30);
  __m512i isum[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) isum[r][t] = _mm512_setzero_si512();
  for (int j = 0; j < 16; ++j) {
    const int64_t s = b * 16 + j;
    __m512i v[T][4];
    for (int t = 0; t < T; ++t) {
      const uint8_t* p = w.w4 + ((t0 + t) * (K / 8) + 2 * s) * 64;  // groups 2s and 2s + 1
      const uint8_t* hp = w.w2 + ((t0 + t) * ns + s) * 64;
      _mm_prefetch(reinterpret_cast<const char*>(p + 2048), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(hp + 1024), _MM_HINT_T0);
      const __m512i p0 = _mm512_loadu_si512(p), p1 = _mm512_loadu_si512(p + 64), h = _mm512_loadu_si512(hp);
      v[t][0] = _mm512_or_si512(_mm512_and_si512(p0, low4), _mm512_and_si512(_mm512_slli_epi16(h, 4), high2));
      v[t][1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(p0, 4), low4),
                                _mm512_and_si512(_mm512_slli_epi16(h, 2), high2));
      v[t][2] = _mm512_or_si512(_mm512_and_si512(p1, low4), _mm512_and_si512(h, high2));
      v[t][3] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(p1, 4), low4),
                                _mm512_and_si512(_mm512_srli_epi16(h, 2), high2));
    }
    __m512i scale[T];
    for (int t = 0; t < T; ++t)
      scale[t] = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.sc + ((t0 + t) * ns + s) * 16)));
    for (int r = 0; r < R; ++r) {
      const int8_t* x = a.q.data() + (r0 + r) * K + 16 * s;
      int32_t xi[4];
      std::memcpy(xi, x, 16);
      const __m512i b0 = _mm512_set1_epi32(xi[0]), b1 = _mm512_set1_epi32(xi[1]), b2 = _mm512_set1_epi32(xi[2]),
                    b3 = _mm512_set1_epi32(xi[3]);
      const __m512i sum32 = _mm512_set1_epi32(xs[(r0 + r) * ns + s]);
      for (int t = 0; t < T; ++t) {
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[t][0], b0);
        dot = _mm512_dpbusd_epi32(dot, v[t][1], b1);
        dot = _mm512_dpbusd_epi32(dot, v[t][2], b2);
        dot = _mm512_dpbusd_epi32(dot, v[t][3], b3);
        isum[r][t] = _mm512_add_epi32(isum[r][t], _mm512_mullo_epi32(_mm512_sub_epi32(dot, sum32), scale[t]));
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    const __m512 dv = _mm512_loadu_ps(w.d + ((t0 + t) * nb + b) * 16);
    for (int r = 0; r < R; ++r) {
      float* out = y + (r0 + r) * w.N + 16 * (t0 + t);
      const __m512 ad = _mm512_set1_ps(a.d[(r0 + r) * nb + b]);
      _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r][t]), _mm512_mul_ps(dv, ad),
                                            _mm512_loadu_ps(out)));
    }
  }
}

using BlockFn = void (*)(const Weights6&, const Acts&, const int32_t*, int64_t, int64_t, int64_t, float*);
constexpr int GROUP = 6;  // rows that share each weight unpacking (as q4k.cpp: a 5-row verification is one group)

template <int T>
void tiles_vnni(const Weights6& w, const Acts& a, const int32_t* xs, int64_t R, int64_t t0, float* y) {
  static constexpr BlockFn by_rows[GROUP] = {block_vnni<1, T>, block_vnni<2, T>, block_vnni<3, T>,
                                             block_vnni<4, T>, block_vnni<5, T>, block_vnni<6, T>};
  for (int64_t r = 0; r < R; ++r) std::memset(y + r * w.N + 16 * t0, 0, sizeof(float) * 16 * T);
  for (int64_t b = 0; b < w.K / QK; ++b)
    for (int64_t r0 = 0; r0 < R; r0 += GROUP) by_rows[std::min<int64_t>(GROUP, R - r0) - 1](w, a, xs, r0, t0, b, y);
}

}  // namespace

// x (R, K) float32 -> y (R, N) float32. kernel: "auto" (AVX-512 VNNI where the CPU has it) or "portable".
torch::Tensor q6k_linear(torch::Tensor x, torch::Tensor w4, torch::Tensor w2, torch::Tensor sc, torch::Tensor d,
                         const std::string& kernel) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be (R, K) float32");
  const int64_t R = x.size(0), K = x.size(1), N = w4.size(0) * 16;
  TORCH_CHECK(K % QK == 0, "K must be a multiple of 256");
  TORCH_CHECK(w4.dim() == 3 && w4.size(1) == K / 8 && w4.size(2) == 64, "w4 must be (N/16, K/8, 64)");
  TORCH_CHECK(w2.dim() == 3 && w2.size(0) == N / 16 && w2.size(1) == K / 16 && w2.size(2) == 64,
              "w2 must be (N/16, K/16, 64)");
  TORCH_CHECK(sc.numel() == N * (K / 16) && d.numel() == N * (K / QK), "scale shapes do not match N and K");
  const bool vnni = kernel != "portable" && has_vnni();
  const Acts a = quantize(x.data_ptr<float>(), R, K, vnni);
  const std::vector<int32_t> xs = sums16(a, R, K);
  auto y = torch::empty({R, N}, x.options());
  const Weights6 w{w4.data_ptr<uint8_t>(), w2.data_ptr<uint8_t>(), sc.data_ptr<int8_t>(), d.data_ptr<float>(), N, K};
  float* Y = y.data_ptr<float>();
  const int64_t tiles = N / 16;
  if (!vnni) {
    at::parallel_for(0, tiles, 8, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) tile_portable(w, a, xs.data(), R, t, Y);
    });
    return y;
  }
  for_tiles(tiles, R, [&](int64_t t) { tiles_vnni<4>(w, a, xs.data(), R, t, Y); },
            [&](int64_t t) { tiles_vnni<1>(w, a, xs.data(), R, t, Y); });
  return y;
}
