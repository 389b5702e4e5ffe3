// A QRNN layer after its matrix multiply, forward and backward, for sqrllm/qrnn.py on CUDA:
//
//     z = tanh(gz), f = s * sigmoid(gf), o = sigmoid(go)
//     c[t] = f[t] * z[t] + (1 - f[t]) * c[t-1]        (c[-1] = c0, or 0)
//     h[t] = o[t] * c[t]                               (h = c without the output gate)
//
// This is the sqrll recurrence y[t] = r[t] * y[t-1] + x[t] with x = f * z and r = 1 - f, run with
// the gate activations and the output gate fused around it: a layer is then its matrix multiply
// and one launch (eight without fusing: activations, f * z, 1 - f, the scan, o * c, ...), which
// is what decides its speed at the batch sizes and lengths the QRNN benchmark covers. One thread
// per (b, j) walks time, reading QU steps of gates at once so that their loads overlap; its
// pointers advance by a step's stride rather than being recomputed from t (with every pair's
// thread resident, a few warps per scheduler hide little latency, so the instruction count shows:
// 64-bit index math was about half of the walk's instructions), and only the last, partial round
// of steps checks bounds. The general scan (sqrll.cu) is what
// splits time across blocks, and sqrllm/qrnn.py sends the shapes that need that (few sequences,
// very long) to it.
//
// g: the pre-activations [gz | gf | go] of every (t, b), G * H wide (G = 3, or 2 without the output
// gate), element (t, b, k * H + j) at g[t * gt + b * gb + k * H + j], before the bias: bias (G * H,
// float32, or null) is added here, so that the matrix multiply runs without cuBLAS's bias epilogue
// and the backward sums the bias gradient as it walks (dbias: one float32 row of G * H partial sums
// per (segment, b), rows segment * B + b; the caller adds the rows); h and dh: (t, b, j) at
// t * ht + b * hb + j; c0, c_last, dc_last, dc0: (B, H). s scales the forget gate (1 - zoneout in
// eval). reverse: time runs from T - 1 down to 0. Storage S is float, f16_t or bf16_t
// (kernels/storage.cuh); arithmetic is float32, and the c kept for the backward is float32.
//
// Backward, walking the direction of travel backwards with dc the gradient reaching c[t] from
// later steps (at the end, from c_last): dc_t = dc + dh[t] * o, dgo = dh[t] * c[t] * o (1 - o),
// dgz = dc_t * f * (1 - z^2), dgf = dc_t * (z - c[t-1]) * s * sf (1 - sf) with sf = sigmoid(gf),
// then dc = dc_t * (1 - f); dc0 is the last dc.

#ifndef QNT
#define QNT 128  // threads per block; sqrllm/cuda_layers.py's QRNN_THREADS
#endif
// Time steps whose loads are issued at once, forward and backward (which holds six values a step).
// Each can be set at compile time (scripts/qrnn_variants.py compares settings).
#ifndef QU
#define QU 8
#endif
#ifndef QU_BWD
#define QU_BWD 8
#endif

__device__ __forceinline__ float sigmoidf_(float v) { return 1.f / (1.f + expf(-v)); }

struct Bias {  // one (b, j) pair's three bias values
    float z, f, o;
    __device__ Bias(const float* bias, long long H, long long j, int G)
        : z(bias ? bias[j] : 0.f), f(bias ? bias[H + j] : 0.f), o(bias && G == 3 ? bias[2 * H + j] : 0.f) {}
};

// One step's three gate pre-activations at q: gz at q[0], gf at q[H], go at q[2H] (0 when G = 2).
template <typename S>
__device__ __forceinline__ void load_gates(const S* q, long long H, int G, float& gz, float& gf, float& go) {
    gz = to_f32(q[0]);
    gf = to_f32(q[H]);
    go = G == 3 ? to_f32(q[2 * H]) : 0.f;
}

