// What the GGUF-block kernels share (q4k.cpp, q6k.cpp, q5_0.cpp): int8 activations, quantised per row
// and per block (symmetric, round to nearest even; 256-blocks for Q4_K and Q6_K, 32-blocks for Q5_0),
// and whether the CPU runs the AVX-512 VNNI forms.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace adaspec_kernels {

constexpr int QK = 256;

struct Acts {
  std::vector<int8_t> q;   // [R, K] natural order
  std::vector<float> d;    // [R, K/256] activation scale of each block
  std::vector<int32_t> s;  // [R, K/64] sums of sub-blocks 2p (low 16 bits) and 2p + 1 (high 16 bits)
};

inline int8_t round_clamp(float v) {
  return static_cast<int8_t>(std::max(-127, std::min(127, static_cast<int>(std::nearbyint(v)))));
}

inline void pair_sums(const int8_t* qb, int32_t* s) {  // one 256-block's 4 packed pairs of sub-block sums
  for (int p = 0; p < 4; ++p) {
    int lo = 0, hi = 0;
    for (int l = 0; l < 32; ++l) {
      lo += qb[64 * p + l];
      hi += qb[64 * p + 32 + l];
    }
    s[p] = static_cast<int32_t>((static_cast<uint32_t>(static_cast<uint16_t>(hi)) << 16) | static_cast<uint16_t>(lo));
  }
}

// One 256-block of one row. The vectorised and the scalar form give the same bytes: the block's
// maximum is exact in any order, and cvtps rounds to nearest even as nearbyint does by default.
__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl")))
inline void quantize_block_avx512(const float* xb, int8_t* qb, float* d) {
  __m512 m = _mm512_setzero_ps();
  for (int i = 0; i < QK; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(xb + i)));
  const float amax = _mm512_reduce_max_ps(m);
  const float iscale = amax > 0.f ? 127.f / amax : 0.f;
  *d = amax > 0.f ? amax / 127.f : 0.f;
  const __m512 s = _mm512_set1_ps(iscale);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int i = 0; i < QK; i += 16) {
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + i), s));
    v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + i), _mm512_cvtepi32_epi8(v));
  }
}

inline void quantize_block_portable(const float* xb, int8_t* qb, float* d, int n = QK) {
  float amax = 0.f;
  for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(xb[i]));
  const float iscale = amax > 0.f ? 127.f / amax : 0.f;
  *d = amax > 0.f ? amax / 127.f : 0.f;
  for (int i = 0; i < n; ++i) qb[i] = round_clamp(xb[i] * iscale);
}

inline bool has_vnni() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return ok;
}

// One block of n inputs, on the vectorised form where it applies (256-blocks on AVX-512): both
// forms give the same bytes, so the choice never changes a result.
inline void quantize_block(const float* xb, int8_t* qb, float* d, int n, bool vector) {
  if (vector && n == QK) quantize_block_avx512(xb, qb, d);
  else quantize_block_portable(xb, qb, d, n);
}

inline Acts quantize(const float* x, int64_t R, int64_t K, bool vector) {
  Acts a;
  const int64_t nb = K / QK;
  a.q.resize(R * K);
  a.d.resize(R * nb);
  a.s.resize(R * (K / 64));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + r * K + b * QK;
      int8_t* qb = a.q.data() + r * K + b * QK;
      quantize_block(xb, qb, &a.d[r * nb + b], QK, vector);
      pair_sums(qb, &a.s[r * (K / 64) + b * 4]);
    }
  return a;
}

// The "a16" activation form (BlockLinear.acts): each row x becomes two rows, x itself (row 2r) and
// what its per-block int8 rounding leaves out, e = x - d * q (row 2r + 1). A kernel quantises both
// rows the same way, so its two results add up to W x with about 15 bits of activation precision at
// the cost of twice the rows. q and d are exactly what the kernels' own quantisation gives (both
// forms of it give the same bytes), and e is one fma per value, so the rows depend on x alone.
inline void split_rows(const float* x, int64_t R, int64_t K, int qb, bool vector, float* out) {
  std::vector<int8_t> q(qb);
  for (int64_t r = 0; r < R; ++r) {
    std::memcpy(out + 2 * r * K, x + r * K, sizeof(float) * K);
    float* e = out + (2 * r + 1) * K;
    for (int64_t b = 0; b < K / qb; ++b) {
      const float* xb = x + r * K + b * qb;
      float d;
      quantize_block(xb, q.data(), &d, qb, vector);
      for (int i = 0; i < qb; ++i) e[b * qb + i] = std::fmaf(-static_cast<float>(q[i]), d, xb[i]);
    }
  }
}

// Tiles of 16 outputs spread over the threads (q6k.cpp, q5_0.cpp): for one row four tiles at a time,
// sharing each activation broadcast; for more rows one tile at a time, so that six rows' accumulators
// stay in registers. four(t) computes tiles t .. t + 3, one(t) tile t; neither changes a result.
template <class Four, class One>
inline void for_tiles(int64_t tiles, int64_t R, Four four, One one) {
  const int step = R == 1 ? 4 : 1;
  at::parallel_for(0, (tiles + step - 1) / step, 4, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t t = i * step;
      if (step == 4 && t + 4 <= tiles) four(t);
      else
        for (int64_t u = t; u < std::min(t + step, tiles); ++u) one(u);
    }
  });
}

}  // namespace adaspec_kernels
