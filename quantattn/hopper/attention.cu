// SageAttention2 (INT8 QK^T, FP8 PV, two-level accumulation) for Hopper (sm_90a): one warpgroup of 64
// query rows per CTA, several CTAs per SM, TMA loads of K, V^T and the key scales into a ring of
// shared-memory stages, wgmma for both products (P from registers).
//
// Numerics are those of quantattn.reference with the default config (qk per_token INT8, FP8 PV with a
// fresh FP32 accumulator per 128-key step, P scaled by 448, V per channel), as the Triton kernel:
//   Q is quantized here, in registers, one scale per row; K arrives as INT8 with one scale per key;
//   V arrives as FP8, transposed ([d, keys]) and with its keys permuted inside each 32-key chunk so that
//   the words of P a thread holds in the QK accumulator are, unshuffled, its A fragment of the PV
//   product (see quantattn/hopper/layout.py: wgmma_key_order).
// Why this shape: docs/perf-notes.md (session 7). Each CTA runs its key blocks in order (QK, softmax,
// PV); the tensor cores stay busy because 3 or 4 CTAs per SM interleave, not because one CTA overlaps
// itself.
//
// Built by quantattn/hopper/build.py into a shared library loaded with ctypes (no PyTorch headers).

#include "common.cuh"
#include "wgmma.cuh"

namespace quantattn_hopper {

constexpr int BLOCK_N = 128;  // keys per online-softmax step (config.KV_BLOCK)
constexpr int BLOCK_M = 64;   // query rows per CTA: one warpgroup, one wgmma M
constexpr int THREADS = 128;
constexpr int STAGES = 2;     // K/V stages per CTA: the other CTAs on the SM hide what two do not
// CTAs per SM the registers are budgeted for: 3 at head_dim 128 (65536 / (3 * 128) = 170 per thread; o,
// the fresh PV accumulator and P need 144), 4 at head_dim 64 (128 per thread). Measured on the H100
// (session 7): 2 CTAs at 128 were 10% slower, 4 CTAs at 64 were 7-11% faster than 3.
template <int D>
constexpr int ctas_per_sm() {
  return D == 128 ? 3 : 4;
}
template <int S>
using Stage = Int<S>;
static_assert(STAGES == 2, "the unrolled loop below walks two stages");
constexpr float LOG2_P_SCALE = 8.807354922057604f;  // P is scaled inside the exponent: exp2(x + log2 448)

struct Params {
  TensorMap tm_k;   // int8 K [B*Hkv][Nk][D]
  TensorMap tm_v;   // fp8 V^T [B*Hkv][D][n_pad], keys permuted per 32-key chunk
  TensorMap tm_ks;  // fp32 k_scale [B*Hkv][ks_stride]
  const void* q;
  int64_t q_sb, q_sh, q_sm;  // element strides; channel stride 1
  void* o;
  int64_t o_sb, o_sh, o_sm;
  float* lse;  // [B, Hq, Nq] natural log, or null
  int64_t l_sb, l_sh;
  const float* k_mean;  // smooth K's vector [B, Hkv, D] (lse correction), or null
  const float* v_max;   // V's channel max / min [B, Hkv, D]: its FP8 scale
  const float* v_min;
  int hq, hkv, nq, nk;
  float qk_scale;  // sm_scale * log2(e)
  float sm_scale;
  int overlap;  // launched to overlap the K/V preprocessing's end (launch.py): K/V are read after Q
};

// ---------------------------------------------------------------------------------------------
// PTX wrappers

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count));
}

__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nLAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra LAB_WAIT;\n}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void tma_load_3d(void* dst, const TensorMap* map, uint64_t* bar, int c0, int c1,
                                            int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];" ::
          "r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

__device__ __forceinline__ void tma_load_2d(void* dst, const TensorMap* map, uint64_t* bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];" ::"r"(
          smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1)
      : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Pin registers an asynchronous wgmma writes: the compiler must not move their uses across the wait.