// One pair's walk forward over n steps from state c; returns the last c. q: the first step's gates
// (gz at q[0], gf at q[H], go at q[2H]); hp, cp: its h and c (cp may be null); a step moves q by dq
// and hp, cp by dh (negative in reverse). U steps are loaded at once; FULL rounds skip the checks.
template <typename S, int U, bool FULL>
__device__ __forceinline__ float fwd_round(const S*& q, S*& hp, float*& cp, long long dq, long long dh, int n,
                                           long long H, int G, float s, const Bias& bi, float c) {
    float gz[U], gf[U], go[U];
#pragma unroll
    for (int u = 0; u < U; u++) {
        if (FULL || u < n) {
            load_gates(q, H, G, gz[u], gf[u], go[u]);
            q += dq;
        }
    }
#pragma unroll
    for (int u = 0; u < U; u++) {
        if (FULL || u < n) {
            const float f = s * sigmoidf_(gf[u] + bi.f);
            c = f * tanhf(gz[u] + bi.z) + (1.f - f) * c;
            *hp = from_f32<S>(G == 3 ? sigmoidf_(go[u] + bi.o) * c : c);
            hp += dh;
            if (cp) {
                *cp = c;
                cp += dh;
            }
        }
    }
    return c;
}

template <typename S, int U>
__device__ __forceinline__ float walk_fwd(const S* q, S* hp, float* cp, long long dq, long long dh, long long n,
                                          long long H, int G, float s, const Bias& bi, float c) {
    long long k = 0;
    for (; k + U <= n; k += U) c = fwd_round<S, U, true>(q, hp, cp, dq, dh, U, H, G, s, bi, c);
    if (k < n) c = fwd_round<S, U, false>(q, hp, cp, dq, dh, (int)(n - k), H, G, s, bi, c);
    return c;
}

// One pair's walk backward over n steps, from the last step of the stretch towards its first, with dc
// reaching the last step; returns dc leaving the first. q, dgq: the last step's gates and their
// gradients; cp, dhp: its c (float32) and dh; a step back moves q, dgq by -dq and cp, dhp by -dh.
// c_prev_first: c before the stretch's first step (c0, or the c_all element before it). The bias
// gradient accumulates into sz, sf, so.
template <typename S, int U, bool FULL>
__device__ __forceinline__ float bwd_round(const S*& q, S*& dgq, const float*& cp, const S*& dhp, long long dq,
                                           long long dh, int n, bool has_first, float c_prev_first, long long H,
                                           int G, float s, const Bias& bi, float dc, float& sz, float& sf_,
                                           float& so) {
    float gz[U], gf[U], go[U], ct[U], cq[U], dht[U];
#pragma unroll
    for (int u = 0; u < U; u++) {
        if (FULL || u < n) {
            load_gates(q, H, G, gz[u], gf[u], go[u]);
            ct[u] = cp[0];
            // the stretch's first step (the last of a partial round) takes c_prev_first
            cq[u] = (!FULL && has_first && u == n - 1) ? c_prev_first : cp[-dh];
            dht[u] = to_f32(dhp[0]);
            q -= dq;
            cp -= dh;
            dhp -= dh;
        }
    }
#pragma unroll
    for (int u = 0; u < U; u++) {
        if (FULL || u < n) {
            const float z = tanhf(gz[u] + bi.z), sig = sigmoidf_(gf[u] + bi.f), f = s * sig;
            const float o = G == 3 ? sigmoidf_(go[u] + bi.o) : 1.f;
            const float dct = dc + dht[u] * o;
            const float dgz = dct * f * (1.f - z * z), dgf = dct * (z - cq[u]) * s * sig * (1.f - sig);
            const float dgo = G == 3 ? dht[u] * ct[u] * o * (1.f - o) : 0.f;
            dgq[0] = from_f32<S>(dgz);
            dgq[H] = from_f32<S>(dgf);
            if (G == 3) dgq[2 * H] = from_f32<S>(dgo);
            dgq -= dq;
            sz += dgz, sf_ += dgf, so += dgo;
            dc = dct * (1.f - f);
        }
    }
    return dc;
}

template <typename S, int U>
__device__ __forceinline__ float walk_bwd(const S* q, S* dgq, const float* cp, const S* dhp, long long dq,
                                          long long dh, long long n, bool has_first, float c_prev_first,
                                          long long H, int G, float s, const Bias& bi, float dc, float& sz,
                                          float& sf_, float& so) {
    // Rounds of U steps from the end; the first step is in the last round, which is partial unless
    // n is a multiple of U: then the last full round is taken as a partial one, so that it reads
    // c_prev_first instead of the element before the stretch.
    long long k = 0;
    for (; k + U < n || (k + U == n && !has_first); k += U)
        dc = bwd_round<S, U, true>(q, dgq, cp, dhp, dq, dh, U, has_first, c_prev_first, H, G, s, bi, dc, sz, sf_,
                                   so);
    if (k < n)
        dc = bwd_round<S, U, false>(q, dgq, cp, dhp, dq, dh, (int)(n - k), has_first, c_prev_first, H, G, s, bi,
                                    dc, sz, sf_, so);
    return dc;
}

