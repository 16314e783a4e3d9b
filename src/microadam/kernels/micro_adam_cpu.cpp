// Fused CPU step of MicroAdam (built and loaded by microadam/kernels/micro_adam_cpu.py).
//
// It computes what microadam.optim.micro_adam.micro_adam_step_ computes, on the same
// state tensors, in one pass over each "unit" of whole Top-K blocks and whole quantization
// buckets (lcm(B, Q, 2) elements, grouped to about 4096): the unit's corrected gradient
// lives in a per-thread float buffer that stays in cache, each gradient element and each
// error code is read from memory once by the step (the gradients once more before it, by
// the finite check), and without weight decay the parameters are touched only at the
// window's coordinates. Units go to the threads of torch's intra-op pool in short runs
// through an atomic counter, so a thread the OS preempts (the machine may be shared) does
// not hold the others up the way a static split would. Each thread keeps its buffers from
// step to step. The per-parameter numbers of a step (t, the window row, the decay factors,
// the bias corrections, the noise key) are computed here from the state's step and seed.
//
// Rounding matches the PyTorch path operation by operation. The file is compiled with
// -ffp-contract=off, so no multiply-add is fused unless written as std::fma:
//   a      = g + (float(code) * u + lo)             decode() then add: two roundings
//   u      = (float(hi) - float(lo)) / L             per bucket, float32
//   code   = clamp(floor((a - lo) / u + 1/2 or xi), 0, L), 0 where u == 0
//   M      = ((0 + v_r0 * b1^age_r0) + v_r1 * b1^age_r1) + ...   rows in storage order,
//            as index_add_ adds them; S likewise with (v * v) * b2^age
//   u      = M * c1 / (sqrt(S * c2) + eps), 0 where the denominator is 0
//   p      = fma(u, -lr, p * (1 - lr * wd))          torch's add_(u, alpha=-lr) is one fma
// sqrt is IEEE (the PyTorch path takes it through float64 for the same result); bf16 and
// fp16 conversions are c10's round-to-nearest-even, as torch's .to() does.
//
// A unit goes through four phases, one function each (run_unit calls them in order):
// load_phase (a = g + Q^-1(e)), select_phase (Top-K per block, window row), encode_phase
// (the error's range and codes per bucket) and update_phase (moments, parameter update).
// Portable C++ does everything, in loops written for the compiler's auto-vectorizer (AVX2,
// NEON, SSE2: docs/cpu-kernel.md lists which loops vectorize on each). Where the compiler
// targets AVX-512 (-march=native on such a CPU; MICROADAM_CPU_ARCH picks the build), the
// hot loops use it directly, next to the portable loops they replace: loading a unit
// (gradient, error decoded by a 16-entry table at 4 bits, Top-K candidates, in one pass;
// block and bucket sizes multiples of 16), picking the kept entries, writing the window
// row, the bucket ranges and encoding a bucket (codes computed and packed in registers).
// These choices were measured A/B in one process (two builds of this file, interleaved
// steps) at 1M parameters. Every build computes the same bits.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MICROADAM_AVX512 1
#else
#define MICROADAM_AVX512 0
#endif

namespace microadam_cpu {
namespace {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

constexpr uint32_t kNoGuess = 0xffffffffu;  // above every key: "no candidate threshold"

struct Config {
  float neg_lr;   // float(-lr), the alpha of add_
  float wd_mult;  // float(1 - lr * weight_decay)
  bool has_wd;
  float eps;
  int64_t m, block, bucket, unit, bits;
  bool ef, stochastic, maximize;
  bool fast;  // AVX-512 loops apply: block (and bucket, with error feedback) % 16 == 0
};

struct Job {
  void* p;
  const void* g;
  int16_t* widx;
  void* wval;
  uint8_t* codes;
  c10::BFloat16* emin;
  c10::BFloat16* emax;
  int64_t numel, num_full, k_block, tail, k_tail, width, row, rows;
  uint32_t key;
  float c1, c2;
  std::vector<float> decay1, decay2;  // per storage row, cast from double
  int pdt, vdt;
};

// Per-thread buffers, sized by the unit and the block: the step's whole scratch memory
// (13 bytes per unit element plus 32 per block element: 180 KiB at the defaults, where
// unit and block are both 4096 elements). Each thread keeps its own between steps (see
// thread_scratch), so a step allocates nothing and the Top-K guess carries over.
struct Scratch {
  std::vector<float> a;           // corrected gradient of the unit
  std::vector<uint8_t> code;      // unpacked codes of the unit (portable path; +2 padding)
  std::vector<int32_t> cand;      // Top-K candidates of the unit: indices (+16 slack)...
  std::vector<uint32_t> keys;     // ...and their |a| bits (+16 slack)
  std::vector<int64_t> cand_at;   // where each block's candidates start in cand
  std::vector<int32_t> bcand;     // candidates of one block for select_topk (+16 slack)...
  std::vector<uint32_t> bkeys;    // ...and their keys (+16 slack)
  std::vector<uint32_t> sample;   // strided sample of keys
  std::vector<int32_t> sel;       // kept indices of one block (+16 slack)
  std::vector<float> m;           // moment pairs (M, S) of one block's window coordinates,
                                  // pair s for the coordinate in slot s, zero between uses
  std::vector<int32_t> slot;      // each block coordinate's slot (0: none), zero between uses
  std::vector<int32_t> listed;    // the coordinate of slot s + 1, in order of first visit
  std::vector<float> u;           // their update directions, then new values
  const void* guess_owner = nullptr;  // the tensor whose last block set the guess
  uint32_t guess = kNoGuess;          // candidate threshold for its next block
  float guess_factor = 0.8f;          // guess = last threshold * guess_factor
  int64_t unit, block, blocks_per_unit;  // the capacity
  Scratch(int64_t unit_, int64_t block_, int64_t blocks_per_unit_)
      : a(unit_ + 16),
        code(unit_ + 2),
        cand(unit_ + 16),
        keys(unit_ + 16),
        cand_at(blocks_per_unit_ + 2),
        bcand(block_ + 16),
        bkeys(block_ + 16),
        sample(256),
        sel(block_ + 16),
        m(2 * block_ + 2, 0.0f),
        slot(block_, 0),
        listed(block_),
        u(block_),
        unit(unit_),
        block(block_),
        blocks_per_unit(blocks_per_unit_) {}
  bool fits(const Config& c) const {
    return c.unit <= unit && c.block <= block && c.unit / c.block <= blocks_per_unit;
  }
};

// This thread's scratch (threads of torch's pool live as long as the process), grown when
// a step needs more; drop_thread_scratch() forgets it after a failure.
thread_local std::unique_ptr<Scratch> tls_scratch;

Scratch& thread_scratch(const Config& c) {
  if (!tls_scratch || !tls_scratch->fits(c)) {
    const Scratch* old = tls_scratch.get();
    tls_scratch = std::make_unique<Scratch>(
        std::max(c.unit, old ? old->unit : 0), std::max(c.block, old ? old->block : 0),
        std::max(c.unit / c.block, old ? old->blocks_per_unit : 0));
  }
  return *tls_scratch;
}

void drop_thread_scratch() { tls_scratch.reset(); }

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}
template <typename T>
inline T from_float(float x) {
  return static_cast<T>(x);  // c10::BFloat16 and c10::Half round to nearest even
}

// The largest finite value of the window's value dtype V, as a float.
template <typename V>
constexpr float value_max() {
  if constexpr (std::is_same_v<V, c10::Half>) return 65504.0f;
  if constexpr (std::is_same_v<V, c10::BFloat16>) return 3.38953139e38f;  // 0x7f7f0000
  return std::numeric_limits<float>::max();
}

// A window value: x saturated at V's largest finite value, then rounded to V, as
// compress/window.py's saturating_cast does (a float16 window cannot hold the 1e5 that
// error feedback accumulates from gradients of 1e4). A NaN stays NaN, as torch's clamp
// keeps it: std::max and std::min return their first argument when a comparison is false.
template <typename V>
inline V window_value(float x) {
  if constexpr (std::is_same_v<V, float>) {
    return x;
  } else {
    constexpr float top = value_max<V>();
    return from_float<V>(std::min(std::max(x, -top), top));
  }
}

inline uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}
inline float float_of(uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}
// |x| as bits: for non-negative floats the bit patterns order like the values.
inline uint32_t key_of(const float* x, int64_t i) {
  return bits_of(x[i]) & 0x7fffffffu;
}

// The integer finalizer of compress/quant.py's mix32.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  return x ^ (x >> 16);
}

