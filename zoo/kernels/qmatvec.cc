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
// XLA's intra-op thread pool.
//
// Built on first use by zoo/kernels/cpu.py (g++ -O3 -march=native); the AVX-512 path is
// taken where the compiler targets it, a portable loop elsewhere.

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

// x as int16 per row: x[m] = xscale[m] * xq[m], xq in [-32767, 32767] (round to nearest).
// A 16-bit activation against an 8- or 4-bit weight keeps ~15 bits where the weight has 8 or
// 4, and lets VNNI's vpdpwssd multiply-add 32 int16 pairs per instruction in exact integer
// arithmetic: the weight is widened to int16 in one instruction, no float conversion per
// weight. A row with a NaN or an infinity gets a NaN scale, so its outputs are NaN as a
// float product's would be. For int4, sums: per row and per chunk of a group (kChunk4
// inputs at most), the sums of xq that each of vpdpwssd's 16 lanes sees (lane j: inputs
// 2j and 2j + 1 of every 32), to take off the nibbles' offset (see Int4Rows).
constexpr int64_t kChunk = 4096;   // int8: a lane takes kChunk / 16 products < 2^31 / (32767 * 127)
constexpr int64_t kChunk4 = 2048;  // int4: 2 kChunk4 / 32 products < 2^31 / (32767 * 240)

struct Activations {
  std::vector<int16_t> xq;
  std::vector<float> xscale;
  std::vector<int32_t> sums;
  int64_t chunks = 0;  // int4 chunks per row

  explicit Activations(const Problem& p) : xq(p.m * p.k), xscale(p.m) {
    for (int64_t m = 0; m < p.m; ++m) {
      const float* x = p.x + m * p.k;
      float amax = 0.f, sum = 0.f;  // sum: NaN when x has a NaN or an infinity (max skips NaN)
      for (int64_t k = 0; k < p.k; ++k) {
        amax = std::max(amax, std::fabs(x[k]));
        sum += x[k] * 0.f;
      }
      if (sum != 0.f || !std::isfinite(amax)) amax = std::numeric_limits<float>::quiet_NaN();
      xscale[m] = amax / 32767.f;
      const float inv = amax > 0.f ? 32767.f / amax : 0.f;
      for (int64_t k = 0; k < p.k; ++k) xq[m * p.k + k] = static_cast<int16_t>(std::nearbyint(x[k] * inv));
    }
    if (p.bits != 4) return;
    const int64_t gs = p.k / p.groups;
    chunks = p.groups * ((gs + kChunk4 - 1) / kChunk4);
    sums.assign(p.m * chunks * 16, 0);
    for (int64_t m = 0; m < p.m; ++m) {
      int32_t* out = sums.data() + m * chunks * 16;
      for (int64_t g = 0; g < p.groups; ++g)
        for (int64_t c0 = g * gs, end = (g + 1) * gs; c0 < end; c0 += kChunk4, out += 16)
          for (int64_t k = c0; k < std::min(end, c0 + kChunk4); ++k) out[(k - c0) % 32 / 2] += xq[m * p.k + k];
    }
  }
};

#if ZOO_AVX512
// acc += pairwise products of x and w (vpdpwssd). In asm: GCC 12 copies the accumulator
// through another register around the intrinsic. By value: a reference into an accumulator
// array makes GCC keep the array in memory.
inline __m512i Dot(__m512i acc, __m512i x, __m512i w) {
#if defined(__GNUC__) && !defined(__clang__)
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
  return acc;
#else
  return _mm512_dpwssd_epi32(acc, x, w);
#endif
}

inline __mmask32 TailMask(int64_t left) {
  return left >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << left) - 1);
}

inline __m512i Bytes(const int8_t* q) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q))); }
inline __m512i Bytes(const int8_t* q, __mmask32 mask) { return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, q)); }

