// Native CPU kernels of KVBuffer (backend "cpu"): a torch C++ extension that cpu_impl.py compiles
// on first use (torch.utils.cpp_extension) and caches.
//
// Same semantics and in-place pool updates as torch_impl.py (the exact reference); the Python
// side has validated every argument. Formulas: docs/kvbuffer-math.md.
//
// Layout of the work: one parallel loop over (sequence, key head) tasks on torch's intra-op
// thread pool (at::parallel_for, the OpenMP pool vLLM's CPU worker sizes and binds to its cores).
// A task owns the state blocks state[slot, h] ([V, K], key-minor rows) and the u / G buffer rows
// of the key head's value heads, so tasks never write the same memory; raw keys and meta rows are
// stored after the parallel loop. The normalised keys and queries and their dot products depend
// only on the key head: a task computes them once for its value heads. Everything in the
// buffered form is separable over value rows v: one pass over a state block computes S0^T k_hat
// and S0^T q_hat for every new token (four rows per iteration, each key element loaded feeding
// several FMAs), the corrected values and outputs follow from the dot table, and a flush
// re-reads the block (still in the core's L2) to write
// exp(G_m) S0 + sum_j exp(G_m - G_j) k_hat_j u_j^T in the state's dtype.
//
// Pools are read through their strides (they may be views into padded vLLM pages; nothing is
// copied). bf16 and fp16 are widened to fp32 in registers; u, G and every accumulator are fp32
// (float64 for a float64 state). Memory the algorithm must not read (buffer rows past a slot's
// length, the state of a slot that never flushed) is never read.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t META_LEN = 0, META_PENDING = 1, META_HAS_STATE = 2;
constexpr double L2NORM_EPS = 1e-6;
#ifndef PF_ROWS
#define PF_ROWS 32
#endif
// Below this many state elements per call, one thread: waking the pool costs more than the work.
constexpr int64_t SERIAL_BELOW = int64_t(1) << 16;

// -- storage types: bf16 as its 16 bits, fp16 as the compiler's _Float16 ------------------------
struct bf16 {
  uint16_t bits;
};

inline float to_acc(bf16 x) {
  uint32_t w = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}
inline float to_acc(_Float16 x) { return float(x); }
inline float to_acc(float x) { return x; }
inline double to_acc(double x) { return x; }

// Stores round to nearest even, as torch's .to(dtype); a float64 value meant for a 16-bit type
// goes through fp32 first, as torch's conversion does.
inline void store(bf16* p, double x) {
  const float f = float(x);
  uint32_t b;
  std::memcpy(&b, &f, 4);
  const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  // NaN stays a (quiet) NaN; a select, not a branch, so that loops of stores vectorise.
  p->bits = uint16_t((b & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}
inline void store(_Float16* p, double x) { *p = _Float16(float(x)); }
inline void store(float* p, double x) { *p = float(x); }
inline void store(double* p, double x) { *p = x; }
inline void store(bf16* p, float x) { store(p, double(x)); }
inline void store(_Float16* p, float x) { *p = _Float16(x); }
inline void store(float* p, float x) { *p = x; }
inline void store(double* p, float x) { *p = x; }

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

std::vector<int64_t> as_i64(const at::Tensor& t) {
  std::vector<int64_t> r(t.numel());
  if (t.scalar_type() == at::kInt) {
    const int32_t* p = t.data_ptr<int32_t>();
    for (int64_t i = 0; i < t.numel(); ++i) r[i] = p[i * t.stride(0)];
  } else {
    const int64_t* p = t.data_ptr<int64_t>();
    for (int64_t i = 0; i < t.numel(); ++i) r[i] = p[i * t.stride(0)];
  }
  return r;
}

// A small 1-D float tensor (a layer's per-head parameters) in the accumulator type, read through
// its stride: no tensor is allocated for the conversion.
template <typename A>
std::vector<A> as_acc(const at::Tensor& t) {
  std::vector<A> r(t.numel());
  const int64_t st = t.numel() > 1 ? t.stride(0) : 1;
  auto fill = [&](auto* p) {
    for (int64_t i = 0; i < t.numel(); ++i) r[i] = A(to_acc(p[i * st]));
  };
  switch (t.scalar_type()) {
    case at::kBFloat16: fill(reinterpret_cast<const bf16*>(t.data_ptr())); break;
    case at::kHalf: fill(reinterpret_cast<const _Float16*>(t.data_ptr())); break;
    case at::kFloat: fill(reinterpret_cast<const float*>(t.data_ptr())); break;
    case at::kDouble: fill(reinterpret_cast<const double*>(t.data_ptr())); break;
    default: TORCH_CHECK_VALUE(false, "unsupported dtype ", t.scalar_type());
  }
  return r;
}

// The kernels read rows as contiguous runs: a ValueError naming the tensor otherwise (before
// anything is written).
void check_inner(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name,
                    ".stride(-1): expected 1 (unit stride in the last dim), got ", t.stride(-1));
}

// The slot pool: pointers and element strides.
template <typename TI, typename TS, typename A>
struct Pool {
  TS* state;
  TI* bk;  // raw keys, the model dtype
  A* bu;
  A* bg;
  int32_t* meta;
  int64_t s_state[3], s_bk[3], s_bu[3], s_bg[3], s_meta[2];
  int64_t HV, H, K, V, B, C;

  Pool(const at::Tensor& st, const at::Tensor& k, const at::Tensor& u, const at::Tensor& g,
       const at::Tensor& m, int64_t chunk)
      : state(ptr<TS>(st)), bk(ptr<TI>(k)), bu(ptr<A>(u)), bg(ptr<A>(g)), meta(ptr<int32_t>(m)) {
    check_inner(st, "cache.state");
    check_inner(k, "cache.buf_k");
    check_inner(u, "cache.buf_u");
    check_inner(g, "cache.buf_g");
    for (int i = 0; i < 3; ++i) {
      s_state[i] = st.stride(i);
      s_bk[i] = k.stride(i);
      s_bu[i] = u.stride(i);
      s_bg[i] = g.stride(i);
    }
    for (int i = 0; i < 2; ++i) s_meta[i] = m.stride(i);
    HV = st.size(1);
    V = st.size(2);
    K = st.size(3);
    H = k.size(2);
    B = k.size(1);
    C = chunk;
  }
  int32_t& mt(int64_t s, int64_t col) const { return meta[s * s_meta[0] + col * s_meta[1]]; }
  TS* block(int64_t s, int64_t h) const { return state + s * s_state[0] + h * s_state[1]; }
  TI* key(int64_t s, int64_t j, int64_t kh) const {
    return bk + s * s_bk[0] + j * s_bk[1] + kh * s_bk[2];
  }
  A* u(int64_t s, int64_t j, int64_t h) const { return bu + s * s_bu[0] + j * s_bu[1] + h * s_bu[2]; }
  A& g(int64_t s, int64_t j, int64_t h) const { return bg[s * s_bg[0] + j * s_bg[1] + h * s_bg[2]]; }
};

// dst[:] = mult * l2norm(src) (or without the norm).
template <typename T, typename A>
inline void load_key(A* dst, const T* src, int64_t K, bool l2, double mult) {
  A ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t kk = 0; kk < K; ++kk) {
    A x = A(to_acc(src[kk]));
    dst[kk] = x;
    ss += x * x;
  }
  A f = A(mult);
  if (l2) f = f / std::sqrt(ss + A(L2NORM_EPS));
#pragma omp simd
  for (int64_t kk = 0; kk < K; ++kk) dst[kk] *= f;
}