// noise_key(seed, t) of compress/quant.py: the key of step t of a stream, exact on Python's
// integers because every operation keeps only the low 32 bits.
inline uint32_t noise_key(int64_t seed, int64_t t) {
  const uint64_t high = static_cast<uint64_t>(seed >> 32);  // Python's >> floors as well
  const uint32_t stream = mix32(static_cast<uint32_t>(high + static_cast<uint64_t>(t) * 0x9E3779B9u));
  return mix32(static_cast<uint32_t>(seed) ^ stream);
}

// uniform_noise(seed, t, i) of compress/quant.py, from key = noise_key(seed, t).
inline float noise_at(uint64_t i, uint32_t key) {
  uint32_t h = mix32(static_cast<uint32_t>(i) ^ key);
  h = mix32(h ^ static_cast<uint32_t>(i >> 32));
  return static_cast<float>(static_cast<int32_t>(h >> 8)) * (1.0f / 16777216.0f);
}

// One code: clamp(floor((x - lo) / u + offset), 0, levels), for u > 0, computed as the
// truncation of clamp((x - lo) / u + offset, 0, levels): for a value clamped to [0, L]
// truncation is floor, and clamping to whole bounds commutes with floor. Truncation is an
// SSE2 and NEON instruction where floor is not (SSE2 has no rounding instruction), and the
// selects are exactly max/min instructions (a NaN, impossible here, would give code 0).
inline uint8_t code_of(float x, float lo, float u, float offset, float levels) {
  float y = (x - lo) / u;
  y = y + offset;
  y = y > 0.0f ? y : 0.0f;
  y = y < levels ? y : levels;
  return static_cast<uint8_t>(static_cast<int32_t>(y));
}

// =======================================================================================
// The four phases of one unit, in the order run_unit calls them:
//   load    a = g + Q^-1(e), the corrected gradient, into s.a           Alg. 1 line 4
//   select  Top-K per block into the window row; a = 0 at the kept      lines 5-7
//   encode  the error (what Top-K dropped) quantized per bucket, packed  line 8
//   update  the moments from the window and the parameter update       lines 9-12
// Each phase is one function, with its portable loops and, beside them (#if
// MICROADAM_AVX512), the AVX-512 loops that replace them where the build targets AVX-512
// (and cfg.fast holds, for the loops that need whole runs of 16). The portable loops are
// written for the compiler's auto-vectorizer (AVX2, NEON; docs/cpu-kernel.md lists what
// vectorizes): contiguous loops over plain arrays through __restrict pointers, selects in
// place of branches, fixed-width lane temporaries for reductions, and the irregular work
// (compaction, gathers and scatters at data-dependent indices) in loops of its own.

// Where one unit lies in its tensor.
struct Span {
  int64_t start;        // its first element
  int64_t n;            // its length (the tensor's last unit may be shorter)
  int64_t first_block;  // its first Top-K block
  float levels;         // 2^bits - 1
};

// ---------------------------------------------------------------------------------------
// Phase 1, load (Alg. 1 line 4): a = g (negated under maximize) + Q^-1(e).

// a[i] = g[i] with its sign bit flipped by sign (0, or 0x80000000 under maximize): the
// negation, as an xor the compiler vectorizes along with the conversion.
template <typename P>
inline void load_gradient(float* __restrict a, const P* __restrict g, int64_t n, uint32_t sign) {
  for (int64_t i = 0; i < n; ++i) a[i] = float_of(bits_of(to_float(g[i])) ^ sign);
}

// Over one bucket: a[i] = (g[i], sign flipped by sign) + (float(code[i]) * u + lo), the
// error decoded as compress/quant.py decodes it (two roundings) and added.
template <typename P>
inline void load_bucket(float* __restrict a, const P* __restrict g,
                        const uint8_t* __restrict code, int64_t n, uint32_t sign, float lo,
                        float u) {
  for (int64_t i = 0; i < n; ++i) {
    float deq = static_cast<float>(code[i]) * u;
    deq = deq + lo;
    a[i] = float_of(bits_of(to_float(g[i])) ^ sign) + deq;
  }
}

// The 4-bit codes of `pairs` bytes, one a byte (the even element is the high nibble).
inline void unpack4(const uint8_t* __restrict packed, uint8_t* __restrict code, int64_t pairs) {
  for (int64_t j = 0; j < pairs; ++j) {
    code[2 * j] = packed[j] >> 4;
    code[2 * j + 1] = packed[j] & 0x0f;
  }
}

// Portable load: the codes unpacked to bytes first (at 4 bits; at 8 they are bytes
// already), then one pass per bucket. The unit's parameters are prefetched: the update
// touches them much later, at scattered coordinates.
template <typename P>
inline void load_portable(const Config& cfg, const Job& job, const Span& span, const P* g,
                          const P* p, Scratch& s) {
  for (int64_t off = 0; off < span.n * static_cast<int64_t>(sizeof(P)); off += 64) {
    __builtin_prefetch(reinterpret_cast<const char*>(p) + off, 0, 2);
  }
  float* a = s.a.data();
  const uint32_t sign = cfg.maximize ? 0x80000000u : 0u;
  if (!cfg.ef) {
    load_gradient(a, g, span.n, sign);
    return;
  }
  const uint8_t* code = job.codes + span.start;
  if (cfg.bits == 4) {
    unpack4(job.codes + span.start / 2, s.code.data(), (span.n + 1) / 2);
    code = s.code.data();
  }
  for (int64_t b0 = 0; b0 < span.n; b0 += cfg.bucket) {
    const int64_t len = std::min(cfg.bucket, span.n - b0);
    const int64_t bucket = (span.start + b0) / cfg.bucket;
    const float lo = to_float(job.emin[bucket]);
    const float u = (to_float(job.emax[bucket]) - lo) / span.levels;
    load_bucket(a + b0, g + b0, code + b0, len, sign, lo, u);
  }
}

#if MICROADAM_AVX512
template <typename P>
inline __m512 load16(const P* x);  // 16 elements as float32 (exact for every P)
template <>
inline __m512 load16<float>(const float* x) {
  return _mm512_loadu_ps(x);
}
template <>
inline __m512 load16<c10::BFloat16>(const c10::BFloat16* x) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <>
inline __m512 load16<c10::Half>(const c10::Half* x) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}

// AVX-512 load, the unit in one pass: a = g (negated under maximize) + (float(code) * u +
// lo), codes unpacked in registers, and, when a candidate threshold is given, the indices
// and keys of each block's Top-K candidates (|a| >= threshold) recorded on the way
// (unit-relative indices in s.cand, keys in s.keys; block b's start at s.cand_at[b]). The
// settings that do not change within a unit are template arguments, and the inner loop
// runs between block and bucket boundaries, so its body has no branch.
template <typename P, bool kEf, bool kFourBits, bool kCollect>
void load_unit(const P* g, const P* p, int64_t start, int64_t n, const Config& cfg,
               const Job& job, float levels, uint32_t threshold, Scratch& s) {
  float* a = s.a.data();
  int32_t* idx = s.cand.data();
  uint32_t* keys = s.keys.data();
  const __m512i sign = _mm512_set1_epi32(cfg.maximize ? static_cast<int32_t>(0x80000000u) : 0);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  const __m512i thr = _mm512_set1_epi32(static_cast<int32_t>(threshold));
  const __m512i lane0 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i nibble_shift = _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  const __m512i sixteen = _mm512_set1_epi32(16);
  __m512i lane = lane0;
  __m512 lo = _mm512_setzero_ps(), u = _mm512_setzero_ps(), table = _mm512_setzero_ps();
  int64_t c = 0, b = 0, next_block = 0;
  int64_t next_bucket = kEf ? 0 : std::numeric_limits<int64_t>::max();
  const int64_t n16 = n & ~int64_t{15};
  int64_t i = 0;
  while (i < n16) {
    if (i == next_block) {
      s.cand_at[b++] = c;
      next_block += cfg.block;
    }
    if (kEf && i == next_bucket) {
      const int64_t bucket = (start + i) / cfg.bucket;
      const float lo_s = to_float(job.emin[bucket]);
      lo = _mm512_set1_ps(lo_s);
      u = _mm512_set1_ps((to_float(job.emax[bucket]) - lo_s) / levels);
      // At 4 bits, the bucket's 16 decoded values, each float(code) * u + lo as below.
      table = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(lane0), u), lo);
      next_bucket += cfg.bucket;
    }
    const int64_t end = std::min({next_block, next_bucket, n16});
    for (; i < end; i += 16) {
      __m512 x =
          _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(load16(g + i)), sign));
      // The update touches this unit's parameters much later, at scattered coordinates:
      // ask for them now, while the access pattern is a plain stream. And the gradient 4 KiB
      // ahead (measured: 5% faster at 25M, where it comes from DRAM, 1% at 1M).
      __builtin_prefetch(p + i, 0, 2);
      __builtin_prefetch(g + i + 1024, 0, 2);
      if constexpr (kEf) {
        __m512 deq;
        if constexpr (kFourBits) {
          // Every byte twice, even elements' copies shifted right by 4: the low 4 bits of
          // each lane are its code, the only bits the table lookup reads.
          const __m128i packed =
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(job.codes + (start + i) / 2));
          const __m512i twice = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(packed, packed));
          deq = _mm512_permutexvar_ps(_mm512_srlv_epi32(twice, nibble_shift), table);
        } else {
          const __m128i c8 =
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(job.codes + start + i));
          deq = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c8)), u),
                              lo);
        }
        x = _mm512_add_ps(x, deq);
      }
      _mm512_storeu_ps(a + i, x);
      if constexpr (kCollect) {
        const __m512i key = _mm512_and_si512(_mm512_castps_si512(x), abs_mask);
        const __mmask16 m = _mm512_cmpge_epi32_mask(key, thr);
        _mm512_storeu_si512(idx + c, _mm512_maskz_compress_epi32(m, lane));
        _mm512_storeu_si512(keys + c, _mm512_maskz_compress_epi32(m, key));
        c += __builtin_popcount(static_cast<unsigned>(m));
        lane = _mm512_add_epi32(lane, sixteen);
      }
    }
  }
  // The tensor's last unit may end inside a run of 16.
  for (; i < n; ++i) {
    if (i == next_block) {
      s.cand_at[b++] = c;
      next_block += cfg.block;
    }
    float x = cfg.maximize ? -to_float(g[i]) : to_float(g[i]);
    if constexpr (kEf) {
      const int64_t e = start + i;
      const uint8_t byte = kFourBits ? job.codes[e / 2] : job.codes[e];
      const uint8_t code = kFourBits ? ((e & 1) ? (byte & 0x0f) : (byte >> 4)) : byte;
      const int64_t bucket = e / cfg.bucket;
      const float lo_s = to_float(job.emin[bucket]);
      const float u_s = (to_float(job.emax[bucket]) - lo_s) / levels;
      float deq = static_cast<float>(code) * u_s;
      deq = deq + lo_s;
      x = x + deq;
    }
    a[i] = x;
    if constexpr (kCollect) {
      idx[c] = static_cast<int32_t>(i);
      keys[c] = bits_of(x) & 0x7fffffffu;
      c += keys[c] >= threshold ? 1 : 0;
    }
  }
  s.cand_at[b] = c;
}
#endif  // MICROADAM_AVX512

