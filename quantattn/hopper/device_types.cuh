// What the kernels need from the C and CUDA headers, defined here: NVRTC, which compiles them at run time
// (quantattn/hopper/compiler.py), ships no C library headers and, on a machine with only torch's wheels,
// no cuda_fp16.h / cuda_bf16.h / cuda.h either.
#pragma once

#ifdef __CUDACC_RTC__
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#define INFINITY __int_as_float(0x7F800000)
#define NAN __int_as_float(0x7FFFFFFF)
#else
#include <math.h>
#include <stdint.h>
#endif

namespace quantattn_hopper {

// 16-bit inputs and outputs, storage only: the kernels compute in float.
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

__device__ __forceinline__ float to_f32(bf16 x) { return __uint_as_float(uint32_t(x.bits) << 16); }
__device__ __forceinline__ float to_f32(f16 x) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
  return f;
}

// The two elements of a 32-bit word (lo in the low half) as floats: one instruction each.
__device__ __forceinline__ void to_f32x2(bf16, uint32_t w, float& lo, float& hi) {
  lo = __uint_as_float(w << 16);
  hi = __uint_as_float(w & 0xFFFF0000u);
}
__device__ __forceinline__ void to_f32x2(f16, uint32_t w, float& lo, float& hi) {
  asm("{.reg .f16 l, h;\n mov.b32 {l, h}, %2;\n cvt.f32.f16 %0, l;\n cvt.f32.f16 %1, h;}" : "=f"(lo), "=f"(hi) : "r"(w));
}

// |x| of 16-bit floats orders as their bits with the sign cleared (infinity and NaN above every finite
// value): the running maximum of two elements' magnitudes per 16-bit half, one LOP3 and half a VIMNMX3.
__device__ __forceinline__ uint32_t max_abs_bits2(uint32_t m, uint32_t w) {
  asm("max.u16x2 %0, %0, %1;" : "+r"(m) : "r"(w & 0x7FFF7FFFu));
  return m;
}
// The smallest magnitude bits that are not finite, and magnitude bits as a float.
__device__ __forceinline__ uint32_t inf_bits(bf16) { return 0x7F80u; }
__device__ __forceinline__ uint32_t inf_bits(f16) { return 0x7C00u; }
__device__ __forceinline__ float bits_to_f32(bf16, uint32_t m) { return __uint_as_float(m << 16); }
__device__ __forceinline__ float bits_to_f32(f16, uint32_t m) { return to_f32(f16{uint16_t(m)}); }

// Two floats rounded to nearest even into one 32-bit word of two T, lo in the low half. SATFINITE: finite
// values beyond T's range become its largest finite value (so does an infinity; NaN stays NaN).
template <bool SATFINITE>
__device__ __forceinline__ uint32_t cvt_pack2(bf16, float lo, float hi) {
  uint32_t r;
  if constexpr (SATFINITE) asm("cvt.rn.satfinite.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  else asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
template <bool SATFINITE>
__device__ __forceinline__ uint32_t cvt_pack2(f16, float lo, float hi) {
  uint32_t r;
  if constexpr (SATFINITE) asm("cvt.rn.satfinite.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) { return cvt_pack2<false>(T{}, lo, hi); }
template <typename T>
__device__ __forceinline__ uint32_t pack2_satfinite(float lo, float hi) { return cvt_pack2<true>(T{}, lo, hi); }

// The largest finite value of T.
template <typename T>
constexpr float max_finite();
template <>
constexpr float max_finite<bf16>() {
  return 3.3895313892515355e38f;
}
template <>
constexpr float max_finite<f16>() {
  return 65504.0f;
}

// A compile-time int as a type (std::integral_constant, which NVRTC cannot include).
template <int V>
struct Int {
  static constexpr int value = V;
};

// CUtensorMap's storage: 128 opaque bytes, 64-byte aligned, encoded on the host by
// cuTensorMapEncodeTiled (quantattn/hopper/driver.py) and passed in a __grid_constant__ parameter.
struct alignas(64) TensorMap {
  uint64_t opaque[16];
};

}  // namespace quantattn_hopper