__device__ __forceinline__ void store_dbias(float* p, long long H, int G, float sz, float sf, float so) {
    p[0] = sz;
    p[H] = sf;
    if (G == 3) p[2 * H] = so;
}

template <typename S>
__device__ __forceinline__ void qrnn_fwd(const S* __restrict__ g, const float* __restrict__ bias,
                                         const S* __restrict__ c0, S* __restrict__ h, float* __restrict__ c_all,
                                         S* __restrict__ c_last, long long T, long long B, long long H, long long gt,
                                         long long gb, long long ht, long long hb, int G, int reverse, float s) {
    const long long i = blockIdx.x * (long long)QNT + threadIdx.x;  // b * H + j
    if (i >= B * H) return;
    const long long b = i / H, j = i - b * H;
    const long long t0 = reverse ? T - 1 : 0, dq = reverse ? -gt : gt, dh = reverse ? -ht : ht;
    const long long ho = t0 * ht + b * hb + j;
    const float c = walk_fwd<S, QU>(g + t0 * gt + b * gb + j, h + ho, c_all ? c_all + ho : nullptr, dq, dh, T, H,
                                    G, s, Bias(bias, H, j, G), c0 ? to_f32(c0[i]) : 0.f);
    if (c_last) c_last[i] = from_f32<S>(c);
}

template <typename S>
__device__ __forceinline__ void qrnn_bwd(const S* __restrict__ g, const float* __restrict__ bias,
                                         const float* __restrict__ c_all, const S* __restrict__ c0,
                                         const S* __restrict__ dh_, const S* __restrict__ dc_last,
                                         S* __restrict__ dg, S* __restrict__ dc0, float* __restrict__ dbias,
                                         long long T, long long B, long long H, long long gt, long long gb,
                                         long long ht, long long hb, int G, int reverse, float s) {
    const long long i = blockIdx.x * (long long)QNT + threadIdx.x;
    if (i >= B * H) return;
    const long long b = i / H, j = i - b * H;
    const long long t1 = reverse ? 0 : T - 1, dq = reverse ? -gt : gt, dh = reverse ? -ht : ht;  // t1: last step
    const long long go_ = t1 * gt + b * gb + j, ho = t1 * ht + b * hb + j;
    float sz = 0.f, sf_ = 0.f, so = 0.f;  // this pair's bias gradient
    const float dc = walk_bwd<S, QU_BWD>(g + go_, dg + go_, c_all + ho, dh_ + ho, dq, dh, T, true,
                                         c0 ? to_f32(c0[i]) : 0.f, H, G, s, Bias(bias, H, j, G),
                                         dc_last ? to_f32(dc_last[i]) : 0.f, sz, sf_, so);
    if (dc0) dc0[i] = from_f32<S>(dc);
    if (dbias) store_dbias(dbias + b * G * H + j, H, G, sz, sf_, so);
}

// Few (b, j) pairs (small batches): one thread per pair leaves most of the GPU idle and walks T
// alone. The segmented variant gives each pair nseg threads, each owning a segment of about
// T / nseg steps: a block is 32 pairs (x) by nseg segments (y), so that a warp reads 32 adjacent
// features of one step. Pass 1: each thread's segment as an affine map of the state entering it;
// the maps meet in shared memory, each thread folding the segments before its own (in a fixed
// order: bitwise reproducible); pass 2 replays the segment from that state, as the kernels above.
#ifndef QMAX_SEG
#define QMAX_SEG 16  // sqrllm/cuda_layers.py's QRNN_MAX_SEG
#endif
#ifndef QSEG_U
#define QSEG_U 8  // steps loaded at once here: up to 512 threads a block leave 128 registers each
#endif

