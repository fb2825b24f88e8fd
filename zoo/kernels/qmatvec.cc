// Products with int8 / int4 weights for XLA's CPU backend (an XLA FFI handler).
//
// y[m, n] = sum_g scale[n, g] * sum_{k in group g} x[m, k] * q[n, k]
//
// x: f32 [M, K] (decoding: M = batch; a prefill: every prompt token); q: int8 [N, K] (bits 8) or [N / 2, K] with two
// output rows per byte (bits 4: row 2p in the low nibble, 2p + 1 in the high one, each a
// signed 4-bit value); scale: f32 [N, G], G groups of K / G inputs; y: f32 [M, N].
//
// Why a kernel: XLA fuses the int8 -> float conversion into its matrix-vector loop, but that
// loop runs on one thread at 5-19 G weights/s by shape, so int8 weights decoded only ~1.2x
// faster than float32 ones on a 2-core CPU where memory would allow ~4x; with more rows XLA
// writes the whole weight out in float first. Here each weight byte is read once, widened
// in registers and multiplied into up to 4 rows of x, and the output rows are split over
// helper threads (see Helpers).
//
// Built on first use by zoo/kernels/cpu.py (g++ -O3 -march=native) for what the CPU has:
// AVX-512 VNNI, else AVX2 + FMA (one vector code, struct V, in both widths), else a
// portable loop, which zoo does not use (ZooQMatvecIsa says which; XLA's own product is
// faster than a scalar loop).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define ZOO_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define ZOO_AVX2 1
#endif
#if ZOO_AVX512 || ZOO_AVX2
#define ZOO_VECTOR 1
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* x;
  const int8_t* q;
  const float* scale;
  float* y;
  int64_t m, n, k, groups, bits;
};