// int8: output rows n .. n + R - 1 for x rows m .. m + TM - 1: each widened weight vector
// multiplies TM x vectors. R * TM accumulators (8: enough independent chains to hide
// vpdpwssd's latency, few enough to stay in registers). Row pointers are hoisted into
// locals: q is int8, which may alias anything, so the compiler would otherwise reload them.
// Each group (and each kChunk run of it) sums in int32, then scales into float totals.
template <int R, int TM>
void Int8Rows(const Problem& p, const Activations& a, int64_t m, int64_t n) {
  const int64_t k_all = p.k, groups = p.groups, gs = k_all / groups;
  const float* scale = p.scale + n * groups;
  const int8_t* row[R];
  for (int r = 0; r < R; ++r) row[r] = p.q + (n + r) * k_all;
  const int16_t* xq[TM];
  for (int t = 0; t < TM; ++t) xq[t] = a.xq.data() + (m + t) * k_all;
  __m512 total[TM][R];
  for (int t = 0; t < TM; ++t)
    for (int r = 0; r < R; ++r) total[t][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t c0 = g * gs, end = (g + 1) * gs; c0 < end; c0 += kChunk) {
      const int64_t c1 = std::min(end, c0 + kChunk), body = c0 + (c1 - c0) / 32 * 32;
      __m512i acc[TM][R];
      for (int t = 0; t < TM; ++t)
        for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_si512();
      for (int64_t k = c0; k < body; k += 32) {
        __m512i xv[TM];
        for (int t = 0; t < TM; ++t) xv[t] = _mm512_loadu_si512(xq[t] + k);
        for (int r = 0; r < R; ++r) {
          const __m512i w = Bytes(row[r] + k);
          for (int t = 0; t < TM; ++t) acc[t][r] = Dot(acc[t][r], xv[t], w);
        }
      }
      if (body < c1) {
        const __mmask32 mask = TailMask(c1 - body);
        for (int r = 0; r < R; ++r) {
          const __m512i w = Bytes(row[r] + body, mask);
          for (int t = 0; t < TM; ++t)
            acc[t][r] = Dot(acc[t][r], _mm512_maskz_loadu_epi16(mask, xq[t] + body), w);
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512 sc = _mm512_set1_ps(scale[r * groups + g]);
        for (int t = 0; t < TM; ++t) total[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][r]), sc, total[t][r]);
      }
    }
  }
  for (int t = 0; t < TM; ++t)
    for (int r = 0; r < R; ++r)
      p.y[(m + t) * p.n + n + r] = _mm512_reduce_add_ps(total[t][r]) * a.xscale[m + t];
}

// int4 sums in int16 pairs too, but on offset nibbles: a stored nibble is v mod 16 for v in
// [-8, 7], so v + 8 is the nibble with bit 3 flipped. For a byte widened to int16, b, one
// vpternlog gives (b & 0x0F) ^ 0x08 = v_lo + 8 and another (b & 0xF0) ^ 0x80 = 16 (v_hi + 8),
// no shifts. The offsets come off by starting the accumulators at minus them, from the x
// sums of each chunk per lane (Activations::sums): sum x v_lo = A_lo - 8 sum x, and
// 16 sum x v_hi = A_hi - 128 sum x (the 16 goes into the scale).
inline __m512i LowNibble(__m512i b) {
  return _mm512_ternarylogic_epi32(b, _mm512_set1_epi16(0x0F), _mm512_set1_epi16(0x08), 0x6A);
}
inline __m512i HighNibble(__m512i b) {
  return _mm512_ternarylogic_epi32(b, _mm512_set1_epi16(0xF0), _mm512_set1_epi16(0x80), 0x6A);
}
inline __m512i UBytes(const int8_t* q) { return _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q))); }
inline __m512i UBytes(const int8_t* q, __mmask32 mask) { return _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(mask, q)); }