template <typename A>
inline A dot(const A* x, const A* y, int64_t K) {
  A d = 0;
#pragma omp simd reduction(+ : d)
  for (int64_t kk = 0; kk < K; ++kk) d += x[kk] * y[kk];
  return d;
}

// out[i * V + v] = state_row(v) . vecs[i * K : +K] for the nvec (even) vectors: four rows and two
// vectors per iteration, so that every element loaded feeds several FMAs.
template <typename TS, typename A>
void state_dots_generic(const TS* blk, int64_t rs, int64_t V, int64_t K, const A* vecs,
                        int64_t nvec, A* out, int64_t v0) {
  for (; v0 + 4 <= V; v0 += 4) {
    const TS* r0 = blk + v0 * rs;
    const TS* r1 = r0 + rs;
    const TS* r2 = r1 + rs;
    const TS* r3 = r2 + rs;
    for (int64_t i = 0; i < nvec; i += 2) {
      const A* x = vecs + i * K;
      const A* y = x + K;
      A a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
      for (int64_t kk = 0; kk < K; ++kk) {
        A s0 = A(to_acc(r0[kk])), s1 = A(to_acc(r1[kk]));
        A s2 = A(to_acc(r2[kk])), s3 = A(to_acc(r3[kk]));
        a0 += s0 * x[kk];
        a1 += s1 * x[kk];
        a2 += s2 * x[kk];
        a3 += s3 * x[kk];
        b0 += s0 * y[kk];
        b1 += s1 * y[kk];
        b2 += s2 * y[kk];
        b3 += s3 * y[kk];
      }
      A* o = out + i * V + v0;
      o[0] = a0, o[1] = a1, o[2] = a2, o[3] = a3;
      o += V;
      o[0] = b0, o[1] = b1, o[2] = b2, o[3] = b3;
    }
  }
  for (int64_t v = v0; v < V; ++v) {
    const TS* r = blk + v * rs;
    for (int64_t i = 0; i < nvec; ++i) {
      const A* x = vecs + i * K;
      A a = 0;
#pragma omp simd reduction(+ : a)
      for (int64_t kk = 0; kk < K; ++kk) a += A(to_acc(r[kk])) * x[kk];
      out[i * V + v] = a;
    }
  }
}

#if defined(__AVX512F__)
// 16 fp32 lanes of a state row, widened from the storage type.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const _Float16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The fp32 state pass with explicit 16-lane accumulators (K a multiple of 16): eight dot
// products in flight per pass over four rows, reduced once per row pair at the end.
template <bool PF, typename TS>
int64_t state_dots_avx512(const TS* blk, int64_t rs, int64_t V, int64_t K, const float* vecs,
                          int64_t nvec, float* out) {
  int64_t v0 = 0;
  for (; v0 + 4 <= V; v0 += 4) {
    const TS* r0 = blk + v0 * rs;
    const TS* r1 = r0 + rs;
    const TS* r2 = r1 + rs;
    const TS* r3 = r2 + rs;
    for (int64_t i = 0; i < nvec; i += 2) {
      const float* x = vecs + i * K;
      const float* y = x + K;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      __m512 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      for (int64_t kk = 0; kk < K; kk += 16) {
        if (PF && i == 0) {
          // The rows PF_ROWS ahead, one cache line per row and step: more misses in flight than
          // the hardware prefetcher keeps on its own (the block streams from L3 or memory).
          __builtin_prefetch(r0 + PF_ROWS * rs + kk);
          __builtin_prefetch(r1 + PF_ROWS * rs + kk);
          __builtin_prefetch(r2 + PF_ROWS * rs + kk);
          __builtin_prefetch(r3 + PF_ROWS * rs + kk);
        }
        const __m512 xv = _mm512_loadu_ps(x + kk), yv = _mm512_loadu_ps(y + kk);
        const __m512 s0 = load16(r0 + kk), s1 = load16(r1 + kk);
        const __m512 s2 = load16(r2 + kk), s3 = load16(r3 + kk);
        a0 = _mm512_fmadd_ps(s0, xv, a0);
        a1 = _mm512_fmadd_ps(s1, xv, a1);
        a2 = _mm512_fmadd_ps(s2, xv, a2);
        a3 = _mm512_fmadd_ps(s3, xv, a3);
        b0 = _mm512_fmadd_ps(s0, yv, b0);
        b1 = _mm512_fmadd_ps(s1, yv, b1);
        b2 = _mm512_fmadd_ps(s2, yv, b2);
        b3 = _mm512_fmadd_ps(s3, yv, b3);
      }
      float* o = out + i * V + v0;
      o[0] = _mm512_reduce_add_ps(a0), o[1] = _mm512_reduce_add_ps(a1);
      o[2] = _mm512_reduce_add_ps(a2), o[3] = _mm512_reduce_add_ps(a3);
      o += V;
      o[0] = _mm512_reduce_add_ps(b0), o[1] = _mm512_reduce_add_ps(b1);
      o[2] = _mm512_reduce_add_ps(b2), o[3] = _mm512_reduce_add_ps(b3);
    }
  }
  return v0;
}
#endif

// out[i * V + v] = row(v) . vecs[i * K : +K] for V rows rs apart and nvec (even) vectors. PF:
// software prefetch PF_ROWS rows ahead (a state block streaming from memory; not for the small
// key tables that sit in L1).
template <bool PF = true, typename TS, typename A>
void state_dots(const TS* blk, int64_t rs, int64_t V, int64_t K, const A* vecs, int64_t nvec,
                A* out) {
  int64_t v0 = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<A, float>) {
    if (K % 16 == 0) v0 = state_dots_avx512<PF>(blk, rs, V, K, vecs, nvec, out);
  }