#if ZOO_AVX512
// 512-bit vectors: 32 int16 inputs per step, vpdpwssd (VNNI) multiply-adds 32 int16 pairs
// into 16 int32 lanes; 32 registers hold 8 output rows' accumulators and totals at once.
struct V {
  using I = __m512i;
  using F = __m512;
  static constexpr int kStep = 32;  // inputs per vector
  static constexpr int kLanes = 16;  // int32 lanes: lane j sums inputs 2j and 2j + 1 of each step
  static constexpr int kRows8 = 8;  // int8 output rows per block for one x row
  static constexpr int kPairs4 = 4;  // int4 packed rows (two outputs each) per block for one x row
  static constexpr int kTM = 4;  // x rows per weight load for several
  static I Zero() { return _mm512_setzero_si512(); }
  static F ZeroF() { return _mm512_setzero_ps(); }
  static I X(const int16_t* x) { return _mm512_loadu_si512(x); }
  static I I32(const int32_t* s) { return _mm512_loadu_si512(s); }
  static I Neg(I v, int shift) { return _mm512_sub_epi32(Zero(), _mm512_slli_epi32(v, shift)); }
  static I Bytes(const int8_t* q) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q))); }
  // acc += pairwise products of x and w. In asm: GCC 12 copies the accumulator through
  // another register around the intrinsic. By value: a reference into an accumulator array
  // makes GCC keep the array in memory.
  static I Dot(I acc, I x, I w) {
#if defined(__GNUC__) && !defined(__clang__)
    asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
    return acc;
#else
    return _mm512_dpwssd_epi32(acc, x, w);
#endif
  }
  // int4 (see Int4Rows): the byte b widened, then one vpternlog per nibble:
  // (b & 0x0F) ^ 0x08 = v_lo + 8 and (b & 0xF0) ^ 0x80 = 16 (v_hi + 8).
  static void Nibbles(const int8_t* q, I& lo, I& hi) {
    const I b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
    lo = _mm512_ternarylogic_epi32(b, _mm512_set1_epi16(0x0F), _mm512_set1_epi16(0x08), 0x6A);
    hi = _mm512_ternarylogic_epi32(b, _mm512_set1_epi16(0xF0), _mm512_set1_epi16(0x80), 0x6A);
  }
  static F Fold(F total, I acc, float scale) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(scale), total); }
  static float Sum(F v) { return _mm512_reduce_add_ps(v); }
};
#elif ZOO_AVX2
// 256-bit vectors (AVX2, e.g. AMD Zen 3 and Intel CPUs without AVX-512): vpmaddwd
// multiplies 16 int16 pairs into 8 int32 lanes, vpaddd accumulates; 16 registers hold the
// accumulators and totals of up to 4 outputs.
struct V {
  using I = __m256i;
  using F = __m256;
  static constexpr int kStep = 16;
  static constexpr int kLanes = 8;
  // One x row: int8 one output row at a time (one linear stream of weight bytes: 30 % faster
  // than 4 interleaved rows on Zen 3, whose prefetcher follows it better); int4 by
  // Int4Single, a packed row (two outputs) at a time.
  static constexpr int kRows8 = 1;
  static constexpr int kTM = 2;
  static I Zero() { return _mm256_setzero_si256(); }
  static F ZeroF() { return _mm256_setzero_ps(); }
  static I X(const int16_t* x) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)); }
  static I I32(const int32_t* s) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)); }
  static I Neg(I v, int shift) { return _mm256_sub_epi32(Zero(), _mm256_slli_epi32(v, shift)); }
  static I Bytes(const int8_t* q) { return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))); }
  static I Dot(I acc, I x, I w) { return _mm256_add_epi32(acc, _mm256_madd_epi16(x, w)); }
  // The bytes' nibble signs flipped before widening (one xor for both nibbles), then
  // b & 0x0F = v_lo + 8 and b & 0xF0 = 16 (v_hi + 8).
  static void Nibbles(const int8_t* q, I& lo, I& hi) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const I b = _mm256_cvtepu8_epi16(_mm_xor_si128(raw, _mm_set1_epi8(static_cast<char>(0x88))));
    lo = _mm256_and_si256(b, _mm256_set1_epi16(0x0F));
    hi = _mm256_and_si256(b, _mm256_set1_epi16(0xF0));
  }
  static F Fold(F total, I acc, float scale) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(scale), total); }
  static float Sum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
};
#endif

#if ZOO_VECTOR
constexpr int kLanes = V::kLanes;
#else
constexpr int kLanes = 16;  // unused by the portable path
#endif

// x as int16 per row: x[m] = xscale[m] * xq[m], xq in [-kXMax, kXMax] (round to nearest;
// kXMax = 0x7F7F, so that xq = 256 hi + lo with both bytes signed: see Int4Single).
// A 16-bit activation against an 8- or 4-bit weight keeps ~15 bits where the weight has 8 or
// 4, and lets one instruction multiply-add int16 pairs in exact integer arithmetic: the
// weight is widened to int16 in one instruction, no float conversion per weight. A row with
// a NaN or an infinity gets a NaN scale, so its outputs are NaN as a float product's would
// be. For int4, sums: per row and per chunk of a group (kChunk4 inputs at
// most), the sums of xq that each int32 lane sees (lane j: inputs 2j and 2j + 1 of every
// 2 kLanes), to take off the nibbles' offset (see Int4Rows).
//
// Integer sums wrap (vpdpwssd, vpaddd), so only each lane's final sum must fit in int32:
// |x| <= kXMax times |w| <= 128 (int8, and int4's high nibble times 16), kChunk / kLanes
// <= 512 products per lane.
constexpr int64_t kChunk = 4096;
constexpr int64_t kChunk4 = 2048;
constexpr float kXMax = 32639.f;

struct Activations {
  std::vector<int16_t> xq;
  std::vector<float> xscale;
  std::vector<int32_t> sums;
  int64_t chunks = 0;  // int4 chunks per row
  std::vector<int8_t> hi, lo;  // AVX2 int4: xq = 256 hi + lo, both signed bytes
  std::vector<float> gsum;  // AVX2 int4: the sum of xq over each group [M, G]