// The load phase: the corrected gradient of the unit into s.a. Returns whether the Top-K
// candidates of every block at threshold guess were recorded on the way (the AVX-512
// load does that when it has a guess; the portable one never: its loop would no longer
// vectorize, and select_topk collects them from a instead).
template <typename P>
inline bool load_phase(const Config& cfg, const Job& job, const Span& span, const P* g,
                       const P* p, [[maybe_unused]] uint32_t guess, Scratch& s) {
#if MICROADAM_AVX512
  if (cfg.fast) {
    const auto load = [&](auto ef, auto four, auto collect) {
      load_unit<P, decltype(ef)::value, decltype(four)::value, decltype(collect)::value>(
          g, p, span.start, span.n, cfg, job, span.levels, guess, s);
    };
    using Y = std::true_type;
    using N = std::false_type;
    const bool collect = guess != kNoGuess;
    if (cfg.ef && cfg.bits == 4) {
      collect ? load(Y{}, Y{}, Y{}) : load(Y{}, Y{}, N{});
    } else if (cfg.ef) {
      collect ? load(Y{}, N{}, Y{}) : load(Y{}, N{}, N{});
    } else {
      collect ? load(N{}, N{}, Y{}) : load(N{}, N{}, N{});
    }
    return collect;
  }
#endif
  load_portable(cfg, job, span, g, p, s);
  return false;
}

// ---------------------------------------------------------------------------------------
// Phase 2, select (Alg. 1 lines 5-7): Top-K per block on |a| bits ("keys"), the window
// row, and a = 0 at the kept entries.

// Number of keys >= t (vectorized).
inline int64_t count_at_least(const uint32_t* __restrict keys, int64_t n, uint32_t t) {
  int32_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += keys[i] >= t ? 1 : 0;
  return c;
}

// A threshold t with count(keys >= t) >= k, built bit by bit from the top (keys < 2^31):
// the k-th largest key, unless the search stops early because exactly k keys are >= t
// (the kept set is then decided). Sets *count to count(keys >= t). Needs 1 <= k <= n.
// The min/max pass and every count are vectorized loops; the bit search around them is
// at most 31 steps.
uint32_t kth_threshold(const uint32_t* __restrict keys, int64_t n, int64_t k, int64_t* count) {
  uint32_t lo = keys[0], hi = keys[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, keys[i]);
    hi = std::max(hi, keys[i]);
  }
  *count = n;
  if (lo == hi || n == k) return lo;
  // Every key shares the bits above the highest one where lo and hi differ: t starts as
  // that prefix (count n) and the search goes on below it.
  const int top = 31 - __builtin_clz(lo ^ hi);
  uint32_t t = hi & ~((2u << top) - 1u);
  int64_t c = n;
  for (int bit = top; bit >= 0 && c != k; --bit) {
    const uint32_t trial = t | (1u << bit);
    const int64_t ct = count_at_least(keys, n, trial);
    if (ct >= k) {
      t = trial;
      c = ct;
    }
  }
  *count = c;
  return t;
}

// The candidates at or above t into out (ascending, minus offset), given that exactly k
// are: a compaction, which AVX-512 does 16 at a time and portable code one at a time
// without a branch (the output position advances by the comparison).
inline void compress_at_least(const int32_t* __restrict idx, const uint32_t* __restrict keys,
                              int64_t nc, uint32_t t, int32_t offset, int32_t* __restrict out) {
  int64_t o = 0, c = 0;
#if MICROADAM_AVX512
  const __m512i thr = _mm512_set1_epi32(static_cast<int32_t>(t));
  const __m512i off = _mm512_set1_epi32(offset);
  for (; c + 16 <= nc; c += 16) {  // keys < 2^31: signed compares are fine
    const __mmask16 m = _mm512_cmpge_epi32_mask(_mm512_loadu_si512(keys + c), thr);
    const __m512i at = _mm512_sub_epi32(_mm512_loadu_si512(idx + c), off);
    _mm512_storeu_si512(out + o, _mm512_maskz_compress_epi32(m, at));  // out has slack
    o += __builtin_popcount(static_cast<unsigned>(m));
  }
#endif
  for (; c < nc; ++c) {
    out[o] = idx[c] - offset;
    o += keys[c] >= t ? 1 : 0;
  }
}

// The k largest of nc candidates (indices ascending, with their keys) into out, ascending:
// every candidate above the threshold and the first ones equal to it, which is a valid
// Top-K (ties may go either way) and needs no sort. Returns the threshold.
uint32_t take_top(const int32_t* idx, const uint32_t* keys, int64_t nc, int64_t k,
                  int32_t offset, int32_t* out) {
  int64_t count;
  const uint32_t t = kth_threshold(keys, nc, k, &count);
  if (count == k) {
    compress_at_least(idx, keys, nc, t, offset, out);
    return t;
  }
  // Ties at t (rare): the first equal_left of them are kept.
  int64_t equal_left = k - count_at_least(keys, nc, t + 1), o = 0;
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t tie = keys[c] == t && equal_left > 0 ? 1 : 0;
    out[o] = idx[c] - offset;
    o += (keys[c] > t ? 1 : 0) | tie;
    equal_left -= tie;
  }
  return t;
}

// Indices i < n with key(i) >= t (ascending) and their keys; idx and keys have n + 16
// slots. A compaction: AVX-512 compresses 16 at a time; portable code stores every index
// and key and advances the output position by the comparison (no branch).
int64_t collect_at_least(const float* __restrict x, int64_t n, uint32_t t,
                         int32_t* __restrict idx, uint32_t* __restrict keys) {
  int64_t c = 0, i = 0;
#if MICROADAM_AVX512
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  const __m512i thr = _mm512_set1_epi32(static_cast<int32_t>(t));
  __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; i + 16 <= n; i += 16) {
    const __m512i v = _mm512_and_si512(_mm512_loadu_si512(x + i), abs_mask);
    const __mmask16 m = _mm512_cmpge_epi32_mask(v, thr);  // keys < 2^31: signed is fine
    // Compress in registers and store whole vectors (the slack absorbs the excess): a
    // compressing store to memory is microcoded on some CPUs.
    _mm512_storeu_si512(idx + c, _mm512_maskz_compress_epi32(m, lane));
    _mm512_storeu_si512(keys + c, _mm512_maskz_compress_epi32(m, v));
    c += __builtin_popcount(static_cast<unsigned>(m));
    lane = _mm512_add_epi32(lane, _mm512_set1_epi32(16));
  }
