// One decoding step of SqrLLM on CUDA (sqrllm/decode.py's CudaGraphStep), float32 throughout:
// a token per row in, next-token logits out, each sqrll layer's state h (B, n_mem) updated in place.
//
// At batch 1 a step is a chain of small matrix-vector products, so what costs is the number of
// launches, not the bytes. Each block of the model is two launches here:
// - `dec_sqrll` / `dec_mlp`: the norm, the input projection and everything elementwise after it.
//   A warp owns one feature j: it computes the row's rstd itself (E floats, from L1/L2), the dot
//   products of the projection rows that feed feature j (four for sqrll: forget, input, input
//   gate, output gate; two for the MLP: value, gate), then the gates, h = r * h + u and
//   y = softsign(h) * og.
// - `dec_out`: x += out(y) + bias, a warp per output feature.
// plus `dec_embed` before the blocks and `dec_head` (final norm and head) after them: 2 + 2 * n_blocks
// launches, replayed from one CUDA graph.
//
// Weights are (out, in) row-major, so a warp reads each row contiguously; every RMSNorm's weight is
// folded into the columns of the matrix after it (sqrllm/decode.py). Needs no CUDA header.
//
// `dec_draw` samples inside the graph: row b takes argmax_v p[b, v] / E[b, v] with E ~ Exp(1),
// token v with probability p[b, v] (the first of independent exponential clocks to ring). E comes
// from a counter-based hash of (seed, draw counter, b, v), both read from device memory so that a
// replayed graph draws anew each time (the counter is bumped after each draw).

#define WARPS 8  // warps per block; sqrllm/cuda_layers.py's DEC_WARPS

typedef unsigned long long u64;

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + expf(-z)); }

// 1 / sqrt(mean(x^2) + eps) of a row of E floats, in every lane
__device__ __forceinline__ float row_rstd(const float* x, int E, float eps, int lane) {
    float s = 0.f;
    for (int k = lane; k < E; k += 32) s += x[k] * x[k];
    return rsqrtf(warp_sum(s) / E + eps);
}

// the dot products of NR weight rows (stride `gap` apart) with x, n long, summed in every lane
template <int NR>
__device__ __forceinline__ void dots(const float* __restrict__ w, long long gap, const float* __restrict__ x,
                                     int n, int lane, float* acc) {
#pragma unroll
    for (int i = 0; i < NR; i++) acc[i] = 0.f;
    if ((n & 3) == 0) {  // 16-byte loads: rows start 16-byte aligned when n is a multiple of 4
        const float4* x4 = (const float4*)x;
        for (int k = lane; k < n / 4; k += 32) {
            float4 xv = x4[k];
#pragma unroll
            for (int i = 0; i < NR; i++) {
                float4 wv = ((const float4*)(w + i * gap))[k];
                acc[i] += wv.x * xv.x + wv.y * xv.y + wv.z * xv.z + wv.w * xv.w;
            }
        }
    } else {
        for (int k = lane; k < n; k += 32) {
            float xv = x[k];
#pragma unroll
            for (int i = 0; i < NR; i++) acc[i] += w[i * gap + k] * xv;
        }
    }
#pragma unroll
    for (int i = 0; i < NR; i++) acc[i] = warp_sum(acc[i]);
}

// x[b] = wte[ids[b]]: grid (B), block 256
extern "C" __global__ void dec_embed(const long long* __restrict__ ids, const float* __restrict__ wte,
                                     float* __restrict__ x, int E) {
    const int b = blockIdx.x;
    const float* row = wte + ids[b] * (long long)E;
    for (int k = threadIdx.x; k < E; k += blockDim.x) x[(long long)b * E + k] = row[k];
}

// one sqrll layer up to its output projection. w: (4 M, E) rows [forget, input, input gate,
// output gate], bias (4 M); h, y: (B, M). grid (ceil(M / WARPS), B)
extern "C" __global__ void dec_sqrll(const float* __restrict__ x, const float* __restrict__ w,
                                     const float* __restrict__ bias, float* __restrict__ h,
                                     float* __restrict__ y, int E, int M, float eps) {
    const int lane = threadIdx.x & 31, j = blockIdx.x * WARPS + (threadIdx.x >> 5), b = blockIdx.y;
    if (j >= M) return;
    const float* xb = x + (long long)b * E;
    const float rs = row_rstd(xb, E, eps, lane);
    float z[4];
    dots<4>(w + (long long)j * E, (long long)M * E, xb, E, lane, z);
    if (lane == 0) {
        const long long o = (long long)b * M + j;
        const float r = sigmoid(rs * z[0] + bias[j]);
        const float u = (rs * z[1] + bias[M + j]) * sigmoid(rs * z[2] + bias[2 * M + j]);
        const float og = sigmoid(rs * z[3] + bias[3 * M + j]);
        const float hv = r * h[o] + u;
        h[o] = hv;
        y[o] = og * hv / (1.f + fabsf(hv));
    }
}

