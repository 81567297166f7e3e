// Q4_K weights x int8 activations, batch-invariant: each output of each row is computed by the same
// instructions in the same order whatever the number of rows, so a k-row forward is bit-identical to
// k one-row forwards. models/q4k.py describes the formats and the reasons.
//
// Weights in tiles of 16 outputs (t) x 8 inputs (g), 64 bytes each: byte 4*o + i holds
//   q[16t + o, 8g + i] in its low nibble and q[16t + o, 8g + 4 + i] in its high nibble,
// so one 64-byte load gives two vpdpbusd operands whose lane o sums 4 inputs of output 16t + o.
//   w4 [N/16, K/8, 64] uint8
//   sc [N/16, K/32, 16] uint8 (6-bit scale of each sub-block of 32 inputs, by output)
//   mn [N/16, K/256, 4, 16, 2] uint8 (6-bit mins, sub-blocks 2p and 2p+1 side by side per output)
//   d, dm [N/16, K/256, 16] float
//   W[n, k] = d[n, k/256] * sc[n, k/32] * q[n, k] - dm[n, k/256] * mn[n, k/32]
// Activations are quantised per row and per 256-block to int8 (symmetric, round to nearest even).
//
// Per row, output and 256-block b, everything up to two float conversions is an exact integer:
//   I = sum_j sc_j * (sum_i q_i x_i)   |I| <= 8 * 63 * 32 * 15 * 127 < 2^31
//   M = sum_j mn_j * (sum_i x_i)       |M| <= 8 * 63 * 32 * 127
//   y += (d * a) * float(I);  y -= (dm * a) * float(M)     (a: the block's activation scale; two fmas)
// so the sub-block scales cost one integer multiply-add per sub-block instead of float work, and
// the mins one vpdpwssd per pair of sub-blocks.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "acts.h"

