// K/V preprocessing of the Hopper backend, one launch: smooth K's statistics, INT8 K with one scale per
// key ("per_token") or per key group of a 64-key block ("per_thread": the PER_THREAD flag), FP8 V^T with
// one scale per channel in the key order the attention kernel reads (layout.py).
// Two kernels compute it: preprocess_kv_resident (below) for heads of up to 2048 keys, and for longer
// ones the ticketed preprocess_kv described here.
//
// The ticketed kernel computes what quantattn/kernels/quant.py's preprocess_kv_kernel computes (same buffers, same
// ticket scheme: see that kernel's docstring), but it is written for bandwidth: 16-byte loads and
// stores, K and V statistics in registers of separate warps, V transposed through shared memory in 4-key
// words. The Triton kernel needs 229 registers per thread at head_dim 128 and runs at about a third of
// copy speed; this one at 0.5-0.7x of copy speed (H100: docs/perf-notes.md, session 6).
//
// Work unit: a chunk of blocks_per_chunk * 64 keys of one (batch, kv head). CTA with ticket t takes the
// statistics of chunk t % n_chunks of head t / n_chunks, then quantizes the same chunk of head
// t / n_chunks - lag once that head's statistics are complete. Tickets are taken in start order, and a
// CTA waits only for smaller tickets, so the launch cannot deadlock whatever the residency.

#include "common.cuh"

namespace quantattn_hopper {
namespace prep {

constexpr int THREADS = 256;
#ifndef QUANTATTN_PREP_MIN_BLOCKS
#define QUANTATTN_PREP_MIN_BLOCKS 3
#endif
constexpr int MIN_BLOCKS = QUANTATTN_PREP_MIN_BLOCKS;  // CTAs per SM the registers must allow
constexpr int WARPS = THREADS / 32;
constexpr int BLOCK = 64;          // keys per quantization block (config.K_BLOCK_KEYS)
constexpr int PARTIAL_ROWS = 7;    // per chunk and channel: K sum, max, min; V sum, max, min; K finite count
constexpr int K_COUNT_ROW = 6;
constexpr int V_ROW_BYTES = 72;    // a row of the shared V^T tile: 64 keys, padded so that the 4-byte
                                   // stores of channels 8 apart fall in different banks

struct Params {
  const void* k;
  int64_t k_sb, k_sh, k_sn;  // element strides; channel stride 1
  const void* v;
  int64_t v_sb, v_sh, v_sn;
  int h, n, heads, n_chunks, blocks_per_chunk, lag;
  float* part;   // [heads, n_chunks, PARTIAL_ROWS, D]
  float* stats;  // [2, 3, heads, D]: K trimmed mean, max, min; V mean, max, min
  int* sync;     // [1 + heads]: the ticket counter, then arrivals per head (zeroed before the launch)
  int8_t* kq;    // [heads, n, D]
  float* k_scale;  // [heads, ks_stride]
  int64_t ks_stride;
  uint8_t* vq;   // [heads, D, n_pad], keys permuted inside each 32-key chunk
  int64_t n_pad;
};

// Thread layouts. K's quantization: thread (r, c) holds channels 8c..8c+7 of rows r, r + ROWS, ...; the
// statistics lay each warp half (K, then V) out the same way (chunk_statistics).
// V's quantization: thread (g, c, quad) holds channels 8c..8c+7 of the four keys whose FP8 values share
// one 4-byte word of V^T in the attention kernel's order, in 64-key block g of a group of V_GROUPS.
template <int D>
struct Layout {
  static constexpr int VECS = D / 8;                      // 16-byte vectors per row
  static constexpr int ROWS = THREADS / VECS;             // rows one pass over the CTA covers
  static constexpr int PASSES = BLOCK / ROWS;
  static constexpr int V_GROUPS = THREADS / (VECS * 16);  // 64-key blocks of V quantized at once
  static constexpr int V_SEGMENTS = V_GROUPS * D * BLOCK / 16;  // 16-byte pieces of their V^T tiles
};

template <int D>
struct Shared {
  union {
    float red[WARPS / 2][PARTIAL_ROWS][D];  // each warp's share of the chunk's partials (K or V rows)
    uint8_t vt[Layout<D>::V_GROUPS][D][V_ROW_BYTES];
  };
  int ticket;
  int arrived;
};

template <typename T>
__device__ __forceinline__ uint4 load_row(const T* base, int row, int n, int64_t stride, int col) {
  return row < n ? __ldg(reinterpret_cast<const uint4*>(base + row * stride + col)) : make_uint4(0, 0, 0, 0);
}

__device__ __forceinline__ int ld_volatile(const int* p) { return *reinterpret_cast<const volatile int*>(p); }

// Per channel sums, maxima and minima of the finite elements of one tensor's rows, one thread's share of E
// channels.
template <int E>
struct Partial {
  float sum[E], max[E], min[E], count[E];
  __device__ __forceinline__ void init() {
#pragma unroll
    for (int e = 0; e < E; ++e) sum[e] = 0.f, max[e] = -INFINITY, min[e] = INFINITY, count[e] = 0.f;
  }
  __device__ __forceinline__ void add(const float (&x)[E], bool counted) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const bool ok = is_finite(x[e]);
      sum[e] += ok ? x[e] : 0.f;
      max[e] = fmaxf(max[e], ok ? x[e] : -INFINITY);
      min[e] = fminf(min[e], ok ? x[e] : INFINITY);
      if (counted) count[e] += ok ? 1.f : 0.f;
    }
  }
  // combine the lanes that hold the same channels (lanes VECS apart), then write the warp's share
  template <int VECS>
  __device__ __forceinline__ void to_shared(float (&red)[PARTIAL_ROWS][VECS * E], int first_row, int lane,
                                            bool counted) {
#pragma unroll
    for (int off = VECS; off < 32; off *= 2) {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        sum[e] += __shfl_xor_sync(0xFFFFFFFF, sum[e], off);
        max[e] = fmaxf(max[e], __shfl_xor_sync(0xFFFFFFFF, max[e], off));
        min[e] = fminf(min[e], __shfl_xor_sync(0xFFFFFFFF, min[e], off));
        if (counted) count[e] += __shfl_xor_sync(0xFFFFFFFF, count[e], off);
      }
    }
    if (lane < VECS) {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        red[first_row][E * lane + e] = sum[e];
        red[first_row + 1][E * lane + e] = max[e];
        red[first_row + 2][E * lane + e] = min[e];
        if (counted) red[K_COUNT_ROW][E * lane + e] = count[e];
      }
    }
  }
};