#endif
  state_dots_generic(blk, rs, V, K, vecs, nvec, out, v0);
}

#if defined(__AVX512F__)
// The flush of an fp32 block (K a multiple of 16, dst the block itself): per four rows and
// 16-lane column block, the four accumulators stay in registers across the m buffered keys
// (one key load feeds four FMAs).
inline int64_t fold_rows_avx512(const float* src, int64_t rs, int64_t V, int64_t K, bool has,
                                const float* KH, const float* U, int64_t us, int64_t m, float eGm,
                                const float* w, float* dst, int64_t drs, float* coef) {
  int64_t v0 = 0;
  const __m512 eg = _mm512_set1_ps(eGm);
  for (; v0 + 4 <= V; v0 += 4) {
    for (int64_t j = 0; j < m; ++j)
      for (int64_t r = 0; r < 4; ++r) coef[j * 4 + r] = w[j] * U[j * us + v0 + r];
    const float* s0 = src + v0 * rs;
    float* d0 = dst + v0 * drs;
    for (int64_t kk = 0; kk < K; kk += 16) {
      __m512 a0, a1, a2, a3;
      if (has) {
        a0 = _mm512_mul_ps(eg, _mm512_loadu_ps(s0 + kk));
        a1 = _mm512_mul_ps(eg, _mm512_loadu_ps(s0 + rs + kk));
        a2 = _mm512_mul_ps(eg, _mm512_loadu_ps(s0 + 2 * rs + kk));
        a3 = _mm512_mul_ps(eg, _mm512_loadu_ps(s0 + 3 * rs + kk));
      } else {
        a0 = a1 = a2 = a3 = _mm512_setzero_ps();
      }
      for (int64_t j = 0; j < m; ++j) {
        const __m512 kv = _mm512_loadu_ps(KH + j * K + kk);
        const float* c = coef + j * 4;
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(c[0]), kv, a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(c[1]), kv, a1);
        a2 = _mm512_fmadd_ps(_mm512_set1_ps(c[2]), kv, a2);
        a3 = _mm512_fmadd_ps(_mm512_set1_ps(c[3]), kv, a3);
      }
      _mm512_storeu_ps(d0 + kk, a0);
      _mm512_storeu_ps(d0 + drs + kk, a1);
      _mm512_storeu_ps(d0 + 2 * drs + kk, a2);
      _mm512_storeu_ps(d0 + 3 * drs + kk, a3);
    }
  }
  return v0;
}
#endif

// Fold the first m buffered rows into the state block src (rows rs apart; S0 is zero and never
// read when !has): S_m = exp(G_m) S0 + sum_{j<m} exp(G_m - G_j) k_hat_j u_j^T, written to dst at
// v * drs + k * dks (the block itself when flushing, an fla-layout [K, V] output for
// materialize_state). KH [m, K], U [m, V] (rows us apart), G [m]; scratch rows [4, K], w [m].
template <typename TS, typename TD, typename A>
void fold_rows(const TS* src, int64_t rs, int64_t V, int64_t K, bool has, const A* KH, const A* U,
               int64_t us, const A* G, int64_t m, TD* dst, int64_t drs, int64_t dks, A* rows,
               A* w) {
  A Gm = m > 0 ? G[m - 1] : A(0);
  A eGm = std::exp(Gm);
  for (int64_t j = 0; j < m; ++j) w[j] = std::exp(Gm - G[j]);
  int64_t v0 = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<TS, float> && std::is_same_v<TD, float> &&
                std::is_same_v<A, float>) {
    // Its 4 x m coefficients live in the 4 x K scratch rows.
    if (dks == 1 && K % 16 == 0 && m <= K)
      v0 = fold_rows_avx512(src, rs, V, K, has, KH, U, us, m, eGm, w, dst, drs, rows);
  }
#endif
  A *r0 = rows, *r1 = rows + K, *r2 = rows + 2 * K, *r3 = rows + 3 * K;
  for (; v0 + 4 <= V; v0 += 4) {
    if (has) {
      const TS* s0 = src + v0 * rs;
      const TS* s1 = s0 + rs;
      const TS* s2 = s1 + rs;
      const TS* s3 = s2 + rs;
#pragma omp simd
      for (int64_t kk = 0; kk < K; ++kk) {
        r0[kk] = eGm * A(to_acc(s0[kk]));
        r1[kk] = eGm * A(to_acc(s1[kk]));
        r2[kk] = eGm * A(to_acc(s2[kk]));
        r3[kk] = eGm * A(to_acc(s3[kk]));
      }
    } else {
      std::fill(rows, rows + 4 * K, A(0));
    }
    for (int64_t j = 0; j < m; ++j) {
      const A* kj = KH + j * K;
      const A* uj = U + j * us + v0;
      A c0 = w[j] * uj[0], c1 = w[j] * uj[1], c2 = w[j] * uj[2], c3 = w[j] * uj[3];
#pragma omp simd
      for (int64_t kk = 0; kk < K; ++kk) {
        A x = kj[kk];
        r0[kk] += c0 * x;
        r1[kk] += c1 * x;
        r2[kk] += c2 * x;
        r3[kk] += c3 * x;
      }
    }
    for (int64_t i = 0; i < 4; ++i) {
      TD* d = dst + (v0 + i) * drs;
      const A* r = rows + i * K;
      if (dks == 1) {
#pragma omp simd
        for (int64_t kk = 0; kk < K; ++kk) store(d + kk, r[kk]);
      } else {
        for (int64_t kk = 0; kk < K; ++kk) store(d + kk * dks, r[kk]);
      }
    }
  }
  for (int64_t v = v0; v < V; ++v) {
    if (has) {
      const TS* s = src + v * rs;
      for (int64_t kk = 0; kk < K; ++kk) r0[kk] = eGm * A(to_acc(s[kk]));
    } else {
      std::fill(r0, r0 + K, A(0));
    }
    for (int64_t j = 0; j < m; ++j) {
      A c = w[j] * U[j * us + v];
      const A* kj = KH + j * K;
#pragma omp simd
      for (int64_t kk = 0; kk < K; ++kk) r0[kk] += c * kj[kk];
    }
    TD* d = dst + v * drs;
    for (int64_t kk = 0; kk < K; ++kk) store(d + kk * dks, r0[kk]);
  }
}