template <int N>
__device__ __forceinline__ void fence_regs(int32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// Shared-memory matrix descriptor of a K-major operand tile whose rows are swizzled by TMA
// (128-byte rows: 128B swizzle, 64-byte rows: 64B swizzle); 8-row groups lie 8 rows apart.
template <int ROW_BYTES>
__device__ __forceinline__ uint64_t smem_desc(const void* tile, int byte_offset) {
  static_assert(ROW_BYTES == 128 || ROW_BYTES == 64, "rows of 64 or 128 bytes");
  const uint64_t addr = smem_u32(tile) + byte_offset;
  const uint64_t swizzle = ROW_BYTES == 128 ? 1 : 2;
  return ((addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t((8 * ROW_BYTES) >> 4) << 32) | (swizzle << 62);
}

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Byte offset of (row, byte) in a tile of ROW_BYTES-byte rows as TMA's 128B / 64B swizzle lays it out
// (tile 1024-byte aligned): the 16-byte chunk index is XORed with row bits 0-2 (128B) or 1-2 (64B).
template <int ROW_BYTES>
__device__ __forceinline__ int swizzled(int row, int byte) {
  const int phase = ROW_BYTES == 128 ? row % 8 : (row / 2) % 4;
  return row * ROW_BYTES + ((byte / 16) ^ phase) * 16 + byte % 16;
}

__device__ __forceinline__ void st_shared_u32(void* dst, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;" ::"r"(smem_u32(dst)), "r"(v) : "memory");
}

// ordinary stores that the tensor cores (async proxy) read next
__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// One thread's A-fragment words (rows rl and rl + 8, in each 32-byte k step the bytes 4t..4t+3 and
// 16+4t..16+4t+3) into an A tile of ROW_BYTES-byte rows.
template <int ROW_BYTES, int KSTEPS>
__device__ __forceinline__ void store_a_fragment(uint8_t* tile, const uint32_t (&a)[KSTEPS][4], int rl, int t) {
#pragma unroll
  for (int k = 0; k < KSTEPS; ++k)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      st_shared_u32(tile + swizzled<ROW_BYTES>(rl + 8 * (i % 2), 32 * k + 16 * (i / 2) + 4 * t), a[k][i]);
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xFFFFFFFF, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xFFFFFFFF, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xFFFFFFFF, x, 1);
  return x + __shfl_xor_sync(0xFFFFFFFF, x, 2);
}

// Finite values clamped to the output dtype's range (P rounded up can put a row past V's range).
template <typename T>
__device__ __forceinline__ float saturate(float x) {
  const float big = max_finite<T>();
  return is_finite(x) ? fminf(fmaxf(x, -big), big) : x;
}

// ---------------------------------------------------------------------------------------------
// Shared memory

// The small members after the tiles, apart so that their size is known at compile time: NVRTC has no
// constant offsetof.
template <int D>
struct SmemTail {
  alignas(16) float ks[STAGES][BLOCK_N];
  // the output's per-channel factor, amax_V / 448: loaded while the first keys arrive, so that the
  // epilogue does not wait on global loads column after column
  float v_factor[D];
  uint64_t full[STAGES];   // a stage's K, V^T and key scales have landed
  uint64_t empty[STAGES];  // every warp is done with a stage (one arrival per warp)
};

template <int D>
struct Smem {
  static constexpr int K_TILE = BLOCK_N * D;  // int8 [keys][D]
  static constexpr int V_TILE = D * BLOCK_N;  // fp8 [D][keys]
  static constexpr int TILES = STAGES * (K_TILE + V_TILE) + BLOCK_M * D;
  alignas(1024) uint8_t k[STAGES][K_TILE];
  alignas(1024) uint8_t v[STAGES][V_TILE];
  // INT8 Q, the A operand of the QK product, in the layout TMA gives K (K-major, swizzled rows). Register
  // A operands for Q were tried first (session 4): ptxas 13.0 gave the registers of Q, live across the
  // loop, to P.
  alignas(1024) uint8_t q[BLOCK_M * D];
  SmemTail<D> tail;  // at offset TILES: the tiles are multiples of 1024 bytes
};

// Bytes of Smem<D> up to its last member (sizeof rounds up to the 1024-byte alignment), plus the slack
// that aligns the dynamic buffer: 3 CTAs of head_dim 128 must fit in the SM's 228 KiB. The launcher
// (quantattn/hopper/kernels.py) computes the same number.
template <int D>
constexpr int smem_bytes() {
  return Smem<D>::TILES + int(sizeof(SmemTail<D>)) + 1024;
}
static_assert(Smem<128>::TILES % 1024 == 0 && Smem<64>::TILES % 1024 == 0, "the tail follows the tiles");
static_assert(smem_bytes<128>() == 580 * 128 + 2080 && smem_bytes<64>() == 580 * 64 + 2080,
              "quantattn/hopper/kernels.py: attention_smem_bytes launches with this formula");

// ---------------------------------------------------------------------------------------------
// Q: the CTA's 64 rows, loaded from global memory into registers in the A-fragment layout of the QK
// product (thread: rows r and r + 8 of its warp's 16, in each 32-channel step the channels 4t..4t+3 and
// 16+4t..16+4t+3), quantized with one scale per row; the kernel then stores them as the shared A tile.

template <int D, typename T, bool PER_THREAD>
struct QRows {
  static constexpr int KSTEPS = D / 32;
  uint32_t a[KSTEPS][4];  // INT8 Q as A fragments (stored to shared memory once)
  float scale[2];     // q_scale * qk_scale per row (NaN: the row holds a non-finite element)
  float dot_kmean[2];  // q . k_mean per row (lse of smooth K)

  // The prologue was 23% of the instructions at 1K keys (ncu, session 11), so it is kept lean. Per
  // element, per_token: a conversion, three quarters of an instruction for |x|'s maximum on the 16-bit bits
  // (which also finds infinities and NaN: they order above every finite value), the scaling and rounding, and
  // three quarters of a byte pack. per_thread finds the maximum over the finite elements in float instead.
  __device__ __forceinline__ void load(const Params& p, const T* q_head, int row0, int t, const float* k_mean) {
    float x[2][KSTEPS][8];
    float amax[2] = {0.f, 0.f};
    bool bad[2];
    uint32_t mbits[2] = {0u, 0u};  // per_token: max |x| bits per 16-bit half
    float probe[2] = {0.f, 0.f};   // per_thread: v * 0 summed, NaN iff the row holds a NaN or an infinity
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // rows past the end read the last row (their results are never stored), so that no load is
      // predicated and every address is one base plus a constant
      const T* src = q_head + int64_t(min(row0 + 8 * h, p.nq - 1)) * p.q_sm + 4 * t;
#pragma unroll
      for (int s = 0; s < KSTEPS; ++s) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const uint2 raw = *reinterpret_cast<const uint2*>(src + 32 * s + 16 * half);
          float* v = &x[h][s][4 * half];
          to_f32x2(T{}, raw.x, v[0], v[1]);
          to_f32x2(T{}, raw.y, v[2], v[3]);
          if constexpr (PER_THREAD) {
            // the partner row shares the scale, so a non-finite element must not set it (the values stay
            // raw: a bad row's quantized values do not matter, and q . k_mean must see its NaN)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              probe[h] = fmaf(v[i], 0.f, probe[h]);
              amax[h] = fmaxf(amax[h], is_finite(v[i]) ? fabsf(v[i]) : 0.f);
            }
          } else {
            mbits[h] = max_abs_bits2(max_abs_bits2(mbits[h], raw.x), raw.y);
          }
        }
      }
    }
    if constexpr (!PER_THREAD) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t m = max(mbits[h] & 0xFFFFu, mbits[h] >> 16);
        m = max(m, __shfl_xor_sync(0xFFFFFFFF, m, 1));
        m = max(m, __shfl_xor_sync(0xFFFFFFFF, m, 2));
        bad[h] = m >= inf_bits(T{});
        amax[h] = fmaxf(bits_to_f32(T{}, m), AMAX_FLOOR);
      }
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float probe_row = quad_sum(probe[h]);
        bad[h] = probe_row != probe_row;
        amax[h] = fmaxf(quad_max(amax[h]), AMAX_FLOOR);
      }
      // rows r and r + 8 share a scale; a row past the end holds no values
      const float a0 = row0 < p.nq ? amax[0] : AMAX_FLOOR, a1 = row0 + 8 < p.nq ? amax[1] : AMAX_FLOOR;
      amax[0] = amax[1] = fmaxf(a0, a1);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      dot_kmean[h] = 0.f;
      if (k_mean != nullptr) {  // lse of smooth K only: q . k_mean on the raw row
#pragma unroll
        for (int s = 0; s < KSTEPS; ++s)
#pragma unroll
          for (int i = 0; i < 8; ++i) dot_kmean[h] += x[h][s][i] * k_mean[32 * s + 16 * (i / 4) + 4 * t + i % 4];
        dot_kmean[h] = quad_sum(dot_kmean[h]);
      }
      const float inv = __fdiv_rn(QMAX, amax[h]);
      scale[h] = bad[h] ? __int_as_float(0x7FC00000) : __fdiv_rn(amax[h], QMAX) * p.qk_scale;
      // |x| <= amax, so |x * inv| rounds to at most 127: no clamp (a bad row's values do not matter: its
      // scale is NaN)