#endif
  for (; i < n; ++i) {
    const uint32_t key = key_of(x, i);
    idx[c] = static_cast<int32_t>(i);
    keys[c] = key;
    c += key >= t ? 1 : 0;
  }
  return c;
}

// Every element a candidate: indices 0..n-1 and all keys (vectorized).
inline void all_keys(const float* __restrict x, int64_t n, int32_t* __restrict idx,
                     uint32_t* __restrict keys) {
  for (int64_t i = 0; i < n; ++i) {
    idx[i] = static_cast<int32_t>(i);
    keys[i] = bits_of(x[i]) & 0x7fffffffu;
  }
}

// Whether nc candidates can be selected from directly: at least k, and few enough that
// thresholding them beats another scan of the block's n elements.
inline bool usable(int64_t nc, int64_t k, int64_t n) {
  return nc >= k && nc <= std::max<int64_t>(n / 4, 16 * k);
}

// Steers the factor between the last threshold found and the next guess so that 2k to
// 10k candidates come out at the guess (nc is how many did). Too few cost a second scan
// of the block, too many only longer scans of the candidates, and the k-th largest |a|
// varies by several percent from block to block (near a flat top after many steps of
// error feedback on a steady gradient, 2k candidates can lie within 1% of the
// threshold), so the guess errs low.
inline void steer_guess(Scratch& s, int64_t nc, int64_t k) {
  if (nc > 10 * k) {
    s.guess_factor += 0.3f * (1.0f - s.guess_factor);
  } else if (nc < 2 * k) {
    s.guess_factor = std::max(0.25f, 1.0f - 1.5f * (1.0f - s.guess_factor));
  }
}

// The next block's guess after threshold t was found for a block of owner's.
inline void update_guess(Scratch& s, const void* owner, uint32_t t) {
  s.guess_owner = owner;
  s.guess = bits_of(float_of(t) * s.guess_factor);
}

// The threshold to try after the candidates at or above t were too few: a little lower
// (too many make a fresh estimate from samples the better next step: kNoGuess).
inline uint32_t retry_threshold(uint32_t t, int64_t nc, int64_t k) {
  return nc < k ? bits_of(float_of(t) * 0.9f) : kNoGuess;
}

// Block Top-K without usable precomputed candidates: the indices of the k largest |x|
// among x[0..n), ascending. Candidates are the elements at or above a threshold: first
// `first` (the caller's retry after precomputed candidates failed, or this thread's guess
// for the tensor, then is_guess; kNoGuess for none), else the r-th largest of 256 strided
// samples (about 2k + 2n/256 candidates expected), else (k a large part of the block, or
// too few came out) the whole block. Gradient statistics change slowly along a tensor
// and from step to step, so the threshold found guides the next block's guess.
void select_topk(const float* x, int64_t n, int64_t k, Scratch& s, const void* owner,
                 uint32_t first, bool is_guess, int32_t* out) {
  if (k >= n) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<int32_t>(i);
    return;
  }
  int32_t* idx = s.bcand.data();
  uint32_t* keys = s.bkeys.data();
  int64_t nc = -1;
  if (k * 16 <= n && n >= 1024) {
    if (first != kNoGuess) {
      nc = collect_at_least(x, n, first, idx, keys);
      if (is_guess) steer_guess(s, nc, k);
      if (!usable(nc, k, n)) nc = -1;
    }
    if (nc < 0) {
      constexpr int64_t kSample = 256;
      const int64_t stride = n / kSample;
      const int64_t r = std::min<int64_t>(kSample, (2 * k * kSample + n - 1) / n + 2);
      uint32_t* sample = s.sample.data();
      for (int64_t j = 0; j < kSample; ++j) sample[j] = key_of(x, j * stride);
      int64_t unused;
      nc = collect_at_least(x, n, kth_threshold(sample, kSample, r, &unused), idx, keys);
      if (nc < k) nc = -1;
    }
  }
  if (nc < 0) {
    nc = n;
    all_keys(x, n, idx, keys);
  }
  update_guess(s, owner, take_top(idx, keys, nc, k, 0, out));
}

// Window row entries of one block: the kept indices, and a at them as value dtype V. The
// indices narrow in a vectorized loop; the values are a gather (AVX-512: 16 at a time,
// with bf16's round to nearest even done in integer lanes).
template <typename V>
void store_row(const int32_t* __restrict sel, int64_t k, const float* __restrict a,
               int16_t* __restrict widx, V* __restrict wval) {
  int64_t c = 0;
#if MICROADAM_AVX512
  if constexpr (std::is_same_v<V, float> || std::is_same_v<V, c10::BFloat16>) {
    for (; c + 16 <= k; c += 16) {
      const __m512i at = _mm512_loadu_si512(sel + c);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(widx + c), _mm512_cvtepi32_epi16(at));
      if constexpr (std::is_same_v<V, float>) {
        _mm512_storeu_si512(wval + c, _mm512_i32gather_epi32(at, a, 4));
      } else {  // saturate (window_value), then round to nearest even as c10::BFloat16 does
        // MINPS and MAXPS return their second operand when either is NaN: x goes second.
        const __m512 v = _mm512_i32gather_ps(at, a, 4);
        const __m512 low = _mm512_max_ps(_mm512_set1_ps(-value_max<V>()), v);
        const __m512i x = _mm512_castps_si512(_mm512_min_ps(_mm512_set1_ps(value_max<V>()), low));
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
        const __m512i up = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), odd);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(wval + c),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(up, 16)));
      }
    }
  }
#endif
  for (int64_t j = c; j < k; ++j) widx[j] = static_cast<int16_t>(sel[j]);
  for (int64_t j = c; j < k; ++j) wval[j] = window_value<V>(a[sel[j]]);
}

// The select phase: per block of the unit, the kept indices (from the candidates the load
// recorded, if it did and they are usable, else by select_topk), written with their
// values to the block's columns of window row (t - 1) mod m; then, with error feedback,
// a = 0 at them, so the error keeps what Top-K dropped.
template <typename V>
inline void select_phase(const Config& cfg, const Job& job, const Span& span, uint32_t guess,
                         bool have_candidates, Scratch& s) {
  float* a = s.a.data();
  int16_t* widx_row = job.widx + job.row * job.width;
  V* wval_row = static_cast<V*>(job.wval) + job.row * job.width;
  int32_t* sel = s.sel.data();
  for (int64_t bs = 0, b = 0; bs < span.n; bs += cfg.block, ++b) {
    const int64_t blk = span.first_block + b;
    const int64_t bn = std::min(cfg.block, span.n - bs);
    const int64_t k = blk < job.num_full ? job.k_block : job.k_tail;
    const int64_t col0 = blk * job.k_block;
    const int64_t c0 = have_candidates ? s.cand_at[b] : 0;
    const int64_t nc = have_candidates ? s.cand_at[b + 1] - c0 : 0;
    if (have_candidates && k < bn) steer_guess(s, nc, k);
    if (have_candidates && k < bn && usable(nc, k, bn)) {
      // load_unit recorded the candidates' indices and keys.
      const uint32_t* keys = s.keys.data() + c0;
      const int32_t* idx = s.cand.data() + c0;
      update_guess(s, job.p, take_top(idx, keys, nc, k, static_cast<int32_t>(bs), sel));
    } else if (have_candidates) {  // they failed, which says how to move the threshold
      select_topk(a + bs, bn, k, s, job.p, retry_threshold(guess, nc, k), false, sel);
    } else {
      const bool known = s.guess_owner == job.p;
      select_topk(a + bs, bn, k, s, job.p, known ? s.guess : kNoGuess, known, sel);
    }
    store_row(sel, k, a + bs, widx_row + col0, wval_row + col0);
    if (cfg.ef) {
      float* ab = a + bs;
      for (int64_t c = 0; c < k; ++c) ab[sel[c]] = 0.0f;  // a scatter
    }
  }
}

// ---------------------------------------------------------------------------------------
// Phase 3, encode (Alg. 1 line 8): per bucket, lo = bf16(min a), hi = bf16(max a), the
// b-bit codes of a, packed two a byte at 4 bits.

// A float's bits as an int32 that orders like the float (negative floats' magnitude bits
// flipped), and back: integer min/max reductions vectorize without -ffast-math, float ones
// do not (the compiler may not reorder them: NaN and -0).
inline int32_t ordered_of(float x) {
  const int32_t b = static_cast<int32_t>(bits_of(x));
  return b ^ ((b >> 31) & 0x7fffffff);
}
inline float float_of_ordered(int32_t k) {
  return float_of(static_cast<uint32_t>(k ^ ((k >> 31) & 0x7fffffff)));
}

