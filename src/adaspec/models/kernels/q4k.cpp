// Q4_K weights x int8 activations, batch-invariant: each output of each row is computed by the same
// instructions in the same order whatever the number of rows, so a k-row forward is bit-identical to
// k one-row forwards. models/q4k.py describes the formats and the reasons.
//
// Weights in tiles of 16 outputs (t) x 8 inputs (g), 64 bytes each: byte 4*o + i holds
//   q[16t + o, 8g + i] in its low nibble and q[16t + o, 8g + 4 + i] in its high nibble,
// so one 64-byte load gives two vpdpbusd operands whose lane o sums 4 inputs of output 16t + o.
//   w4 [N/16, K/8, 64] uint8;  sc, mn [N/16, K/32, 16] uint8 (6-bit);  d, dm [N/16, K/256, 16] float
//   W[n, k] = d[n, k/256] * sc[n, k/32] * q[n, k] - dm[n, k/256] * mn[n, k/32]
// Activations are quantised per row and per 256-block to int8 (symmetric, round to nearest even).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace {

constexpr int QK = 256;
constexpr int MAXR = 16;

struct Acts {
  std::vector<int8_t> q;   // [R, K] natural order
  std::vector<float> d;    // [R, K/256] activation scale of each block
  std::vector<float> s;    // [R, K/32] sum of the quantised values of each sub-block (exact in float)
};

Acts quantize(const float* x, int64_t R, int64_t K) {
  Acts a;
  const int64_t nb = K / QK;
  a.q.resize(R * K);
  a.d.resize(R * nb);
  a.s.resize(R * (K / 32));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + r * K + b * QK;
      float amax = 0.f;
      for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float iscale = amax > 0.f ? 127.f / amax : 0.f;
      a.d[r * nb + b] = amax > 0.f ? amax / 127.f : 0.f;
      int8_t* qb = a.q.data() + r * K + b * QK;
      for (int j = 0; j < 8; ++j) {
        int sum = 0;
        for (int l = 0; l < 32; ++l) {
          const int v = std::max(-127, std::min(127, static_cast<int>(std::nearbyint(xb[32 * j + l] * iscale))));
          qb[32 * j + l] = static_cast<int8_t>(v);
          sum += v;
        }
        a.s[r * (K / 32) + b * 8 + j] = static_cast<float>(sum);
      }
    }
  return a;
}

struct Weights {
  const uint8_t *w4, *sc, *mn;
  const float *d, *dm;
  int64_t N, K;
};

// The 16 outputs of tile t for every row (any x86-64 CPU).
void tile_portable(const Weights& w, const Acts& a, int64_t R, int64_t t, float* y) {
  const int64_t K = w.K, nb = K / QK, ns = K / 32;
  for (int64_t r = 0; r < R; ++r) {
    const int8_t* x = a.q.data() + r * K;
    float acc[16] = {0};
    for (int64_t b = 0; b < nb; ++b) {
      float blk[16] = {0};
      for (int j = 0; j < 8; ++j) {
        const int64_t sb = b * 8 + j;
        for (int o = 0; o < 16; ++o) {
          int32_t dot = 0;
          for (int gg = 0; gg < 4; ++gg) {
            const int64_t g = sb * 4 + gg;
            const uint8_t* v = w.w4 + (t * (K / 8) + g) * 64 + 4 * o;
            for (int i = 0; i < 4; ++i) dot += (v[i] & 15) * x[8 * g + i] + (v[i] >> 4) * x[8 * g + 4 + i];
          }
          const float scale = w.d[(t * nb + b) * 16 + o] * static_cast<float>(w.sc[(t * ns + sb) * 16 + o]);
          const float low = w.dm[(t * nb + b) * 16 + o] * static_cast<float>(w.mn[(t * ns + sb) * 16 + o]);
          blk[o] = blk[o] + static_cast<float>(dot) * scale - low * a.s[r * ns + sb];
        }
      }
      for (int o = 0; o < 16; ++o) acc[o] += blk[o] * a.d[r * nb + b];
    }
    std::memcpy(y + r * w.N + 16 * t, acc, sizeof acc);
  }
}