// Per-thread scratch of a task: key rows KH [B, K] and the new tokens' keys and queries QB
// [2 nmax, K] with their dot table DT [2 nmax, B] (shared by the value heads of a key head); per
// value head of the group, cumulative gates G [B] (and, for the folds outside tokens, u rows
// U [B, V]).
template <typename A>
struct Scratch {
  std::vector<A> KH, U, G, QB, DT, R, uacc, oacc, rows, w;
  Scratch(int64_t B, int64_t nmax, int64_t K, int64_t V, int64_t group = 1)
      : KH(B * K), U(B * V), G(group * B), QB(2 * nmax * K), DT(2 * nmax * B),
        R(2 * nmax * V), uacc(V), oacc(V), rows(4 * K), w(B) {}
};

// Token inputs: pointers and (token, head) element strides.
template <typename TI, typename A>
struct Tokens {
  const TI *q, *k, *v;
  const A *g, *beta;
  TI* out;
  int64_t sq[2], sk[2], sv[2], sg[2], sb[2], so[2];
};

template <typename T>
void strides2(const at::Tensor& t, int64_t* s) {
  s[0] = t.stride(0);
  s[1] = t.stride(1);
}

// Sequence n, key head kh and its GROUP = HV / H value heads: tokens cu[n]:cu[n+1] continue slot
// slots[n]. What depends only on the keys (the normalised buffered and new keys, the queries and
// every key-key and query-key dot product) is computed once for the group; each value head then
// runs its state pass, its forward substitution and (when the buffer fills) its flush.
template <typename TI, typename TS, typename A>
void tokens_group(int64_t n, int64_t kh, const std::vector<int64_t>& slots,
                  const std::vector<int64_t>& cu, bool commit, double scale, bool l2,
                  const Pool<TI, TS, A>& P, const Tokens<TI, A>& X, Scratch<A>& W) {
  const int64_t K = P.K, V = P.V, C = P.C, B = P.B, GROUP = P.HV / P.H, h0 = kh * GROUP;
  const int64_t s = slots[n], t_lo = cu[n], t_hi = cu[n + 1];
  if (s < 0) {
    for (int64_t t = t_lo; t < t_hi; ++t)
      for (int64_t h = h0; h < h0 + GROUP; ++h) {
        TI* o = X.out + t * X.so[0] + h * X.so[1];
        for (int64_t vv = 0; vv < V; ++vv) store(o + vv, 0.0f);
      }
    return;
  }
  int64_t L = P.mt(s, META_LEN);
  bool has = P.mt(s, META_HAS_STATE) != 0;
  const int64_t rs = P.s_state[2];
  if (has) {
    // Start streaming the first block's first rows while the buffer rows load (state_dots keeps
    // PF_ROWS rows ahead from there on, into the next head's block where blocks are adjacent).
    const TS* blk = P.block(s, h0);
    const int64_t line = 64 / int64_t(sizeof(TS));
    for (int64_t v = 0; v < std::min<int64_t>(PF_ROWS, V); ++v)
      for (int64_t kk = 0; kk < K; kk += line) __builtin_prefetch(blk + v * rs + kk);
  }
  A *KH = W.KH.data(), *QB = W.QB.data(), *DT = W.DT.data(), *R = W.R.data();
  A *uacc = W.uacc.data(), *oacc = W.oacc.data();
  for (int64_t j = 0; j < L; ++j) load_key(KH + j * K, P.key(s, j, kh), K, l2, 1.0);
  for (int64_t gi = 0; gi < GROUP; ++gi) {
    A* G = W.G.data() + gi * B;
    for (int64_t j = 0; j < L; ++j) G[j] = P.g(s, j, h0 + gi);
  }
  const int64_t us = P.s_bu[1];  // u rows are read and written in the pool itself
  int64_t pos = t_lo;
  while (pos < t_hi) {
    const int64_t nseg = commit ? std::min(t_hi - pos, C - L) : t_hi - pos;
    const int64_t rows = L + nseg;
    for (int64_t t = 0; t < nseg; ++t) {
      const int64_t tok = pos + t;
      load_key(QB + t * K, X.k + tok * X.sk[0] + kh * X.sk[1], K, l2, 1.0);
      load_key(QB + (nseg + t) * K, X.q + tok * X.sq[0] + kh * X.sq[1], K, l2, scale);
      std::memcpy(KH + (L + t) * K, QB + t * K, K * sizeof(A));
    }
    // DT[t * rows + j] = k_{L+t} . k_j, DT[(nseg + t) * rows + j] = q_t . k_j (the rectangle;
    // the substitution reads its causal part).
    state_dots<false>(KH, K, rows, K, QB, 2 * nseg, DT);
    const bool flush = commit && rows >= C;
    for (int64_t gi = 0; gi < GROUP; ++gi) {
      const int64_t h = h0 + gi;
      A *U = P.u(s, 0, h), *G = W.G.data() + gi * B;
      TS* blk = P.block(s, h);
      A Gp = L > 0 ? G[L - 1] : A(0);
      for (int64_t t = 0; t < nseg; ++t) {
        Gp = Gp + X.g[(pos + t) * X.sg[0] + h * X.sg[1]];
        G[L + t] = Gp;
      }
      if (has) state_dots(blk, rs, V, K, QB, 2 * nseg, R);
      for (int64_t t = 0; t < nseg; ++t) {
        const int64_t tok = pos + t, i = L + t;
        const A eG = std::exp(G[i]);
        const A bt = X.beta[tok * X.sb[0] + h * X.sb[1]];
        const TI* vin = X.v + tok * X.sv[0] + h * X.sv[1];
        // u_i = beta_i (v_i - exp(G_i) S0^T k_i - sum_{j<i} exp(G_i - G_j)(k_i.k_j) u_j), the
        // forward substitution of the block's unit lower-triangular system, and beside it
        // o_i = exp(G_i) S0^T q_i + sum_{j<=i} exp(G_i - G_j)(q_i.k_j) u_j.
        if (has) {
          const A *rk = R + t * V, *rq = R + (nseg + t) * V;
#pragma omp simd
          for (int64_t vv = 0; vv < V; ++vv) {
            uacc[vv] = A(to_acc(vin[vv])) - eG * rk[vv];
            oacc[vv] = eG * rq[vv];
          }
        } else {
#pragma omp simd
          for (int64_t vv = 0; vv < V; ++vv) {
            uacc[vv] = A(to_acc(vin[vv]));
            oacc[vv] = A(0);
          }
        }
        const A *dk = DT + t * rows, *dq = DT + (nseg + t) * rows;
        for (int64_t j = 0; j < i; ++j) {
          const A e = std::exp(G[i] - G[j]);
          const A ck = e * dk[j], cq = e * dq[j];
          const A* uj = U + j * us;
#pragma omp simd
          for (int64_t vv = 0; vv < V; ++vv) {
            uacc[vv] -= ck * uj[vv];
            oacc[vv] += cq * uj[vv];
          }
        }
        A* ui = U + i * us;
        const A cs = dq[i];
        TI* o = X.out + tok * X.so[0] + h * X.so[1];
#pragma omp simd
        for (int64_t vv = 0; vv < V; ++vv) {
          ui[vv] = bt * uacc[vv];
          store(o + vv, oacc[vv] + cs * ui[vv]);
        }
        P.g(s, i, h) = G[i];
      }
      if (flush) fold_rows(blk, rs, V, K, has, KH, U, us, G, rows, blk, rs, int64_t(1),
                           W.rows.data(), W.w.data());
    }
    L = rows;
    pos += nseg;
    if (flush) {
      has = true;
      L = 0;
    }
  }
}