  explicit Activations(const Problem& p) : xq(p.m * p.k), xscale(p.m) {
    for (int64_t m = 0; m < p.m; ++m) {
      const float* x = p.x + m * p.k;
      float amax = 0.f, sum = 0.f;  // sum: NaN when x has a NaN or an infinity (max skips NaN)
      for (int64_t k = 0; k < p.k; ++k) {
        amax = std::max(amax, std::fabs(x[k]));
        sum += x[k] * 0.f;
      }
      if (sum != 0.f || !std::isfinite(amax)) amax = std::numeric_limits<float>::quiet_NaN();
      xscale[m] = amax / kXMax;
      const float inv = amax > 0.f ? kXMax / amax : 0.f;
      for (int64_t k = 0; k < p.k; ++k) xq[m * p.k + k] = static_cast<int16_t>(std::nearbyint(x[k] * inv));
    }
    if (p.bits != 4) return;
    const int64_t gs = p.k / p.groups;
#if ZOO_AVX2
    hi.resize(p.m * p.k);
    lo.resize(p.m * p.k);
    gsum.assign(p.m * p.groups, 0.f);
    for (int64_t i = 0; i < p.m * p.k; ++i) {
      const int32_t v = xq[i];
      lo[i] = static_cast<int8_t>(v & 0xFF);  // the low byte read as signed
      hi[i] = static_cast<int8_t>((v - lo[i]) / 256);
    }
    for (int64_t m = 0; m < p.m; ++m)
      for (int64_t g = 0; g < p.groups; ++g) {
        int64_t total = 0;
        for (int64_t k = g * gs; k < (g + 1) * gs; ++k) total += xq[m * p.k + k];
        gsum[m * p.groups + g] = static_cast<float>(total);
      }
#endif
    chunks = p.groups * ((gs + kChunk4 - 1) / kChunk4);
    sums.assign(p.m * chunks * kLanes, 0);
    for (int64_t m = 0; m < p.m; ++m) {
      int32_t* out = sums.data() + m * chunks * kLanes;
      for (int64_t g = 0; g < p.groups; ++g)
        for (int64_t c0 = g * gs, end = (g + 1) * gs; c0 < end; c0 += kChunk4, out += kLanes)
          for (int64_t k = c0; k < std::min(end, c0 + kChunk4); ++k)
            out[(k - c0) % (2 * kLanes) / 2] += xq[m * p.k + k];
    }
  }
};

#if ZOO_VECTOR
// The last `left` < kStep inputs of a chunk, zero-padded to a whole vector: x and weight
// bytes copied to the stack (rare: only where a group's size is not a multiple of kStep).
struct Tail {
  alignas(64) int16_t x[V::kStep] = {};
  alignas(64) int8_t q[V::kStep] = {};
  Tail(const int16_t* xs, const int8_t* qs, int64_t left) {
    std::copy(xs, xs + left, x);
    std::copy(qs, qs + left, q);
  }
};

// The rows kAhead blocks on (`ahead` bytes), a cache line per row every 64 inputs: a block's
// rows are short streams (a few KiB) that the hardware prefetcher barely learns before they
// end. Measured on a 2-core AMD EPYC (Zen 3), weights streamed from memory, with blocks of 4
// int8 rows: a decoder step's products took 5.5 ms instead of 8.3, and 1 to 16 blocks ahead
// measured alike within the noise. Prefetching past the end of q is harmless (prefetches do
// not fault).
constexpr int64_t kAhead = 2;

template <int R>
inline void Prefetch(const int8_t* const* row, int64_t ahead, int64_t k) {
  if (k % 64) return;
  for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(row[r] + ahead + k), _MM_HINT_T0);
}