template <typename S>
__device__ __forceinline__ void qrnn_fwd_seg(const S* __restrict__ g, const float* __restrict__ bias,
                                             const S* __restrict__ c0, S* __restrict__ h, float* __restrict__ c_all,
                                             S* __restrict__ c_last, long long T, long long B, long long H,
                                             long long gt, long long gb, long long ht, long long hb, int G,
                                             int reverse, float s) {
    __shared__ float sA[QMAX_SEG][32], sB[QMAX_SEG][32];
    const int x = threadIdx.x, y = threadIdx.y, nseg = blockDim.y;
    const long long i = blockIdx.x * 32LL + x;  // b * H + j
    const bool ok = i < B * H;
    const long long b = ok ? i / H : 0, j = ok ? i - b * H : 0;
    const long long len = (T + nseg - 1) / nseg, p_begin = min(T, y * len), p_end = min(T, p_begin + len);
    const long long t0 = reverse ? T - 1 - p_begin : p_begin, dq = reverse ? -gt : gt, dh = reverse ? -ht : ht;
    const S* q0 = g + t0 * gt + b * gb + j;  // the segment's first step
    const Bias bi(ok ? bias : nullptr, H, j, G);

    // pass 1: c leaving the segment = A * c entering it + m
    float A = 1.f, m = 0.f;
    if (ok) {
        const S* q = q0;
        for (long long p0 = p_begin; p0 < p_end; p0 += QSEG_U) {
            float gz[QSEG_U], gf[QSEG_U];
#pragma unroll
            for (int u = 0; u < QSEG_U; u++) {
                if (p0 + u < p_end) {
                    gz[u] = to_f32(q[0]);
                    gf[u] = to_f32(q[H]);
                    q += dq;
                }
            }
#pragma unroll
            for (int u = 0; u < QSEG_U; u++) {
                if (p0 + u < p_end) {
                    const float f = s * sigmoidf_(gf[u] + bi.f);
                    m = f * tanhf(gz[u] + bi.z) + (1.f - f) * m;
                    A *= 1.f - f;
                }
            }
        }
    }
    sA[y][x] = A;
    sB[y][x] = m;
    __syncthreads();
    float c = ok && c0 ? to_f32(c0[i]) : 0.f;
    for (int k = 0; k < y; k++) c = fmaf(sA[k][x], c, sB[k][x]);

    // pass 2: replay from the state entering the segment
    if (!ok) return;
    const long long ho = t0 * ht + b * hb + j;
    c = walk_fwd<S, QSEG_U>(q0, h + ho, c_all ? c_all + ho : nullptr, dq, dh, p_end - p_begin, H, G, s, bi, c);
    if (c_last && y == nseg - 1) c_last[i] = from_f32<S>(c);
}