// What combining partial row q with leaves it unchanged (rows 1, 4 are maxima, 2, 5 minima, the rest sums).
__device__ __forceinline__ float identity(int q) {
  return (q == 1 || q == 4) ? -INFINITY : (q == 2 || q == 5) ? INFINITY : 0.f;
}
__device__ __forceinline__ float combine(int q, float acc, float x) {
  return (q == 1 || q == 4) ? fmaxf(acc, x) : (q == 2 || q == 5) ? fminf(acc, x) : acc + x;
}

// Partial row q of the chunk, channel ch: the warps' shares combined in warp order.
template <int D>
__device__ __forceinline__ float combine_warps(const Shared<D>& sm, int q, int ch) {
  float acc = sm.red[0][q][ch];
#pragma unroll
  for (int w = 1; w < WARPS / 2; ++w) acc = combine(q, acc, sm.red[w][q][ch]);
  return acc;
}

// One channel's statistics of a whole head from its combined partial rows -> STATS. K's centre is the
// trimmed mean of the finite elements, (sum - max - min) / (finite - 2), zero where fewer than 3 are
// finite (reference.quant.smoothing_vector_k).
__device__ __forceinline__ float k_centre(const float (&acc)[PARTIAL_ROWS]) {
  const float finite = acc[K_COUNT_ROW];
  const bool enough = finite >= 3.f;
  const float trimmed = acc[0] - (enough ? acc[1] : 0.f) - (enough ? acc[2] : 0.f);
  return enough ? __fdiv_rn(trimmed, fmaxf(finite - 2.f, 1.f)) : 0.f;
}
// V's FP8 factor of one channel, 448 / amax, from its maximum and minimum
__device__ __forceinline__ float v_factor(float max, float min) {
  return __fdiv_rn(V_RANGE, fmaxf(fmaxf(max, -min), AMAX_FLOOR));
}

template <int D>
__device__ __forceinline__ void store_statistics(const Params& p, int head, int ch, const float (&acc)[PARTIAL_ROWS]) {
  const float v_mean = __fdiv_rn(acc[3], fmaxf(float(p.n), 1.f));
  const int64_t plane = int64_t(p.heads) * D;
  float* out = p.stats + int64_t(head) * D + ch;
  const float values[6] = {k_centre(acc), acc[1], acc[2], v_mean, acc[4], acc[5]};
#pragma unroll
  for (int q = 0; q < 6; ++q) out[q * plane] = values[q];
}

// The head's last chunk to finish: its chunks' partials, combined in chunk order so that the result does
// not depend on which CTA ran last.
template <int D>
__device__ __forceinline__ void reduce_statistics(const Params& p, int head, int ch) {
  const float* part = p.part + int64_t(head) * p.n_chunks * PARTIAL_ROWS * D + ch;
  float acc[PARTIAL_ROWS];
#pragma unroll
  for (int q = 0; q < PARTIAL_ROWS; ++q) acc[q] = identity(q);
  constexpr int AT_ONCE = 8;  // chunks whose loads are in flight together (one L2 latency, not eight)
  for (int c0 = 0; c0 < p.n_chunks; c0 += AT_ONCE) {
    float x[AT_ONCE][PARTIAL_ROWS];
#pragma unroll
    for (int c = 0; c < AT_ONCE; ++c)
#pragma unroll
      for (int q = 0; q < PARTIAL_ROWS; ++q)
        x[c][q] = c0 + c < p.n_chunks ? __ldcg(part + (c0 + c) * PARTIAL_ROWS * D + q * D) : identity(q);
#pragma unroll
    for (int c = 0; c < AT_ONCE; ++c)
#pragma unroll
      for (int q = 0; q < PARTIAL_ROWS; ++q)
        acc[q] = combine(q, acc[q], x[c][q]);
  }
  store_statistics<D>(p, head, ch, acc);
}