// int8: output rows n .. n + R - 1 for x rows m .. m + TM - 1: each widened weight vector
// multiplies TM x vectors. R * TM accumulators (enough independent chains to hide the
// multiply-add's latency, few enough to stay in registers). Row pointers are hoisted into
// locals: q is int8, which may alias anything, so the compiler would otherwise reload them.
// Each group (and each kChunk run of it) sums in int32, then scales into float totals.
template <int R, int TM>
void Int8Rows(const Problem& p, const Activations& a, int64_t m, int64_t n) {
  const int64_t k_all = p.k, groups = p.groups, gs = k_all / groups;
  const float* scale = p.scale + n * groups;
  const int8_t* row[R];
  for (int r = 0; r < R; ++r) row[r] = p.q + (n + r) * k_all;
  const int64_t ahead = kAhead * R * k_all;
  const int16_t* xq[TM];
  for (int t = 0; t < TM; ++t) xq[t] = a.xq.data() + (m + t) * k_all;
  typename V::F total[TM][R];
  for (int t = 0; t < TM; ++t)
    for (int r = 0; r < R; ++r) total[t][r] = V::ZeroF();
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t c0 = g * gs, end = (g + 1) * gs; c0 < end; c0 += kChunk) {
      const int64_t c1 = std::min(end, c0 + kChunk), body = c0 + (c1 - c0) / V::kStep * V::kStep;
      typename V::I acc[TM][R];
      for (int t = 0; t < TM; ++t)
        for (int r = 0; r < R; ++r) acc[t][r] = V::Zero();
      for (int64_t k = c0; k < body; k += V::kStep) {
        Prefetch<R>(row, ahead, k);
        typename V::I xv[TM];
        for (int t = 0; t < TM; ++t) xv[t] = V::X(xq[t] + k);
        for (int r = 0; r < R; ++r) {
          const typename V::I w = V::Bytes(row[r] + k);
          for (int t = 0; t < TM; ++t) acc[t][r] = V::Dot(acc[t][r], xv[t], w);
        }
      }
      if (body < c1) {
        for (int r = 0; r < R; ++r)
          for (int t = 0; t < TM; ++t) {
            const Tail tail(xq[t] + body, row[r] + body, c1 - body);
            acc[t][r] = V::Dot(acc[t][r], V::X(tail.x), V::Bytes(tail.q));
          }
      }
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < TM; ++t) total[t][r] = V::Fold(total[t][r], acc[t][r], scale[r * groups + g]);
    }
  }
  for (int t = 0; t < TM; ++t)
    for (int r = 0; r < R; ++r) p.y[(m + t) * p.n + n + r] = V::Sum(total[t][r]) * a.xscale[m + t];
}