#pragma unroll
      for (int s = 0; s < KSTEPS; ++s) {
        int qi[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) qi[i] = __float2int_rn(__fmul_rn(x[h][s][i], inv));
        a[s][h] = pack_s8x4(qi[0], qi[1], qi[2], qi[3]);
        a[s][2 + h] = pack_s8x4(qi[4], qi[5], qi[6], qi[7]);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// The kernel

// PER_THREAD: QK scale groups of quantattn's "per_thread" granularity (reference/quant.py): a thread's two
// query rows share one Q scale, and its keys of a 64-key block (8j + 2t + {0, 1}) one K scale, so that
// the scales fold into the exponent's FFMA instead of a multiply per score.
template <int D, bool CAUSAL, typename T, bool PER_THREAD>
__global__ void __launch_bounds__(THREADS, ctas_per_sm<D>()) sage_attention_hopper(const __grid_constant__ Params p) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  // swizzled TMA tiles want 1024-byte alignment, which the dynamic buffer is not promised
  const uint32_t misalign = smem_u32(smem_raw) & 1023;
  Smem<D>& sm = *reinterpret_cast<Smem<D>*>(smem_raw + (misalign ? 1024 - misalign : 0));

  // causal: the longest query blocks first, so that the short ones fill the tail of the launch
  const int m_block = CAUSAL ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int bh = blockIdx.y;
  const int b = bh / p.hq, h = bh % p.hq;
  const int kvh = h / (p.hq / p.hkv);
  const int bh_kv = b * p.hkv + kvh;
  const int m0 = m_block * BLOCK_M;
  const int shift = p.nk - p.nq;  // bottom-right causal alignment: row i sees keys j <= i + shift
  const int key_end = CAUSAL ? min(p.nk, max(m0 + BLOCK_M + shift, 0)) : p.nk;
  const int n_blocks = (key_end + BLOCK_N - 1) / BLOCK_N;
  // the first key block that some row of this CTA cannot fully see (causal), or the tail block
  const int full_blocks_end = CAUSAL ? min(p.nk / BLOCK_N, max(m0 + shift + 1, 0) / BLOCK_N) : p.nk / BLOCK_N;

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int t = lane % 4;
  const int rl = warp * 16 + lane / 4;  // the thread's rows in the CTA's 64: rl and rl + 8
  const int r0 = m0 + rl;

  constexpr uint32_t STAGE_BYTES = Smem<D>::K_TILE + Smem<D>::V_TILE + BLOCK_N * 4;
  auto load_stage = [&](int s, int j) {  // thread 0 only
    mbar_expect_tx(&sm.tail.full[s], STAGE_BYTES);
    tma_load_3d(sm.k[s], &p.tm_k, &sm.tail.full[s], 0, j * BLOCK_N, bh_kv);
    tma_load_3d(sm.v[s], &p.tm_v, &sm.tail.full[s], j * BLOCK_N, 0, bh_kv);
    tma_load_2d(sm.tail.ks[s], &p.tm_ks, &sm.tail.full[s], j * BLOCK_N, bh_kv);
  };
  // Launched to overlap the preprocessing (p.overlap), the kernel may start before the K/V it reads are
  // written: Q, which the preprocessing does not touch, is quantized first, and everything else waits.
  // Otherwise the first keys are requested first, so that they arrive while Q is quantized.
  const bool keys_first = !p.overlap;
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&sm.tail.full[s], 1);
      mbar_init(&sm.tail.empty[s], THREADS / 32);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    if (keys_first) {
      for (int s = 0; s < STAGES && s < n_blocks; ++s) load_stage(s, s);
    }
  }

  const T* q_head = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const float* k_mean = p.lse != nullptr && p.k_mean != nullptr ? p.k_mean + int64_t(bh_kv) * D : nullptr;
  if (k_mean != nullptr) wait_for_prior_grid();  // q . k_mean reads the preprocessing's output
  QRows<D, T, PER_THREAD> q;
  q.load(p, q_head, r0, t, k_mean);
  store_a_fragment<D, D / 32>(sm.q, q.a, rl, t);
  fence_async_shared();
  wait_for_prior_grid();
  if (tid == 0 && !keys_first) {
    for (int s = 0; s < STAGES && s < n_blocks; ++s) load_stage(s, s);
  }
  // V's channel factors. output / (448 l) <= ~476 * factor, so below FLT_MAX / 512 no finite output
  // overflows FP32 before its saturating cast (the epilogue's fast path)
  bool huge_factor = false;
  if (tid < D) {
    const int64_t at = int64_t(bh_kv) * D + tid;
    const float factor = fmaxf(fmaxf(p.v_max[at], -p.v_min[at]), AMAX_FLOOR) * (1.f / V_RANGE);
    sm.tail.v_factor[tid] = factor;
    huge_factor = !(factor < 3.4028235e38f / 512.f);
  }
  // Q's tile (all four warps' rows), v_factor and the barriers' initialization
  const bool huge_v = __syncthreads_or(huge_factor);

  constexpr int ACC = D / 2;  // accumulator registers per thread of a 64 x D product
  float o[ACC];
