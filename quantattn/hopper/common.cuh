// Device helpers and constants shared by the attention kernel (attention.cu) and the K/V preprocessing
// (preprocess.cu): what both compute must round the same way.
#pragma once
#include "device_types.cuh"

namespace quantattn_hopper {

constexpr float QMAX = 127.0f;       // INT8 range of Q and K
constexpr float V_RANGE = 448.0f;    // E4M3's largest finite value: V's per-channel scale maps amax to it
constexpr float AMAX_FLOOR = 1e-30f;  // all-zero rows and channels get a finite scale

// Two floats -> two E4M3 bytes (round to nearest even, saturating, NaN kept), lo in the low byte.
__device__ __forceinline__ uint32_t e4m3x2(float lo, float hi) {
  uint16_t r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
}

// The low bytes of a, b, c, d as one word (a in the low byte): three byte permutes.
__device__ __forceinline__ uint32_t pack_s8x4(int a, int b, int c, int d) {
  uint32_t ab, cd, r;
  asm("prmt.b32 %0, %1, %2, 0x0040;" : "=r"(ab) : "r"(a), "r"(b));
  asm("prmt.b32 %0, %1, %2, 0x0040;" : "=r"(cd) : "r"(c), "r"(d));
  asm("prmt.b32 %0, %1, %2, 0x5410;" : "=r"(r) : "r"(ab), "r"(cd));
  return r;
}

// Eight 16-bit elements (one 16-byte load) as floats.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&x)[8]) {
  to_f32x2(T{}, raw.x, x[0], x[1]);
  to_f32x2(T{}, raw.y, x[2], x[3]);
  to_f32x2(T{}, raw.z, x[4], x[5]);
  to_f32x2(T{}, raw.w, x[6], x[7]);
}

__device__ __forceinline__ bool is_finite(float x) { return fabsf(x) < INFINITY; }

// Programmatic dependent launch: a kernel launched with it (driver.launch_after_prior_grid) may start
// while the kernel before it in the stream still runs, once every CTA of that one has allowed it or
// ended. The wait returns when that kernel has ended and its writes are visible (at once for a kernel
// launched without it).
__device__ __forceinline__ void allow_dependent_grid() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void wait_for_prior_grid() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

}  // namespace quantattn_hopper