template <int D, typename T>
__device__ __forceinline__ void chunk_statistics(const Params& p, Shared<D>& sm, int head, int chunk) {
  using L = Layout<D>;
  // warps 0..3 take K, warps 4..7 V (half the accumulators per thread: more CTAs fit on an SM)
  constexpr int HALF = THREADS / 2, ROWS = HALF / L::VECS, PASSES = BLOCK / ROWS, AT_ONCE = 4;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const bool is_v = tid >= HALF;
  const int c = tid % L::VECS, r = (tid % HALF) / L::VECS;
  const int b = head / p.h, hh = head % p.h;
  const T* base = is_v ? static_cast<const T*>(p.v) + b * p.v_sb + hh * p.v_sh
                       : static_cast<const T*>(p.k) + b * p.k_sb + hh * p.k_sh;
  const int64_t stride = is_v ? p.v_sn : p.k_sn;
  Partial<8> st;
  st.init();
  const int row0 = chunk * p.blocks_per_chunk * BLOCK;
  for (int blk = 0; blk < p.blocks_per_chunk; ++blk) {
#pragma unroll
    for (int i0 = 0; i0 < PASSES; i0 += AT_ONCE) {
      uint4 raw[AT_ONCE];
#pragma unroll
      for (int i = 0; i < AT_ONCE; ++i) raw[i] = load_row(base, row0 + blk * BLOCK + (i0 + i) * ROWS + r, p.n, stride, 8 * c);
#pragma unroll
      for (int i = 0; i < AT_ONCE; ++i) {
        float x[8];
        unpack8<T>(raw[i], x);
        if (row0 + blk * BLOCK + (i0 + i) * ROWS + r >= p.n) {  // past the end: in no statistic, not counted
#pragma unroll
          for (int e = 0; e < 8; ++e) x[e] = NAN;
        }
        st.add(x, !is_v);
      }
    }
  }
  st.to_shared<L::VECS>(sm.red[warp % (WARPS / 2)], is_v ? 3 : 0, lane, !is_v);
  __syncthreads();
  if (tid < D) {
    float* part = p.part + (int64_t(head) * p.n_chunks + chunk) * PARTIAL_ROWS * D + tid;
#pragma unroll
    for (int q = 0; q < PARTIAL_ROWS; ++q) part[q * D] = combine_warps(sm, q, tid);
  }
  __syncthreads();  // the partials are written (and sm.red read) before the arrival counts them
  if (tid == 0) {
    __threadfence();
    sm.arrived = atomicAdd(p.sync + 1 + head, 1);
    __threadfence();
  }
  __syncthreads();
  if (sm.arrived == p.n_chunks - 1) {
    if (tid < D) reduce_statistics<D>(p, head, tid);
    __syncthreads();
    if (tid == 0) {
      __threadfence();
      atomicAdd(p.sync + 1 + head, 1);  // n_chunks + 1: the head's statistics are ready
    }
  }
}

// One row's 8 channels held by this thread minus smooth K's vector, in x, with non-finite results as 0 (they
// must not set a scale); amax becomes the largest |x| it had seen. Returns whether raw held a non-finite element.
template <typename T>
__device__ __forceinline__ int smooth_k_vector(const uint4& raw, const float (&mean)[8], float (&x)[8], float& amax) {
  unpack8<T>(raw, x);
  int bad = 0;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    bad |= is_finite(x[e]) ? 0 : 1;
    const float s = x[e] - mean[e];
    x[e] = is_finite(s) ? s : 0.f;
    amax = fmaxf(amax, fabsf(x[e]));
  }
  return bad;
}

// x * inv rounded half to even, clamped to INT8's +-127
__device__ __forceinline__ void round_to_int8(const float (&x)[8], float inv, int (&qi)[8]) {
#pragma unroll
  for (int e = 0; e < 8; ++e) qi[e] = static_cast<int>(fminf(fmaxf(rintf(__fmul_rn(x[e], inv)), -QMAX), QMAX));
}
__device__ __forceinline__ uint2 pack_s8x8(const int (&qi)[8]) {
  return make_uint2(pack_s8x4(qi[0], qi[1], qi[2], qi[3]), pack_s8x4(qi[4], qi[5], qi[6], qi[7]));
}

// The scale of a key holding a non-finite element (its finite elements are still quantized)
__device__ __forceinline__ float nan_scale() { return __int_as_float(0x7FC00000); }
__device__ __forceinline__ float k_scale_of(float amax, bool bad) { return bad ? nan_scale() : __fdiv_rn(amax, QMAX); }