// Smallest and largest of x[0..n), n >= 1. The corrected gradient holds no NaN (the step
// checks the gradients first) and no -0 (g + decoded error is never -0, and Top-K zeroes
// with +0), so min/max instructions, or min/max of ordered_of, give exactly torch's
// amin/amax, in any order.
inline void min_max(const float* __restrict x, int64_t n, float& lo, float& hi) {
#if MICROADAM_AVX512
  int64_t i = 0;
  float mn = x[0], mx = x[0];
  if (n >= 16) {
    __m512 vmn = _mm512_loadu_ps(x), vmx = vmn;
    for (i = 16; i + 16 <= n; i += 16) {
      const __m512 v = _mm512_loadu_ps(x + i);
      vmn = _mm512_min_ps(vmn, v);
      vmx = _mm512_max_ps(vmx, v);
    }
    mn = _mm512_reduce_min_ps(vmn);
    mx = _mm512_reduce_max_ps(vmx);
  }
  for (; i < n; ++i) {
    mn = x[i] < mn ? x[i] : mn;
    mx = x[i] > mx ? x[i] : mx;
  }
  lo = mn;
  hi = mx;
#else
  int32_t mn = ordered_of(x[0]), mx = mn;
  for (int64_t i = 1; i < n; ++i) {
    const int32_t key = ordered_of(x[i]);
    mn = std::min(mn, key);
    mx = std::max(mx, key);
  }
  lo = float_of_ordered(mn);
  hi = float_of_ordered(mx);
#endif
}

// The codes of one bucket at one offset (1/2: round to nearest), vectorized.
inline void codes_at(const float* __restrict a, uint8_t* __restrict code, int64_t n, float lo,
                     float u, float offset, float levels) {
  for (int64_t i = 0; i < n; ++i) code[i] = code_of(a[i], lo, u, offset, levels);
}

// The codes of one bucket with a per-element offset (stochastic rounding), vectorized.
inline void codes_with(const float* __restrict a, const float* __restrict offset,
                       uint8_t* __restrict code, int64_t n, float lo, float u, float levels) {
  for (int64_t i = 0; i < n; ++i) code[i] = code_of(a[i], lo, u, offset[i], levels);
}

// out[i] = noise_at(first + i, key), i < n. Vectorized in 32-bit lanes while the
// counter's low word does not wrap within the run (always, but for a run that crosses a
// multiple of 2^32 elements, which takes the scalar loop).
inline void noise_into(float* __restrict out, int64_t n, uint64_t first, uint32_t key) {
  const uint32_t low = static_cast<uint32_t>(first);
  if (n <= 0) return;
  if (low > 0xffffffffu - static_cast<uint32_t>(n - 1)) {
    for (int64_t i = 0; i < n; ++i) out[i] = noise_at(first + i, key);
    return;
  }
  const uint32_t high = static_cast<uint32_t>(first >> 32);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t h = mix32((low + static_cast<uint32_t>(i)) ^ key);
    h = mix32(h ^ high);
    out[i] = static_cast<float>(static_cast<int32_t>(h >> 8)) * (1.0f / 16777216.0f);
  }
}

// Pairs of codes into bytes, (even << 4) | odd (vectorized).
inline void pack4(const uint8_t* __restrict code, uint8_t* __restrict packed, int64_t pairs) {
  for (int64_t j = 0; j < pairs; ++j) {
    packed[j] = static_cast<uint8_t>((code[2 * j] << 4) | code[2 * j + 1]);
  }
}

// Portable codes of one bucket of the unit into code (one a byte); the noise of stochastic
// rounding is made in runs of kNoiseRun into a stack buffer, then used.
inline void encode_portable(const float* a, int64_t n, float lo, float u, float levels,
                            bool stochastic, uint64_t first, uint32_t key, uint8_t* code) {
  if (!stochastic) {
    codes_at(a, code, n, lo, u, 0.5f, levels);
    return;
  }
  constexpr int64_t kNoiseRun = 256;
  float noise[kNoiseRun];
  for (int64_t c0 = 0; c0 < n; c0 += kNoiseRun) {
    const int64_t len = std::min(kNoiseRun, n - c0);
    noise_into(noise, len, first + static_cast<uint64_t>(c0), key);
    codes_with(a + c0, noise, code + c0, len, lo, u, levels);
  }
}

#if MICROADAM_AVX512
inline __m512i mix32_16(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb352d));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int32_t>(0x846ca68bu)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

// The offsets of elements e .. e + 15 of the tensor: 1/2 (round to nearest) or their
// uniform noise (stochastic rounding).
inline __m512 offsets16(bool stochastic, uint64_t e, uint32_t key) {
  if (!stochastic) return _mm512_set1_ps(0.5f);
  if (static_cast<uint32_t>(e) > 0xffffffffu - 15u) {  // the counter's low word wraps
    alignas(64) float o[16];
    for (int l = 0; l < 16; ++l) o[l] = noise_at(e + l, key);
    return _mm512_load_ps(o);
  }
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i counter = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(e)), lane);
  __m512i h = mix32_16(_mm512_xor_si512(counter, _mm512_set1_epi32(static_cast<int32_t>(key))));
  h = mix32_16(_mm512_xor_si512(h, _mm512_set1_epi32(static_cast<int32_t>(e >> 32))));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(h, 8)),
                       _mm512_set1_ps(1.0f / 16777216.0f));
}

// The codes of 16 elements as int32 lanes, as code_of computes them (clamp, then
// truncate).
inline __m512i codes16(const float* a, __m512 lo, __m512 u, __m512 offset, __m512 levels) {
  const __m512 y = _mm512_div_ps(_mm512_sub_ps(_mm512_loadu_ps(a), lo), u);
  return _mm512_cvttps_epi32(
      _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(y, offset), _mm512_setzero_ps()), levels));
}

// AVX-512 codes of one bucket starting on a multiple of 16 elements: the codes of
// a[0..n), computed and packed in registers, into out (the bucket's first byte).
void encode_bucket(const float* a, int64_t n, float lo_s, float u_s, float levels_s,
                   bool stochastic, uint64_t first, uint32_t key, int64_t bits, uint8_t* out) {
  const __m512 lo = _mm512_set1_ps(lo_s), u = _mm512_set1_ps(u_s);
  const __m512 levels = _mm512_set1_ps(levels_s);
  int64_t i = 0;
  // 64 at a time: narrowed to bytes by two saturating packs (codes are 0..255), which
  // interleave 128-bit lanes, put back in order by one permute; at 4 bits each pair of
  // bytes becomes (even << 4) | odd by a multiply-add with (16, 1).
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  for (; i + 64 <= n; i += 64) {
    __m512i c[4];
    for (int v = 0; v < 4; ++v) {
      const int64_t j = i + 16 * v;
      c[v] = codes16(a + j, lo, u, offsets16(stochastic, first + j, key), levels);
    }
    const __m512i bytes = _mm512_permutexvar_epi32(
        order, _mm512_packus_epi16(_mm512_packus_epi32(c[0], c[1]),
                                   _mm512_packus_epi32(c[2], c[3])));
    if (bits == 4) {
      const __m512i pairs = _mm512_maddubs_epi16(bytes, _mm512_set1_epi16(0x0110));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i / 2), _mm512_cvtepi16_epi8(pairs));
    } else {
      _mm512_storeu_si512(out + i, bytes);
    }
  }
  for (; i + 16 <= n; i += 16) {
    const __m512i c = codes16(a + i, lo, u, offsets16(stochastic, first + i, key), levels);
    if (bits == 4) {
      // Per 64-bit lane (even code low, odd code high): (even << 4) | odd in its low byte.
      const __m512i w = _mm512_or_si512(_mm512_slli_epi64(c, 4), _mm512_srli_epi64(c, 32));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i / 2), _mm512_cvtepi64_epi8(w));
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtepi32_epi8(c));
    }
  }
  // A short last bucket of the tensor: its rest, pairwise at 4 bits (an odd count leaves
  // the last low nibble zero).
  for (; i < n; i += (bits == 4 ? 2 : 1)) {
    uint8_t codes[2] = {0, 0};
    const int64_t width = bits == 4 ? std::min<int64_t>(2, n - i) : 1;
    for (int64_t l = 0; l < width; ++l) {
      const float offset = stochastic ? noise_at(first + i + l, key) : 0.5f;
      codes[l] = code_of(a[i + l], lo_s, u_s, offset, levels_s);
    }
    if (bits == 4) {
      out[i / 2] = static_cast<uint8_t>((codes[0] << 4) | codes[1]);
    } else {
      out[i] = codes[0];
    }
  }
}
#endif  // MICROADAM_AVX512