#pragma unroll
  for (int i = 0; i < ACC; ++i) o[i] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_part[2] = {0.f, 0.f};  // this thread's share of the row sums (reduced over the quad at the end)
  bool poisoned[2] = {false, false};  // PER_THREAD: the row sees a key with a non-finite element

  // Descriptors of the first tiles; a stage or 32-byte k step is an offset in 16-byte units added to the
  // address field (shared addresses stay below 2^18, so it never carries into the rest).
  const uint64_t desc_q = smem_desc<D>(sm.q, 0), desc_k = smem_desc<D>(sm.k[0], 0);
  const uint64_t desc_v = smem_desc<128>(sm.v[0], 0);
  constexpr uint32_t K_STAGE = Smem<D>::K_TILE / 16, V_STAGE = Smem<D>::V_TILE / 16;

  // One key block: S = QK^T, the online softmax, fresh = PV, o updated. The loop below is unrolled by
  // STAGES so that the stage is a compile-time constant: its descriptors then cost no arithmetic per
  // block (+3% measured, session 7).
  auto step = [&](int j, auto stage) {
    constexpr int s = decltype(stage)::value;
    mbar_wait(&sm.tail.full[s], (j / STAGES) & 1);

    // S = Q K^T (INT8 -> INT32), 64 x 128
    int32_t acc_s[64];
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < D / 32; ++k) wgmma_s8_n128_ss(acc_s, desc_q + 2 * k, desc_k + s * K_STAGE + 2 * k, k > 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(acc_s);

    // scores in exp2 units without q_scale: s = qk * k_scale (q_scale > 0 commutes with the row max).
    // PER_THREAD: s = qk, and group[g] the K scale of the thread's keys in 64-key half g. A key with a
    // non-finite element has a NaN scale (the preprocessing marks it); in the reference NaN then reaches
    // every row that sees that key. Here such a row is marked (poisoned) and the epilogue makes it NaN:
    // made NaN here, through the exponent, the test would sit on every block's softmax chain.
    float sc[64];
    float group[2] = {1.f, 1.f};
    if constexpr (PER_THREAD) {
      const float g0 = sm.tail.ks[s][2 * t], g1 = sm.tail.ks[s][64 + 2 * t];
      // a group past the last key reads TMA's zero fill: any positive factor keeps its -inf scores -inf
      group[0] = is_finite(g0) ? fmaxf(g0, 1e-30f) : 1.f;
      group[1] = is_finite(g1) ? fmaxf(g1, 1e-30f) : 1.f;
#pragma unroll
      for (int i = 0; i < 64; ++i) sc[i] = __int2float_rn(acc_s[i]);
      const float4 k4 = *reinterpret_cast<const float4*>(&sm.tail.ks[s][4 * lane]);
      const float probe = fmaf(k4.x, 0.f, k4.y * 0.f) + fmaf(k4.z, 0.f, k4.w * 0.f);  // NaN iff one is not finite
      if (__any_sync(0xFFFFFFFF, probe != probe)) {  // rare: the block holds such a key
        const int bad = !is_finite(k4.x) ? 0 : !is_finite(k4.y) ? 1 : !is_finite(k4.z) ? 2 : !is_finite(k4.w) ? 3 : BLOCK_N;
        const int first_bad = __reduce_min_sync(0xFFFFFFFF, bad == BLOCK_N ? BLOCK_N : 4 * lane + bad);
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) poisoned[hh] |= !CAUSAL || j * BLOCK_N + first_bad <= r0 + 8 * hh + shift;
      }
    } else {
#pragma unroll
      for (int cc = 0; cc < 16; ++cc) {
        const float2 ks = *reinterpret_cast<const float2*>(&sm.tail.ks[s][8 * cc + 2 * t]);
        sc[4 * cc + 0] = __int2float_rn(acc_s[4 * cc + 0]) * ks.x;
        sc[4 * cc + 1] = __int2float_rn(acc_s[4 * cc + 1]) * ks.y;
        sc[4 * cc + 2] = __int2float_rn(acc_s[4 * cc + 2]) * ks.x;
        sc[4 * cc + 3] = __int2float_rn(acc_s[4 * cc + 3]) * ks.y;
      }
    }
    if (j >= full_blocks_end) {
#pragma unroll
      for (int i = 0; i < 64; ++i) {
        const int key = j * BLOCK_N + 8 * (i / 4) + 2 * t + (i % 2);
        const int row = r0 + 8 * ((i / 2) % 2);
        const bool visible = key < p.nk && (!CAUSAL || key <= row + shift);
        sc[i] = visible ? sc[i] : -INFINITY;
      }
    }
    float m_safe[2], alpha[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      // a tree, not a chain: the chain's latency is not hidden
      float mx[16];
#pragma unroll
      for (int cc = 0; cc < 16; ++cc) mx[cc] = fmaxf(sc[4 * cc + 2 * hh], sc[4 * cc + 2 * hh + 1]);
      float m_blk;
      if constexpr (PER_THREAD) {  // each 64-key half (cc < 8, cc >= 8) apart: their scales differ
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) mx[cc] = fmaxf(mx[cc], mx[cc + 4]), mx[cc + 8] = fmaxf(mx[cc + 8], mx[cc + 12]);
        const float half0 = fmaxf(fmaxf(mx[0], mx[2]), fmaxf(mx[1], mx[3]));
        const float half1 = fmaxf(fmaxf(mx[8], mx[10]), fmaxf(mx[9], mx[11]));
        m_blk = quad_max(fmaxf(half0 * group[0], half1 * group[1]));
      } else {
#pragma unroll
        for (int cc = 0; cc < 8; ++cc) mx[cc] = fmaxf(mx[cc], mx[cc + 8]);
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) mx[cc] = fmaxf(mx[cc], mx[cc + 4]);
        m_blk = quad_max(fmaxf(fmaxf(mx[0], mx[2]), fmaxf(mx[1], mx[3])));
      }
      const float m_new = fmaxf(m_run[hh], m_blk * q.scale[hh]);
      m_safe[hh] = m_new == -INFINITY ? 0.f : m_new;
      alpha[hh] = ex2(m_run[hh] - m_safe[hh]);
      m_run[hh] = m_new;
    }
    // 448 * P = exp2(s * q_scale - m + log2 448) in E4M3, packed as this thread's A fragment of the PV
    // product; its row sums are 448 * l, which the epilogue divides out
    const float m_exp[2] = {LOG2_P_SCALE - m_safe[0], LOG2_P_SCALE - m_safe[1]};
    // the factor from s to exp2 units, per row and 64-key half
    const float* qs = q.scale;
    const float to_exp[2][2] = {{qs[0] * group[0], qs[0] * group[1]}, {qs[1] * group[0], qs[1] * group[1]}};
    float rowsum[2] = {0.f, 0.f};
    uint32_t pa[4][4];
    float fresh[ACC];  // fresh = P V (FP8, the tensor cores' FP32 accumulator), then added to o in FP32