// Raw keys and meta rows, after the parallel loop: the value heads sharing a key head read its
// history rows, and a prefill that flushes reuses those rows for its tail.
template <typename TI, typename TS, typename A>
void tokens_finish(const std::vector<int64_t>& slots, const std::vector<int64_t>& cu, bool commit,
                   const Pool<TI, TS, A>& P, const Tokens<TI, A>& X) {
  const int64_t C = P.C, K = P.K;
  for (size_t n = 0; n < slots.size(); ++n) {
    const int64_t s = slots[n];
    if (s < 0) continue;
    int64_t L = P.mt(s, META_LEN);
    bool flushed = false;
    int64_t pos = cu[n];
    while (pos < cu[n + 1]) {
      const int64_t nseg = commit ? std::min(cu[n + 1] - pos, C - L) : cu[n + 1] - pos;
      if (pos + nseg == cu[n + 1] && !(commit && L + nseg >= C)) {
        // Only rows that stay buffered are stored (flushed rows are dead).
        for (int64_t t = 0; t < nseg; ++t)
          for (int64_t kh = 0; kh < P.H; ++kh)
            std::memcpy(P.key(s, L + t, kh), X.k + (pos + t) * X.sk[0] + kh * X.sk[1],
                        K * sizeof(TI));
      }
      L += nseg;
      pos += nseg;
      if (commit && L >= C) {
        L = 0;
        flushed = true;
      }
    }
    if (commit) {
      P.mt(s, META_LEN) = int32_t(L);
      if (flushed) P.mt(s, META_HAS_STATE) = 1;
    } else {
      P.mt(s, META_PENDING) = int32_t(cu[n + 1] - cu[n]);
    }
  }
}

template <typename TI, typename TS, typename A>
void tokens_impl(const at::Tensor& state, const at::Tensor& bk, const at::Tensor& bu,
                 const at::Tensor& bg, const at::Tensor& meta, int64_t chunk,
                 const at::Tensor& slots_t, const at::Tensor& cu_t, int64_t per_seq,
                 const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& g, const at::Tensor& beta, const at::Tensor& out, bool commit,
                 double scale, bool l2) {
  Pool<TI, TS, A> P(state, bk, bu, bg, meta, chunk);
  check_inner(q, "q");
  check_inner(k, "k");
  check_inner(v, "v");
  Tokens<TI, A> X{ptr<TI>(q), ptr<TI>(k), ptr<TI>(v), ptr<A>(g), ptr<A>(beta), ptr<TI>(out)};
  strides2<TI>(q, X.sq);
  strides2<TI>(k, X.sk);
  strides2<TI>(v, X.sv);
  strides2<A>(g, X.sg);
  strides2<A>(beta, X.sb);
  strides2<TI>(out, X.so);
  const std::vector<int64_t> slots = as_i64(slots_t);
  const int64_t N = int64_t(slots.size());
  std::vector<int64_t> cu;
  if (cu_t.numel() > 0) {
    cu = as_i64(cu_t);
  } else {
    cu.resize(N + 1);
    for (int64_t n = 0; n <= N; ++n) cu[n] = n * per_seq;
  }
  const int64_t nmax = commit ? P.C : P.B;
  const int64_t group = P.HV / P.H;
  const int64_t grain =
      std::max<int64_t>(1, SERIAL_BELOW / std::max<int64_t>(1, group * P.K * P.V));
  at::parallel_for(0, N * P.H, grain, [&](int64_t lo, int64_t hi) {
    Scratch<A> W(P.B, nmax, P.K, P.V, group);
    for (int64_t p = lo; p < hi; ++p)
      tokens_group<TI, TS, A>(p / P.H, p % P.H, slots, cu, commit, scale, l2, P, X, W);
  });
  tokens_finish<TI, TS, A>(slots, cu, commit, P, X);
}

// Fold the first lengths[n] buffered rows of slot slots[n] into its state (to_state: pairs with
// lengths[n] < 0 skipped, HAS_STATE set after), or write dst[n, h, k, v] and leave the pool alone
// (padding: a zero block).
template <typename TI, typename TS, typename A>
void fold_impl(const Pool<TI, TS, A>& P, const std::vector<int64_t>& slots,
               const std::vector<int64_t>& lengths, bool l2, A* dst, const int64_t* dst_st,
               bool to_state) {
  const int64_t K = P.K, V = P.V, N = int64_t(slots.size());
  const int64_t grain = std::max<int64_t>(1, SERIAL_BELOW / std::max<int64_t>(1, K * V));
  at::parallel_for(0, N * P.HV, grain, [&](int64_t lo, int64_t hi) {
    Scratch<A> W(P.B, 1, K, V);
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t n = p / P.HV, h = p % P.HV;
      const int64_t s = slots[n], m = lengths[n];
      if (s < 0 || m < 0) {
        if (!to_state) {
          A* d = dst + n * dst_st[0] + h * dst_st[1];
          for (int64_t kk = 0; kk < K; ++kk)
            for (int64_t vv = 0; vv < V; ++vv) d[kk * dst_st[2] + vv * dst_st[3]] = 0;
        }
        continue;
      }
      const int64_t kh = h / (P.HV / P.H);
      const bool has = P.mt(s, META_HAS_STATE) != 0;
      for (int64_t j = 0; j < m; ++j) {
        load_key(W.KH.data() + j * K, P.key(s, j, kh), K, l2, 1.0);
        std::memcpy(W.U.data() + j * V, P.u(s, j, h), V * sizeof(A));
        W.G[j] = P.g(s, j, h);
      }
      TS* blk = P.block(s, h);
      const int64_t rs = P.s_state[2];
      if (to_state) {
        fold_rows(blk, rs, V, K, has, W.KH.data(), W.U.data(), V, W.G.data(), m, blk, rs,
                  int64_t(1), W.rows.data(), W.w.data());
      } else {
        fold_rows(blk, rs, V, K, has, W.KH.data(), W.U.data(), V, W.G.data(), m,
                  dst + n * dst_st[0] + h * dst_st[1], dst_st[3], dst_st[2], W.rows.data(),
                  W.w.data());
      }
    }
  });
  if (to_state) {
    for (int64_t n = 0; n < N; ++n)
      if (slots[n] >= 0 && lengths[n] >= 0) P.mt(slots[n], META_HAS_STATE) = 1;
  }
}