// int4 sums in int16 pairs too, but on offset nibbles: a stored nibble is v mod 16 for v in
// [-8, 7], so v + 8 is the nibble with bit 3 flipped (V::Nibbles gives v_lo + 8 and
// 16 (v_hi + 8), no shifts). The offsets come off by starting the accumulators at minus
// them, from the x sums of each chunk per lane (Activations::sums): sum x v_lo = A_lo - 8
// sum x, and 16 sum x v_hi = A_hi - 128 sum x (the 16 goes into the scale).
//
// Packed rows pr .. pr + R - 1 (output rows 2 pr .. 2 (pr + R) - 1) for x rows
// m .. m + TM - 1; 2 R TM accumulators.
template <int R, int TM>
void Int4Rows(const Problem& p, const Activations& a, int64_t m, int64_t pr) {
  const int64_t k_all = p.k, groups = p.groups, gs = k_all / groups;
  const float* scale = p.scale + 2 * pr * groups;
  const int8_t* row[R];
  for (int r = 0; r < R; ++r) row[r] = p.q + (pr + r) * k_all;
  const int64_t ahead = kAhead * R * k_all;
  const int16_t* xq[TM];
  const int32_t* sums[TM];
  for (int t = 0; t < TM; ++t) {
    xq[t] = a.xq.data() + (m + t) * k_all;
    sums[t] = a.sums.data() + (m + t) * a.chunks * kLanes;
  }
  typename V::F total[TM][2 * R];
  for (int t = 0; t < TM; ++t)
    for (int r = 0; r < 2 * R; ++r) total[t][r] = V::ZeroF();
  for (int64_t g = 0, chunk = 0; g < groups; ++g) {
    for (int64_t c0 = g * gs, end = (g + 1) * gs; c0 < end; c0 += kChunk4, ++chunk) {
      const int64_t c1 = std::min(end, c0 + kChunk4), body = c0 + (c1 - c0) / V::kStep * V::kStep;
      typename V::I acc[TM][2 * R];
      for (int t = 0; t < TM; ++t) {
        const typename V::I sum = V::I32(sums[t] + kLanes * chunk);
        const typename V::I lo = V::Neg(sum, 3), hi = V::Neg(sum, 7);
        for (int r = 0; r < R; ++r) {
          acc[t][2 * r] = lo;
          acc[t][2 * r + 1] = hi;
        }
      }
      for (int64_t k = c0; k < body; k += V::kStep) {
        Prefetch<R>(row, ahead, k);
        typename V::I xv[TM];
        for (int t = 0; t < TM; ++t) xv[t] = V::X(xq[t] + k);
        for (int r = 0; r < R; ++r) {
          typename V::I lo, hi;
          V::Nibbles(row[r] + k, lo, hi);
          for (int t = 0; t < TM; ++t) {
            acc[t][2 * r] = V::Dot(acc[t][2 * r], xv[t], lo);
            acc[t][2 * r + 1] = V::Dot(acc[t][2 * r + 1], xv[t], hi);
          }
        }
      }
      if (body < c1) {  // x padded with zeros: the nibbles' offsets there add 0
        for (int r = 0; r < R; ++r)
          for (int t = 0; t < TM; ++t) {
            const Tail tail(xq[t] + body, row[r] + body, c1 - body);
            typename V::I lo, hi;
            V::Nibbles(tail.q, lo, hi);
            const typename V::I xv = V::X(tail.x);
            acc[t][2 * r] = V::Dot(acc[t][2 * r], xv, lo);
            acc[t][2 * r + 1] = V::Dot(acc[t][2 * r + 1], xv, hi);
          }
      }
      for (int r = 0; r < 2 * R; ++r) {
        const float sc = scale[r * groups + g] * (r % 2 ? 0.0625f : 1.f);
        for (int t = 0; t < TM; ++t) total[t][r] = V::Fold(total[t][r], acc[t][r], sc);
      }
    }
  }
  for (int t = 0; t < TM; ++t)
    for (int r = 0; r < 2 * R; ++r)
      p.y[(m + t) * p.n + 2 * pr + r] = V::Sum(total[t][r]) * a.xscale[m + t];
}