// The encode phase (error feedback only): per bucket, its range stored as bf16 and its
// codes computed from the rounded range; a bucket whose range rounds to nothing (u == 0)
// gets code 0 everywhere. AVX-512 writes each bucket's packed codes directly; portable
// code writes one code a byte (into s.code at 4 bits, packed at the end; straight into
// ef_codes at 8).
inline void encode_phase(const Config& cfg, const Job& job, const Span& span, Scratch& s) {
  const float* a = s.a.data();
  const bool four = cfg.bits == 4;
  uint8_t* code = four ? s.code.data() : job.codes + span.start;
  for (int64_t b0 = 0; b0 < span.n; b0 += cfg.bucket) {
    const int64_t len = std::min(cfg.bucket, span.n - b0);
    const int64_t bucket = (span.start + b0) / cfg.bucket;
    float lo_f, hi_f;
    min_max(a + b0, len, lo_f, hi_f);
    const c10::BFloat16 lo_b(lo_f), hi_b(hi_f);
    job.emin[bucket] = lo_b;
    job.emax[bucket] = hi_b;
    const float lo = to_float(lo_b);
    const float u = (to_float(hi_b) - lo) / span.levels;
    const uint64_t first = static_cast<uint64_t>(span.start + b0);  // the noise's counter
#if MICROADAM_AVX512
    if (cfg.fast) {
      uint8_t* out = job.codes + (four ? (span.start + b0) / 2 : span.start + b0);
      if (!(u > 0.0f)) {
        std::memset(out, 0, four ? (len + 1) / 2 : len);
      } else {
        encode_bucket(a + b0, len, lo, u, span.levels, cfg.stochastic, first, job.key,
                      cfg.bits, out);
      }
      continue;
    }
#endif
    if (!(u > 0.0f)) {
      std::memset(code + b0, 0, len);
    } else {
      encode_portable(a + b0, len, lo, u, span.levels, cfg.stochastic, first, job.key,
                      code + b0);
    }
  }
  if (four && !cfg.fast) {
    code[span.n] = 0;  // an odd tensor length leaves the last low nibble zero
    pack4(code, job.codes + span.start / 2, (span.n + 1) / 2);
  }
}

// ---------------------------------------------------------------------------------------
// Phase 4, update (Alg. 1 lines 9-12): the moments at the window's coordinates of each
// block, then the update. Portable code only: the work is scattered over a block's
// coordinates, except the direction's loop, which the compiler vectorizes at whatever
// width the build targets (AVX-512 included).

// The unit's columns of the window, asked for right after the load (one short segment
// per row), so that they arrive while select and encode run.
inline void prefetch_window(const Config& cfg, const Job& job, const Span& span) {
  const int64_t c0 = span.first_block * job.k_block;
  const int64_t c1 =
      std::min(job.width, (span.first_block + (span.n + cfg.block - 1) / cfg.block) *
                                  job.k_block + job.k_tail);
  const int64_t vsize = job.vdt == kF32 ? 4 : 2;
  for (int64_t r = 0; r < job.rows; ++r) {
    const char* ir = reinterpret_cast<const char*>(job.widx + r * job.width + c0);
    const char* vr = static_cast<const char*>(job.wval) + (r * job.width + c0) * vsize;
    for (int64_t off = 0; off < (c1 - c0) * 2; off += 64) __builtin_prefetch(ir + off, 0, 2);
    for (int64_t off = 0; off < (c1 - c0) * vsize; off += 64) __builtin_prefetch(vr + off, 0, 2);
  }
}

// Alg. 1 lines 10-12 on one block, after the moments of its c distinct window coordinates
// were accumulated into the pairs m[2 (j + 1)], m[2 (j + 1) + 1] of slot j + 1, the slot of
// coordinate at[j] (pairs and slots are zeroed here for the next block): u for those
// coordinates (a vectorized loop), then p = fma(u, -lr, p * (1 - lr wd)) at them (a
// scatter). A coordinate in no window row gets u = 0, so without weight decay only the
// window's parameters are touched.
template <typename P, bool kDecay>
void update_block(P* p, float* __restrict m, int32_t* __restrict slot,
                  const int32_t* __restrict at, int64_t c, int64_t n, float c1, float c2,
                  float eps, float neg_lr, float wd_mult, Scratch& s) {
  float* __restrict u = s.u.data();
  const float* __restrict pairs = m + 2;  // slot j + 1 holds coordinate at[j]
  for (int64_t j = 0; j < c; ++j) {
    const float m_hat = pairs[2 * j] * c1;
    const float v_hat = pairs[2 * j + 1] * c2;
    const float denom = std::sqrt(v_hat) + eps;
    u[j] = denom > 0.0f ? m_hat / denom : 0.0f;
  }
  std::memset(m, 0, (2 * c + 2) * sizeof(float));
  if (!kDecay) {
    for (int64_t j = 0; j < c; ++j) {
      slot[at[j]] = 0;
      P& x = p[at[j]];
      x = from_float<P>(std::fma(u[j], neg_lr, to_float(x)));
    }
    return;
  }
  // The window coordinates need the decayed value before it is rounded to P: compute
  // them first, then decay the whole block (vectorized), then write them.
  for (int64_t j = 0; j < c; ++j) {
    slot[at[j]] = 0;
    u[j] = std::fma(u[j], neg_lr, to_float(p[at[j]]) * wd_mult);
  }
  for (int64_t k = 0; k < n; ++k) p[k] = from_float<P>(to_float(p[k]) * wd_mult);
  for (int64_t j = 0; j < c; ++j) p[at[j]] = from_float<P>(u[j]);
}

// The update phase, per block of the unit: its moments, then its update. The moments: for
// each window row r (storage order, as index_add_ adds them) and each of its k entries
// (coordinate i, value v), M_i += v * decay1[r] and S_i += (v * v) * decay2[r], into the
// pair of i's slot, which i gets on its first visit (slots 1, 2, ... in order; at[slot - 1]
// = i), so that the update's pass over the pairs is contiguous. This loop is irregular
// (each entry reads and writes the slot of its coordinate) and stays scalar; its speed is
// that of the window's memory, which prefetch_window asked for. (Kept in this function:
// as a function of its own, or with the index check hoisted into a vectorized pass, it
// measured 10-40% slower in this phase, from register spills in the inner loop.)
template <typename P, typename V>
inline void update_phase(const Config& cfg, const Job& job, const Span& span, P* p, Scratch& s,
                         std::atomic<int>& bad_index) {
  float* m = s.m.data();
  int32_t* slot = s.slot.data();
  int32_t* at = s.listed.data();
  for (int64_t bs = 0; bs < span.n; bs += cfg.block) {
    const int64_t blk = span.first_block + bs / cfg.block;
    const int64_t bn = std::min(cfg.block, span.n - bs);
    const int64_t k = blk < job.num_full ? job.k_block : job.k_tail;
    const int64_t col0 = blk * job.k_block;
    int64_t listed = 0;
    for (int64_t r = 0; r < job.rows; ++r) {
      const int16_t* ir = job.widx + r * job.width + col0;
      const V* vr = static_cast<const V*>(job.wval) + r * job.width + col0;
      const float d1 = job.decay1[r], d2 = job.decay2[r];
      for (int64_t c = 0; c < k; ++c) {
        const int64_t i = static_cast<uint16_t>(ir[c]);
        if (i >= bn) {  // a corrupted checkpoint: never write outside the block
          bad_index.store(1, std::memory_order_relaxed);
          continue;
        }
        const float v = to_float(vr[c]);
        const float f = v * d1;
        const float sq = v * v;
        const float f2 = sq * d2;
        const int32_t old = slot[i];
        const int32_t sl = old != 0 ? old : static_cast<int32_t>(listed + 1);
        slot[i] = sl;
        at[listed] = static_cast<int32_t>(i);
        listed += old == 0 ? 1 : 0;
        m[2 * sl] = m[2 * sl] + f;
        m[2 * sl + 1] = m[2 * sl + 1] + f2;
      }
    }
    if (cfg.has_wd) {
      update_block<P, true>(p + bs, m, slot, at, listed, bn, job.c1, job.c2, cfg.eps,
                            cfg.neg_lr, cfg.wd_mult, s);
    } else {
      update_block<P, false>(p + bs, m, slot, at, listed, bn, job.c1, job.c2, cfg.eps,
                             cfg.neg_lr, 1.0f, s);
    }
  }
}