#pragma unroll
    for (int k = 0; k < 4; ++k) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        float pv[8];
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) {
#pragma unroll
          for (int e = 0; e < 2; ++e) pv[2 * cc + e] = ex2(fmaf(sc[4 * (4 * k + cc) + 2 * hh + e], to_exp[hh][k / 2], m_exp[hh]));
        }
        rowsum[hh] += ((pv[0] + pv[1]) + (pv[2] + pv[3])) + ((pv[4] + pv[5]) + (pv[6] + pv[7]));
        pa[k][hh] = e4m3x2(pv[0], pv[1]) | (e4m3x2(pv[2], pv[3]) << 16);
        pa[k][2 + hh] = e4m3x2(pv[4], pv[5]) | (e4m3x2(pv[6], pv[7]) << 16);
      }
    }
    // Issuing the PV product in two halves (the second half's exponentials under the first) or the QK
    // product in two (the first half's conversions under the second) measured no faster: session 7.
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if constexpr (D == 128) {
        wgmma_e4m3_n128_rs(fresh, pa[k], desc_v + s * V_STAGE + 2 * k, k > 0);
      } else {
        wgmma_e4m3_n64_rs(fresh, pa[k], desc_v + s * V_STAGE + 2 * k, k > 0);
      }
    }
    wgmma_commit();
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) l_part[hh] = l_part[hh] * alpha[hh] + rowsum[hh];
    wgmma_wait<0>();
    fence_regs(fresh);
    if (lane == 0) mbar_arrive(&sm.tail.empty[s]);