// R (rows) and T (tiles of 16 outputs sharing each activation broadcast) are template arguments, so
// that the loops unroll and the accumulators stay in registers. Neither changes a single result: an
// output's integer sums are exact in any order, and its float operations (one fma and one fnmadd per
// sub-block, one fma per block) run in the same order for every R and T.
template <int R, int T>
__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
void tiles_vnni(const Weights& w, const Acts& a, int64_t t0, float* y) {
  const int64_t K = w.K, nb = K / QK, ns = K / 32;
  constexpr int C = R * T >= 4 ? 1 : 2;  // independent dot chains per output tile (latency, not throughput)
  const __m512i low4 = _mm512_set1_epi8(15);
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) _mm512_storeu_ps(y + r * w.N + 16 * (t0 + t), _mm512_setzero_ps());
  for (int64_t b = 0; b < nb; ++b) {
    __m512 blk[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) blk[r][t] = _mm512_setzero_ps();
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
          _mm_prefetch(reinterpret_cast<const char*>(v + 1024), _MM_HINT_T0);  // a few sub-blocks ahead
          const __m512i p = _mm512_loadu_si512(v);
          lo[t] = _mm512_and_si512(p, low4);
          hi[t] = _mm512_and_si512(_mm512_srli_epi16(p, 4), low4);
        }
        for (int r = 0; r < R; ++r) {
          const int8_t* x = a.q.data() + r * K + 32 * sb + 8 * gg;
          int32_t x0, x1;
          std::memcpy(&x0, x, 4);
          std::memcpy(&x1, x + 4, 4);
          const __m512i b0 = _mm512_set1_epi32(x0), b1 = _mm512_set1_epi32(x1);
          for (int t = 0; t < T; ++t) {
            __m512i& acc = dot[r][t][gg % C];
            acc = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, lo[t], b0), hi[t], b1);
          }
        }
      }
      for (int t = 0; t < T; ++t) {
        const int64_t at = (t0 + t) * nb + b, st = ((t0 + t) * ns + sb) * 16;
        const __m512 scale = _mm512_mul_ps(_mm512_loadu_ps(w.d + at * 16), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.sc + st)))));
        const __m512 minv = _mm512_mul_ps(_mm512_loadu_ps(w.dm + at * 16), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.mn + st)))));
        for (int r = 0; r < R; ++r) {
          __m512i d = dot[r][t][0];
          for (int c = 1; c < C; ++c) d = _mm512_add_epi32(d, dot[r][t][c]);
          blk[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale, blk[r][t]);
          blk[r][t] = _mm512_fnmadd_ps(minv, _mm512_set1_ps(a.s[r * ns + sb]), blk[r][t]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) {
        float* out = y + r * w.N + 16 * (t0 + t);
        _mm512_storeu_ps(out, _mm512_fmadd_ps(blk[r][t], _mm512_set1_ps(a.d[r * nb + b]), _mm512_loadu_ps(out)));
      }
  }
}

using TileFn = void (*)(const Weights&, const Acts&, int64_t, float*);
constexpr int PAIR_ROWS = 6;  // up to this many rows, two tiles share each broadcast (registers suffice)

template <int... Rs>
TileFn pick(int64_t R, int tiles, std::integer_sequence<int, Rs...>) {
  TileFn one[] = {tiles_vnni<Rs + 1, 1>...};
  TileFn two[] = {tiles_vnni<(Rs < PAIR_ROWS ? Rs + 1 : 1), 2>...};
  return tiles == 2 ? two[R - 1] : one[R - 1];
}

bool has_vnni() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return ok;
}

}  // namespace

// x (R, K) float32 -> y (R, N) float32. kernel: "auto" (AVX-512 VNNI where the CPU has it) or "portable".
torch::Tensor q4k_linear(torch::Tensor x, torch::Tensor w4, torch::Tensor sc, torch::Tensor mn, torch::Tensor d,
                         torch::Tensor dm, const std::string& kernel) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be (R, K) float32");
  const int64_t R = x.size(0), K = x.size(1), N = w4.size(0) * 16;
  TORCH_CHECK(K % QK == 0, "K must be a multiple of 256");
  TORCH_CHECK(R <= MAXR, "at most 16 rows per call");
  TORCH_CHECK(w4.dim() == 3 && w4.size(1) == K / 8 && w4.size(2) == 64, "w4 must be (N/16, K/8, 64)");
  TORCH_CHECK(sc.size(1) == K / 32 && d.size(1) == K / QK, "scale shapes do not match K");
  const Acts a = quantize(x.data_ptr<float>(), R, K);
  auto y = torch::empty({R, N}, x.options());
  const Weights w{w4.data_ptr<uint8_t>(), sc.data_ptr<uint8_t>(), mn.data_ptr<uint8_t>(), d.data_ptr<float>(),
                  dm.data_ptr<float>(), N, K};
  const bool vnni = kernel != "portable" && has_vnni();
  float* Y = y.data_ptr<float>();
  const int64_t tiles = N / 16;
  if (!vnni) {
    at::parallel_for(0, tiles, 8, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) tile_portable(w, a, R, t, Y);
    });
    return y;
  }
  const auto seq = std::make_integer_sequence<int, MAXR>{};
  const int step = R <= PAIR_ROWS ? 2 : 1;
  const TileFn many = pick(R, step, seq), single = pick(R, 1, seq);
  at::parallel_for(0, (tiles + step - 1) / step, 4, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t t = i * step;
      if (t + step <= tiles) many(w, a, t, Y);
      else single(w, a, t, Y);  // an odd last tile
    }
  });
  return y;
}

bool q4k_has_vnni() { return has_vnni(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &q4k_linear, "Q4_K weights x int8 activations (batch-invariant)");
  m.def("has_vnni", &q4k_has_vnni, "whether the AVX-512 VNNI kernel runs on this CPU");
}