template <typename S>
__device__ __forceinline__ void qrnn_bwd_seg(const S* __restrict__ g, const float* __restrict__ bias,
                                             const float* __restrict__ c_all, const S* __restrict__ c0,
                                             const S* __restrict__ dh_, const S* __restrict__ dc_last,
                                             S* __restrict__ dg, S* __restrict__ dc0, float* __restrict__ dbias,
                                             long long T, long long B, long long H, long long gt, long long gb,
                                             long long ht, long long hb, int G, int reverse, float s) {
    __shared__ float sA[QMAX_SEG][32], sB[QMAX_SEG][32];
    const int x = threadIdx.x, y = threadIdx.y, nseg = blockDim.y;
    const long long i = blockIdx.x * 32LL + x;
    const bool ok = i < B * H;
    const long long b = ok ? i / H : 0, j = ok ? i - b * H : 0;
    const long long len = (T + nseg - 1) / nseg, p_begin = min(T, y * len), p_end = min(T, p_begin + len);
    // t1: the segment's last step (an empty segment's pointers are never read)
    const long long t1 = reverse ? T - p_end : p_end - 1, dq = reverse ? -gt : gt, dh = reverse ? -ht : ht;
    const long long go_ = t1 * gt + b * gb + j, ho = t1 * ht + b * hb + j;
    const Bias bi(ok ? bias : nullptr, H, j, G);

    // pass 1, walking the segment backwards: dc leaving it (towards earlier steps) = A * dc entering + m,
    // one step being dc -> (1 - f) * (dc + dh * o)
    float A = 1.f, m = 0.f;
    if (ok) {
        const S* q = g + go_;
        const S* dhp = dh_ + ho;
        for (long long p1 = p_end - 1; p1 >= p_begin; p1 -= QSEG_U) {
            float gf[QSEG_U], go[QSEG_U], dht[QSEG_U];
#pragma unroll
            for (int u = 0; u < QSEG_U; u++) {
                if (p1 - u >= p_begin) {
                    gf[u] = to_f32(q[H]);
                    go[u] = G == 3 ? to_f32(q[2 * H]) : 0.f;
                    dht[u] = to_f32(dhp[0]);
                    q -= dq;
                    dhp -= dh;
                }
            }
#pragma unroll
            for (int u = 0; u < QSEG_U; u++) {
                if (p1 - u >= p_begin) {
                    const float a = 1.f - s * sigmoidf_(gf[u] + bi.f);
                    const float o = G == 3 ? sigmoidf_(go[u] + bi.o) : 1.f;
                    m = a * (m + dht[u] * o);
                    A *= a;
                }
            }
        }
    }
    sA[y][x] = A;
    sB[y][x] = m;
    __syncthreads();
    float dc = ok && dc_last ? to_f32(dc_last[i]) : 0.f;
    for (int k = nseg - 1; k > y; k--) dc = fmaf(sA[k][x], dc, sB[k][x]);

    // pass 2: as qrnn_bwd over the segment, from the dc entering it
    if (!ok) return;
    float sz = 0.f, sf_ = 0.f, so = 0.f;  // this segment's share of the pair's bias gradient
    dc = walk_bwd<S, QSEG_U>(g + go_, dg + go_, c_all + ho, dh_ + ho, dq, dh, p_end - p_begin, p_begin == 0,
                             c0 ? to_f32(c0[i]) : 0.f, H, G, s, bi, dc, sz, sf_, so);
    if (dc0 && y == 0) dc0[i] = from_f32<S>(dc);
    if (dbias) store_dbias(dbias + (y * B + b) * G * H + j, H, G, sz, sf_, so);
}

#define QRNN_KERNELS(S)                                                                                          \
    extern "C" __global__ void __launch_bounds__(QNT) qrnn_fwd_##S(                                              \
        const S* g, const float* bias, const S* c0, S* h, float* c_all, S* c_last, long long T, long long B,     \
        long long H, long long gt, long long gb, long long ht, long long hb, int G, int reverse, float s) {      \
        qrnn_fwd<S>(g, bias, c0, h, c_all, c_last, T, B, H, gt, gb, ht, hb, G, reverse, s);                      \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(QNT) qrnn_bwd_##S(                                              \
        const S* g, const float* bias, const float* c_all, const S* c0, const S* dh, const S* dc_last, S* dg,    \
        S* dc0, float* dbias, long long T, long long B, long long H, long long gt, long long gb, long long ht,   \
        long long hb, int G, int reverse, float s) {                                                             \
        qrnn_bwd<S>(g, bias, c_all, c0, dh, dc_last, dg, dc0, dbias, T, B, H, gt, gb, ht, hb, G, reverse, s);    \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(32 * QMAX_SEG) qrnn_fwd_seg_##S(                                \
        const S* g, const float* bias, const S* c0, S* h, float* c_all, S* c_last, long long T, long long B,     \
        long long H, long long gt, long long gb, long long ht, long long hb, int G, int reverse, float s) {      \
        qrnn_fwd_seg<S>(g, bias, c0, h, c_all, c_last, T, B, H, gt, gb, ht, hb, G, reverse, s);                  \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(32 * QMAX_SEG) qrnn_bwd_seg_##S(                                \
        const S* g, const float* bias, const float* c_all, const S* c0, const S* dh, const S* dc_last, S* dg,    \
        S* dc0, float* dbias, long long T, long long B, long long H, long long gt, long long gb, long long ht,   \
        long long hb, int G, int reverse, float s) {                                                             \
        qrnn_bwd_seg<S>(g, bias, c_all, c0, dh, dc_last, dg, dc0, dbias,                                         \
            T, B, H, gt, gb, ht, hb, G, reverse, s);                                                             \
    }

QRNN_KERNELS(float)
QRNN_KERNELS(f16_t)
QRNN_KERNELS(bf16_t)
