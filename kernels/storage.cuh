// Storage types of the CUDA kernels (float, half, bfloat16 as 16-bit patterns) and their
// conversions to and from float32, in which all arithmetic is done. sqrllm/cuda.py puts this in
// front of each kernel source; it needs no CUDA header.

struct bf16_t { unsigned short u; };
struct f16_t { unsigned short u; };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16_t v) { return __uint_as_float((unsigned)v.u << 16); }
__device__ __forceinline__ float to_f32(f16_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.u));
    return f;
}

template <typename S> __device__ __forceinline__ S from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float v) {
    bf16_t o;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(o.u) : "f"(v));
    return o;
}
template <> __device__ __forceinline__ f16_t from_f32<f16_t>(float v) {
    f16_t o;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(o.u) : "f"(v));
    return o;
}