#if ZOO_AVX2
// int4 for one x row on AVX2, on bytes rather than int16: x split into two signed byte
// planes (xq = 256 hi + lo) and the weights as unsigned nibbles u = v + 8 (one xor flips
// both nibbles' sign bits; the high nibble shifted down), vpmaddubsw multiplies 32 u8 x s8
// pairs into 16 int16 sums. Per 64 weights (32 bytes of a packed row) that is 4 of them and
// 4 int16 adds where the int16 path (Int4Rows) widens twice and multiplies 4 times into
// int32: a third fewer instructions. Each vpmaddubsw pair sum is at most 2 * 15 * 128 = 3840,
// so 8 steps (256 inputs) sum in int16 before widening into int32 (x256 for the high plane);
// the nibbles' +8 comes off per group as 8 * scale * sum(xq of the group), in float.
void Int4Single(const Problem& p, const Activations& a, int64_t m, int64_t pr) {
  const int64_t k_all = p.k, groups = p.groups, gs = k_all / groups;
  const int8_t* row = p.q + pr * k_all;
  const int8_t* xh = a.hi.data() + m * k_all;
  const int8_t* xl = a.lo.data() + m * k_all;
  const float* gsum = a.gsum.data() + m * groups;
  const float* scale_lo = p.scale + 2 * pr * groups;
  const float* scale_hi = scale_lo + groups;
  const int64_t ahead = kAhead * k_all;
  const __m256i nibble = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8(static_cast<char>(0x88));
  const __m256i ones = _mm256_set1_epi16(1), high = _mm256_set1_epi16(256);
  __m256 total_lo = _mm256_setzero_ps(), total_hi = _mm256_setzero_ps();
  float offset_lo = 0.f, offset_hi = 0.f;
  auto step = [&](const int8_t* q, const int8_t* h, const int8_t* l, __m256i* acc) {
    const __m256i b = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)), flip);
    const __m256i u_lo = _mm256_and_si256(b, nibble);
    const __m256i u_hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nibble);
    const __m256i vh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h));
    const __m256i vl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(l));
    acc[0] = _mm256_add_epi16(acc[0], _mm256_maddubs_epi16(u_lo, vh));
    acc[1] = _mm256_add_epi16(acc[1], _mm256_maddubs_epi16(u_lo, vl));
    acc[2] = _mm256_add_epi16(acc[2], _mm256_maddubs_epi16(u_hi, vh));
    acc[3] = _mm256_add_epi16(acc[3], _mm256_maddubs_epi16(u_hi, vl));
  };
  for (int64_t g = 0; g < groups; ++g) {
    __m256i sum_lo = _mm256_setzero_si256(), sum_hi = _mm256_setzero_si256();
    for (int64_t c0 = g * gs, end = (g + 1) * gs; c0 < end; c0 += 256) {
      const int64_t c1 = std::min(end, c0 + 256), body = c0 + (c1 - c0) / 32 * 32;
      __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                        _mm256_setzero_si256()};
      for (int64_t k = c0; k < body; k += 32) {
        Prefetch<1>(&row, ahead, k);
        step(row + k, xh + k, xl + k, acc);
      }
      if (body < c1) {  // zero x bytes past the end: those products add 0
        alignas(32) int8_t q[32] = {}, h[32] = {}, l[32] = {};
        std::copy(row + body, row + c1, q);
        std::copy(xh + body, xh + c1, h);
        std::copy(xl + body, xl + c1, l);
        step(q, h, l, acc);
      }
      sum_lo = _mm256_add_epi32(sum_lo, _mm256_add_epi32(_mm256_madd_epi16(acc[0], high), _mm256_madd_epi16(acc[1], ones)));
      sum_hi = _mm256_add_epi32(sum_hi, _mm256_add_epi32(_mm256_madd_epi16(acc[2], high), _mm256_madd_epi16(acc[3], ones)));
    }
    total_lo = V::Fold(total_lo, sum_lo, scale_lo[g]);
    total_hi = V::Fold(total_hi, sum_hi, scale_hi[g]);
    offset_lo += scale_lo[g] * gsum[g];
    offset_hi += scale_hi[g] * gsum[g];
  }
  p.y[m * p.n + 2 * pr] = (V::Sum(total_lo) - 8.f * offset_lo) * a.xscale[m];
  p.y[m * p.n + 2 * pr + 1] = (V::Sum(total_hi) - 8.f * offset_hi) * a.xscale[m];
}
#endif

// int4, one packed row (two outputs) for one x row: the byte-plane path where there is one.
inline void Int4One(const Problem& p, const Activations& a, int64_t m, int64_t pr) {
#if ZOO_AVX2
  Int4Single(p, a, m, pr);
#else
  Int4Rows<1, 1>(p, a, m, pr);
#endif
}