// Commit the accepted tokens: the rows to flush per slot (or -1), meta rows updated as after the
// flush that follows.
template <typename TI, typename TS, typename A>
void accept_impl(const at::Tensor& state, const at::Tensor& bk, const at::Tensor& bu,
                 const at::Tensor& bg, const at::Tensor& meta, int64_t chunk,
                 const at::Tensor& slots_t, const at::Tensor& accepted_t, bool l2) {
  Pool<TI, TS, A> P(state, bk, bu, bg, meta, chunk);
  const std::vector<int64_t> slots = as_i64(slots_t), acc = as_i64(accepted_t);
  std::vector<int64_t> lengths(slots.size(), -1);
  bool any = false;
  for (size_t n = 0; n < slots.size(); ++n) {
    const int64_t s = slots[n];
    if (s < 0) continue;
    const int64_t L = P.mt(s, META_LEN) + acc[n];
    P.mt(s, META_PENDING) = 0;
    if (L >= P.C) {
      lengths[n] = L;
      P.mt(s, META_LEN) = 0;
      any = true;
    } else {
      P.mt(s, META_LEN) = int32_t(L);
    }
  }
  // LEN is already 0 for the slots to flush; the fold sets HAS_STATE after reading it.
  if (any) fold_impl<TI, TS, A>(P, slots, lengths, l2, nullptr, nullptr, true);
}

template <typename TI, typename TS, typename A>
void materialize_impl(const at::Tensor& state, const at::Tensor& bk, const at::Tensor& bu,
                      const at::Tensor& bg, const at::Tensor& meta, int64_t chunk,
                      const at::Tensor& slots_t, const at::Tensor& out, bool l2) {
  Pool<TI, TS, A> P(state, bk, bu, bg, meta, chunk);
  const std::vector<int64_t> slots = as_i64(slots_t);
  std::vector<int64_t> lengths(slots.size(), -1);
  for (size_t n = 0; n < slots.size(); ++n)
    if (slots[n] >= 0) lengths[n] = P.mt(slots[n], META_LEN);
  const int64_t st[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  fold_impl<TI, TS, A>(P, slots, lengths, l2, ptr<A>(out), st, false);
}

// exp in a form the compiler vectorises (the conv's SiLU runs it on every channel): range
// reduction by ln 2 and a degree-6 polynomial on [-ln2/2, ln2/2], within 2 ulp of expf
// (tests/kernels/test_cpu_kernels.py); NaN propagates. float64 keeps the library's exp (the exactness tests run there).
inline float exp_vec(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.3f);
  // n = round(xc / ln 2) by the 1.5 * 2^23 trick (exact for |v| < 2^22; a floor() call would
  // keep GCC from vectorising the loop without -ffast-math).
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t e = (int32_t(n) + 127) << 23;
  const float two_n = __builtin_bit_cast(float, e);
  const float res = p * two_n;
  return x != x ? x : res;
}
inline double exp_vec(double x) { return std::exp(x); }

// Gates of rows [r0, r1): g = -exp(A_log) softplus(a + dt_bias) (softplus(z) = z above 20, as
// torch's), beta = beta_scale sigmoid(b), written to g, beta [rows, HV] (contiguous).
template <typename T, typename A>
inline void gate_rows(int64_t r0, int64_t r1, int64_t HV, const T* ap, int64_t a0, int64_t a1,
                      const T* bp, int64_t b0, int64_t b1, const A* alp, const A* dtp,
                      double beta_scale, A* gp, A* bt) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t h = 0; h < HV; ++h) {
      const A z = A(to_acc(ap[r * a0 + h * a1])) + dtp[h];
      const A sp = z > A(20) ? z : std::log1p(std::exp(z));
      gp[r * HV + h] = -std::exp(alp[h]) * sp;
      const A bz = A(to_acc(bp[r * b0 + h * b1]));
      A sg = A(1) / (A(1) + std::exp(-bz));
      if (beta_scale != 1.0) sg = sg * A(beta_scale);
      bt[r * HV + h] = sg;
    }
  }
}