// a gated MLP up to its output projection. w: (2 F, E) rows [value, gate], bias (2 F); y: (B, F).
// grid (ceil(F / WARPS), B)
extern "C" __global__ void dec_mlp(const float* __restrict__ x, const float* __restrict__ w,
                                   const float* __restrict__ bias, float* __restrict__ y, int E, int F,
                                   float eps) {
    const int lane = threadIdx.x & 31, j = blockIdx.x * WARPS + (threadIdx.x >> 5), b = blockIdx.y;
    if (j >= F) return;
    const float* xb = x + (long long)b * E;
    const float rs = row_rstd(xb, E, eps, lane);
    float z[2];
    dots<2>(w + (long long)j * E, (long long)F * E, xb, E, lane, z);
    if (lane == 0) y[(long long)b * F + j] = (rs * z[0] + bias[j]) * sigmoid(rs * z[1] + bias[F + j]);
}

// x += y @ w.T + bias, the residual add of a block. w: (E, K); y: (B, K); x: (B, E).
// grid (ceil(E / WARPS), B)
extern "C" __global__ void dec_out(const float* __restrict__ y, const float* __restrict__ w,
                                   const float* __restrict__ bias, float* __restrict__ x, int K, int E) {
    const int lane = threadIdx.x & 31, i = blockIdx.x * WARPS + (threadIdx.x >> 5), b = blockIdx.y;
    if (i >= E) return;
    float s[1];
    dots<1>(w + (long long)i * K, 0, y + (long long)b * K, K, lane, s);
    if (lane == 0) x[(long long)b * E + i] += s[0] + bias[i];
}

// logits = rstd(x) * (x @ w.T), the final norm (its weight folded into w) and the head. w: (V, E).
// grid (ceil(V / WARPS), B)
extern "C" __global__ void dec_head(const float* __restrict__ x, const float* __restrict__ w,
                                    float* __restrict__ logits, int E, int V, float eps) {
    const int lane = threadIdx.x & 31, v = blockIdx.x * WARPS + (threadIdx.x >> 5), b = blockIdx.y;
    if (v >= V) return;
    const float* xb = x + (long long)b * E;
    const float rs = row_rstd(xb, E, eps, lane);
    float s[1];
    dots<1>(w + (long long)v * E, 0, xb, E, lane, s);
    if (lane == 0) logits[(long long)b * V + v] = rs * s[0];
}

__device__ __forceinline__ u64 mix64(u64 z) {  // splitmix64's finalizer
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// ids[b] = argmax_v probs[b, v] / E, E ~ Exp(1) from (rng[0] = seed, rng[1] = draw counter, b, v);
// ties go to the lower index. probs: (B, V). grid (B), block 256
extern "C" __global__ void dec_draw(const float* __restrict__ probs, const u64* __restrict__ rng,
                                    long long* __restrict__ ids, int V) {
    __shared__ float best_s[256];
    __shared__ int best_v[256];
    const int b = blockIdx.x, t = threadIdx.x;
    const u64 key = mix64(rng[0] ^ mix64(rng[1]));
    float best = -1.f;
    int arg = 0;
    for (int v = t; v < V; v += blockDim.x) {
        const u64 z = mix64(key + (u64)b * (u64)V + (u64)v);
        const float u = ((float)(z >> 41) + 0.5f) * 1.1920929e-7f;  // in (0, 1): 23 random bits, exact
        const float score = probs[(long long)b * V + v] / -logf(u);
        if (score > best) best = score, arg = v;
    }
    best_s[t] = best, best_v[t] = arg;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half) {
            const float s = best_s[t + half];
            const int v = best_v[t + half];
            if (s > best_s[t] || (s == best_s[t] && v < best_v[t])) best_s[t] = s, best_v[t] = v;
        }
        __syncthreads();
    }
    if (t == 0) ids[b] = best_v[0];
}