// "per_token" K quantization of one row's 8 channels held by this thread, the row's VECS lanes consecutive
// in the warp: INT8 after subtracting smooth K's vector, one scale per row. Stores where in_range; the
// scale where scale is not null (one lane of the row).
template <int VECS, typename T>
__device__ __forceinline__ void quantize_k_vector(const uint4& raw, const float (&mean)[8], bool in_range, int8_t* dst,
                                                  float* scale) {
  float x[8];
  float amax = 0.f;
  int bad = smooth_k_vector<T>(raw, mean, x, amax);
#pragma unroll
  for (int off = VECS / 2; off > 0; off /= 2) {
    amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFF, amax, off));
    bad |= __shfl_xor_sync(0xFFFFFFFF, bad, off);
  }
  amax = fmaxf(amax, AMAX_FLOOR);
  const float inv = __fdiv_rn(QMAX, amax);
  int qi[8];
  round_to_int8(x, inv, qi);
  if (in_range) {
    *reinterpret_cast<uint2*>(dst) = pack_s8x8(qi);
    if (scale != nullptr) *scale = k_scale_of(amax, bad);
  }
}

// raw, as a value the compiler cannot know: what was computed from raw before is computed again from it,
// not kept in registers (per_thread K would otherwise hold 32 smoothed floats across its barrier, and spill).
__device__ __forceinline__ uint4 opaque(uint4 raw) {
  asm volatile("" : "+r"(raw.x), "+r"(raw.y), "+r"(raw.z), "+r"(raw.w));
  return raw;
}

// "per_thread" K quantization (reference/quant.py row_group_amax): key 8j + 2c + e of a 64-key block takes
// the scale of group c, the largest |x| over the block's 16 keys with (key mod 8) div 2 == c, which are the
// keys whose scores one thread of the attention kernel's wgmma holds (it applies one K scale per group).
// Keys past `end` are in no group's maximum; a key holding a non-finite element gets a NaN scale.
//
// This thread (r, kc) = (tid / VECS, tid % VECS) holds channels 8kc..8kc+7 of rows first_row + i * ROWS + r,
// i < LOADS, raw_row(i) giving them (both K layouts of this file). first_row is a multiple of 64 and ROWS one
// of 8, so all its rows are in group (r mod 8) / 2, load i in block i * ROWS / 64. A group's rows of a block
// are ROWS / 8 row pairs r / 2 = group + 4j, each on 2 * VECS consecutive lanes (d128: the whole of warps c and
// c + 4; d64: one half of warps c / 2, c / 2 + 2, ...): lanes combine within a pair, shared memory across.
// Two phases, since no row can be quantized before its group's maximum is known: the maxima, then the rows
// smoothed again from raw and quantized. A barrier must separate two calls (the next call's writes to the
// pair maxima from this one's reads).
template <int VECS, int LOADS, typename T, typename RawRow>
__device__ __forceinline__ void quantize_k_rows_per_thread(RawRow raw_row, const float (&mean)[8], int first_row,
                                                           int end, int8_t* kq, float* k_scale) {
  constexpr int D = 8 * VECS, ROWS = THREADS / VECS, PAIRS = ROWS / 2, BLOCKS = LOADS * ROWS / BLOCK;
  static_assert(ROWS % 8 == 0 && LOADS * ROWS % BLOCK == 0, "a thread's rows must cover whole 64-key blocks");
  __shared__ float pair_max[BLOCKS][PAIRS];
  const int tid = threadIdx.x, r = tid / VECS, kc = tid % VECS;
  float amax[BLOCKS];  // per block: the maximum of this thread's rows, then of its row pair's
  uint32_t bad = 0;    // bit i: row i holds a non-finite element
#pragma unroll
  for (int b = 0; b < BLOCKS; ++b) amax[b] = 0.f;
#pragma unroll
  for (int i = 0; i < LOADS; ++i) {
    float x[8], a = 0.f;
    bad |= uint32_t(smooth_k_vector<T>(raw_row(i), mean, x, a)) << i;
    if (first_row + i * ROWS + r < end) amax[i * ROWS / BLOCK] = fmaxf(amax[i * ROWS / BLOCK], a);
  }
#pragma unroll
  for (int off = 1; off <= VECS; off *= 2) {  // the row pair's lanes
#pragma unroll
    for (int b = 0; b < BLOCKS; ++b) amax[b] = fmaxf(amax[b], __shfl_xor_sync(0xFFFFFFFF, amax[b], off));
  }
#pragma unroll
  for (int off = 1; off < VECS; off *= 2) bad |= __shfl_xor_sync(0xFFFFFFFF, bad, off);  // the row's lanes
  if (tid % (2 * VECS) == 0) {
#pragma unroll
    for (int b = 0; b < BLOCKS; ++b) pair_max[b][r / 2] = amax[b];
  }
  __syncthreads();
  const int group = (r / 2) % 4;
#pragma unroll
  for (int b = 0; b < BLOCKS; ++b) {  // block by block: one block's inverse and scale live at a time
    float m = pair_max[b][group];
#pragma unroll
    for (int j = 1; j < PAIRS / 4; ++j) m = fmaxf(m, pair_max[b][group + 4 * j]);
    m = fmaxf(m, AMAX_FLOOR);
    const float inv = __fdiv_rn(QMAX, m), scale = __fdiv_rn(m, QMAX);
#pragma unroll
    for (int i = b * LOADS / BLOCKS; i < (b + 1) * LOADS / BLOCKS; ++i) {
      const int row = first_row + i * ROWS + r;
      float x[8], unused = 0.f;
      smooth_k_vector<T>(opaque(raw_row(i)), mean, x, unused);
      int qi[8];
      round_to_int8(x, inv, qi);
      if (row < end) {
        *reinterpret_cast<uint2*>(kq + int64_t(row) * D) = pack_s8x8(qi);
        if (kc == 0) k_scale[row] = (bad >> i) & 1 ? nan_scale() : scale;
      }
    }
  }
}