#pragma unroll
    for (int i = 0; i < ACC; ++i) o[i] = fmaf(o[i], alpha[(i / 2) % 2], fresh[i]);
    if (tid == 0 && j + STAGES < n_blocks) {
      mbar_wait(&sm.tail.empty[s], (j / STAGES) & 1);
      load_stage(s, j + STAGES);
    }
  };
  int j = 0;
  for (; j + 1 < n_blocks; j += 2) {
    step(j, Stage<0>{});
    step(j + 1, Stage<1>{});
  }
  if (j < n_blocks) step(j, Stage<0>{});

  // ---- epilogue: normalize, undo V's scale, store ----
  // one reciprocal per row instead of an IEEE division per element: within 2 ulp of o / l * amax / 448,
  // far below the output's rounding
  float l[2], inv_l[2];
  bool has_keys[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    l[hh] = quad_sum(l_part[hh]);
    if (PER_THREAD && poisoned[hh]) l[hh] = __int_as_float(0x7FC00000);
    has_keys[hh] = l[hh] > 0.f || l[hh] != l[hh];
    inv_l[hh] = __frcp_rn(l[hh] > 0.f || l[hh] != l[hh] ? l[hh] : 1.f);
  }
  T* o_head = static_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh;
  // One row at a time, so that its bounds check and address are computed once: a check per store made the
  // epilogue a sixth of the instructions at 1K keys (ncu, session 11).
  // V's channel factors of the thread's columns, read once for both rows (the loop's registers are free now)
  float2 factor[D / 8];