// -- the layer's causal conv and gates -------------------------------------------------------
// Row n holds tokens cu[n]:cu[n+1] of x (uniform rows: cu[n] = n * Tn) and continues slot
// blocks[n] (block <= 0: padding, vLLM's null block; its outputs are computed from slot 0's
// window and never used, nothing is written). Its input window is the W-1 columns of conv[slot]
// from the offset in meta[slot, META_CONV], or zeros when has_init[n] is false (a new sequence);
// full = [window, x rows], y_t = act(sum_w full[t + w] weight[:, w] + bias) rounded to x's dtype.
// The window written back is full[keep:] at column 0, keep = keep_from (or, for keep_from < 0,
// the row's token count: the last W-1 columns), and meta[slot, META_CONV] becomes meta_value.
// Gates: g = -exp(A_log) softplus(a + dt_bias), beta = beta_scale sigmoid(b), in A.
template <typename T, typename A>
void conv_gates_impl(const at::Tensor& conv, const at::Tensor& meta, int64_t meta_col,
                     const at::Tensor& weight, const at::Tensor& bias, bool silu,
                     const at::Tensor& blocks_t, const at::Tensor& x, const at::Tensor& cu_t,
                     int64_t Tn, const at::Tensor& has_init_t, int64_t keep_from,
                     int64_t meta_value, const at::Tensor& A_log_t, const at::Tensor& dt_bias_t,
                     const at::Tensor& a, const at::Tensor& b, double beta_scale,
                     const at::Tensor& y, const at::Tensor& g, const at::Tensor& beta) {
  const std::vector<int64_t> blocks = as_i64(blocks_t);
  const int64_t N = int64_t(blocks.size()), W = weight.size(1), Dc = weight.size(0);
  std::vector<int64_t> cu;
  if (cu_t.numel() > 0) {
    cu = as_i64(cu_t);
  } else {
    cu.resize(N + 1);
    for (int64_t n = 0; n <= N; ++n) cu[n] = n * Tn;
  }
  std::vector<int64_t> has_init(N, 1);
  if (has_init_t.numel() > 0) {
    const at::Tensor h = has_init_t.to(at::kLong);
    for (int64_t n = 0; n < N; ++n) has_init[n] = h.data_ptr<int64_t>()[n * h.stride(0)];
  }
  const int64_t cap = conv.size(1), HV = a.size(1);
  T* cs = ptr<T>(conv);
  const int64_t c0 = conv.stride(0), c1 = conv.stride(1), c2 = conv.stride(2);
  int32_t* mt = ptr<int32_t>(meta);
  const int64_t m0 = meta.stride(0), m1 = meta.stride(1);
  const T* wt = ptr<T>(weight);
  const int64_t w0 = weight.stride(0), w1 = weight.stride(1);
  const T* bs = bias.numel() ? ptr<T>(bias) : nullptr;
  const int64_t bst = bias.numel() ? bias.stride(0) : 0;
  const T* xp = ptr<T>(x);
  const int64_t x0 = x.stride(0), x1 = x.stride(1);
  T* yp = ptr<T>(y);
  const std::vector<A> Al = as_acc<A>(A_log_t), dt = as_acc<A>(dt_bias_t);
  const A* alp = Al.data();
  const A* dtp = dt.data();
  const T* ap = ptr<T>(a);
  const T* bp = ptr<T>(b);
  const int64_t a0 = a.stride(0), a1 = a.stride(1), b0 = b.stride(0), b1 = b.stride(1);
  A* gp = ptr<A>(g);
  A* bt = ptr<A>(beta);
  // Fast path: channels contiguous in the conv state and in x (vLLM's default "SD" layout).
  const bool fast = c2 == 1 && x1 == 1;
  std::vector<A> wT(fast ? W * Dc : 0);  // taps-major copy of the weights
  for (int64_t w = 0; w < (fast ? W : 0); ++w)
    for (int64_t c = 0; c < Dc; ++c) wT[w * Dc + c] = A(to_acc(wt[c * w0 + w * w1]));
  std::vector<T> zeros(fast ? Dc : 0);
  for (auto& z : zeros) store(&z, 0.0f);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, Dc));
  at::parallel_for(0, N, grain, [&](int64_t lo, int64_t hi) {
    std::vector<A> buf;
    for (int64_t n = lo; n < hi; ++n) {
      const int64_t s = blocks[n] > 0 ? blocks[n] : -1;
      const bool valid = s >= 0, init = has_init[n] != 0;
      const int64_t sc = valid ? s : 0, t0 = cu[n], nt = cu[n + 1] - cu[n];
      int64_t off = 0;
      if (valid && init) {
        off = mt[sc * m0 + meta_col * m1];
        off = std::min<int64_t>(std::max<int64_t>(off, 0), cap - (W - 1));
      }
      const int64_t keep = keep_from >= 0 ? keep_from : nt, kept = W - 1 + nt - keep;
      T* win = cs + sc * c0;
      if (fast) {
        buf.resize(Dc);
        A* acc = buf.data();
        auto src = [&](int64_t j) -> const T* {  // column j of full = [window, x rows]
          if (j >= W - 1) return xp + (t0 + j - (W - 1)) * x0;
          return init ? win + (off + j) * c1 : zeros.data();
        };
        for (int64_t t = 0; t < nt; ++t) {
          if (bs) {
#pragma omp simd
            for (int64_t c = 0; c < Dc; ++c) acc[c] = A(to_acc(bs[c * bst]));
          } else {
            std::fill(acc, acc + Dc, A(0));
          }
          for (int64_t w = 0; w < W; ++w) {
            const T* sw = src(t + w);
            const A* ww = wT.data() + w * Dc;
#pragma omp simd
            for (int64_t c = 0; c < Dc; ++c) acc[c] += A(to_acc(sw[c])) * ww[c];
          }
          if (silu) {
#pragma omp simd
            for (int64_t c = 0; c < Dc; ++c) acc[c] = acc[c] / (A(1) + exp_vec(-acc[c]));
          }
          T* yr = yp + (t0 + t) * Dc;
#pragma omp simd
          for (int64_t c = 0; c < Dc; ++c) store(yr + c, acc[c]);
        }
        // Window update: column w <- full[keep + w], ascending (a source is never behind).
        if (valid)
          for (int64_t w = 0; w < kept; ++w) {
            const T* from = src(keep + w);
            T* to = win + w * c1;
            if (from != to) std::memmove(to, from, Dc * sizeof(T));
          }
      } else {
        const int64_t full_len = W - 1 + nt;
        buf.resize(full_len);
        A* full = buf.data();
        for (int64_t c = 0; c < Dc; ++c) {
          for (int64_t w = 0; w < W - 1; ++w)
            full[w] = init ? A(to_acc(win[(off + w) * c1 + c * c2])) : A(0);
          for (int64_t t = 0; t < nt; ++t) full[W - 1 + t] = A(to_acc(xp[(t0 + t) * x0 + c * x1]));
          const T* wc = wt + c * w0;
          const A bias_c = bs ? A(to_acc(bs[c * bst])) : A(0);
          for (int64_t t = 0; t < nt; ++t) {
            A acc = 0;
            for (int64_t w = 0; w < W; ++w) acc += full[t + w] * A(to_acc(wc[w * w1]));
            acc += bias_c;
            if (silu) acc = acc / (A(1) + std::exp(-acc));
            store(yp + (t0 + t) * Dc + c, acc);
          }
          if (valid)
            for (int64_t w = 0; w < kept; ++w) store(win + w * c1 + c * c2, full[keep + w]);
        }
      }
      if (valid) mt[sc * m0 + meta_col * m1] = int32_t(meta_value);
      gate_rows(t0, t0 + nt, HV, ap, a0, a1, bp, b0, b1, alp, dtp, beta_scale, gp, bt);
    }
  });
}

void conv_gates(const at::Tensor& conv, const at::Tensor& meta, int64_t meta_col,
                const at::Tensor& weight, const at::Tensor& bias, bool silu,
                const at::Tensor& blocks, const at::Tensor& x, const at::Tensor& cu, int64_t Tn,
                const at::Tensor& has_init, int64_t keep_from, int64_t meta_value,
                const at::Tensor& A_log, const at::Tensor& dt_bias, const at::Tensor& a,
                const at::Tensor& b, double beta_scale, const at::Tensor& y,
                const at::Tensor& g, const at::Tensor& beta) {
#define KVB_CONV(TY, AY)                                                                   \
  return conv_gates_impl<TY, AY>(conv, meta, meta_col, weight, bias, silu, blocks, x, cu, \
                                 Tn, has_init, keep_from, meta_value, A_log, dt_bias, a,  \
                                 b, beta_scale, y, g, beta)
  switch (x.scalar_type()) {
    case at::kBFloat16: KVB_CONV(bf16, float);
    case at::kHalf: KVB_CONV(_Float16, float);
    case at::kFloat: KVB_CONV(float, float);
    case at::kDouble: KVB_CONV(double, double);
    default: TORCH_CHECK_VALUE(false, "x.dtype: unsupported ", x.scalar_type());
  }
#undef KVB_CONV
}