namespace {

using namespace adaspec_kernels;

struct Weights {
  const uint8_t *w4, *sc, *mn;
  const float *d, *dm;
  int64_t N, K;
};

// The 16 outputs of tile t for every row (any x86-64 CPU): the same integers and float operations
// as the vectorised kernel.
void tile_portable(const Weights& w, const Acts& a, int64_t R, int64_t t, float* y) {
  const int64_t K = w.K, nb = K / QK, ns = K / 32;
  for (int64_t r = 0; r < R; ++r) {
    const int8_t* x = a.q.data() + r * K;
    float acc[16] = {0};
    for (int64_t b = 0; b < nb; ++b) {
      const int32_t* s = &a.s[r * (K / 64) + b * 4];
      for (int o = 0; o < 16; ++o) {
        int32_t isum = 0, imin = 0;
        for (int j = 0; j < 8; ++j) {
          const int64_t sb = b * 8 + j;
          int32_t dot = 0;
          for (int gg = 0; gg < 4; ++gg) {
            const int64_t g = sb * 4 + gg;
            const uint8_t* v = w.w4 + (t * (K / 8) + g) * 64 + 4 * o;
            for (int i = 0; i < 4; ++i) dot += (v[i] & 15) * x[8 * g + i] + (v[i] >> 4) * x[8 * g + 4 + i];
          }
          isum += static_cast<int32_t>(w.sc[(t * ns + sb) * 16 + o]) * dot;
          const int16_t part = static_cast<int16_t>(j % 2 ? (s[j / 2] >> 16) : (s[j / 2] & 0xffff));
          imin += static_cast<int32_t>(w.mn[((t * nb + b) * 4 + j / 2) * 32 + 2 * o + j % 2]) * part;
        }
        const float ad = a.d[r * nb + b];
        const float scale = w.d[(t * nb + b) * 16 + o] * ad, low = w.dm[(t * nb + b) * 16 + o] * ad;
        acc[o] = std::fmaf(static_cast<float>(isum), scale, acc[o]);
        acc[o] = std::fmaf(-static_cast<float>(imin), low, acc[o]);
      }
    }
    std::memcpy(y + r * w.N + 16 * t, acc, sizeof acc);
  }
}

// One 256-block b of rows r0 .. r0 + R and tiles t0 .. t0 + T, added to y. R and T are template
// arguments, so that the loops unroll and the accumulators stay in registers. Neither changes a
// single result: an output's integer sums are exact in any order, and its two float operations per
// block run in the same order for every R and T, so how rows are grouped does not matter either.
template <int R, int T>
__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
void block_vnni(const Weights& w, const Acts& a, int64_t r0, int64_t t0, int64_t b, float* y) {
  const int64_t K = w.K, nb = K / QK, ns = K / 32;
  constexpr int C = R * T >= 4 ? 1 : 2;  // independent dot chains per output tile (latency, not throughput)
  const __m512i low4 = _mm512_set1_epi8(15);
  __m512i isum[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) isum[r][t] = _mm512_setzero_si512();
  for (int j = 0; j < 8; ++j) {
    const int64_t sb = b * 8 + j;
    __m512i dot[R][T][C];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t)
        for (int c = 0; c < C; ++c) dot[r][t][c] = _mm512_setzero_si512();
    for (int gg = 0; gg < 4; ++gg) {
      __m512i lo[T], hi[T];
      for (int t = 0; t < T; ++t) {
        const uint8_t* v = w.w4 + ((t0 + t) * (K / 8) + sb * 4 + gg) * 64;
        _mm_prefetch(reinterpret_cast<const char*>(v + 2048), _MM_HINT_T0);  // a block ahead
        const __m512i p = _mm512_loadu_si512(v);
        lo[t] = _mm512_and_si512(p, low4);
        hi[t] = _mm512_and_si512(_mm512_srli_epi16(p, 4), low4);
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* x = a.q.data() + (r0 + r) * K + 32 * sb + 8 * gg;
        int32_t x0, x1;
        std::memcpy(&x0, x, 4);
        std::memcpy(&x1, x + 4, 4);
        const __m512i b0 = _mm512_set1_epi32(x0), b1 = _mm512_set1_epi32(x1);
        for (int t = 0; t < T; ++t) {
          if (C == 2) {
            dot[r][t][0] = _mm512_dpbusd_epi32(dot[r][t][0], lo[t], b0);
            dot[r][t][C - 1] = _mm512_dpbusd_epi32(dot[r][t][C - 1], hi[t], b1);
          } else {
            dot[r][t][0] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dot[r][t][0], lo[t], b0), hi[t], b1);
          }
        }
      }
    }
    for (int t = 0; t < T; ++t) {
      const __m512i scale = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.sc + ((t0 + t) * ns + sb) * 16)));
      for (int r = 0; r < R; ++r) {
        __m512i d = dot[r][t][0];
        if (C == 2) d = _mm512_add_epi32(d, dot[r][t][C - 1]);
        isum[r][t] = _mm512_add_epi32(isum[r][t], _mm512_mullo_epi32(d, scale));
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    const int64_t at = (t0 + t) * nb + b;
    const uint8_t* m = w.mn + at * 128;
    __m512i mins[4];
    for (int p = 0; p < 4; ++p)
      mins[p] = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + 32 * p)));
    const __m512 dv = _mm512_loadu_ps(w.d + at * 16), dmv = _mm512_loadu_ps(w.dm + at * 16);
    for (int r = 0; r < R; ++r) {
      const int32_t* s = &a.s[(r0 + r) * (K / 64) + b * 4];
      __m512i imin = _mm512_setzero_si512();
      for (int p = 0; p < 4; ++p) imin = _mm512_dpwssd_epi32(imin, mins[p], _mm512_set1_epi32(s[p]));
      const __m512 ad = _mm512_set1_ps(a.d[(r0 + r) * nb + b]);
      float* out = y + (r0 + r) * w.N + 16 * (t0 + t);
      __m512 acc = _mm512_loadu_ps(out);
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r][t]), _mm512_mul_ps(dv, ad), acc);
      acc = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(imin), _mm512_mul_ps(dmv, ad), acc);
      _mm512_storeu_ps(out, acc);
    }
  }
}

using BlockFn = void (*)(const Weights&, const Acts&, int64_t, int64_t, int64_t, float*);
// Rows that share each weight load. 6 (24 accumulators with two tiles) rather than 4 since session 10:
// a 5-row verification runs as one group instead of 4 + 1. On the 1.5B's 56 ffn_gate/ffn_up matrices,
// streamed, median of 9, the two builds interleaved (a /tmp script, not committed): 5 rows 24.6 ->
// 23.4 ms, 8 rows 29.7 -> 28.3, 16 rows 48.1 -> 44.3, 1 and 4 rows unchanged; the outputs equal
// bit for bit. More rows would spill the accumulators.
constexpr int GROUP = 6;