// V's element scaled to E4M3's range, ready for the saturating cast (which would make Inf 448: NaN instead).
__device__ __forceinline__ float v_scaled(float x, float factor) {
  const float y = x * factor;
  return fabsf(y) == INFINITY ? NAN : y;
}

// Quantization of one chunk of a head whose statistics are complete, V_GROUPS 64-key blocks at a time,
// the loads of K and V for a group issued together (they come from L2: the statistics read them).
//   K: INT8 after subtracting smooth K's vector (thread layout of the statistics), one scale per key or
//   (PER_THREAD) per key group of a 64-key block.
//   V: V * (448 / amax of its channel) in E4M3, transposed to [D][keys] with the keys of each 32-key
//   chunk in the attention kernel's order (quantattn/hopper/layout.py: position 16h + 4t + 2a + b holds
//   key 16h + 8a + 2t + b), keys n .. n_pad as zeros. A thread converts the four keys of one 4-byte word
//   for its 8 channels; the words go through a shared tile and leave in 16-byte runs of keys.
template <int D, typename T, bool SMOOTH_K, bool PER_THREAD>
struct ChunkQuantizer {
  using L = Layout<D>;
  static constexpr int K_LOADS = L::V_GROUPS * L::PASSES;  // K rows per thread and group
  const Params& p;
  Shared<D>& sm;
  const int tid, row0, chunk_end;  // the chunk's rows: row0 .. chunk_end - 1 (clipped to n)
  const int kc, kr;                // K: channel vector and first row
  const int vg, vc, quad;          // V: block in the group, channel vector, 4-key word
  const T *kb, *vb;
  int8_t* kq;
  float* k_scale;
  uint8_t* vq;
  float mean[8], factor[8];

  __device__ __forceinline__ ChunkQuantizer(const Params& p_, Shared<D>& sm_, int head, int chunk)
      : p(p_),
        sm(sm_),
        tid(threadIdx.x),
        row0(chunk * p_.blocks_per_chunk * BLOCK),
        chunk_end(min(p_.n, (chunk + 1) * p_.blocks_per_chunk * BLOCK)),
        kc(threadIdx.x % L::VECS),
        kr(threadIdx.x / L::VECS),
        vg(threadIdx.x / (L::VECS * 16)),
        vc((threadIdx.x / 16) % L::VECS),
        quad(threadIdx.x % 16) {
    const int b = head / p.h, hh = head % p.h;
    kb = static_cast<const T*>(p.k) + b * p.k_sb + hh * p.k_sh;
    vb = static_cast<const T*>(p.v) + b * p.v_sb + hh * p.v_sh;
    kq = p.kq + int64_t(head) * p.n * D + 8 * kc;
    k_scale = p.k_scale + int64_t(head) * p.ks_stride;
    vq = p.vq + int64_t(head) * D * p.n_pad;
  }