// =======================================================================================
// One unit: the four phases on its blocks and buckets.
template <typename P, typename V>
void run_unit(const Config& cfg, const Job& job, int64_t unit, Scratch& s,
              std::atomic<int>& bad_index) {
  Span span;
  span.start = unit * cfg.unit;
  span.n = std::min(cfg.unit, job.numel - span.start);
  span.first_block = span.start / cfg.block;
  span.levels = static_cast<float>((1 << cfg.bits) - 1);
  const P* g = static_cast<const P*>(job.g) + span.start;
  P* p = static_cast<P*>(job.p) + span.start;
  // This thread's Top-K threshold guess for the tensor, if it has one.
  const uint32_t guess = s.guess_owner == job.p ? s.guess : kNoGuess;

  const bool have_candidates = load_phase<P>(cfg, job, span, g, p, guess, s);
  prefetch_window(cfg, job, span);
  select_phase<V>(cfg, job, span, guess, have_candidates, s);
  if (cfg.ef) encode_phase(cfg, job, span, s);
  update_phase<P, V>(cfg, job, span, p, s, bad_index);
}

using UnitFn = void (*)(const Config&, const Job&, int64_t, Scratch&, std::atomic<int>&);

template <typename P>
UnitFn pick_value(int vdt) {
  switch (vdt) {
    case kF32:
      return &run_unit<P, float>;
    case kBF16:
      return &run_unit<P, c10::BFloat16>;
    default:
      return &run_unit<P, c10::Half>;
  }
}

UnitFn pick(int pdt, int vdt) {
  switch (pdt) {
    case kF32:
      return pick_value<float>(vdt);
    case kBF16:
      return pick_value<c10::BFloat16>(vdt);
    default:
      return pick_value<c10::Half>(vdt);
  }
}

int dtype_code(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kF32;
    case at::kBFloat16:
      return kBF16;
    case at::kHalf:
      return kF16;
    default:
      TORCH_CHECK(false, "microadam fused CPU step: ", what, " has the unsupported dtype ",
                  t.scalar_type());
  }
  return kF32;
}

void check(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "microadam fused CPU step: ", what, " is not on the CPU");
  TORCH_CHECK(t.is_contiguous(), "microadam fused CPU step: ", what, " is not contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, "microadam fused CPU step: ", what, " has dtype ",
              t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.numel() == numel, "microadam fused CPU step: ", what, " has ", t.numel(),
              " elements, expected ", numel);
}

// Whether gradients are all finite, checked in chunks that threads claim one by one:
// each gradient is read once and nothing of its size is allocated.
class FiniteCheck {
 public:
  explicit FiniteCheck(at::TensorList grads) : grads_(grads), first_(grads.size() + 1, 0) {
    for (size_t j = 0; j < grads.size(); ++j) {
      TORCH_CHECK(grads[j].device().is_cpu() && grads[j].is_contiguous(),
                  "microadam fused CPU step: gradients to check must be contiguous CPU tensors");
      dtypes_.push_back(dtype_code(grads[j], "a gradient"));
      first_[j + 1] = first_[j] + (grads[j].numel() + kChunk - 1) / kChunk;
    }
    bad_ = std::vector<std::atomic<uint8_t>>(grads.size());
    for (auto& b : bad_) b.store(0);
  }
  int64_t chunks() const { return first_.back(); }
  bool all_finite() const { return !any_bad_.load(); }
  int64_t first_bad() const {  // -1 if none
    for (size_t j = 0; j < bad_.size(); ++j) {
      if (bad_[j].load()) return static_cast<int64_t>(j);
    }
    return -1;
  }

  void work() {
    size_t j = 0;
    for (;;) {
      const int64_t w = next_.fetch_add(1, std::memory_order_relaxed);
      if (w >= chunks()) return;
      while (first_[j + 1] <= w) ++j;
      const int64_t begin = (w - first_[j]) * kChunk;
      const int64_t n = std::min(kChunk, grads_[j].numel() - begin);
      uint32_t acc = 0;
      // An element is NaN or inf exactly when its exponent bits are all ones.
      if (dtypes_[j] == kF32) {
        const uint32_t* x = static_cast<const uint32_t*>(grads_[j].data_ptr()) + begin;
        for (int64_t i = 0; i < n; ++i) acc |= (~x[i] & 0x7f800000u) == 0 ? 1u : 0u;
      } else {
        const uint16_t* x = static_cast<const uint16_t*>(grads_[j].data_ptr()) + begin;
        const uint16_t e = dtypes_[j] == kBF16 ? 0x7f80 : 0x7c00;
        for (int64_t i = 0; i < n; ++i) acc |= (~x[i] & e) == 0 ? 1u : 0u;
      }
      if (acc) {
        bad_[j].store(1, std::memory_order_relaxed);
        any_bad_.store(1, std::memory_order_relaxed);
      }
    }
  }

 private:
  static constexpr int64_t kChunk = 1 << 16;
  at::TensorList grads_;
  std::vector<int64_t> first_;
  std::vector<int> dtypes_;
  std::vector<std::atomic<uint8_t>> bad_;
  std::atomic<int64_t> next_{0};
  std::atomic<int> any_bad_{0};
};

// Runs first() on every thread of torch's intra-op pool, then, after all of them are
// done, second() on every thread if proceed() says so: one parallel region for both, so
// a step wakes the pool once. Inline when there is one thread or we already are inside a
// parallel region.
template <typename F1, typename P, typename F2>
void two_phases(int64_t work_items, const F1& first, const P& proceed, const F2& second) {
#ifdef _OPENMP
  at::internal::lazy_init_num_threads();  // this thread's OpenMP team size, as torch sets it
  const bool parallel =
      std::min<int64_t>(at::get_num_threads(), work_items) > 1 && !at::in_parallel_region() &&
      !omp_in_parallel();
#else
  const bool parallel = false;
#endif
  if (!parallel) {
    first();
    if (proceed()) second();
    return;
  }
#ifdef _OPENMP
  // No num_threads clause (torch avoids it for GOMP's thread pool, pytorch#32008): the
  // team is torch's, and the workers share work dynamically, so extra threads are harmless.
#pragma omp parallel
  {
    first();
#pragma omp barrier
    if (proceed()) second();
  }
#endif
}

// A 0-d (or one-element) CPU tensor of dtype, for the per-parameter step and seed.
template <typename T>
T scalar_of(const at::Tensor& t, at::ScalarType dtype, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.numel() == 1,
              "microadam fused CPU step: ", what, " must be a one-element ", dtype,
              " tensor on the CPU, got ", t.scalar_type(), " with ", t.numel(),
              " elements on ", t.device());
  return *t.data_ptr<T>();
}