// The gates alone (kernels.gdn_gates): a, b [N, HV] in T; returns g, beta [N, HV] in A.
template <typename T, typename A>
std::tuple<at::Tensor, at::Tensor> gates_impl(const at::Tensor& A_log_t,
                                              const at::Tensor& dt_bias_t, const at::Tensor& a,
                                              const at::Tensor& b, double beta_scale) {
  const int64_t N = a.size(0), HV = a.size(1);
  const auto opts = a.options().dtype(c10::CppTypeToScalarType<A>::value);
  at::Tensor g = at::empty({N, HV}, opts), beta = at::empty({N, HV}, opts);
  const std::vector<A> Al = as_acc<A>(A_log_t), dt = as_acc<A>(dt_bias_t);
  const A *alp = Al.data(), *dtp = dt.data();
  const T* ap = ptr<T>(a);
  const T* bp = ptr<T>(b);
  const int64_t a0 = a.stride(0), a1 = a.stride(1), b0 = b.stride(0), b1 = b.stride(1);
  A* gp = ptr<A>(g);
  A* bt = ptr<A>(beta);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, HV));
  at::parallel_for(0, N, grain, [&](int64_t lo, int64_t hi) {
    gate_rows(lo, hi, HV, ap, a0, a1, bp, b0, b1, alp, dtp, beta_scale, gp, bt);
  });
  return {g, beta};
}

std::tuple<at::Tensor, at::Tensor> gates(const at::Tensor& A_log, const at::Tensor& dt_bias,
                                         const at::Tensor& a, const at::Tensor& b,
                                         double beta_scale) {
  switch (a.scalar_type()) {
    case at::kBFloat16: return gates_impl<bf16, float>(A_log, dt_bias, a, b, beta_scale);
    case at::kHalf: return gates_impl<_Float16, float>(A_log, dt_bias, a, b, beta_scale);
    case at::kFloat: return gates_impl<float, float>(A_log, dt_bias, a, b, beta_scale);
    case at::kDouble: return gates_impl<double, double>(A_log, dt_bias, a, b, beta_scale);
    default: TORCH_CHECK_VALUE(false, "a.dtype: unsupported ", a.scalar_type());
  }
}

// (input dtype, state dtype) -> the instantiation; the accumulator is float64 for a float64 state.
#define KVB_STATE_CASES(TI, FN, ...)                                                     \
  switch (state.scalar_type()) {                                                         \
    case at::kBFloat16: return FN<TI, bf16, float>(__VA_ARGS__);                         \
    case at::kHalf: return FN<TI, _Float16, float>(__VA_ARGS__);                         \
    case at::kFloat: return FN<TI, float, float>(__VA_ARGS__);                           \
    case at::kDouble: return FN<TI, double, double>(__VA_ARGS__);                        \
    default: TORCH_CHECK_VALUE(false, "state.dtype: unsupported ", state.scalar_type()); \
  }
#define KVB_DISPATCH(FN, ...)                                                               \
  switch (bk.scalar_type()) {                                                               \
    case at::kBFloat16: KVB_STATE_CASES(bf16, FN, __VA_ARGS__)                              \
    case at::kHalf: KVB_STATE_CASES(_Float16, FN, __VA_ARGS__)                              \
    case at::kFloat: KVB_STATE_CASES(float, FN, __VA_ARGS__)                                \
    case at::kDouble: KVB_STATE_CASES(double, FN, __VA_ARGS__)                              \
    default: TORCH_CHECK_VALUE(false, "buf_k.dtype: unsupported ", bk.scalar_type());       \
  }

// Returns the outputs [T, HV, V] in v's dtype (allocated here: a torch.empty from Python costs
// more than the whole kernel call at small shapes).
at::Tensor tokens(const at::Tensor& state, const at::Tensor& bk, const at::Tensor& bu,
                  const at::Tensor& bg, const at::Tensor& meta, int64_t chunk,
                  const at::Tensor& slots, const at::Tensor& cu, int64_t per_seq,
                  const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& g, const at::Tensor& beta, bool commit, double scale,
                  bool l2) {
  at::Tensor out = at::empty(v.sizes(), v.options());
  [&]() {
    KVB_DISPATCH(tokens_impl, state, bk, bu, bg, meta, chunk, slots, cu, per_seq, q, k, v, g,
                 beta, out, commit, scale, l2)
  }();
  return out;
}

void accept(const at::Tensor& state, const at::Tensor& bk, const at::Tensor& bu,
            const at::Tensor& bg, const at::Tensor& meta, int64_t chunk, const at::Tensor& slots,
            const at::Tensor& accepted, bool l2) {
  KVB_DISPATCH(accept_impl, state, bk, bu, bg, meta, chunk, slots, accepted, l2)
}

void materialize(const at::Tensor& state, const at::Tensor& bk, const at::Tensor& bu,
                 const at::Tensor& bg, const at::Tensor& meta, int64_t chunk,
                 const at::Tensor& slots, const at::Tensor& out, bool l2) {
  KVB_DISPATCH(materialize_impl, state, bk, bu, bg, meta, chunk, slots, out, l2)
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tokens", &tokens, "decode / verify / prefill: tokens cu[n]:cu[n+1] continue slot n");
  m.def("accept", &accept, "commit accepted tokens and flush the slots that reach chunk_size");
  m.def("materialize", &materialize, "the exact state of each slot, fla layout [N, HV, K, V]");
  m.def("conv_gates", &conv_gates, "the layer's causal conv (window update) and gates");
  m.def("gates", &gates, "g = -exp(A_log) softplus(a + dt_bias), beta = beta_scale sigmoid(b)");
  m.def("exp_vec", [](const at::Tensor& x) {  // the SiLU's exp, for its accuracy test
    TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous fp32");
    at::Tensor y = at::empty_like(x);
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    for (int64_t i = 0; i < x.numel(); ++i) yp[i] = exp_vec(xp[i]);
    return y;
  });
  m.def("num_threads", []() { return at::get_num_threads(); });
}
