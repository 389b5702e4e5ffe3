// The elementwise work of a sqrll layer around its scan, forward and backward (sqrllm/core.py):
//
//     p = [f | a | g | o]  (N rows of 4C: the layer's one projection, N = B * T)
//     r = sigmoid(f) (0 on reset rows), x = a * sigmoid(g)      -> the scan's inputs
//     (r, x) = (1, 0) at zoned elements off reset rows           (zoneout: the memory keeps its value)
//     z = softsign(y) * sigmoid(o)                                -> the output projection's input
//
// Each of the four kernels reads p's column slices in place (no copies of the strided views) and
// the backward kernels write the gradient of p slice by slice, so it needs no concatenation.
// Storage float, half or bfloat16 (storage.cuh, put in front of this file); arithmetic float32;
// 64-bit indices.

__device__ __forceinline__ float sigm(float v) { return 1.f / (1.f + expf(-v)); }

// A block walks rows (grid-stride), its threads the row's features: consecutive threads touch
// consecutive features, and no index is divided. i: the (row, c) element of an (n, C) tensor,
// at: its f column in p (the slices follow C, 2C and 3C further on).
#define CORE_LOOP                                                                    \
    for (long long row = blockIdx.x; row < n; row += gridDim.x)                      \
        for (long long c = threadIdx.x, i = row * C + c, at = row * 4 * C + c; c < C; \
             c += blockDim.x, i += blockDim.x, at += blockDim.x)

// reset: one byte a row, or null; zone: one byte an (n, C) element, or null
template <typename S>
__device__ void gates_fwd(const S* p, const unsigned char* reset, const unsigned char* zone, S* x, S* r, long long n,
                          long long C) {
    CORE_LOOP {
        const bool cut = reset != nullptr && reset[row];
        const bool keep = !cut && zone != nullptr && zone[i];
        r[i] = from_f32<S>(cut ? 0.f : keep ? 1.f : sigm(to_f32(p[at])));
        x[i] = from_f32<S>(keep ? 0.f : to_f32(p[at + C]) * sigm(to_f32(p[at + 2 * C])));
    }
}

template <typename S>
__device__ void out_fwd(const S* y, const S* p, S* z, long long n, long long C) {
    CORE_LOOP {
        const float v = to_f32(y[i]);
        z[i] = from_f32<S>(v / (1.f + fabsf(v)) * sigm(to_f32(p[at + 3 * C])));
    }
}

// dy = dz * sigmoid(o) / (1 + |y|)^2; do = dz * softsign(y) * s' (s = sigmoid(o), s' = s (1 - s))
template <typename S>
__device__ void out_bwd(const S* dz, const S* y, const S* p, S* dy, S* dp, long long n, long long C) {
    CORE_LOOP {
        const float v = to_f32(y[i]), d = to_f32(dz[i]), s = sigm(to_f32(p[at + 3 * C]));
        const float q = 1.f / (1.f + fabsf(v));
        dy[i] = from_f32<S>(d * s * q * q);
        dp[at + 3 * C] = from_f32<S>(d * v * q * s * (1.f - s));
    }
}

// df = dr * r (1 - r) (0 on reset rows); da = dx * sigmoid(g); dg = dx * a * s' (s = sigmoid(g)); all three 0
// where zoned (r and x were constants there)
template <typename S>
__device__ void gates_bwd(const S* dx, const S* dr, const S* p, const unsigned char* reset, const unsigned char* zone,
                          S* dp, long long n, long long C) {
    CORE_LOOP {
        const bool cut = reset != nullptr && reset[row];
        const bool keep = !cut && zone != nullptr && zone[i];
        const float rr = sigm(to_f32(p[at])), s = sigm(to_f32(p[at + 2 * C])), d = keep ? 0.f : to_f32(dx[i]);
        dp[at] = from_f32<S>(cut || keep ? 0.f : to_f32(dr[i]) * rr * (1.f - rr));
        dp[at + C] = from_f32<S>(d * s);
        dp[at + 2 * C] = from_f32<S>(d * to_f32(p[at + C]) * s * (1.f - s));
    }
}

#define SQRLL_CORE(S)                                                                                     \
    extern "C" __global__ void core_gates_fwd_##S(const S* p, const unsigned char* reset,                 \
                                                  const unsigned char* zone, S* x, S* r, long long n,     \
                                                  long long C) {                                          \
        gates_fwd<S>(p, reset, zone, x, r, n, C);                                                         \
    }                                                                                                     \
    extern "C" __global__ void core_out_fwd_##S(const S* y, const S* p, S* z, long long n, long long C) { \
        out_fwd<S>(y, p, z, n, C);                                                                        \
    }                                                                                                     \
    extern "C" __global__ void core_out_bwd_##S(const S* dz, const S* y, const S* p, S* dy, S* dp,        \
                                                long long n, long long C) {                               \
        out_bwd<S>(dz, y, p, dy, dp, n, C);                                                               \
    }                                                                                                     \
    extern "C" __global__ void core_gates_bwd_##S(const S* dx, const S* dr, const S* p,                   \
                                                  const unsigned char* reset, const unsigned char* zone,  \
                                                  S* dp, long long n, long long C) {                      \
        gates_bwd<S>(dx, dr, p, reset, zone, dp, n, C);                                                   \
    }

SQRLL_CORE(float)
SQRLL_CORE(f16_t)
SQRLL_CORE(bf16_t)