// Rows n .. n + 7 (8 int8 rows, 4 int4 row pairs), every x row: kRows8 / kPairs4 rows at a
// time for one x row; in pairs of rows, kTM x rows per weight load, for several.
template <int Bits>
void Block(const Problem& p, const Activations& a, int64_t n) {
  if (p.m == 1) {
    if constexpr (Bits == 8) {
      for (int64_t sub = 0; sub < 8; sub += V::kRows8) Int8Rows<V::kRows8, 1>(p, a, 0, n + sub);
    } else {
#if ZOO_AVX2
      for (int64_t sub = 0; sub < 8; sub += 2) Int4Single(p, a, 0, (n + sub) / 2);
#else
      for (int64_t sub = 0; sub < 8; sub += 2 * V::kPairs4) Int4Rows<V::kPairs4, 1>(p, a, 0, (n + sub) / 2);
#endif
    }
    return;
  }
  for (int64_t sub = 0; sub < 8; sub += 2) {
    int64_t m = 0;
    for (; m + V::kTM <= p.m; m += V::kTM) {
      if constexpr (Bits == 8) Int8Rows<2, V::kTM>(p, a, m, n + sub); else Int4Rows<1, V::kTM>(p, a, m, (n + sub) / 2);
    }
    for (; m < p.m; ++m) {
      if constexpr (Bits == 8) Int8Rows<2, 1>(p, a, m, n + sub); else Int4One(p, a, m, (n + sub) / 2);
    }
  }
}
#endif

// The weight of output row n at input k, portable path.
inline float Weight(const Problem& p, int64_t n, int64_t k) {
  if (p.bits == 8) return static_cast<float>(p.q[n * p.k + k]);
  const int8_t b = p.q[(n / 2) * p.k + k];
  // Sign-extend the nibble: shift it to the top of a byte, then back arithmetically.
  return static_cast<float>(n % 2 ? static_cast<int8_t>(b >> 4)
                                  : static_cast<int8_t>(static_cast<int8_t>(b << 4) >> 4));
}

// One output of the portable path, from the same int16 activations as the vector path.
void PortableRow(const Problem& p, const Activations& a, int64_t m, int64_t n) {
  const int64_t gs = p.k / p.groups;
  const int16_t* xq = a.xq.data() + m * p.k;
  float total = 0.f;
  for (int64_t g = 0; g < p.groups; ++g) {
    int64_t acc = 0;
    for (int64_t k = g * gs; k < (g + 1) * gs; ++k) acc += xq[k] * static_cast<int64_t>(Weight(p, n, k));
    total += static_cast<float>(acc) * p.scale[n * p.groups + g];
  }
  p.y[m * p.n + n] = total * a.xscale[m];
}

// Output rows [n0, n1) of every x row; n0, n1 even for int4 (whole packed rows).
void Rows(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  int64_t n = n0;
#if ZOO_VECTOR
  for (; n + 8 <= n1; n += 8) p.bits == 8 ? Block<8>(p, a, n) : Block<4>(p, a, n);
  for (; n < n1 && p.bits == 8; ++n)
    for (int64_t m = 0; m < p.m; ++m) Int8Rows<1, 1>(p, a, m, n);
  for (; n + 2 <= n1; n += 2)
    for (int64_t m = 0; m < p.m; ++m) Int4One(p, a, m, n / 2);
#endif
  for (; n < n1; ++n)
    for (int64_t m = 0; m < p.m; ++m) PortableRow(p, a, m, n);
}

// Splits the output rows into chunks that the caller and the helper threads claim from a
// shared counter: the caller never waits on a chunk nobody has started, so a busy or late
// helper costs parallelism, not a deadlock. The state is shared-owned: a helper may pick
// the job up after the call has returned (and then finds nothing left to claim).
struct Split {
  Problem p;
  Activations a;
  int64_t chunk, chunks;
  std::atomic<int64_t> next{0}, done{0};

  Split(const Problem& p, int64_t chunk, int64_t chunks) : p(p), a(p), chunk(chunk), chunks(chunks) {}