  // the head's statistics (complete: the caller waited for them)
  __device__ __forceinline__ void load_statistics(int head) {
    const int64_t plane = int64_t(p.heads) * D;
    const float* stat = p.stats + int64_t(head) * D;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      mean[e] = SMOOTH_K ? __ldcg(stat + 8 * kc + e) : 0.f;
      factor[e] = v_factor(__ldcg(stat + 4 * plane + 8 * vc + e), __ldcg(stat + 5 * plane + 8 * vc + e));
    }
  }

  // the V word's keys inside a 64-key block: 32-key chunk quad / 8, half (quad / 4) % 2, pair quad % 4
  __device__ __forceinline__ int v_key(int i) const {
    return 32 * (quad / 8) + 16 * ((quad / 4) % 2) + 2 * (quad % 4) + (i & 1) + 8 * (i >> 1);
  }

  // K and V of the group starting at first_row, in registers (they need no statistics: the first group's
  // loads are issued before the wait for them)
  uint4 kraw[K_LOADS], vraw[4];
  __device__ __forceinline__ void load(int first_row) {
#pragma unroll
    for (int i = 0; i < K_LOADS; ++i) kraw[i] = load_row(kb, first_row + i * L::ROWS + kr, chunk_end, p.k_sn, 8 * kc);
#pragma unroll
    for (int i = 0; i < 4; ++i) vraw[i] = load_row(vb, first_row + vg * BLOCK + v_key(i), chunk_end, p.v_sn, 8 * vc);
  }

  // (PER_THREAD: v_words' barriers separate one group's reads of the pair maxima from the next one's writes)
  __device__ __forceinline__ void quantize(int first_row) {
    if constexpr (PER_THREAD) {
      quantize_k_rows_per_thread<L::VECS, K_LOADS, T>([&](int i) { return kraw[i]; }, mean, first_row, chunk_end, kq,
                                                      k_scale);
    } else {
#pragma unroll
      for (int i = 0; i < K_LOADS; ++i) k_row(kraw[i], first_row + i * L::ROWS + kr);
    }
    v_words(vraw, first_row);
  }

  __device__ __forceinline__ void k_row(const uint4& raw, int row) {
    quantize_k_vector<L::VECS, T>(raw, mean, row < chunk_end, kq + int64_t(row) * D, kc == 0 ? k_scale + row : nullptr);
  }

  __device__ __forceinline__ void v_words(const uint4 (&raw)[4], int first_row) {
    uint32_t word[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
    for (int i = 0; i < 4; i += 2) {
      float x0[8], x1[8];
      unpack8<T>(raw[i], x0);
      unpack8<T>(raw[i + 1], x1);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        word[e] |= e4m3x2(v_scaled(x0[e], factor[e]), v_scaled(x1[e], factor[e])) << (8 * i);
      }
    }
    __syncthreads();  // the previous group's tile has gone out
#pragma unroll
    for (int e = 0; e < 8; ++e) *reinterpret_cast<uint32_t*>(&sm.vt[vg][8 * vc + e][4 * quad]) = word[e];
    __syncthreads();
    // keys n .. n_pad are zeros (loaded as such); keys of the next chunk are not this CTA's
    const int key_end = min(int64_t(row0 + p.blocks_per_chunk * BLOCK), p.n_pad);
#pragma unroll
    for (int s = tid; s < L::V_SEGMENTS; s += THREADS) {
      const int g = s / (4 * D), ch = (s / 4) % D, j = s % 4;
      const int key = first_row + g * BLOCK + 16 * j;
      if (key < key_end) {
        const uint2 lo = *reinterpret_cast<const uint2*>(&sm.vt[g][ch][16 * j]);
        const uint2 hi = *reinterpret_cast<const uint2*>(&sm.vt[g][ch][16 * j + 8]);
        *reinterpret_cast<uint4*>(vq + int64_t(ch) * p.n_pad + key) = make_uint4(lo.x, lo.y, hi.x, hi.y);
      }
    }
  }
};

template <int D, typename T, bool SMOOTH_K, bool PER_THREAD>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) preprocess_kv(const __grid_constant__ Params p) {
  __shared__ Shared<D> sm;
  if (threadIdx.x == 0) sm.ticket = atomicAdd(p.sync, 1);
  __syncthreads();
  const int ticket = sm.ticket;
  const int head = ticket / p.n_chunks, chunk = ticket % p.n_chunks;
  if (head < p.heads) chunk_statistics<D, T>(p, sm, head, chunk);

  const int qhead = head - p.lag;
  if (qhead < 0) return;
  ChunkQuantizer<D, T, SMOOTH_K, PER_THREAD> quantizer(p, sm, qhead, chunk);
  quantizer.load(quantizer.row0);
  if (threadIdx.x == 0) {
    while (ld_volatile(p.sync + 1 + qhead) <= p.n_chunks) __nanosleep(100);
    __threadfence();
  }
  __syncthreads();
  quantizer.load_statistics(qhead);
  for (int b0 = 0; b0 < p.blocks_per_chunk; b0 += Layout<D>::V_GROUPS) {
    const int first_row = quantizer.row0 + b0 * BLOCK;
    if (b0 > 0) quantizer.load(first_row);
    quantizer.quantize(first_row);
  }
}

// ---------------------------------------------------------------------------------------------
// Resident variant, for heads of at most RESIDENT_KEYS * MAX_CLUSTER keys: a cluster of CTAs per (batch,
// kv head), each holding RESIDENT_KEYS keys of K and V in shared memory from the statistics to the
// quantization. The CTAs exchange their partial statistics through distributed shared memory. So K and V
// are read from DRAM once, and there is no ticket, counter or partial in global memory: one launch,
// no memset, about three dependent trips to memory per CTA instead of eight (the ticket kernel's are what
// bounds it below 4K keys: docs/perf-notes.md, session 6).

constexpr int RESIDENT_KEYS = 128;
constexpr int MAX_CLUSTER = 16;  // a non-portable cluster size, which the H100 allows
constexpr int RESIDENT_CTAS_PER_SM = 3;

template <int D>
struct ResidentSmem {
  static constexpr int SPLITS = THREADS / D;  // key ranges per channel pair in the statistics
  uint32_t k[RESIDENT_KEYS][D / 2];           // the rows as loaded: pairs of 16-bit elements
  uint32_t v[RESIDENT_KEYS][D / 2];
  float part[SPLITS][PARTIAL_ROWS][D];        // part[0]: the CTA's partial statistics, which the cluster reads
  float mean[D], factor[D];                   // the head's smooth-K vector and V's FP8 factors
};

static_assert(sizeof(ResidentSmem<128>) == 520 * 128 + 7168 && sizeof(ResidentSmem<64>) == 520 * 64 + 7168,
              "quantattn/hopper/kernels.py: resident_smem_bytes launches with this formula");