// Rows go through in groups of GROUP (the last one smaller); every group re-reads the block's
// weights from the L1 cache.
template <int T>
void tiles_vnni(const Weights& w, const Acts& a, int64_t R, int64_t t0, float* y) {
  static constexpr BlockFn by_rows[GROUP] = {block_vnni<1, T>, block_vnni<2, T>, block_vnni<3, T>, block_vnni<4, T>,
                                             block_vnni<5, T>, block_vnni<6, T>};
  for (int64_t r = 0; r < R; ++r) std::memset(y + r * w.N + 16 * t0, 0, sizeof(float) * 16 * T);
  for (int64_t b = 0; b < w.K / QK; ++b)
    for (int64_t r0 = 0; r0 < R; r0 += GROUP) by_rows[std::min<int64_t>(GROUP, R - r0) - 1](w, a, r0, t0, b, y);
}

}  // namespace

// x (R, K) float32 -> y (R, N) float32. kernel: "auto" (AVX-512 VNNI where the CPU has it) or "portable".
torch::Tensor q4k_linear(torch::Tensor x, torch::Tensor w4, torch::Tensor sc, torch::Tensor mn, torch::Tensor d,
                         torch::Tensor dm, const std::string& kernel) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be (R, K) float32");
  const int64_t R = x.size(0), K = x.size(1), N = w4.size(0) * 16;
  TORCH_CHECK(K % QK == 0, "K must be a multiple of 256");
  TORCH_CHECK(w4.dim() == 3 && w4.size(1) == K / 8 && w4.size(2) == 64, "w4 must be (N/16, K/8, 64)");
  TORCH_CHECK(sc.size(1) == K / 32 && d.size(1) == K / QK && mn.numel() == N * (K / 32), "scale shapes do not match K");
  const bool vnni = kernel != "portable" && has_vnni();
  const Acts a = quantize(x.data_ptr<float>(), R, K, vnni);
  auto y = torch::empty({R, N}, x.options());
  const Weights w{w4.data_ptr<uint8_t>(), sc.data_ptr<uint8_t>(), mn.data_ptr<uint8_t>(), d.data_ptr<float>(),
                  dm.data_ptr<float>(), N, K};
  float* Y = y.data_ptr<float>();
  const int64_t tiles = N / 16;
  if (!vnni) {
    at::parallel_for(0, tiles, 8, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) tile_portable(w, a, R, t, Y);
    });
    return y;
  }
  // Four tiles share each activation broadcast for one row, two for more (registers); an uneven
  // last tile or two go one by one.
  const int step = R == 1 ? 4 : 2;
  at::parallel_for(0, (tiles + step - 1) / step, 2, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t t = i * step;
      if (t + step <= tiles) {
        if (step == 4) tiles_vnni<4>(w, a, R, t, Y);
        else tiles_vnni<2>(w, a, R, t, Y);
      } else {
        for (int64_t u = t; u < tiles; ++u) tiles_vnni<1>(w, a, R, u, Y);
      }
    }
  });
  return y;
}

bool q4k_has_vnni() { return has_vnni(); }

// x (R, K) float32 -> (2R, K): acts.h's split_rows, with the kernels' activation blocks of qb inputs.
torch::Tensor split_activations(torch::Tensor x, int64_t qb, const std::string& kernel) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be (R, K) float32");
  TORCH_CHECK((qb == QK || qb == 32) && x.size(1) % qb == 0, "activation blocks are 256 or 32 inputs and divide K");
  auto out = torch::empty({2 * x.size(0), x.size(1)}, x.options());
  split_rows(x.data_ptr<float>(), x.size(0), x.size(1), static_cast<int>(qb), kernel != "portable" && has_vnni(),
             out.data_ptr<float>());
  return out;
}

torch::Tensor q6k_linear(torch::Tensor x, torch::Tensor w4, torch::Tensor w2, torch::Tensor sc, torch::Tensor d,
                         const std::string& kernel);  // q6k.cpp
torch::Tensor q5_0_linear(torch::Tensor x, torch::Tensor w4, torch::Tensor wh, torch::Tensor d,
                          const std::string& kernel);  // q5_0.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &q4k_linear, "Q4_K weights x int8 activations (batch-invariant)");
  m.def("linear_q6k", &q6k_linear, "Q6_K weights x int8 activations (batch-invariant)");
  m.def("linear_q5_0", &q5_0_linear, "Q5_0 weights x int8 activations (batch-invariant)");
  m.def("split_activations", &split_activations, "each row and its int8 rounding's remainder (the a16 form)");
  m.def("has_vnni", &q4k_has_vnni, "whether the AVX-512 VNNI kernel runs on this CPU");
}