// int4: packed rows pr .. pr + R - 1 (output rows 2 pr .. 2 (pr + R) - 1) for x rows
// m .. m + TM - 1; 2 R TM accumulators.
template <int R, int TM>
void Int4Rows(const Problem& p, const Activations& a, int64_t m, int64_t pr) {
  const int64_t k_all = p.k, groups = p.groups, gs = k_all / groups;
  const float* scale = p.scale + 2 * pr * groups;
  const int8_t* row[R];
  for (int r = 0; r < R; ++r) row[r] = p.q + (pr + r) * k_all;
  const int16_t* xq[TM];
  const int32_t* sums[TM];
  for (int t = 0; t < TM; ++t) {
    xq[t] = a.xq.data() + (m + t) * k_all;
    sums[t] = a.sums.data() + (m + t) * a.chunks * 16;
  }
  __m512 total[TM][2 * R];
  for (int t = 0; t < TM; ++t)
    for (int r = 0; r < 2 * R; ++r) total[t][r] = _mm512_setzero_ps();
  for (int64_t g = 0, chunk = 0; g < groups; ++g) {
    for (int64_t c0 = g * gs, end = (g + 1) * gs; c0 < end; c0 += kChunk4, ++chunk) {
      const int64_t c1 = std::min(end, c0 + kChunk4), body = c0 + (c1 - c0) / 32 * 32;
      __m512i acc[TM][2 * R];
      for (int t = 0; t < TM; ++t) {
        const __m512i sum = _mm512_loadu_si512(sums[t] + 16 * chunk);
        const __m512i lo = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum, 3));
        const __m512i hi = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum, 7));
        for (int r = 0; r < R; ++r) {
          acc[t][2 * r] = lo;
          acc[t][2 * r + 1] = hi;
        }
      }
      for (int64_t k = c0; k < body; k += 32) {
        __m512i xv[TM];
        for (int t = 0; t < TM; ++t) xv[t] = _mm512_loadu_si512(xq[t] + k);
        for (int r = 0; r < R; ++r) {
          const __m512i b = UBytes(row[r] + k), lo = LowNibble(b), hi = HighNibble(b);
          for (int t = 0; t < TM; ++t) {
            acc[t][2 * r] = Dot(acc[t][2 * r], xv[t], lo);
            acc[t][2 * r + 1] = Dot(acc[t][2 * r + 1], xv[t], hi);
          }
        }
      }
      if (body < c1) {  // x masked to zero past the chunk: the nibbles' offsets there add 0
        const __mmask32 mask = TailMask(c1 - body);
        for (int r = 0; r < R; ++r) {
          const __m512i b = UBytes(row[r] + body, mask), lo = LowNibble(b), hi = HighNibble(b);
          for (int t = 0; t < TM; ++t) {
            const __m512i xv = _mm512_maskz_loadu_epi16(mask, xq[t] + body);
            acc[t][2 * r] = Dot(acc[t][2 * r], xv, lo);
            acc[t][2 * r + 1] = Dot(acc[t][2 * r + 1], xv, hi);
          }
        }
      }
      for (int r = 0; r < 2 * R; ++r) {
        const __m512 sc = _mm512_set1_ps(scale[r * groups + g] * (r % 2 ? 0.0625f : 1.f));
        for (int t = 0; t < TM; ++t) total[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][r]), sc, total[t][r]);
      }
    }
  }
  for (int t = 0; t < TM; ++t)
    for (int r = 0; r < 2 * R; ++r)
      p.y[(m + t) * p.n + 2 * pr + r] = _mm512_reduce_add_ps(total[t][r]) * a.xscale[m + t];
}

// Rows n .. n + block - 1 (block: 8 int8 rows, 4 int4 row pairs), every x row, 4 at a time.
template <int Bits>
void Block(const Problem& p, const Activations& a, int64_t n) {
  int64_t m = 0;
  if (p.m == 1) {
    if constexpr (Bits == 8) Int8Rows<8, 1>(p, a, 0, n); else Int4Rows<4, 1>(p, a, 0, n / 2);
    return;
  }
  for (int64_t sub = 0; sub < 8; sub += 2) {
    for (m = 0; m + 4 <= p.m; m += 4) {
      if constexpr (Bits == 8) Int8Rows<2, 4>(p, a, m, n + sub); else Int4Rows<1, 4>(p, a, m, (n + sub) / 2);
    }
    for (; m < p.m; ++m) {
      if constexpr (Bits == 8) Int8Rows<2, 1>(p, a, m, n + sub); else Int4Rows<1, 1>(p, a, m, (n + sub) / 2);
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
#if ZOO_AVX512
  for (; n + 8 <= n1; n += 8) p.bits == 8 ? Block<8>(p, a, n) : Block<4>(p, a, n);
  for (; n < n1 && p.bits == 8; ++n)
    for (int64_t m = 0; m < p.m; ++m) Int8Rows<1, 1>(p, a, m, n);
  for (; n + 2 <= n1; n += 2)
    for (int64_t m = 0; m < p.m; ++m) Int4Rows<1, 1>(p, a, m, n / 2);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooQMatvec, QMatvec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("bits"));