  void Work() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      Rows(p, a, c * chunk, std::min(p.n, (c + 1) * chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

inline void Pause() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#endif
}

// Helper threads of our own rather than XLA's intra-op pool: a decoding step runs dozens of
// these products a few microseconds apart, and a pool thread woken for each one arrived
// ~20 us late, after a mid-sized product (a layer's projections) was mostly done. These
// spin for kSpin after a job, so the next product finds them awake, then sleep.
class Helpers {
 public:
  static Helpers& Get(int64_t threads) {
    static Helpers* helpers = new Helpers(threads - 1);  // never destroyed: threads detached
    return *helpers;
  }
  int64_t size() const { return static_cast<int64_t>(count_); }

  void Post(std::shared_ptr<Split> job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = std::move(job);
      gen_.fetch_add(1, std::memory_order_release);
    }
    if (sleeping_.load(std::memory_order_acquire) > 0) cv_.notify_all();
  }

 private:
  static constexpr auto kSpin = std::chrono::microseconds(500);

  explicit Helpers(int64_t count) : count_(std::max<int64_t>(0, count)) {
    for (int64_t i = 0; i < count_; ++i) std::thread([this] { Loop(); }).detach();
  }

  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      while (gen_.load(std::memory_order_acquire) == seen) {
        Pause();
        if (std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lock(mu_);
          sleeping_.fetch_add(1, std::memory_order_acq_rel);
          cv_.wait(lock, [&] { return gen_.load(std::memory_order_acquire) != seen; });
          sleeping_.fetch_sub(1, std::memory_order_acq_rel);
          break;
        }
      }
      std::shared_ptr<Split> job;
      {
        std::lock_guard<std::mutex> lock(mu_);
        seen = gen_.load(std::memory_order_acquire);
        job = job_;
      }
      if (job) job->Work();
    }
  }

  int64_t count_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> sleeping_{0};
  std::shared_ptr<Split> job_;
};

// Below this many weights (times rows) a product runs on the calling thread alone.
constexpr int64_t kMinParallelWeights = 1 << 17;

ffi::Error QMatvec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                   ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int32_t bits) {
  const auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || qd.size() != 2 || sd.size() != 2)
    return ffi::Error::InvalidArgument("zoo_qmatvec: x, q and scale must be 2-D");
  if (bits != 8 && bits != 4)
    return ffi::Error::InvalidArgument("zoo_qmatvec: bits must be 4 or 8");
  const int64_t m = xd[0], k = xd[1], n = sd[0], groups = sd[1];
  if (qd[1] != k || qd[0] * (bits == 4 ? 2 : 1) != n || groups < 1 || k % groups)
    return ffi::Error::InvalidArgument("zoo_qmatvec: shapes of x, q and scale do not agree");
  const Problem p{x.typed_data(), q.typed_data(), scale.typed_data(), y->typed_data(),
                  m, n, k, groups, bits};
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  Helpers& helpers = Helpers::Get(threads);
  if (helpers.size() == 0 || n * k * m < kMinParallelWeights) {
    Rows(p, Activations(p), 0, n);
    return ffi::Error::Success();
  }
  // A few chunks per thread even out a thread that starts late; multiples of 8 rows keep
  // the 8-row blocks (and int4's row pairs) whole.
  const int64_t want = std::min<int64_t>(4 * (helpers.size() + 1), std::max<int64_t>(1, n / 8));
  const int64_t chunk = ((n + want - 1) / want + 7) / 8 * 8;
  auto split = std::make_shared<Split>(p, chunk, (n + chunk - 1) / chunk);
  helpers.Post(split);
  split->Work();
  while (split->done.load(std::memory_order_acquire) < split->chunks) Pause();
  return ffi::Error::Success();
}

}  // namespace

// Which path this build runs: "avx512-vnni", "avx2" or "portable".
extern "C" const char* ZooQMatvecIsa() {
#if ZOO_AVX512
  return "avx512-vnni";
#elif ZOO_AVX2
  return "avx2";
#else
  return "portable";
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooQMatvec, QMatvec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("bits"));