#pragma unroll
  for (int cc = 0; cc < D / 8; ++cc) factor[cc] = *reinterpret_cast<const float2*>(&sm.tail.v_factor[8 * cc + 2 * t]);
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int row = r0 + 8 * hh;
    if (row >= p.nq) continue;
    T* dst = o_head + row * p.o_sm + 2 * t;
    // l holds 448 * the row sum (P_SCALE in the exponent), which v_factor's 1 / 448 undoes
    auto out = [&](int cc) {
      const float2 f = factor[cc];
      return float2{o[4 * cc + 2 * hh] * inv_l[hh] * f.x, o[4 * cc + 2 * hh + 1] * inv_l[hh] * f.y};
    };
    if (has_keys[hh] && !huge_v) {
      // the saturating conversion is saturate() then the conversion, unless a product overflowed FP32 to an
      // infinity (saturate() keeps it): impossible below huge_v's bound
#pragma unroll
      for (int cc = 0; cc < D / 8; ++cc) {
        const float2 v = out(cc);
        *reinterpret_cast<uint32_t*>(dst + 8 * cc) = pack2_satfinite<T>(v.x, v.y);
      }
    } else {
      // a row that sees no key stores 0 (its o can be NaN: P = 0 times a NaN in V)
#pragma unroll
      for (int cc = 0; cc < D / 8; ++cc) {
        const float2 v = out(cc);
        const float v0 = has_keys[hh] ? saturate<T>(v.x) : 0.f, v1 = has_keys[hh] ? saturate<T>(v.y) : 0.f;
        *reinterpret_cast<uint32_t*>(dst + 8 * cc) = pack2<T>(v0, v1);
      }
    }
  }
  if (p.lse != nullptr && t == 0) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int row = r0 + 8 * hh;
      if (row < p.nq) {
        float lse = has_keys[hh] ? (m_run[hh] + log2f(l[hh]) - LOG2_P_SCALE) * 0.6931471805599453f : -INFINITY;
        if (k_mean != nullptr) lse += q.dot_kmean[hh] * p.sm_scale;
        p.lse[b * p.l_sb + h * p.l_sh + row] = lse;
      }
    }
  }
}

}  // namespace quantattn_hopper