__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {  // zeros where !valid
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t cluster_size() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }
// a float of CTA `rank`'s shared memory, at the place `local` has in this CTA's
__device__ __forceinline__ float ld_cluster(const float* local, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_u32(local)), "r"(rank));
  float x;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(x) : "r"(remote) : "memory");
  return x;
}

template <typename T>
__device__ __forceinline__ void unpack2(uint32_t w, float (&x)[2]) {
  to_f32x2(T{}, w, x[0], x[1]);
}

// The CTA's partial statistics -> part[0]. Threads of one half take K, of the other V; a thread holds a
// channel pair over one of SPLITS key ranges, and the ranges are combined in order.
template <int D, typename T>
__device__ __forceinline__ void resident_partials(ResidentSmem<D>& sm, int keys) {
  constexpr int SPLITS = ResidentSmem<D>::SPLITS, SPLIT_KEYS = RESIDENT_KEYS / SPLITS;
  const int tid = threadIdx.x;
  const bool is_v = tid >= THREADS / 2;
  const int pair = tid % (D / 2), split = (tid % (THREADS / 2)) / (D / 2);
  const int first = is_v ? 3 : 0;
  const uint32_t(*rows)[D / 2] = is_v ? sm.v : sm.k;
  const int begin = split * SPLIT_KEYS, end = min(keys, begin + SPLIT_KEYS);
  // Fast path: sums, maxima and minima of all elements, which are those of the finite ones when the sum
  // is finite (a NaN or an infinity makes it NaN or infinite; fmaxf and fminf skip NaN). Otherwise the
  // thread starts over on the checked path: the same additions in the same order where all are finite.
  Partial<2> st;
  st.init();
  if (end - begin == SPLIT_KEYS) {
#pragma unroll 16
    for (int key = begin; key < end; ++key) {
      float x[2];
      unpack2<T>(rows[key][pair], x);
#pragma unroll
      for (int e = 0; e < 2; ++e) st.sum[e] += x[e], st.max[e] = fmaxf(st.max[e], x[e]), st.min[e] = fminf(st.min[e], x[e]);
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) st.count[e] = is_v ? 0.f : float(SPLIT_KEYS);
  }
  if (end - begin != SPLIT_KEYS || !is_finite(st.sum[0]) || !is_finite(st.sum[1])) {
    st.init();
#pragma unroll 4
    for (int key = begin; key < end; ++key) {
      float x[2];
      unpack2<T>(rows[key][pair], x);
      st.add(x, !is_v);
    }
  }
  auto put = [&](float(&out)[PARTIAL_ROWS][D]) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      out[first][2 * pair + e] = st.sum[e];
      out[first + 1][2 * pair + e] = st.max[e];
      out[first + 2][2 * pair + e] = st.min[e];
      if (!is_v) out[K_COUNT_ROW][2 * pair + e] = st.count[e];
    }
  };
  if (split > 0) put(sm.part[split]);
  __syncthreads();
  if (split == 0) {
    for (int s = 1; s < SPLITS; ++s) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int ch = 2 * pair + e;
        st.sum[e] = combine(0, st.sum[e], sm.part[s][first][ch]);
        st.max[e] = combine(1, st.max[e], sm.part[s][first + 1][ch]);
        st.min[e] = combine(2, st.min[e], sm.part[s][first + 2][ch]);
        if (!is_v) st.count[e] += sm.part[s][K_COUNT_ROW][ch];
      }
    }
    put(sm.part[0]);
  }
}