// One MicroAdam step of several parameters of one param group (see micro_adam_cpu.py).
// Per parameter: steps[j] (float32, incremented here), seeds[j] (int64, stochastic
// rounding only), the window (m rows of k columns) and the error-feedback buffers. The
// step's per-parameter numbers (t, the window row, the ages' decay factors, the bias
// corrections, the noise key) are computed here, in double as the PyTorch path computes
// them. Returns the position in check_grads of the first gradient that is not all
// finite (nothing was changed then), else -1.
int64_t micro_adam_step(at::TensorList params, at::TensorList grads, at::TensorList steps,
                        at::TensorList seeds, at::TensorList window_indices,
                        at::TensorList window_values, at::TensorList ef_codes,
                        at::TensorList ef_min, at::TensorList ef_max, double lr, double beta1,
                        double beta2, double eps, double weight_decay, int64_t k_block,
                        int64_t window_size, int64_t topk_block_size, int64_t quant_block_size,
                        int64_t unit, int64_t quant_bits, bool error_feedback, bool stochastic,
                        bool maximize, at::TensorList check_grads) {
  const int64_t count = static_cast<int64_t>(params.size());
  const auto listed = [count](at::TensorList l) { return static_cast<int64_t>(l.size()) == count; };
  TORCH_CHECK(listed(grads) && listed(steps) && listed(window_indices) && listed(window_values),
              "microadam fused CPU step: list lengths differ");
  TORCH_CHECK(!stochastic || listed(seeds), "microadam fused CPU step: one seed per parameter");
  TORCH_CHECK(!error_feedback || (listed(ef_codes) && listed(ef_min) && listed(ef_max)),
              "microadam fused CPU step: error-feedback list lengths differ");
  TORCH_CHECK(quant_bits == 4 || quant_bits == 8, "microadam fused CPU step: bad quant_bits");
  TORCH_CHECK(topk_block_size >= 1 && topk_block_size <= 32768 && quant_block_size >= 1 &&
                  unit >= 1 && unit % topk_block_size == 0 &&
                  (!error_feedback ||
                   (unit % quant_block_size == 0 && (quant_bits == 8 || unit % 2 == 0))),
              "microadam fused CPU step: bad block sizes");
  TORCH_CHECK(k_block >= 1 && k_block <= topk_block_size, "microadam fused CPU step: bad k_block");
  const int64_t m = window_size;
  TORCH_CHECK(m >= 1, "microadam fused CPU step: bad window_size");

  Config cfg;
  cfg.neg_lr = static_cast<float>(-lr);
  const double wd_mult = weight_decay != 0.0 ? 1.0 - lr * weight_decay : 1.0;
  cfg.wd_mult = static_cast<float>(wd_mult);
  cfg.has_wd = wd_mult != 1.0;
  cfg.eps = static_cast<float>(eps);
  cfg.m = m;
  cfg.block = topk_block_size;
  cfg.bucket = quant_block_size;
  cfg.unit = unit;
  cfg.bits = quant_bits;
  cfg.ef = error_feedback;
  cfg.stochastic = stochastic;
  cfg.maximize = maximize;
  cfg.fast = MICROADAM_AVX512 && topk_block_size % 16 == 0 &&
             (!error_feedback || quant_block_size % 16 == 0);

  std::vector<Job> jobs(count);
  std::vector<int64_t> first_unit(count + 1, 0);
  for (int64_t j = 0; j < count; ++j) {
    Job& job = jobs[j];
    const at::Tensor& p = params[j];
    const float step = scalar_of<float>(steps[j], at::kFloat, "step");
    // float32 counts exactly up to 2^24 (MAX_STEPS in optim/micro_adam.py).
    TORCH_CHECK(std::isfinite(step) && step >= 0.0f && step == std::floor(step),
                "microadam fused CPU step: a parameter's step count is ", step,
                ", not a whole number >= 0 (corrupted optimizer state?)");
    TORCH_CHECK(step < 16777215.0f, "MicroAdam: a parameter's step count is ",
                static_cast<int64_t>(step),  // a whole number >= 2^24 - 1: exact
                "; the float32 step counter of its state stops being exact at 2^24, so "
                "MicroAdam takes at most 16777215 steps per parameter");
    const int64_t t = static_cast<int64_t>(step) + 1;
    job.numel = p.numel();
    job.num_full = job.numel / topk_block_size;
    job.tail = job.numel % topk_block_size;
    job.k_block = job.num_full > 0 ? k_block : 0;
    // The window's width gives k of the short last block (its shape was checked against
    // the layout when the state was made or loaded).
    TORCH_CHECK(window_indices[j].dim() == 2 && window_indices[j].size(0) == m,
                "microadam fused CPU step: window_indices of parameter ", j,
                " is not (window_size, k)");
    job.width = window_indices[j].size(1);
    job.k_tail = job.width - job.num_full * job.k_block;
    TORCH_CHECK(job.k_tail >= 0 && job.k_tail <= job.tail && (job.tail == 0 || job.k_tail >= 1),
                "microadam fused CPU step: the window of parameter ", j, " has ", job.width,
                " columns, which does not fit its ", job.numel, " elements");
    job.row = (t - 1) % m;
    job.rows = std::min(t, m);
    job.key = stochastic ? noise_key(scalar_of<int64_t>(seeds[j], at::kLong, "rng_seed"), t) : 0;
    job.pdt = dtype_code(p, "a parameter");
    check(p, p.scalar_type(), job.numel, "a parameter");
    check(grads[j], p.scalar_type(), job.numel, "a gradient");
    check(window_indices[j], at::kShort, m * job.width, "window_indices");
    job.vdt = dtype_code(window_values[j], "window_values");
    check(window_values[j], window_values[j].scalar_type(), m * job.width, "window_values");
    job.p = p.data_ptr();
    job.g = grads[j].data_ptr();
    job.widx = window_indices[j].data_ptr<int16_t>();
    job.wval = window_values[j].data_ptr();
    job.codes = nullptr;
    job.emin = job.emax = nullptr;
    if (error_feedback) {
      const int64_t buckets = (job.numel + quant_block_size - 1) / quant_block_size;
      check(ef_codes[j], at::kByte, quant_bits == 4 ? (job.numel + 1) / 2 : job.numel,
            "ef_codes");
      check(ef_min[j], at::kBFloat16, buckets, "ef_min");
      check(ef_max[j], at::kBFloat16, buckets, "ef_max");
      job.codes = ef_codes[j].data_ptr<uint8_t>();
      job.emin = ef_min[j].data_ptr<c10::BFloat16>();
      job.emax = ef_max[j].data_ptr<c10::BFloat16>();
    }
    // As window_direction: the bias factors and beta ** age in double, then float.
    job.c1 = static_cast<float>((1.0 - beta1) / (1.0 - std::pow(beta1, static_cast<double>(t))));
    job.c2 = static_cast<float>((1.0 - beta2) / (1.0 - std::pow(beta2, static_cast<double>(t))));
    job.decay1.resize(job.rows);
    job.decay2.resize(job.rows);
    for (int64_t r = 0; r < job.rows; ++r) {
      const double age = static_cast<double>(((t - 1 - r) % m + m) % m);
      job.decay1[r] = static_cast<float>(std::pow(beta1, age));
      job.decay2[r] = static_cast<float>(std::pow(beta2, age));
    }
    first_unit[j + 1] = first_unit[j] + (job.numel + unit - 1) / unit;
  }
  const int64_t total = first_unit[count];
  std::vector<UnitFn> fns(count);
  for (int64_t j = 0; j < count; ++j) fns[j] = pick(jobs[j].pdt, jobs[j].vdt);

  // Threads take runs of consecutive units (a sequential stream through memory, and the
  // Top-K threshold of one block is a good guess for the next); runs are short enough
  // (at least 16 per thread) that a preempted thread leaves its share to the others.
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  const int64_t run = std::clamp<int64_t>(total / (threads * 16), 1, 16);
  std::atomic<int64_t> next{0};
  std::atomic<int> bad_index{0};
  // First every gradient of check_grads is checked (the whole optimizer's, on the first
  // call of a step); the update runs only if all are finite, so that a bad batch changes
  // nothing anywhere.
  FiniteCheck finite_check(check_grads);
  const auto check = [&]() { finite_check.work(); };
  const auto proceed = [&]() { return finite_check.all_finite(); };
  std::exception_ptr error;
  std::atomic_flag error_taken = ATOMIC_FLAG_INIT;
  two_phases(std::max(total, finite_check.chunks()), check, proceed, [&]() {
   try {  // an exception must not leave an OpenMP region; it is rethrown below
    Scratch& s = thread_scratch(cfg);
    int64_t j = 0;  // work ids only grow, so the owning parameter only moves forward
    for (;;) {
      const int64_t w0 = next.fetch_add(run, std::memory_order_relaxed);
      if (w0 >= total) break;
      for (int64_t w = w0; w < std::min(total, w0 + run); ++w) {
        while (first_unit[j + 1] <= w) ++j;
        fns[j](cfg, jobs[j], w - first_unit[j], s, bad_index);
      }
    }
   } catch (...) {
    drop_thread_scratch();  // it may be left in an unknown state
    if (!error_taken.test_and_set()) error = std::current_exception();
   }
  });

  if (error) std::rethrow_exception(error);
  if (!finite_check.all_finite()) return finite_check.first_bad();
  for (int64_t j = 0; j < count; ++j) {
    params[j].unsafeGetTensorImpl()->bump_version();
    window_indices[j].unsafeGetTensorImpl()->bump_version();
    window_values[j].unsafeGetTensorImpl()->bump_version();
    if (error_feedback) {
      ef_codes[j].unsafeGetTensorImpl()->bump_version();
      ef_min[j].unsafeGetTensorImpl()->bump_version();
      ef_max[j].unsafeGetTensorImpl()->bump_version();
    }
  }
  TORCH_CHECK(!bad_index.load(),
              "microadam fused CPU step: a window index lies outside its Top-K block "
              "(corrupted optimizer state?)");
  for (int64_t j = 0; j < count; ++j) {
    float* step = steps[j].data_ptr<float>();
    *step = *step + 1.0f;  // as torch._foreach_add_(steps, 1.0)
    steps[j].unsafeGetTensorImpl()->bump_version();
  }
  return -1;
}

}  // namespace

TORCH_LIBRARY(microadam_cpu, m) {
  m.def(
      "micro_adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] steps, "
      "Tensor[] seeds, Tensor(c!)[] window_indices, Tensor(d!)[] window_values, "
      "Tensor(e!)[] ef_codes, Tensor(f!)[] ef_min, Tensor(g!)[] ef_max, float lr, "
      "float beta1, float beta2, float eps, float weight_decay, int k_block, "
      "int window_size, int topk_block_size, int quant_block_size, int unit, int quant_bits, "
      "bool error_feedback, bool stochastic, bool maximize, Tensor[] check_grads) -> int");
  m.impl("micro_adam_step_", c10::DispatchKey::CPU, &micro_adam_step);
}

}  // namespace microadam_cpu