// V^T of one 32-key chunk for this lane's channel pair: E4M3 in the attention kernel's key order
// (position 16h + 4t + 2a + b holds key 16h + 8a + 2t + b), 32 bytes per channel.
template <int D, typename T>
__device__ __forceinline__ void resident_v_chunk(const ResidentSmem<D>& sm, int chunk, int pair, uint8_t* dst,
                                                 int64_t n_pad) {
  const float f0 = sm.factor[2 * pair], f1 = sm.factor[2 * pair + 1];
  uint32_t w0[8] = {0, 0, 0, 0, 0, 0, 0, 0}, w1[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
  for (int m = 0; m < 16; ++m) {  // positions 2m and 2m + 1: keys key and key + 1
    const int pos = 2 * m;
    const int key = 32 * chunk + 16 * (pos / 16) + 8 * ((pos / 2) % 2) + 2 * ((pos / 4) % 4);
    float a[2], b[2];
    unpack2<T>(sm.v[key][pair], a);
    unpack2<T>(sm.v[key + 1][pair], b);
    w0[m / 2] |= e4m3x2(v_scaled(a[0], f0), v_scaled(b[0], f0)) << (16 * (m % 2));
    w1[m / 2] |= e4m3x2(v_scaled(a[1], f1), v_scaled(b[1], f1)) << (16 * (m % 2));
  }
  uint4* d0 = reinterpret_cast<uint4*>(dst);
  uint4* d1 = reinterpret_cast<uint4*>(dst + n_pad);
  d0[0] = make_uint4(w0[0], w0[1], w0[2], w0[3]);
  d0[1] = make_uint4(w0[4], w0[5], w0[6], w0[7]);
  d1[0] = make_uint4(w1[0], w1[1], w1[2], w1[3]);
  d1[1] = make_uint4(w1[4], w1[5], w1[6], w1[7]);
}

template <int D, typename T, bool SMOOTH_K, bool PER_THREAD>
__global__ void __launch_bounds__(THREADS, RESIDENT_CTAS_PER_SM) preprocess_kv_resident(const __grid_constant__ Params p) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  ResidentSmem<D>& sm = *reinterpret_cast<ResidentSmem<D>*>(smem_raw);
  allow_dependent_grid();  // the attention kernel's CTAs take the SMs this launch's last clusters leave
  constexpr int VECS = D / 8;
  const int tid = threadIdx.x;
  const uint32_t rank = cluster_rank(), n_ranks = cluster_size();
  const int head = blockIdx.x / n_ranks;
  const int key0 = rank * RESIDENT_KEYS;
  const int keys = max(0, min(RESIDENT_KEYS, p.n - key0));
  const int b = head / p.h, hh = head % p.h;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + hh * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_sb + hh * p.v_sh;

  // K and V rows -> shared memory; rows past n as zeros (V^T's padding keys are zeros)
#pragma unroll
  for (int i = tid; i < RESIDENT_KEYS * VECS; i += THREADS) {
    const int row = i / VECS, c = i % VECS;
    const int64_t src = row < keys ? key0 + row : 0;
    cp_async_16(&sm.k[row][4 * c], kb + src * p.k_sn + 8 * c, row < keys);
    cp_async_16(&sm.v[row][4 * c], vb + src * p.v_sn + 8 * c, row < keys);
  }
  cp_async_wait_all();
  __syncthreads();
  resident_partials<D, T>(sm, keys);
  __syncthreads();

  // the head's statistics: every CTA combines the cluster's partials in rank order (the same result in each)
  cluster_arrive();
  cluster_wait();
  if (tid < D) {
    float acc[PARTIAL_ROWS];
#pragma unroll
    for (int q = 0; q < PARTIAL_ROWS; ++q) acc[q] = identity(q);
    constexpr int AT_ONCE = 4;  // ranks whose reads are in flight together (one round trip, not four)
    for (uint32_t r0 = 0; r0 < n_ranks; r0 += AT_ONCE) {
      float x[AT_ONCE][PARTIAL_ROWS];
#pragma unroll
      for (int r = 0; r < AT_ONCE; ++r)
#pragma unroll
        for (int q = 0; q < PARTIAL_ROWS; ++q)
          x[r][q] = r0 + r < n_ranks ? ld_cluster(&sm.part[0][q][tid], r0 + r) : identity(q);
#pragma unroll
      for (int r = 0; r < AT_ONCE; ++r)
#pragma unroll
        for (int q = 0; q < PARTIAL_ROWS; ++q) acc[q] = combine(q, acc[q], x[r][q]);
    }
    if (rank == 0) store_statistics<D>(p, head, tid, acc);
    sm.mean[tid] = SMOOTH_K ? k_centre(acc) : 0.f;
    sm.factor[tid] = v_factor(acc[4], acc[5]);
  }
  cluster_arrive();  // done reading the others' shared memory: they may exit once everyone is
  __syncthreads();

  {  // K: INT8 rows, thread (r, c) holding channels 8c..8c+7
    constexpr int ROWS = THREADS / VECS;
    const int c = tid % VECS, r = tid / VECS;
    float mean[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) mean[e] = sm.mean[8 * c + e];
    int8_t* kq = p.kq + (int64_t(head) * p.n + key0) * D + 8 * c;
    float* ks = p.k_scale + int64_t(head) * p.ks_stride + key0;
    if constexpr (PER_THREAD) {  // the rows read twice from shared memory rather than held in registers
      quantize_k_rows_per_thread<VECS, RESIDENT_KEYS / ROWS, T>(
          [&](int i) { return *reinterpret_cast<const uint4*>(&sm.k[i * ROWS + r][4 * c]); }, mean, 0, keys, kq, ks);
    } else {
#pragma unroll
      for (int i = 0; i < RESIDENT_KEYS / ROWS; ++i) {
        const int row = i * ROWS + r;
        const uint4 raw = *reinterpret_cast<const uint4*>(&sm.k[row][4 * c]);
        quantize_k_vector<VECS, T>(raw, mean, row < keys, kq + int64_t(row) * D, c == 0 ? ks + row : nullptr);
      }
    }
  }
  {  // V^T: a warp takes a 32-key chunk of 64 channels, a lane a channel pair
    constexpr int GROUPS = D / 64, UNITS = RESIDENT_KEYS / 32 * GROUPS;
    const int warp = tid / 32, lane = tid % 32;
#pragma unroll
    for (int u = warp; u < UNITS; u += WARPS) {
      const int chunk = u / GROUPS, pair = 32 * (u % GROUPS) + lane;
      const int64_t key = key0 + 32 * chunk;
      if (key < p.n_pad)
        resident_v_chunk<D, T>(sm, chunk, pair, p.vq + (int64_t(head) * D + 2 * pair) * p.n_pad + key, p.n_pad);
    }
  }
  cluster_wait();  // the other CTAs have read this one's partials
}

}  // namespace prep
}  // namespace quantattn_hopper
